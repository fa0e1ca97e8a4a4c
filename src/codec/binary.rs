//! The bincode-compatible binary encoding, through `wincode` (the `bincode` crate is
//! unmaintained; wincode writes bincode 1's default layout: little-endian fixed-width
//! integers, u64 lengths, u32 enum tags, u8 option tags). Layouts are in
//! `schemas/binary.md`.

use wincode::{SchemaRead, SchemaWrite};

use super::cursor::{self, Cursor};
use super::{DecodeError, EnvelopeBytes, Envelopes};
use crate::core::process::{Copy, Envelope};
use crate::core::record::{Cell, CloseCause, Kind, Rat, Record, Usage};
use crate::core::treat::Text;
use crate::vocab::purpose::Field;
use crate::vocab::time::Millis;
use crate::vocab::treatment::Treatment;

/// The serving cell on the wire.
#[derive(SchemaWrite, SchemaRead, Debug)]
pub struct CellWire<'a> {
    mcc: &'a [u8],
    mnc: &'a [u8],
    lac_or_tac: u32,
    cell_id: u64,
}

/// A record on the wire: DESIGN.md's fields in its order; `start_time` as UTC ms. Strings
/// are read as their bytes (the same layout: u64 length, then the bytes) and checked as
/// UTF-8 by [`utf8`].
#[derive(SchemaWrite, SchemaRead, Debug)]
pub struct RecordWire<'a> {
    record_id: &'a [u8],
    kind: Kind,
    msisdn: &'a [u8],
    imsi: &'a [u8],
    imei: Option<&'a [u8]>,
    other_party: Option<&'a [u8]>,
    start_time: i64,
    duration_s: Option<u32>,
    close_cause: CloseCause,
    cell: Option<CellWire<'a>>,
    serving_plmn: &'a [u8],
    service_centre: Option<&'a [u8]>,
    apn: Option<&'a [u8]>,
    charging_id: Option<u64>,
    rat: Rat,
    ue_ip: Option<&'a [u8]>,
    usage: Option<Vec<Usage>>,
    recording_entity: &'a [u8],
    local_seq_no: u64,
}

/// A string's bytes as `&str`. Identifiers are ASCII: `is_ascii` checks a word at a time
/// where `str::from_utf8` goes byte by byte through strings this short (a tenth of the
/// binary pipeline). Anything else takes the full check, and its error.
#[inline(always)]
fn utf8(b: &[u8]) -> Result<&str, DecodeError> {
    if is_ascii(b) {
        // SAFETY: ASCII bytes are valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).map_err(|e| DecodeError::Malformed {
            format: "binary",
            detail: wincode::ReadError::from(e).to_string(),
        })
    }
}

/// `b.is_ascii()`, with the lengths identifiers have (1 to 16 bytes) tested in at most
/// two overlapping words instead of through the general loop's setup.
#[inline(always)]
fn is_ascii(b: &[u8]) -> bool {
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let n = b.len();
    match n {
        8..=16 => (word(&b[..8]) | word(&b[n - 8..])) & 0x8080_8080_8080_8080 == 0,
        4..8 => (word(&b[..4]) | word(&b[n - 4..])) & 0x8080_8080 == 0,
        // mcc and mnc: three loads cover every byte of 1 to 3.
        1..4 => (b[0] | b[n / 2] | b[n - 1]) < 0x80,
        _ => b.is_ascii(),
    }
}

#[inline(always)]
fn utf8_opt(b: Option<&[u8]>) -> Result<Option<&str>, DecodeError> {
    b.map(utf8).transpose()
}

/// Decodes and validates one binary record, borrowing its strings from `bytes`.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    // Checked where it was decoded and returned as it came: taking the record out of its
    // `Result` and wrapping it again moved all 400 bytes of it, twice.
    let r = decode_record_unchecked(bytes);
    if let Ok(r) = &r {
        r.validate()?;
    }
    r
}

