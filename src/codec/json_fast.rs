//! The fast path of JSON record decoding: a parser for the plain form records take on
//! the wire (unescaped strings, integers, any JSON whitespace), which builds exactly the
//! record serde would and declines everything else. Declined input (escapes, `null`,
//! floats, unknown or duplicate keys, missing fields, trailing bytes, ...) goes to serde,
//! so results and error messages are serde's own. serde's generic, key-by-key path was
//! the largest cost of the JSON pipeline.

use std::borrow::Cow;

use crate::core::record::{Cell, CloseCause, Kind, Rat, Record, Usage};
use crate::vocab::purpose::Field;
use crate::vocab::time::Millis;

/// Where each field's `,"name":value` sits in a record's input line (the first field's
/// leading byte is the object's `{`); a field the record lacks has an empty range where
/// it would sit. Known only for input written as cdrguard writes JSON (see [`record`]).
pub(crate) type Layout = [(u32, u32); Field::COUNT];

/// The record in `b`, or `None` when the input is not in the plain form (it may still be
/// valid JSON: serde decides). With it, where its fields sit, when every byte of each
/// is what the copy writer writes for it: no whitespace, fields and the members of
/// `cell` and `usage` in record order, a canonical time (numbers, names and unescaped
/// strings have one form on this path).
pub(super) fn record(b: &[u8]) -> Option<(Record<'_>, Option<Layout>)> {
    // Invalid UTF-8 anywhere makes serde fail too; validated once here, every string is
    // then a slice of `s` without a check of its own.
    let s = std::str::from_utf8(b).ok()?;
    let mut p = Parser {
        s,
        at: 0,
        canonical: true,
    };
    let mut f = Fields::default();
    let mut seen = 0u32;
    let mut layout: Layout = [(0, 0); Field::COUNT];
    // Each key is first compared with the names of the next few fields in record order
    // (where records written by cdrguard or serde have them): one fixed-size comparison
    // each instead of a scan and a look-up.
    let mut next = 0;
    p.members(|p, start| {
        let field = match p.known_key(next) {
            Some(f) => f,
            None => {
                let key = p.string()?;
                p.eat(b':')?;
                record_field(key.as_bytes())?
            }
        };
        next = field as usize + 1;
        // serde refuses a key given twice.
        let bit = 1 << field as u32;
        if seen & bit != 0 {
            return None;
        }
        // A field after a later one is out of record order.
        if seen >> field as u32 != 0 {
            p.canonical = false;
        }
        seen |= bit;
        match field {
            Field::RecordId => f.record_id = Some(p.string()?),
            Field::Kind => f.kind = Some(kind(p.string()?)?),
            Field::Msisdn => f.msisdn = Some(p.string()?),
            Field::Imsi => f.imsi = Some(p.string()?),
            Field::Imei => f.imei = Some(p.string()?),
            Field::OtherParty => f.other_party = Some(p.string()?),
            Field::StartTime => {
                let t = p.string()?;
                f.start_time = Some(match Millis::parse_canonical(t.as_bytes()) {
                    Some(m) => m,
                    None => {
                        p.canonical = false;
                        Millis::parse(t).ok()?
                    }
                });
            }
            Field::DurationS => f.duration_s = Some(p.u32()?),
            Field::CloseCause => f.close_cause = Some(close_cause(p.string()?)?),
            Field::Cell => f.cell = Some(p.cell()?),
            Field::ServingPlmn => f.serving_plmn = Some(p.string()?),
            Field::ServiceCentre => f.service_centre = Some(p.string()?),
            Field::Apn => f.apn = Some(p.string()?),
            Field::ChargingId => f.charging_id = Some(p.u64()?),
            Field::Rat => f.rat = Some(rat(p.string()?)?),
            Field::UeIp => f.ue_ip = Some(p.string()?),
            Field::Usage => f.usage = Some(p.usage()?),
            Field::RecordingEntity => f.recording_entity = Some(p.string()?),
            Field::LocalSeqNo => f.local_seq_no = Some(p.u64()?),
        }
        layout[field as usize] = (start as u32, p.at as u32);
        Some(())
    })?;
    let layout = p.canonical.then(|| {
        // Absent fields sit, empty, where the previous field ends.
        let mut end = 0;
        for (i, span) in layout.iter_mut().enumerate() {
            if seen & (1 << i) != 0 {
                end = span.1;
            } else {
                *span = (end, end);
            }
        }
        layout
    });
    p.end()?;
    let record = Record {
        record_id: Cow::Borrowed(f.record_id?),
        kind: f.kind?,
        msisdn: Cow::Borrowed(f.msisdn?),
        imsi: Cow::Borrowed(f.imsi?),
        imei: f.imei.map(Cow::Borrowed),
        other_party: f.other_party.map(Cow::Borrowed),
        start_time: f.start_time?,
        duration_s: f.duration_s,
        close_cause: f.close_cause?,
        cell: f.cell,
        serving_plmn: Cow::Borrowed(f.serving_plmn?),
        service_centre: f.service_centre.map(Cow::Borrowed),
        apn: f.apn.map(Cow::Borrowed),
        charging_id: f.charging_id,
        rat: f.rat?,
        ue_ip: f.ue_ip.map(Cow::Borrowed),
        usage: f.usage,
        recording_entity: Cow::Borrowed(f.recording_entity?),
        local_seq_no: f.local_seq_no?,
    };
    Some((record, layout))
}