/// Decodes one binary record without checking it against the record contract.
pub(super) fn decode_record_unchecked(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    let w: RecordWire<'_> =
        wincode::deserialize_exact(bytes).map_err(|e| DecodeError::Malformed {
            format: "binary",
            detail: e.to_string(),
        })?;
    Ok(Record {
        record_id: utf8(w.record_id)?.into(),
        kind: w.kind,
        msisdn: utf8(w.msisdn)?.into(),
        imsi: utf8(w.imsi)?.into(),
        imei: utf8_opt(w.imei)?.map(Into::into),
        other_party: utf8_opt(w.other_party)?.map(Into::into),
        start_time: Millis(w.start_time),
        duration_s: w.duration_s,
        close_cause: w.close_cause,
        cell: match w.cell {
            None => None,
            Some(c) => Some(Cell {
                mcc: utf8(c.mcc)?.into(),
                mnc: utf8(c.mnc)?.into(),
                lac_or_tac: c.lac_or_tac,
                cell_id: c.cell_id,
            }),
        },
        serving_plmn: utf8(w.serving_plmn)?.into(),
        service_centre: utf8_opt(w.service_centre)?.map(Into::into),
        apn: utf8_opt(w.apn)?.map(Into::into),
        charging_id: w.charging_id,
        rat: w.rat,
        ue_ip: utf8_opt(w.ue_ip)?.map(Into::into),
        usage: w.usage,
        recording_entity: utf8(w.recording_entity)?.into(),
        local_seq_no: w.local_seq_no,
    })
}

/// Appends a record's binary form to `out`.
pub fn encode_record(r: &Record<'_>, out: &mut Vec<u8>) {
    let w = RecordWire {
        record_id: r.record_id.as_bytes(),
        kind: r.kind,
        msisdn: r.msisdn.as_bytes(),
        imsi: r.imsi.as_bytes(),
        imei: r.imei.as_deref().map(str::as_bytes),
        other_party: r.other_party.as_deref().map(str::as_bytes),
        start_time: r.start_time.0,
        duration_s: r.duration_s,
        close_cause: r.close_cause,
        cell: r.cell.as_ref().map(|c| CellWire {
            mcc: c.mcc.as_bytes(),
            mnc: c.mnc.as_bytes(),
            lac_or_tac: c.lac_or_tac,
            cell_id: c.cell_id,
        }),
        serving_plmn: r.serving_plmn.as_bytes(),
        service_centre: r.service_centre.as_deref().map(str::as_bytes),
        apn: r.apn.as_deref().map(str::as_bytes),
        charging_id: r.charging_id,
        rat: r.rat,
        ue_ip: r.ue_ip.as_deref().map(str::as_bytes),
        usage: r.usage.clone(),
        recording_entity: r.recording_entity.as_bytes(),
        local_seq_no: r.local_seq_no,
    };
    // Writing into a growable Vec does not fail.
    let _ = wincode::serialize_into(out, &w);
}

/// Treatment codes of the binary envelope.
pub fn treatment_code(t: Treatment) -> u8 {
    match t {
        Treatment::Keep => 0,
        Treatment::Drop => 1,
        Treatment::Generalise => 2,
        Treatment::Mask { .. } => 3,
        Treatment::Pseudonymise => 4,
        Treatment::Tokenise => 5,
    }
}

/// The treatment code of every field of the copy, in record order: the field map's codes
/// (encoded with the policy), then `0xFF` over every field the input did not carry.
#[inline(always)]
fn treatment_codes(fixed: &EnvelopeBytes, e: &Envelope<'_>) -> [u8; Field::COUNT] {
    // The presence bits are spread to one byte each, eight fields at a time, without a
    // branch.
    let mut codes = fixed.binary_codes;
    for (i, chunk) in codes.chunks_exact_mut(8).enumerate() {
        let bits = u64::from((e.present >> (8 * i)) & 0xFF);
        // Byte j keeps bit j of `bits`; adding 0x7F sets its high bit iff that bit is set.
        let spread = bits.wrapping_mul(0x0101_0101_0101_0101) & 0x8040_2010_0804_0201;
        let present = ((spread + 0x7F7F_7F7F_7F7F_7F7F) & 0x8080_8080_8080_8080) >> 7;
        let absent = !(present * 0xFF);
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_le_bytes(word) | absent).to_le_bytes());
    }
    let mut out = [0u8; Field::COUNT];
    out.copy_from_slice(&codes[..Field::COUNT]);
    out
}

/// Strings one after another in the binary layout (u64 length, then the bytes): the
/// constant runs of an envelope, encoded once per policy (`policy::EnvelopeBytes`).
pub(crate) fn strings(s: &[&str]) -> Box<[u8]> {
    let mut out = Vec::new();
    for s in s {
        string(&mut out, s);
    }
    out.into_boxed_slice()
}

/// Room reserved for one copy: a typical copy takes 300 to 500 bytes; a larger one (long
/// usage lists or masked values) takes the `Vec` path.
const CHUNK: usize = 768;