// Unit variants by their JSON names (a test holds them to each type's `id`): matched
// on literals, each comparison of a constant length, where a search over `ALL` compared
// with `memcmp` calls.

fn kind(s: &str) -> Option<Kind> {
    Some(match s {
        "moc" => Kind::Moc,
        "mtc" => Kind::Mtc,
        "sms_mo" => Kind::SmsMo,
        "sms_mt" => Kind::SmsMt,
        "data" => Kind::Data,
        _ => return None,
    })
}

fn close_cause(s: &str) -> Option<CloseCause> {
    Some(match s {
        "normal" => CloseCause::Normal,
        "abnormal" => CloseCause::Abnormal,
        "partial" => CloseCause::Partial,
        "volume_limit" => CloseCause::VolumeLimit,
        "time_limit" => CloseCause::TimeLimit,
        _ => return None,
    })
}

fn rat(s: &str) -> Option<Rat> {
    Some(match s {
        "gsm" => Rat::Gsm,
        "umts" => Rat::Umts,
        "lte" => Rat::Lte,
        "nr" => Rat::Nr,
        _ => return None,
    })
}

/// The record field a key names. By length first, so a key is compared with at most
/// four names, each comparison of a known length (no `memcmp` call).
pub(super) fn record_field(key: &[u8]) -> Option<Field> {
    Some(match key.len() {
        3 => match key {
            b"apn" => Field::Apn,
            b"rat" => Field::Rat,
            _ => return None,
        },
        4 => match key {
            b"kind" => Field::Kind,
            b"imsi" => Field::Imsi,
            b"imei" => Field::Imei,
            b"cell" => Field::Cell,
            _ => return None,
        },
        5 => match key {
            b"ue_ip" => Field::UeIp,
            b"usage" => Field::Usage,
            _ => return None,
        },
        6 if key == b"msisdn" => Field::Msisdn,
        9 if key == b"record_id" => Field::RecordId,
        10 => match key {
            b"start_time" => Field::StartTime,
            b"duration_s" => Field::DurationS,
            _ => return None,
        },
        11 => match key {
            b"other_party" => Field::OtherParty,
            b"close_cause" => Field::CloseCause,
            b"charging_id" => Field::ChargingId,
            _ => return None,
        },
        12 => match key {
            b"serving_plmn" => Field::ServingPlmn,
            b"local_seq_no" => Field::LocalSeqNo,
            _ => return None,
        },
        14 if key == b"service_centre" => Field::ServiceCentre,
        16 if key == b"recording_entity" => Field::RecordingEntity,
        _ => return None,
    })
}

/// The position of the first byte a JSON string cannot hold raw: a control character,
/// `"` or `\`. Eight bytes at a time (the has-less-than and has-zero-byte bit tricks: a
/// flagged byte above a real one may be spurious, the lowest one never is), the last
/// eight overlapping the rest.
pub(super) fn first_special(s: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * n as u64) & !x & HIGH;
    let zero = |x: u64| below(x, 1);
    let flags = |c: &[u8]| {
        let x = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        below(x, 0x20) | zero(x ^ (ONES * b'"' as u64)) | zero(x ^ (ONES * b'\\' as u64))
    };
    if s.len() < 8 {
        return s.iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\');
    }
    let mut chunks = s.chunks_exact(8);
    for (k, c) in (&mut chunks).enumerate() {
        let m = flags(c);
        if m != 0 {
            return Some(k * 8 + m.trailing_zeros() as usize / 8);
        }
    }
    if chunks.remainder().is_empty() {
        return None;
    }
    let m = flags(&s[s.len() - 8..]);
    (m != 0).then(|| s.len() - 8 + m.trailing_zeros() as usize / 8)
}

/// [`first_special`] for a string's rest of the line: sixteen bytes at a time, so a
/// value or key of up to 15 bytes (most of them) is found with one comparison. SSE2 is
/// part of every x86-64 processor; elsewhere the eight-byte version does it.
#[inline(always)]
fn first_special_in_line(s: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set_epi64x,
            _mm_set1_epi8,
        };
        let mut at = 0;
        while let Some(c) = s.get(at..at + 16) {
            let half =
                |h: &[u8]| i64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
            let (lo, hi) = (half(&c[..8]), half(&c[8..]));
            // SAFETY: these intrinsics only need SSE2, which every x86-64 processor has
            // (the target's baseline); they touch no memory.
            let m = unsafe {
                let v = _mm_set_epi64x(hi, lo);
                let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
                // Unsigned v <= 0x1F exactly when max(v, 0x1F) is 0x1F.
                let low = _mm_set1_epi8(0x1F);
                let control = _mm_cmpeq_epi8(_mm_max_epu8(v, low), low);
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control))
            };
            if m != 0 {
                return Some(at + m.trailing_zeros() as usize);
            }
            at += 16;
        }
        first_special(&s[at..]).map(|p| at + p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    first_special(s)
}

/// Whether `s` holds a byte a JSON string cannot hold raw (see [`first_special`]). A
/// value of up to 16 bytes, as most record values are, is checked as two overlapping
/// words without a loop or a call.
#[inline(always)]
pub(super) fn needs_escape(s: &[u8]) -> bool {
    let n = s.len();
    let word = |b: &[u8]| -> u64 {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let w = match n {
        0 => return false,
        8..=16 => {
            let (a, b) = (word(&s[..8]), word(&s[n - 8..]));
            return special_bytes(a) | special_bytes(b) != 0;
        }
        4..8 => word(&s[..4]) | word(&s[n - 4..]) << 32,
        1..4 => u64::from_le_bytes([s[0], s[n / 2], s[n - 1], s[0], s[0], s[0], s[0], s[0]]),
        _ => return first_special(s).is_some(),
    };
    special_bytes(w) != 0
}

/// The high bit of each byte of `x` that may be a control character, `"` or `\`: zero
/// only if none is (the has-less-than and has-zero-byte bit tricks; a flag above a real
/// one may be spurious, the lowest one never is).
#[inline(always)]
fn special_bytes(x: u64) -> u64 {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * n as u64) & !x & HIGH;
    below(x, 0x20) | below(x ^ (ONES * b'"' as u64), 1) | below(x ^ (ONES * b'\\' as u64), 1)
}