/// The binary layout's pieces, written through the shared cursor (`codec::cursor`).
impl Cursor<'_, CHUNK> {
    #[inline(always)]
    fn string(&mut self, s: &str) -> Option<()> {
        self.put((s.len() as u64).to_le_bytes())?;
        self.bytes(s.as_bytes())
    }

    // Options are written as one piece, tag byte and value together.

    #[inline(always)]
    fn option4(&mut self, v: Option<u32>) -> Option<()> {
        match v {
            None => self.put([0]),
            Some(v) => self.tagged(1, v.to_le_bytes()),
        }
    }

    #[inline(always)]
    fn option8(&mut self, v: Option<u64>) -> Option<()> {
        match v {
            None => self.put([0]),
            Some(v) => self.tagged(1, v.to_le_bytes()),
        }
    }

    #[inline(always)]
    fn option_str(&mut self, s: Option<&str>) -> Option<()> {
        match s {
            None => self.put([0]),
            Some(s) => {
                self.tagged(1, (s.len() as u64).to_le_bytes())?;
                self.bytes(s.as_bytes())
            }
        }
    }

    /// The `CopyWire` layout of `schemas/binary.md`; `None` if it does not fit.
    #[inline(always)]
    fn copy(&mut self, env: &Envelopes, c: &Copy<'_>) -> Option<()> {
        let e = &c.envelope;
        self.option_str(c.text(Field::RecordId))?;
        self.option4(c.kind().map(|k| k as u32))?;
        self.option_str(c.text(Field::Msisdn))?;
        self.option_str(c.text(Field::Imsi))?;
        self.option_str(c.text(Field::Imei))?;
        self.option_str(c.text(Field::OtherParty))?;
        self.option8(c.start_time().map(|t| t.0 as u64))?;
        self.option4(c.duration_s())?;
        self.option4(c.close_cause().map(|c| c as u32))?;
        match c.cell() {
            None => self.put([0])?,
            Some(c) => {
                self.put([1])?;
                self.string(c.mcc)?;
                self.string(c.mnc)?;
                self.put(c.lac_or_tac.to_le_bytes())?;
                self.option8(c.cell_id)?;
            }
        }
        self.option_str(c.text(Field::ServingPlmn))?;
        self.option_str(c.text(Field::ServiceCentre))?;
        self.option_str(c.text(Field::Apn))?;
        self.option8(c.charging_id())?;
        self.option4(c.rat().map(|rat| rat as u32))?;
        self.option_str(c.text(Field::UeIp))?;
        let usage = c.usage();
        let usage = usage.as_ref().map(|u| u.as_slice());
        self.option8(usage.map(|u| u.len() as u64))?;
        for u in usage.unwrap_or_default() {
            self.put(u.rating_group.to_le_bytes())?;
            self.put(u.ul_bytes.to_le_bytes())?;
            self.put(u.dl_bytes.to_le_bytes())?;
        }
        self.option_str(c.text(Field::RecordingEntity))?;
        self.option8(c.local_seq_no())?;
        self.option_str(e.record_id.as_ref().map(Text::as_str))?;
        let fixed = env.of(e);
        self.bytes(&fixed.binary_tags)?;
        self.put(treatment_codes(fixed, e))?;
        self.option_str(e.key_id)?;
        self.bytes(&fixed.binary_rule)
    }
}

/// Appends one copy's binary form to `out`: the `CopyWire` layout of `schemas/binary.md`,
/// byte for byte what wincode writes for it (a test holds the two equal over every
/// shipped policy). Written field by field because wincode's generic writer cost a third
/// of the binary pipeline. Enum values are their variant index (declaration order).
pub fn encode_copy(env: &Envelopes, c: &Copy<'_>, out: &mut Vec<u8>) {
    if !cursor::write_with::<CHUNK>(out, |w| w.copy(env, c)) {
        encode_copy_vec(env, c, out);
    }
}

#[inline(always)]
fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[inline(always)]
fn option4(out: &mut Vec<u8>, v: Option<u32>) {
    match v {
        None => out.push(0),
        Some(v) => {
            let b = v.to_le_bytes();
            out.extend_from_slice(&[1, b[0], b[1], b[2], b[3]]);
        }
    }
}

#[inline(always)]
fn option8(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            let b = v.to_le_bytes();
            out.extend_from_slice(&[1, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        }
    }
}