#[derive(Default)]
struct Fields<'a> {
    record_id: Option<&'a str>,
    kind: Option<Kind>,
    msisdn: Option<&'a str>,
    imsi: Option<&'a str>,
    imei: Option<&'a str>,
    other_party: Option<&'a str>,
    start_time: Option<Millis>,
    duration_s: Option<u32>,
    close_cause: Option<CloseCause>,
    cell: Option<Cell<'a>>,
    serving_plmn: Option<&'a str>,
    service_centre: Option<&'a str>,
    apn: Option<&'a str>,
    charging_id: Option<u64>,
    rat: Option<Rat>,
    ue_ip: Option<&'a str>,
    usage: Option<Vec<Usage>>,
    recording_entity: Option<&'a str>,
    local_seq_no: Option<u64>,
}

struct Parser<'a> {
    s: &'a str,
    at: usize,
    /// No whitespace and every member in record order so far (see [`record`]).
    canonical: bool,
}

impl<'a> Parser<'a> {
    fn byte(&self) -> Option<u8> {
        self.s.as_bytes().get(self.at).copied()
    }

    /// The next byte after JSON whitespace (the four characters serde_json skips).
    fn peek(&mut self) -> Option<u8> {
        while let Some(c) = self.byte() {
            if !matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(c);
            }
            self.canonical = false;
            self.at += 1;
        }
        None
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    /// Nothing but whitespace is left.
    fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// A string without escapes or control characters (serde refuses raw control
    /// characters; escapes would make serde's value owned rather than borrowed).
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let len = first_special_in_line(&self.s.as_bytes()[start..])?;
        self.at = start + len + 1;
        if self.s.as_bytes()[start + len] != b'"' {
            return None;
        }
        // On ASCII boundaries, so the slice cannot fail.
        self.s.get(start..start + len)
    }

    /// A non-negative integer as serde_json reads one: no sign, no leading zero, no
    /// fraction or exponent (those make it a float, which serde refuses for integers).
    fn u64(&mut self) -> Option<u64> {
        self.peek()?;
        let b = self.s.as_bytes();
        let start = self.at;
        // Nineteen digits cannot overflow; only a twentieth needs checked arithmetic.
        let mut v = 0u64;
        let mut at = start;
        while let Some(d) = b.get(at).map(|c| c.wrapping_sub(b'0')).filter(|d| *d < 10) {
            if at - start >= 19 {
                v = v.checked_mul(10)?.checked_add(u64::from(d))?;
            } else {
                v = v * 10 + u64::from(d);
            }
            at += 1;
        }
        let digits = at - start;
        self.at = at;
        if digits == 0 || (digits > 1 && b[start] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.byte() {
            return None;
        }
        Some(v)
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.u64()?).ok()
    }

    /// Takes `lit` if the input continues with it.
    #[inline(always)]
    fn expect(&mut self, lit: &'static [u8]) -> bool {
        let hit = self.s.as_bytes().get(self.at..self.at + lit.len()) == Some(lit);
        if hit {
            self.at += lit.len();
        }
        hit
    }

    /// Takes `"name":` of field `f` if the input continues with it (each comparison of
    /// a constant length, so no `memcmp` call).
    #[inline(always)]
    fn expect_key(&mut self, f: Field) -> bool {
        macro_rules! keys {
            ($($v:ident => $k:literal),* $(,)?) => {
                match f {
                    $(Field::$v => self.expect($k)),*
                }
            };
        }
        keys!(
            RecordId => b"\"record_id\":",
            Kind => b"\"kind\":",
            Msisdn => b"\"msisdn\":",
            Imsi => b"\"imsi\":",
            Imei => b"\"imei\":",
            OtherParty => b"\"other_party\":",
            StartTime => b"\"start_time\":",
            DurationS => b"\"duration_s\":",
            CloseCause => b"\"close_cause\":",
            Cell => b"\"cell\":",
            ServingPlmn => b"\"serving_plmn\":",
            ServiceCentre => b"\"service_centre\":",
            Apn => b"\"apn\":",
            ChargingId => b"\"charging_id\":",
            Rat => b"\"rat\":",
            UeIp => b"\"ue_ip\":",
            Usage => b"\"usage\":",
            RecordingEntity => b"\"recording_entity\":",
            LocalSeqNo => b"\"local_seq_no\":",
        )
    }

    /// The field whose `"name":` comes next, if it is one of the four fields from
    /// `Field::ALL[next]` on (optional fields may be absent in between).
    #[inline(always)]
    fn known_key(&mut self, next: usize) -> Option<Field> {
        let candidates = Field::ALL.get(next..)?;
        candidates
            .iter()
            .take(4)
            .copied()
            .find(|&f| self.expect_key(f))
    }

    /// The members of the record object: `member` reads each key and its value, told
    /// where the member starts (at its leading `{` or `,`).
    fn members(&mut self, mut member: impl FnMut(&mut Self, usize) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        loop {
            member(self, self.at - 1)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An object: `member` reads the value of each key, told where the member starts
    /// (at its leading `{` or `,`); `{}` is declined (every object here has required
    /// keys).
    fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, &[u8], usize) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        loop {
            let start = self.at - 1;
            let key = self.string()?;
            self.eat(b':')?;
            member(self, key.as_bytes(), start)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn cell(&mut self) -> Option<Cell<'a>> {
        // As cdrguard and serde write it; anything else is read member by member.
        let start = self.at;
        if let Some(c) = self.cell_in_order() {
            return Some(c);
        }
        // What the ordered read declined and this reads is not laid out as copies are
        // written (whitespace or another order; anything else neither reads).
        self.at = start;
        self.canonical = false;
        let (mut mcc, mut mnc, mut area, mut id) = (None, None, None, None);
        // A key seen twice fails its `is_none` guard and is declined like an unknown one.
        self.object(|p, key, _| {
            match key {
                b"mcc" if mcc.is_none() => mcc = Some(p.string()?),
                b"mnc" if mnc.is_none() => mnc = Some(p.string()?),
                b"lac_or_tac" if area.is_none() => area = Some(p.u32()?),
                b"cell_id" if id.is_none() => id = Some(p.u64()?),
                _ => return None,
            }
            Some(())
        })?;
        Some(Cell {
            mcc: Cow::Borrowed(mcc?),
            mnc: Cow::Borrowed(mnc?),
            lac_or_tac: area?,
            cell_id: id?,
        })
    }

    /// `{"mcc":..,"mnc":..,"lac_or_tac":..,"cell_id":..}` exactly, or `None`.
    #[inline(always)]
    fn cell_in_order(&mut self) -> Option<Cell<'a>> {
        if !self.expect(b"{\"mcc\":") {
            return None;
        }
        let mcc = self.string()?;
        if !self.expect(b",\"mnc\":") {
            return None;
        }
        let mnc = self.string()?;
        if !self.expect(b",\"lac_or_tac\":") {
            return None;
        }
        let lac_or_tac = self.u32()?;
        if !self.expect(b",\"cell_id\":") {
            return None;
        }
        let cell_id = self.u64()?;
        self.expect(b"}").then_some(Cell {
            mcc: Cow::Borrowed(mcc),
            mnc: Cow::Borrowed(mnc),
            lac_or_tac,
            cell_id,
        })
    }

    /// `{"rating_group":..,"ul_bytes":..,"dl_bytes":..}` exactly, or `None`.
    #[inline(always)]
    fn usage_in_order(&mut self) -> Option<Usage> {
        if !self.expect(b"{\"rating_group\":") {
            return None;
        }
        let rating_group = self.u32()?;
        if !self.expect(b",\"ul_bytes\":") {
            return None;
        }
        let ul_bytes = self.u64()?;
        if !self.expect(b",\"dl_bytes\":") {
            return None;
        }
        let dl_bytes = self.u64()?;
        self.expect(b"}").then_some(Usage {
            rating_group,
            ul_bytes,
            dl_bytes,
        })
    }

    fn usage(&mut self) -> Option<Vec<Usage>> {
        self.eat(b'[')?;
        let mut all = Vec::new();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(all);
        }
        loop {
            // As cdrguard and serde write it; anything else is read member by member.
            let start = self.at;
            if let Some(u) = self.usage_in_order() {
                match self.byte() {
                    Some(b',') => {
                        self.at += 1;
                        all.push(u);
                        continue;
                    }
                    Some(b']') => {
                        self.at += 1;
                        all.push(u);
                        return Some(all);
                    }
                    _ => {}
                }
            }
            // As for `cell`: what the ordered read declined is not laid out as copies are.
            self.at = start;
            self.canonical = false;
            let (mut group, mut ul, mut dl) = (None, None, None);
            self.object(|p, key, _| {
                match key {
                    b"rating_group" if group.is_none() => group = Some(p.u32()?),
                    b"ul_bytes" if ul.is_none() => ul = Some(p.u64()?),
                    b"dl_bytes" if dl.is_none() => dl = Some(p.u64()?),
                    _ => return None,
                }
                Some(())
            })?;
            all.push(Usage {
                rating_group: group?,
                ul_bytes: ul?,
                dl_bytes: dl?,
            });
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(all);
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::generate::{GenConfig, Line, generate};

    fn records() -> Vec<Vec<u8>> {
        let cfg = GenConfig {
            records: 400,
            subscribers: 50,
            malformed_rate: 0.0,
            ..GenConfig::default()
        };
        generate(&cfg)
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Record(r) => Some(serde_json::to_vec(r).unwrap()),
                Line::Malformed(_) => None,
            })
            .collect()
    }

    /// The fast path may decline anything, but what it accepts serde must decode to the
    /// same record.
    fn agrees_with_serde(input: &[u8]) -> bool {
        match record(input).map(|(r, _)| r) {
            None => true,
            Some(fast) => serde_json::from_slice::<Record<'_>>(input).ok() == Some(fast),
        }
    }

    #[test]
    fn every_field_name_is_a_key_and_nothing_else_is() {
        for f in Field::ALL {
            assert_eq!(record_field(f.name().as_bytes()), Some(f));
            let mut other = f.name().as_bytes().to_vec();
            other[0] ^= 0x20;
            assert_eq!(record_field(&other), None);
        }
        assert_eq!(record_field(b"rap"), None);
    }

    #[test]
    fn each_variant_is_read_by_its_id_alone() {
        for k in Kind::ALL {
            assert_eq!(kind(k.id()), Some(k));
        }
        for c in CloseCause::ALL {
            assert_eq!(close_cause(c.id()), Some(c));
        }
        for r in Rat::ALL {
            assert_eq!(rat(r.id()), Some(r));
        }
        for other in ["", "MOC", "lte ", "volume", "sms_m"] {
            assert!(kind(other).is_none() && close_cause(other).is_none() && rat(other).is_none());
        }
    }

    #[test]
    fn each_fields_key_literal_is_its_name() {
        for f in Field::ALL {
            for g in Field::ALL {
                let text = format!("\"{}\":1", g.name());
                let mut p = Parser {
                    s: &text,
                    at: 0,
                    canonical: true,
                };
                assert_eq!(p.expect_key(f), f == g, "{f:?} {g:?}");
                assert_eq!(p.at, if f == g { text.len() - 1 } else { 0 });
            }
        }
    }

    #[test]
    fn first_special_is_the_first_one() {
        for len in 0..40 {
            let clean = vec![b'a'; len];
            assert_eq!(first_special(&clean), None);
            for at in 0..len {
                for b in (0u8..0x20).chain([b'"', b'\\']) {
                    let mut s = clean.clone();
                    s[at] = b;
                    // Specials after the first must not move it.
                    for later in s.iter_mut().skip(at + 1).step_by(3) {
                        *later = b'"';
                    }
                    assert_eq!(first_special(&s), Some(at), "{len} {at} {b}");
                }
                for b in [0x20u8, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xff] {
                    let mut s = clean.clone();
                    s[at] = b;
                    assert_eq!(first_special(&s), None, "{len} {at} {b}");
                }
            }
        }
    }

    #[test]
    fn the_line_scan_agrees_with_first_special() {
        for len in 0..70 {
            let clean: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(first_special_in_line(&clean), None);
            for at in 0..len {
                for b in [0u8, 0x1f, b'"', b'\\', 0x20, 0x7f, 0x80, 0xff] {
                    let mut s = clean.clone();
                    s[at] = b;
                    assert_eq!(
                        first_special_in_line(&s),
                        first_special(&s),
                        "{len} {at} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn needs_escape_agrees_with_first_special() {
        for len in 0..40 {
            let clean = vec![b'a'; len];
            assert!(!needs_escape(&clean));
            for at in 0..len {
                for b in (0u8..0x20).chain([b'"', b'\\']) {
                    let mut s = clean.clone();
                    s[at] = b;
                    assert!(needs_escape(&s), "{len} {at} {b}");
                }
                for b in [0x20u8, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xff] {
                    let mut s = clean.clone();
                    s[at] = b;
                    assert!(!needs_escape(&s), "{len} {at} {b}");
                }
            }
        }
    }

    #[test]
    fn takes_every_generated_record_compact_or_pretty() {
        for line in records() {
            let want: Record<'_> = serde_json::from_slice(&line).unwrap();
            assert_eq!(record(&line).map(|(r, _)| r), Some(want.clone()));
            let pretty = serde_json::to_vec_pretty(&want).unwrap();
            assert_eq!(record(&pretty).map(|(r, _)| r), Some(want));
        }
    }

    #[test]
    fn accepts_only_what_serde_decodes_the_same_after_any_one_byte_edit() {
        let edits: &[u8] = b"\"\\{}[],:0123-.eE tn\n\x01\x7f\xff";
        let lines = records();
        // Every kind of record, each edited at every position in every way.
        for line in lines.iter().step_by(lines.len() / 12) {
            for at in 0..=line.len() {
                let mut cut = line.clone();
                if at < line.len() {
                    cut.remove(at);
                    assert!(agrees_with_serde(&cut), "{}", String::from_utf8_lossy(&cut));
                }
                for &e in edits {
                    let mut ins = line.clone();
                    ins.insert(at, e);
                    assert!(agrees_with_serde(&ins), "{}", String::from_utf8_lossy(&ins));
                    if at < line.len() {
                        let mut rep = line.clone();
                        rep[at] = e;
                        assert!(agrees_with_serde(&rep), "{}", String::from_utf8_lossy(&rep));
                    }
                }
            }
        }
    }

    #[test]
    fn declines_what_serde_reads_differently_or_refuses() {
        let base = r#""record_id":"r1","kind":"moc","msisdn":"+46701234567","imsi":"240011234567890","other_party":"+46709876543","start_time":"2026-03-01T12:34:56.789Z","duration_s":60,"close_cause":"normal","serving_plmn":"24001","rat":"lte","recording_entity":"msc-1","local_seq_no":7"#;
        assert!(record(format!("{{{base}}}").as_bytes()).is_some());
        let offset = format!("{{{}}}", base.replace(".789Z", ".789+00:00"));
        assert!(record(offset.as_bytes()).is_some() && agrees_with_serde(offset.as_bytes()));
        for declined in [
            format!("{{{base},\"kind\":\"mtc\"}}"),
            format!("{{{base},\"extra\":1}}"),
            format!("{{{base},\"imei\":null}}"),
            format!("{{{base}}} x"),
            format!("[{base}]"),
            format!("{{{base},}}"),
            "{}".to_string(),
            format!("{{{}}}", base.replace("\"r1\"", "\"r\\u0031\"")),
            format!("{{{}}}", base.replace(":60", ":060")),
            format!("{{{}}}", base.replace(":60", ":60.0")),
            format!("{{{}}}", base.replace(":60", ":6e1")),
            format!("{{{}}}", base.replace(":60", ":-60")),
            format!("{{{}}}", base.replace(":60", ":4294967296")),
            format!("{{{}}}", base.replace(":7", ":18446744073709551616")),
            format!("{{{}}}", base.replace("\"moc\"", "\"MOC\"")),
            format!("{{{}}}", base.replace(".789Z", ".789Q")),
            base.replace(",\"local_seq_no\":7", ""),
        ] {
            assert!(record(declined.as_bytes()).is_none(), "{declined}");
        }
    }
}