#[inline(always)]
fn option_str(out: &mut Vec<u8>, s: Option<&str>) {
    option8(out, s.map(|s| s.len() as u64));
    if let Some(s) = s {
        out.extend_from_slice(s.as_bytes());
    }
}

#[inline(always)]
fn text(out: &mut Vec<u8>, t: &Option<Text<'_>>) {
    option_str(out, t.as_ref().map(Text::as_str));
}

/// [`encode_copy`] for a copy too large for its stack buffer, written straight into `out`.
#[inline(never)]
fn encode_copy_vec(env: &Envelopes, c: &Copy<'_>, out: &mut Vec<u8>) {
    let e = &c.envelope;
    option_str(out, c.text(Field::RecordId));
    option4(out, c.kind().map(|k| k as u32));
    option_str(out, c.text(Field::Msisdn));
    option_str(out, c.text(Field::Imsi));
    option_str(out, c.text(Field::Imei));
    option_str(out, c.text(Field::OtherParty));
    option8(out, c.start_time().map(|t| t.0 as u64));
    option4(out, c.duration_s());
    option4(out, c.close_cause().map(|c| c as u32));
    match c.cell() {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            string(out, c.mcc);
            string(out, c.mnc);
            out.extend_from_slice(&c.lac_or_tac.to_le_bytes());
            option8(out, c.cell_id);
        }
    }
    option_str(out, c.text(Field::ServingPlmn));
    option_str(out, c.text(Field::ServiceCentre));
    option_str(out, c.text(Field::Apn));
    option8(out, c.charging_id());
    option4(out, c.rat().map(|rat| rat as u32));
    option_str(out, c.text(Field::UeIp));
    let usage = c.usage();
    let usage = usage.as_ref().map(|u| u.as_slice());
    option8(out, usage.map(|u| u.len() as u64));
    for u in usage.unwrap_or_default() {
        out.extend_from_slice(&u.rating_group.to_le_bytes());
        out.extend_from_slice(&u.ul_bytes.to_le_bytes());
        out.extend_from_slice(&u.dl_bytes.to_le_bytes());
    }
    option_str(out, c.text(Field::RecordingEntity));
    option8(out, c.local_seq_no());
    text(out, &e.record_id);
    let fixed = env.of(e);
    out.extend_from_slice(&fixed.binary_tags);
    out.extend_from_slice(&treatment_codes(fixed, e));
    option_str(out, e.key_id);
    out.extend_from_slice(&fixed.binary_rule);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::tests::data_record;

    /// The cell in a copy: `cell_id` absent once generalised.
    #[derive(SchemaWrite)]
    struct CellOutWire<'a> {
        mcc: &'a str,
        mnc: &'a str,
        lac_or_tac: u32,
        cell_id: Option<u64>,
    }

    /// A copy on the wire, as `schemas/binary.md` gives it: every record field as an option (absent = dropped), then the
    /// envelope. Treatments are one code per field in record order (see `schemas/binary.md`).
    #[derive(SchemaWrite)]
    struct CopyWire<'a> {
        record_id: Option<&'a str>,
        kind: Option<Kind>,
        msisdn: Option<&'a str>,
        imsi: Option<&'a str>,
        imei: Option<&'a str>,
        other_party: Option<&'a str>,
        start_time: Option<i64>,
        duration_s: Option<u32>,
        close_cause: Option<CloseCause>,
        cell: Option<CellOutWire<'a>>,
        serving_plmn: Option<&'a str>,
        service_centre: Option<&'a str>,
        apn: Option<&'a str>,
        charging_id: Option<u64>,
        rat: Option<Rat>,
        ue_ip: Option<&'a str>,
        usage: Option<&'a [Usage]>,
        recording_entity: Option<&'a str>,
        local_seq_no: Option<u64>,
        env_record_id: Option<&'a str>,
        purpose: &'a str,
        legal_basis: &'a str,
        gdpr_article: &'a str,
        policy: &'a str,
        consent: &'a str,
        treatments: [u8; Field::COUNT],
        key_id: Option<&'a str>,
        retention_rule: &'a str,
    }

    fn s<'t>(t: &'t Option<crate::core::treat::Text<'_>>) -> Option<&'t str> {
        t.as_ref().map(|t| t.as_str())
    }

    /// The copy as wincode writes `CopyWire`: the reference for `encode_copy`.
    fn reference_encode(c: &Copy<'_>, out: &mut Vec<u8>) {
        let r = &c.record();
        let e = &c.envelope;
        let mut treatments = [0xFFu8; Field::COUNT];
        for (f, t) in e.changed() {
            treatments[f as usize] = treatment_code(t);
        }
        for f in Field::ALL {
            if e.present & (1 << f as u32) != 0 && treatments[f as usize] == 0xFF {
                treatments[f as usize] = 0;
            }
        }
        let w = CopyWire {
            record_id: s(&r.record_id),
            kind: r.kind,
            msisdn: s(&r.msisdn),
            imsi: s(&r.imsi),
            imei: s(&r.imei),
            other_party: s(&r.other_party),
            start_time: r.start_time.map(|t| t.0),
            duration_s: r.duration_s,
            close_cause: r.close_cause,
            cell: r.cell.as_ref().map(|c| CellOutWire {
                mcc: c.mcc,
                mnc: c.mnc,
                lac_or_tac: c.lac_or_tac,
                cell_id: c.cell_id,
            }),
            serving_plmn: s(&r.serving_plmn),
            service_centre: s(&r.service_centre),
            apn: s(&r.apn),
            charging_id: r.charging_id,
            rat: r.rat,
            ue_ip: s(&r.ue_ip),
            usage: r.usage.as_ref().map(|u| u.as_slice()),
            recording_entity: s(&r.recording_entity),
            local_seq_no: r.local_seq_no,
            env_record_id: e.record_id.as_ref().map(|t| t.as_str()),
            purpose: e.purpose.id(),
            legal_basis: e.legal_basis,
            gdpr_article: e.gdpr_article,
            policy: e.policy,
            consent: e.consent.id(),
            treatments,
            key_id: e.key_id,
            retention_rule: &e.retention.rule_id,
        };
        let _ = wincode::serialize_into(out, &w);
    }

    #[test]
    fn hand_written_copies_are_byte_for_byte_wincode() {
        let (mut copies, mut out, mut want) = (0, Vec::new(), Vec::new());
        crate::codec::tests::for_every_copy(|env, _, c| {
            // The chunk is not zeroed: a byte the encoder skipped would show this filler.
            let filler = if copies % 2 == 0 { 0xA5 } else { 0x5A };
            out.clear();
            out.resize(4096, filler);
            out.clear();
            want.clear();
            encode_copy(env, c, &mut out);
            reference_encode(c, &mut want);
            assert_eq!(out, want);
            copies += 1;
        });
        assert!(copies > 10_000);
    }

    #[test]
    fn binary_round_trips_and_matches_bincode_layout() {
        let r = data_record();
        let mut buf = Vec::new();
        encode_record(&r, &mut buf);
        // bincode 1 layout: u64 length then the bytes of the first string.
        assert_eq!(&buf[..8], &3u64.to_le_bytes());
        assert_eq!(&buf[8..11], b"r-1");
        // Then the kind as a u32 tag: Data is the fifth variant.
        assert_eq!(&buf[11..15], &4u32.to_le_bytes());
        let back = decode_record(&buf).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn the_short_ascii_check_is_is_ascii() {
        for n in 0..=40usize {
            for pos in 0..n.max(1) {
                for bad in [0x7F, 0x80, 0xC3, 0xFF] {
                    let mut v: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                    assert_eq!(is_ascii(&v), v.is_ascii());
                    if n > 0 {
                        v[pos] = bad;
                    }
                    assert_eq!(is_ascii(&v), v.is_ascii(), "{v:?}");
                }
            }
        }
    }

    #[test]
    fn non_ascii_strings_take_the_full_utf8_check() {
        let mut r = data_record();
        r.record_id = "r-é".into();
        let mut buf = Vec::new();
        encode_record(&r, &mut buf);
        assert_eq!(decode_record(&buf).unwrap(), r);
        // 0xC3 0xA9 is "é"; a lone continuation byte is not UTF-8.
        let at = buf.windows(2).position(|w| w == [0xC3, 0xA9]).unwrap();
        buf[at] = 0xA9;
        match decode_record(&buf) {
            Err(DecodeError::Malformed { detail, .. }) => {
                assert!(detail.contains("utf-8"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_or_padded_input_is_malformed() {
        let mut buf = Vec::new();
        encode_record(&data_record(), &mut buf);
        assert!(matches!(
            decode_record(&buf[..buf.len() - 1]),
            Err(DecodeError::Malformed { .. })
        ));
        buf.push(0);
        assert!(matches!(
            decode_record(&buf),
            Err(DecodeError::Malformed { .. })
        ));
    }
}
