//! JSON: records and control events in, copies and expiry events out.

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

use super::CopyFields;
use super::cursor::{self, Cursor};
use super::{DecodeError, Envelopes};
use crate::core::control::{ControlEvent, RawControl};
use crate::core::process::{Copy, Envelope};
use crate::core::record::Record;
use crate::core::treat::{Text, Treated};
use crate::policy::Retention;
use crate::vocab::purpose::Field;
use crate::vocab::treatment::Treatment;

/// Decodes and validates one record; strings borrow from `bytes` where unescaped. A
/// leading byte-order mark (the first line of a file saved with one) is skipped.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    decode_record_laid_out(bytes).map(|d| d.record)
}

/// A record decoded from JSON, and where its fields sit in the input when the input is
/// written as cdrguard writes JSON (compact, fields in record order, canonical times):
/// then [`RecordJson::of_input`] takes the record's fields from the input instead of
/// writing them again.
pub struct Decoded<'a> {
    /// The record.
    pub record: Record<'a>,
    input: &'a [u8],
    layout: Option<super::json_fast::Layout>,
}

/// A record from elsewhere (the binary decoder): its fields are written when needed.
impl<'a> From<Record<'a>> for Decoded<'a> {
    fn from(record: Record<'a>) -> Decoded<'a> {
        Decoded {
            record,
            input: &[],
            layout: None,
        }
    }
}

/// [`decode_record`], keeping where the record's fields sit in `bytes`.
pub fn decode_record_laid_out(bytes: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    let input = super::strip_bom(bytes);
    let (record, layout) = match super::json_fast::record(input) {
        Some(r) => r,
        None => (
            serde_json::from_slice(input).map_err(|e| DecodeError::Malformed {
                format: "json",
                detail: describe(input, &e),
            })?,
            None,
        ),
    };
    record.validate()?;
    Ok(Decoded {
        record,
        input,
        layout,
    })
}

/// The record's `start_time`, found without decoding the rest, so a reorder buffer can
/// place a line by its time and decode it once, when it leaves. `None` unless the key is
/// written plainly with a canonical time (`"start_time":"2026-03-02T10:15:30.250Z"`):
/// then decode the record. In a record that decodes, the first such match is its
/// `start_time` key: the quote after the name is unescaped, so it cannot sit inside a
/// string, and unknown or duplicate keys are refused.
pub fn start_time_hint(bytes: &[u8]) -> Option<crate::vocab::time::Millis> {
    const KEY: &[u8] = b"\"start_time\":\"";
    let at = memchr::memmem::find(bytes, KEY)? + KEY.len();
    if bytes.get(at + 24) != Some(&b'"') {
        return None;
    }
    crate::vocab::time::Millis::parse_canonical(bytes.get(at..at + 24)?)
}

/// Decodes and checks one control event; a leading byte-order mark is skipped.
pub fn decode_control(bytes: &[u8]) -> Result<ControlEvent, String> {
    let bytes = super::strip_bom(bytes);
    let raw: RawControl<'_> = serde_json::from_slice(bytes).map_err(|e| describe(bytes, &e))?;
    raw.into_event().map_err(|e| e.to_string())
}

/// Names a record or control event may use, nested ones included: the only words of the
/// input an error message may repeat.
const KNOWN_KEYS: [&str; 14] = [
    "mcc",
    "mnc",
    "lac_or_tac",
    "cell_id",
    "rating_group",
    "ul_bytes",
    "dl_bytes",
    "type",
    "at",
    "purpose",
    "granted",
    "active",
    "period_start",
    "period_end",
];

fn known_key(k: &str) -> bool {
    KNOWN_KEYS.contains(&k) || crate::vocab::purpose::Field::from_name(k).is_some()
}

/// The key whose value ends at `offset`: the last `"key":` before it, if it is a name the
/// contract knows (a value that happens to look like a key is never repeated).
fn key_before(bytes: &[u8], offset: usize) -> Option<&str> {
    let head = bytes.get(..offset.min(bytes.len()))?;
    let colon = head.windows(2).rposition(|w| w == b"\":")?;
    let start = head[..colon].iter().rposition(|b| *b == b'"')? + 1;
    let key = std::str::from_utf8(&head[start..colon]).ok()?;
    known_key(key).then_some(key)
}

/// The parser's account of a bad line, without any value from it: serde echoes values
/// (`invalid type: integer `46701234567``), and a value may be a phone number. Keeps the
/// field, what is wrong and the position.
fn describe(bytes: &[u8], e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let full = e.to_string();
    // serde_json appends " at line L column C"; the position is given again below.
    let msg = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m);
    let problem = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => msg.to_string(),
        Category::Data => {
            let named = |prefix: &str| {
                msg.strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix('`'))
                    .and_then(|r| r.split_once('`'))
                    .filter(|(k, _)| known_key(k))
                    .map(|(k, rest)| format!("{prefix}`{k}`{rest}"))
            };
            if let Some(m) = named("missing field ").or_else(|| named("duplicate field ")) {
                m
            } else if let Some(rest) = msg.strip_prefix("unknown field `") {
                // An unknown key is input too: repeated only when it looks like a name, not
                // like a number someone used as a key.
                let name = rest.split('`').next().unwrap_or("");
                let looks_like_a_name = (1..=40).contains(&name.len())
                    && name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if looks_like_a_name {
                    format!("unknown field `{name}`, not in the contract")
                } else {
                    "unknown field (its name is not repeated), not in the contract".to_string()
                }
            } else if let Some(rest) = msg.strip_prefix("unknown variant ") {
                let expected = rest.split_once(", expected").map_or("", |(_, e)| e);
                format!("unknown variant, expected{expected}")
            } else if let Some((kind, rest)) = ["invalid type: ", "invalid value: "]
                .iter()
                .find_map(|p| msg.strip_prefix(p).map(|r| (&p[..p.len() - 2], r)))
            {
                // "integer `4670...`, expected a string": keep what it was, not its value.
                let what = rest
                    .split([' ', ','])
                    .next()
                    .filter(|w| w.bytes().all(|b| b.is_ascii_alphabetic()))
                    .unwrap_or("value");
                let expected = rest.split_once(", expected").map_or("", |(_, e)| e);
                format!("{kind}: {what}, expected{expected}")
            } else if msg.starts_with("not an RFC 3339 timestamp") {
                // Our own time parser's message; it quotes the value after the colon.
                "invalid value, expected an RFC 3339 timestamp".to_string()
            } else if let Some((_, expected)) = msg.split_once(", expected") {
                format!("invalid value, expected{expected}")
            } else {
                "invalid value".to_string()
            }
        }
    };
    let offset = line_column_offset(bytes, e.line(), e.column());
    let about_a_value = ["invalid type", "invalid value", "unknown variant"]
        .iter()
        .any(|p| problem.starts_with(p));
    match (about_a_value, key_before(bytes, offset)) {
        (true, Some(k)) => format!(
            "field {k}: {problem} (line {}, column {})",
            e.line(),
            e.column()
        ),
        _ => format!("{problem} (line {}, column {})", e.line(), e.column()),
    }
}

/// The byte offset of a 1-based line and column as serde_json counts them.
fn line_column_offset(bytes: &[u8], line: usize, column: usize) -> usize {
    let start: usize = bytes
        .split(|b| *b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    start + column
}

struct Treatments<'a>(&'a Envelope<'a>);

impl Serialize for Treatments<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (f, t) in self.0.changed() {
            m.serialize_entry(f.name(), t.id())?;
        }
        m.end()
    }
}

struct RetentionTag<'a>(&'a Envelope<'a>);

impl Serialize for RetentionTag<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0.retention;
        let mut m = s.serialize_struct("retention", 4)?;
        m.serialize_field("rule", &r.rule_id)?;
        m.serialize_field("anchor", r.anchor.id())?;
        m.serialize_field("after", &r.after)?;
        m.serialize_field("assumption", &r.cite.is_assumption())?;
        m.end()
    }
}

impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("envelope", 9)?;
        m.serialize_field("record_id", &self.record_id)?;
        m.serialize_field("purpose", self.purpose.id())?;
        m.serialize_field("legal_basis", self.legal_basis)?;
        m.serialize_field("gdpr_article", self.gdpr_article)?;
        m.serialize_field("policy", self.policy)?;
        m.serialize_field("consent", self.consent.id())?;
        m.serialize_field("treatments", &Treatments(self))?;
        m.serialize_field("key_id", &self.key_id)?;
        m.serialize_field("retention", &RetentionTag(self))?;
        m.end()
    }
}

impl Serialize for Copy<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("copy", 2)?;
        m.serialize_field("record", &self.record())?;
        m.serialize_field("envelope", &self.envelope)?;
        m.end()
    }
}

/// Appends one copy as a JSON object (no newline) to `out`.
///
/// The bytes are exactly those `serde_json` writes for the copy's `Serialize` impls (a test
/// holds the two equal over every shipped policy). Written by hand because serde's generic
/// path, one escaped write per key and value, cost two thirds of the JSON pipeline.
///
/// Most copies are written through the output cursor (`codec::cursor`); a copy larger
/// than [`CHUNK`] or holding a value that needs escaping is written again through the
/// `Vec` path below, which escapes as serde_json does. Where a record has several copies,
/// [`RecordJson::encode_copy`] writes them with less work.
pub fn encode_copy(env: &Envelopes, c: &Copy<'_>, out: &mut Vec<u8>) {
    if !cursor::write_with::<CHUNK>(out, |w| w.copy(env, None, c)) {
        encode_copy_vec(env, c, out);
    }
}

/// A record's fields written once as JSON (`,"name":value` each, in record order), for
/// all of its copies: a copy that carries a field as the record has it takes its bytes
/// from here, and a run of such fields is one move. A record has three to four copies,
/// most of them keeping most fields, and writing each field again for each copy (number
/// and time formatting, escape checks) was most of the JSON encoder's cost.
///
/// A copy carries a field as the record has it where its field map keeps the field or
/// the record lacks it (a copy is read from its record, `process::Copy`). A copy of
/// another record, or a value the copy derived, is written as [`encode_copy`] writes it,
/// so the result is always the same as that function's. (The binary layout was tried the
/// same way: its fields cost about as little to write as to look up, and it was slower.)
pub struct RecordJson<'r> {
    record: &'r Record<'r>,
    buf: &'r [u8],
    /// Each field's bytes in `buf`; an empty range where the record lacks the field,
    /// placed where the field would be, so that the ranges of a run are adjacent.
    spans: [(u32, u32); Field::COUNT],
}

impl<'r> RecordJson<'r> {
    /// Writes every field of `record` into `scratch` (cleared first).
    pub fn new(record: &'r Record<'r>, scratch: &'r mut Vec<u8>) -> RecordJson<'r> {
        scratch.clear();
        let kept = crate::core::treat::kept(record);
        let mut spans = [(0, 0); Field::COUNT];
        // Through the cursor as a copy is written; a record too large for it or with a
        // value to escape through the `Vec` path.
        let fast = cursor::write_with::<CHUNK>(scratch, |w| {
            each_field!(F => {
                let start = w.pos() as u32;
                w.own_field(F, &kept)?;
                spans[F as usize] = (start, w.pos() as u32);
            });
            Some(())
        });
        if !fast {
            for f in Field::ALL {
                let start = scratch.len() as u32;
                write_field(f, &kept, scratch);
                spans[f as usize] = (start, scratch.len() as u32);
            }
        }
        RecordJson {
            record,
            buf: scratch,
            spans,
        }
    }

    /// The fields of a decoded record: the input's own bytes where it is laid out as
    /// copies are written, else written into `scratch` as [`RecordJson::new`] does.
    pub fn of_input(d: &'r Decoded<'r>, scratch: &'r mut Vec<u8>) -> RecordJson<'r> {
        match d.layout {
            Some(spans) => RecordJson {
                record: &d.record,
                buf: d.input,
                spans,
            },
            None => RecordJson::new(&d.record, scratch),
        }
    }

    /// Appends copy `c` as [`encode_copy`] does (the same bytes), taking what it can
    /// from this record's fields.
    pub fn encode_copy(&self, env: &Envelopes, c: &Copy<'_>, out: &mut Vec<u8>) {
        if !cursor::write_with::<CHUNK>(out, |w| w.copy(env, Some(self), c)) {
            encode_copy_vec(env, c, out);
        }
    }
}

/// Room reserved for one copy: a typical copy takes 500 to 1,100 bytes.
const CHUNK: usize = 2048;

/// A range of a [`RecordJson`]'s bytes not yet moved into the copy.
#[derive(Default)]
struct Run {
    start: u32,
    end: u32,
}

/// The JSON pieces of a copy, written through the shared cursor. Keys are literals at
/// each call, so their moves are of constant size. Returns `None` where the copy must
/// take the `Vec` path.
impl Cursor<'_, CHUNK> {
    /// `"s"` when `s` needs no escape (record values are identifiers and codes); `None`
    /// otherwise.
    #[inline(always)]
    fn str_value(&mut self, s: &str) -> Option<()> {
        if super::json_fast::needs_escape(s.as_bytes()) {
            return None;
        }
        self.put(*b"\"")?;
        self.bytes(s.as_bytes())?;
        self.put(*b"\"")
    }

    /// A name from the crate's fixed vocabulary (no character JSON escapes; a test checks
    /// every one).
    #[inline(always)]
    fn name_value(&mut self, s: &'static str) -> Option<()> {
        self.put(*b"\"")?;
        self.bytes(s.as_bytes())?;
        self.put(*b"\"")
    }

    #[inline(always)]
    fn number<I: itoa::Integer>(&mut self, i: I) -> Option<()> {
        self.bytes(itoa::Buffer::new().format(i).as_bytes())
    }

    /// `,"key":` and the value `write` writes, where the copy carries one.
    #[inline(always)]
    fn member<T>(
        &mut self,
        comma_key: &'static [u8],
        v: Option<T>,
        write: impl FnOnce(&mut Self, T) -> Option<()>,
    ) -> Option<()> {
        match v {
            None => Some(()),
            Some(v) => {
                self.bytes(comma_key)?;
                write(self, v)
            }
        }
    }

    /// `,"key":"value"` for a text field the copy carries.
    #[inline(always)]
    fn text(&mut self, comma_key: &'static [u8], v: Option<&str>) -> Option<()> {
        match v {
            None => Some(()),
            Some(v) => {
                self.bytes(comma_key)?;
                self.str_value(v)
            }
        }
    }

    #[inline(always)]
    fn copy(&mut self, env: &Envelopes, rj: Option<&RecordJson<'_>>, c: &Copy<'_>) -> Option<()> {
        self.bytes(b"{\"record\":")?;
        self.record(rj, c)?;
        self.bytes(b",\"envelope\":")?;
        self.envelope(env, &c.envelope)?;
        self.put(*b"}")
    }

    /// The treated record, as [`write_record`] writes it: each field with a leading
    /// comma, the first comma then turned into the opening brace.
    #[inline(always)]
    fn record(&mut self, rj: Option<&RecordJson<'_>>, c: &Copy<'_>) -> Option<()> {
        // The record's fields serve only its own copies.
        let rj = rj.filter(|rj| std::ptr::eq(rj.record, c.source));
        // The fields the copy carries as the record has them: those its map keeps, and
        // those the record lacks (empty in both).
        let same = !(c.envelope.present & c.envelope.facts.changed);
        let open = self.pos();
        let mut run = Run::default();
        each_field!(F => self.field(rj, &mut run, F, same & 1 << F as u32 != 0, c)?);
        self.flush(rj, &mut run)?;
        if self.pos() == open {
            return self.put(*b"{}");
        }
        self.set(open, b'{');
        self.put(*b"}")
    }

    /// Field `f`: added to the run of the record's bytes where the copy carries it as
    /// the record has it (`same`), else written here.
    #[inline(always)]
    fn field(
        &mut self,
        rj: Option<&RecordJson<'_>>,
        run: &mut Run,
        f: Field,
        same: bool,
        c: &Copy<'_>,
    ) -> Option<()> {
        if let Some(rj) = rj
            && same
        {
            let (start, end) = rj.spans[f as usize];
            if start != run.end {
                self.flush(Some(rj), run)?;
                run.start = start;
            }
            run.end = end;
            return Some(());
        }
        self.flush(rj, run)?;
        self.own_field(f, c)
    }

    /// Moves the pending run into the copy.
    #[inline(always)]
    fn flush(&mut self, rj: Option<&RecordJson<'_>>, run: &mut Run) -> Option<()> {
        if let Some(rj) = rj
            && run.end > run.start
        {
            self.bytes(&rj.buf[run.start as usize..run.end as usize])?;
            run.start = run.end;
        }
        Some(())
    }

    /// `,"name":value` for field `f` of the copy, as [`write_field`] writes it.
    #[inline(always)]
    fn own_field(&mut self, f: Field, r: &impl CopyFields) -> Option<()> {
        match f {
            Field::RecordId => self.text(b",\"record_id\":", r.text(Field::RecordId)),
            Field::Kind => self.member(b",\"kind\":", r.kind(), |w, k| w.name_value(k.id())),
            Field::Msisdn => self.text(b",\"msisdn\":", r.text(Field::Msisdn)),
            Field::Imsi => self.text(b",\"imsi\":", r.text(Field::Imsi)),
            Field::Imei => self.text(b",\"imei\":", r.text(Field::Imei)),
            Field::OtherParty => self.text(b",\"other_party\":", r.text(Field::OtherParty)),
            Field::StartTime => self.member(b",\"start_time\":\"", r.start_time(), |w, t| {
                w.put(*t.to_buf().as_bytes())?;
                w.put(*b"\"")
            }),
            Field::DurationS => self.member(b",\"duration_s\":", r.duration_s(), Self::number),
            Field::CloseCause => self.member(b",\"close_cause\":", r.close_cause(), |w, c| {
                w.name_value(c.id())
            }),
            Field::Cell => self.member(b",\"cell\":{\"mcc\":", r.cell(), |w, c| {
                w.str_value(c.mcc)?;
                w.bytes(b",\"mnc\":")?;
                w.str_value(c.mnc)?;
                w.bytes(b",\"lac_or_tac\":")?;
                w.number(c.lac_or_tac)?;
                w.member(b",\"cell_id\":", c.cell_id, Self::number)?;
                w.put(*b"}")
            }),
            Field::ServingPlmn => self.text(b",\"serving_plmn\":", r.text(Field::ServingPlmn)),
            Field::ServiceCentre => {
                self.text(b",\"service_centre\":", r.text(Field::ServiceCentre))
            }
            Field::Apn => self.text(b",\"apn\":", r.text(Field::Apn)),
            Field::ChargingId => self.member(b",\"charging_id\":", r.charging_id(), Self::number),
            Field::Rat => self.member(b",\"rat\":", r.rat(), |w, rat| w.name_value(rat.id())),
            Field::UeIp => self.text(b",\"ue_ip\":", r.text(Field::UeIp)),
            Field::Usage => self.member(b",\"usage\":[", r.usage().as_ref(), |w, usage| {
                for (i, u) in usage.as_slice().iter().enumerate() {
                    if i > 0 {
                        w.put(*b",")?;
                    }
                    w.bytes(b"{\"rating_group\":")?;
                    w.number(u.rating_group)?;
                    w.bytes(b",\"ul_bytes\":")?;
                    w.number(u.ul_bytes)?;
                    w.bytes(b",\"dl_bytes\":")?;
                    w.number(u.dl_bytes)?;
                    w.put(*b"}")?;
                }
                w.put(*b"]")
            }),
            Field::RecordingEntity => {
                self.text(b",\"recording_entity\":", r.text(Field::RecordingEntity))
            }
            Field::LocalSeqNo => self.member(b",\"local_seq_no\":", r.local_seq_no(), Self::number),
        }
    }

    /// The envelope, as [`envelope`] writes it.
    #[inline(always)]
    fn envelope(&mut self, env: &Envelopes, e: &Envelope<'_>) -> Option<()> {
        self.bytes(b"{\"record_id\":")?;
        match &e.record_id {
            Some(t) => self.str_value(t.as_str())?,
            None => self.put(*b"null")?,
        }
        let fixed = env.of(e);
        self.bytes(&fixed.json_tags)?;
        // The changed fields the input carried, in record order, each followed by a comma
        // (runs of the policy's pieces); the last comma becomes the closing brace. The
        // same runs as the `treatments` header's (`codec::headers`), written out here: a
        // helper shared by both, as a callback or an iterator, cost 28 to 38 more
        // instructions per record (the cursor's position left its register).
        let mut changed = e.facts.changed & e.present;
        if changed == 0 {
            self.put(*b"}")?;
        } else {
            let (pieces, spans) = &fixed.json_treatments;
            let (mut start, mut end) = spans[changed.trailing_zeros() as usize];
            changed &= changed - 1;
            while changed != 0 {
                let (s, e) = spans[changed.trailing_zeros() as usize];
                changed &= changed - 1;
                if s != end {
                    self.bytes(&pieces[start as usize..end as usize])?;
                    start = s;
                }
                end = e;
            }
            self.bytes(&pieces[start as usize..end as usize])?;
            self.set(self.pos() - 1, b'}');
        }
        self.bytes(b",\"key_id\":")?;
        match e.key_id {
            Some(k) => self.str_value(k)?,
            None => self.put(*b"null")?,
        }
        self.bytes(&fixed.json_tail)
    }
}

/// [`encode_copy`] through `Vec` writes, escaping what needs it.
fn encode_copy_vec(env: &Envelopes, c: &Copy<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"record\":");
    write_record(&c.record(), out);
    out.extend_from_slice(b",\"envelope\":");
    envelope(env, &c.envelope, out);
    out.push(b'}');
}

/// A JSON string from input or a policy file: escaped the way serde_json escapes it
/// (also the retention schedule's hand-written entries).
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    if super::json_fast::first_special(s.as_bytes()).is_some() {
        // Rare (record values are identifiers and codes), so serde_json itself escapes it.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// A name from the crate's fixed vocabulary (purpose, basis and enum ids), which holds no
/// character JSON escapes (a test checks every one).
fn name(out: &mut Vec<u8>, s: &'static str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn number<I: itoa::Integer>(out: &mut Vec<u8>, i: I) {
    out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
}

/// `,"name":` for a record field: written as one constant piece (a test checks them
/// against the field names).
const fn field_key(f: Field) -> &'static [u8] {
    match f {
        Field::RecordId => b",\"record_id\":",
        Field::Kind => b",\"kind\":",
        Field::Msisdn => b",\"msisdn\":",
        Field::Imsi => b",\"imsi\":",
        Field::Imei => b",\"imei\":",
        Field::OtherParty => b",\"other_party\":",
        Field::StartTime => b",\"start_time\":",
        Field::DurationS => b",\"duration_s\":",
        Field::CloseCause => b",\"close_cause\":",
        Field::Cell => b",\"cell\":",
        Field::ServingPlmn => b",\"serving_plmn\":",
        Field::ServiceCentre => b",\"service_centre\":",
        Field::Apn => b",\"apn\":",
        Field::ChargingId => b",\"charging_id\":",
        Field::Rat => b",\"rat\":",
        Field::UeIp => b",\"ue_ip\":",
        Field::Usage => b",\"usage\":",
        Field::RecordingEntity => b",\"recording_entity\":",
        Field::LocalSeqNo => b",\"local_seq_no\":",
    }
}

/// A treatment id as a JSON string.
const fn treatment_value(t: Treatment) -> &'static [u8] {
    match t {
        Treatment::Keep => b"\"keep\"",
        Treatment::Drop => b"\"drop\"",
        Treatment::Generalise => b"\"generalise\"",
        Treatment::Mask { .. } => b"\"mask\"",
        Treatment::Pseudonymise => b"\"pseudonymise\"",
        Treatment::Tokenise => b"\"tokenise\"",
    }
}

/// The members of one object. Keys are given with a leading comma, dropped for the first.
struct Members<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Members<'o> {
    fn open(out: &'o mut Vec<u8>) -> Members<'o> {
        out.push(b'{');
        Members { out, first: true }
    }

    /// Writes `,"key":` (without the comma for the first member) and returns the buffer
    /// for the value. Inlined so constant keys are copied without a call.
    #[inline(always)]
    fn key(&mut self, comma_key: &'static [u8]) -> &mut Vec<u8> {
        let skip = usize::from(self.first);
        self.first = false;
        self.out.extend_from_slice(&comma_key[skip..]);
        self.out
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// A treated record as the JSON object of a copy, its fields in the record's order.
pub(super) fn write_record(r: &Treated<'_>, out: &mut Vec<u8>) {
    let open = out.len();
    for f in Field::ALL {
        write_field(f, r, out);
    }
    // Every member was written with a leading comma: the first becomes the brace.
    match out.get_mut(open) {
        Some(first) => *first = b'{',
        None => out.push(b'{'),
    }
    out.push(b'}');
}

/// `,"name":value` for one field of a copy, or nothing where the copy lacks it.
fn write_field(f: Field, r: &Treated<'_>, out: &mut Vec<u8>) {
    let txt = |out: &mut Vec<u8>, v: &Option<Text<'_>>| {
        if let Some(v) = v {
            out.extend_from_slice(field_key(f));
            string(out, v.as_str());
        }
    };
    let key = |out: &mut Vec<u8>| out.extend_from_slice(field_key(f));
    match f {
        Field::RecordId => txt(out, &r.record_id),
        Field::Kind => {
            if let Some(k) = r.kind {
                key(out);
                name(out, k.id());
            }
        }
        Field::Msisdn => txt(out, &r.msisdn),
        Field::Imsi => txt(out, &r.imsi),
        Field::Imei => txt(out, &r.imei),
        Field::OtherParty => txt(out, &r.other_party),
        Field::StartTime => {
            if let Some(t) = r.start_time {
                key(out);
                out.push(b'"');
                out.extend_from_slice(t.to_buf().as_bytes());
                out.push(b'"');
            }
        }
        Field::DurationS => {
            if let Some(d) = r.duration_s {
                key(out);
                number(out, d);
            }
        }
        Field::CloseCause => {
            if let Some(c) = r.close_cause {
                key(out);
                name(out, c.id());
            }
        }
        Field::Cell => {
            if let Some(c) = &r.cell {
                key(out);
                let mut cell = Members::open(out);
                string(cell.key(b",\"mcc\":"), c.mcc);
                string(cell.key(b",\"mnc\":"), c.mnc);
                number(cell.key(b",\"lac_or_tac\":"), c.lac_or_tac);
                if let Some(id) = c.cell_id {
                    number(cell.key(b",\"cell_id\":"), id);
                }
                cell.close();
            }
        }
        Field::ServingPlmn => txt(out, &r.serving_plmn),
        Field::ServiceCentre => txt(out, &r.service_centre),
        Field::Apn => txt(out, &r.apn),
        Field::ChargingId => {
            if let Some(c) = r.charging_id {
                key(out);
                number(out, c);
            }
        }
        Field::Rat => {
            if let Some(rat) = r.rat {
                key(out);
                name(out, rat.id());
            }
        }
        Field::UeIp => txt(out, &r.ue_ip),
        Field::Usage => {
            if let Some(usage) = &r.usage {
                key(out);
                out.push(b'[');
                for (i, u) in usage.as_slice().iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let mut o = Members::open(out);
                    number(o.key(b",\"rating_group\":"), u.rating_group);
                    number(o.key(b",\"ul_bytes\":"), u.ul_bytes);
                    number(o.key(b",\"dl_bytes\":"), u.dl_bytes);
                    o.close();
                }
                out.push(b']');
            }
        }
        Field::RecordingEntity => txt(out, &r.recording_entity),
        Field::LocalSeqNo => {
            if let Some(n) = r.local_seq_no {
                key(out);
                number(out, n);
            }
        }
    }
}

fn envelope(env: &Envelopes, e: &Envelope<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"record_id\":");
    match &e.record_id {
        Some(t) => string(out, t.as_str()),
        None => out.extend_from_slice(b"null"),
    }
    let fixed = env.of(e);
    out.extend_from_slice(&fixed.json_tags);
    // The changed fields the input carried, in record order.
    let mut t = Members { out, first: true };
    let mut changed = e.facts.changed & e.present;
    while changed != 0 {
        let f = Field::ALL[changed.trailing_zeros() as usize];
        changed &= changed - 1;
        t.key(field_key(f))
            .extend_from_slice(treatment_value(e.treatments[f as usize]));
    }
    t.close();
    out.extend_from_slice(b",\"key_id\":");
    match e.key_id {
        Some(k) => string(out, k),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(&fixed.json_tail);
}

/// The envelope from `,"purpose":` to the opening brace of `"treatments"`, for the tags
/// `[purpose, legal_basis, gdpr_article, policy, consent]`: encoded once per policy
/// (`policy::EnvelopeBytes`).
pub(crate) fn envelope_tags(tags: [&str; 5]) -> Box<[u8]> {
    let [purpose, legal_basis, gdpr_article, policy, consent] = tags;
    let mut out = Vec::new();
    let mut m = Members {
        out: &mut out,
        first: false,
    };
    string(m.key(b",\"purpose\":"), purpose);
    string(m.key(b",\"legal_basis\":"), legal_basis);
    string(m.key(b",\"gdpr_article\":"), gdpr_article);
    string(m.key(b",\"policy\":"), policy);
    string(m.key(b",\"consent\":"), consent);
    m.key(b",\"treatments\":").push(b'{');
    out.into_boxed_slice()
}

/// `"name":"treatment",` for every field under `map`, in record order, and where each
/// sits: encoded once per policy (`codec::EnvelopeBytes`).
pub(crate) fn treatment_pieces(
    map: &[Treatment; Field::COUNT],
) -> (Box<[u8]>, [(u16, u16); Field::COUNT]) {
    let mut out = Vec::new();
    let mut spans = [(0, 0); Field::COUNT];
    for f in Field::ALL {
        let start = out.len() as u16;
        out.extend_from_slice(&field_key(f)[1..]);
        out.extend_from_slice(treatment_value(map[f as usize]));
        out.push(b',');
        spans[f as usize] = (start, out.len() as u16);
    }
    (out.into_boxed_slice(), spans)
}

/// The envelope from `,"retention":` to its closing brace: encoded once per policy.
pub(crate) fn envelope_tail(r: &Retention) -> Box<[u8]> {
    let mut out = Vec::new();
    let mut m = Members {
        out: &mut out,
        first: false,
    };
    let mut ret = Members::open(m.key(b",\"retention\":"));
    string(ret.key(b",\"rule\":"), &r.rule_id);
    name(ret.key(b",\"anchor\":"), r.anchor.id());
    string(ret.key(b",\"after\":"), &r.after);
    let assumption: &[u8] = if r.cite.is_assumption() {
        b"true"
    } else {
        b"false"
    };
    ret.key(b",\"assumption\":").extend_from_slice(assumption);
    ret.close();
    m.close();
    out.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::{CloseCause, Kind, Rat};
    use crate::policy::{Anchor, Basis};
    use crate::vocab::consent::ConsentTag;
    use crate::vocab::treatment::Treatment;

    #[test]
    fn hand_written_copies_are_byte_for_byte_serde_json() {
        let (mut copies, mut anonymised, mut escaped) = (0, 0, 0);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        // A copy of another record than the one written once must not take its bytes.
        let other = crate::core::record::tests::data_record();
        let mut other_scratch = Vec::new();
        let other = RecordJson::new(&other, &mut other_scratch);
        super::super::tests::for_every_copy(|env, r, c| {
            let want = serde_json::to_vec(c).unwrap();
            out.clear();
            encode_copy(env, c, &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want)
            );
            out.clear();
            RecordJson::new(r, &mut scratch).encode_copy(env, c, &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want),
                "through the record's fields written once"
            );
            out.clear();
            other.encode_copy(env, c, &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want),
                "through another record's"
            );
            copies += 1;
            anonymised += usize::from(c.envelope.consent == ConsentTag::Absent);
            escaped += usize::from(want.windows(2).any(|w| w == b"\\u"));
        });
        // The comparison covered the cases that take different paths.
        assert!(copies > 10_000 && anonymised > 100 && escaped > 100);
    }

    #[test]
    fn fields_taken_from_the_input_are_the_fields_written() {
        let cfg = crate::adapters::generate::GenConfig {
            records: 600,
            subscribers: 50,
            malformed_rate: 0.0,
            ..Default::default()
        };
        let (mut laid_out, mut declined) = (0, 0);
        let keys = crate::core::pseudonym::tests::test_keyring();
        let policies: Vec<_> = crate::policy::SHIPPED
            .iter()
            .map(|(name, text)| crate::policy::parse_policy(text, name).unwrap())
            .collect();
        let mut everyone = crate::core::control::SubscriberState::default();
        for p in crate::vocab::purpose::Purpose::ALL {
            everyone.consented.set(p, true);
        }
        let states = [crate::core::control::SubscriberState::default(), everyone];
        for l in crate::adapters::generate::generate(&cfg).lines {
            let crate::adapters::generate::Line::Record(r) = l else {
                continue;
            };
            let compact = serde_json::to_vec(&r).unwrap();
            let mut v: serde_json::Value = serde_json::from_slice(&compact).unwrap();
            let pretty = serde_json::to_vec_pretty(&v).unwrap();
            // serde_json's maps sort their keys: record order no longer.
            let sorted = serde_json::to_vec(&v).unwrap();
            v["start_time"] =
                serde_json::Value::from(r.start_time.to_string().replace('Z', "+00:00"));
            let offset = serde_json::to_vec(&v).unwrap();
            let mut bom = super::super::BOM.to_vec();
            bom.extend_from_slice(&compact);
            for input in [&compact, &pretty, &sorted, &offset, &bom] {
                let d = decode_record_laid_out(input).unwrap();
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let from_input = RecordJson::of_input(&d, &mut a);
                let written = RecordJson::new(&d.record, &mut b);
                if d.layout.is_some() {
                    laid_out += 1;
                } else {
                    declined += 1;
                }
                for f in Field::ALL {
                    let (s, e) = from_input.spans[f as usize];
                    let (ws, we) = written.spans[f as usize];
                    let mut got = from_input.buf[s as usize..e as usize].to_vec();
                    // The first field's leading byte is the object's brace.
                    if got.first() == Some(&b'{') {
                        got[0] = b',';
                    }
                    assert_eq!(
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(&written.buf[ws as usize..we as usize]),
                        "{f:?} of {}",
                        String::from_utf8_lossy(input)
                    );
                }
                // Adjacent fields are adjacent bytes, so runs of them are one move.
                for w in from_input.spans.windows(2) {
                    assert_eq!(w[0].1, w[1].0);
                }
                // And every copy of it is the copy serde writes.
                for policy in &policies {
                    let env = Envelopes::new(policy);
                    for st in &states {
                        let t = d.record.start_time;
                        for c in
                            &crate::core::process::process(&d.record, policy, st, &keys, t).copies
                        {
                            let mut out = Vec::new();
                            from_input.encode_copy(&env, c, &mut out);
                            assert_eq!(
                                String::from_utf8_lossy(&out),
                                String::from_utf8_lossy(&serde_json::to_vec(c).unwrap())
                            );
                        }
                    }
                }
            }
        }
        // The compact form and the byte-order-marked one are laid out; the pretty,
        // sorted and offset ones are not.
        assert!(
            laid_out >= 1_000 && declined >= 1_500,
            "{laid_out} {declined}"
        );
    }

    #[test]
    fn each_field_names_every_field_in_order() {
        let mut seen = Vec::new();
        each_field!(F => seen.push(F));
        assert_eq!(seen, Field::ALL);
    }

    #[test]
    fn constant_pieces_match_the_names() {
        for f in Field::ALL {
            assert_eq!(field_key(f), format!(",\"{}\":", f.name()).as_bytes());
        }
        for t in [
            Treatment::Keep,
            Treatment::Drop,
            Treatment::Generalise,
            Treatment::Mask { first: 1, last: 1 },
            Treatment::Pseudonymise,
            Treatment::Tokenise,
        ] {
            assert_eq!(treatment_value(t), format!("\"{}\"", t.id()).as_bytes());
        }
    }

    #[test]
    fn vocabulary_written_unescaped_needs_no_escape() {
        let fields = Field::ALL.map(Field::name);
        let purposes = crate::vocab::purpose::Purpose::ALL.map(|p| p.id());
        let treatments = [
            Treatment::Keep,
            Treatment::Drop,
            Treatment::Generalise,
            Treatment::Mask { first: 0, last: 0 },
            Treatment::Pseudonymise,
            Treatment::Tokenise,
        ]
        .map(Treatment::id);
        let consents = [
            ConsentTag::Granted,
            ConsentTag::NotRequired,
            ConsentTag::Absent,
        ]
        .map(ConsentTag::id);
        let anchors = [
            Anchor::EventTime,
            Anchor::InvoiceSettled,
            Anchor::ContractEnd,
        ]
        .map(Anchor::id);
        let kinds = Kind::ALL.map(Kind::id);
        let causes = CloseCause::ALL.map(CloseCause::id);
        let rats = Rat::ALL.map(Rat::id);
        let bases = Basis::ALL.map(Basis::id);
        let articles = Basis::ALL.map(Basis::article);
        let other = ["anonymous", "recital 26"];
        let every = [
            &fields[..],
            &purposes,
            &treatments,
            &consents,
            &anchors,
            &kinds,
            &causes,
            &rats,
            &bases,
            &articles,
            &other,
        ];
        for s in every.concat() {
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
    }
}

#[cfg(test)]
mod serialisation {
    use super::*;
    use crate::core::control::SubscriberState;
    use crate::core::process::process;
    use crate::core::pseudonym::tests::test_keyring;
    use crate::core::record::tests::data_record;
    use crate::policy::{parse_policy, shipped};
    use crate::vocab::purpose::{Purpose, PurposeSet};
    use crate::vocab::time::Millis;

    /// Regression: the first line of a records or control file saved with a byte-order
    /// mark went to the dead letter as malformed JSON.
    #[test]
    fn a_byte_order_mark_before_a_record_or_event_is_skipped() {
        let r = data_record();
        let text = [&b"\xEF\xBB\xBF"[..], &serde_json::to_vec(&r).unwrap()].concat();
        assert_eq!(decode_record(&text).unwrap(), r);
        // serde's path as well as the fast one (an escape sends a record to serde).
        let escaped = serde_json::to_string(&r)
            .unwrap()
            .replacen("\"+", "\"\\u002b", 1);
        assert!(escaped.contains("\\u002b"), "{escaped}");
        let escaped = [&b"\xEF\xBB\xBF"[..], escaped.as_bytes()].concat();
        assert_eq!(decode_record(&escaped).unwrap(), r);
        let event =
            br#"{"type":"erasure","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z"}"#;
        let with_bom = [&b"\xEF\xBB\xBF"[..], &event[..]].concat();
        assert_eq!(decode_control(&with_bom), decode_control(event));
        assert!(decode_control(event).is_ok());
        // Only at the start: anywhere else it is not JSON.
        let inside = [&event[..1], &b"\xEF\xBB\xBF"[..], &event[1..]].concat();
        assert!(decode_control(&inside).is_err());
        assert_eq!(strip_bom_twice(), b"\xEF\xBB\xBF{}");
    }

    /// One mark is skipped, not every one.
    fn strip_bom_twice() -> &'static [u8] {
        crate::codec::strip_bom(b"\xEF\xBB\xBF\xEF\xBB\xBF{}")
    }

    #[test]
    fn a_record_survives_a_json_round_trip() {
        let r = data_record();
        let text = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode_record(&text).unwrap(), r);
        // Field names are the contract's.
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for n in names {
            assert!(crate::vocab::purpose::Field::from_name(n).is_some(), "{n}");
        }
    }

    fn copies_of(
        policy: &str,
        consented: &[Purpose],
    ) -> (crate::policy::Policy, Vec<serde_json::Value>) {
        let p = parse_policy(shipped(policy).unwrap(), policy).unwrap();
        let keys = test_keyring();
        let mut state = SubscriberState::default();
        let mut set = PurposeSet::EMPTY;
        for c in consented {
            set.set(*c, true);
        }
        state.consented = set;
        let r = data_record();
        let out = process(&r, &p, &state, &keys, Millis(0))
            .copies
            .iter()
            .map(|c| {
                let mut line = Vec::new();
                encode_copy(&Envelopes::new(&p), c, &mut line);
                serde_json::from_slice(&line).unwrap()
            })
            .collect();
        (p, out)
    }

    #[test]
    fn envelopes_carry_every_tag_in_order_and_only_changed_treatments() {
        let (_, copies) = copies_of("excedo", &[Purpose::Analytics]);
        let billing = copies
            .iter()
            .find(|c| c["envelope"]["purpose"] == "billing")
            .unwrap();
        let keys: Vec<&str> = billing["envelope"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        let mut want = vec![
            "record_id",
            "purpose",
            "legal_basis",
            "gdpr_article",
            "policy",
            "consent",
            "treatments",
            "key_id",
            "retention",
        ];
        want.sort_unstable();
        assert_eq!(sorted, want);
        let e = &billing["envelope"];
        assert_eq!(e["record_id"], "r-1");
        assert_eq!(e["legal_basis"], "contract");
        assert_eq!(e["gdpr_article"], "6(1)(b)");
        assert_eq!(e["policy"], "excedo@2018-05-25");
        assert_eq!(e["consent"], "not_required");
        assert!(e["key_id"].is_null());
        // Billing drops what a data record has and it does not need; kept fields are not
        // listed.
        assert_eq!(
            e["treatments"],
            serde_json::json!({"imei": "drop", "cell": "drop", "ue_ip": "drop"})
        );
        assert_eq!(
            e["retention"],
            serde_json::json!({"rule": "excedo.billing", "anchor": "invoice_settled", "after": "6 months", "assumption": false})
        );
        let analytics = copies
            .iter()
            .find(|c| c["envelope"]["purpose"] == "analytics")
            .unwrap();
        let e = &analytics["envelope"];
        assert_eq!(
            (e["consent"].as_str(), e["legal_basis"].as_str()),
            (Some("granted"), Some("consent"))
        );
        assert_eq!(e["key_id"], "test1.analytics");
        assert_eq!(e["treatments"]["msisdn"], "pseudonymise");
        assert_eq!(e["treatments"]["start_time"], "generalise");
        assert_eq!(e["retention"]["assumption"], true);
        assert!(
            analytics["record"]["msisdn"]
                .as_str()
                .unwrap()
                .starts_with("test1.analytics:")
        );
    }

    #[test]
    fn anonymised_copies_serialise_with_no_link_back() {
        let (_, copies) = copies_of("alleato", &[]);
        let a = copies
            .iter()
            .find(|c| c["envelope"]["purpose"] == "analytics")
            .unwrap();
        assert!(a["envelope"]["record_id"].is_null() && a["envelope"]["key_id"].is_null());
        assert_eq!(a["envelope"]["legal_basis"], "anonymous");
        assert_eq!(a["envelope"]["gdpr_article"], "recital 26");
        assert_eq!(
            a["record"],
            serde_json::json!({"kind": "data", "duration_s": 3600, "usage": [{"rating_group": 0, "ul_bytes": 1000, "dl_bytes": 1000}]})
        );
    }

    #[test]
    fn the_treatments_header_lists_each_changed_field_the_input_had() {
        let mut scratch = String::new();
        super::super::tests::for_every_copy(|env, _, c| {
            let want: Vec<String> = c
                .envelope
                .changed()
                .map(|(f, t)| format!("{}={}", f.name(), t.id()))
                .collect();
            let h = crate::codec::headers(env, c, &mut scratch);
            assert_eq!(h[6], ("treatments", want.join(",").as_str()));
        });
    }

    #[test]
    fn headers_repeat_the_envelope_in_design_order() {
        let p = parse_policy(shipped("excedo").unwrap(), "excedo").unwrap();
        let keys = test_keyring();
        let mut state = SubscriberState::default();
        state.consented.set(Purpose::Marketing, true);
        let r = data_record();
        let d = process(&r, &p, &state, &keys, Millis(0));
        let marketing = d
            .copies
            .iter()
            .find(|c| c.envelope.purpose == Purpose::Marketing)
            .unwrap();
        let mut scratch = String::new();
        let env = Envelopes::new(&p);
        let h = crate::codec::headers(&env, marketing, &mut scratch);
        let names: Vec<&str> = h.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "record_id",
                "purpose",
                "legal_basis",
                "gdpr_article",
                "policy",
                "consent",
                "treatments",
                "key_id",
                "retention"
            ]
        );
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).unwrap().1;
        assert_eq!(get("purpose"), "marketing");
        assert_eq!(get("consent"), "granted");
        assert_eq!(get("key_id"), "test1.marketing");
        assert_eq!(get("retention"), "excedo.marketing");
        assert!(
            get("record_id").starts_with("test1.marketing:"),
            "a pseudonym, not r-1"
        );
        let t = get("treatments");
        assert!(t.starts_with("record_id=drop,msisdn=tokenise,"), "{t}");
        assert!(
            !t.contains("kind=") && !t.contains("usage="),
            "kept fields are not listed: {t}"
        );
    }

    /// Regression: dead-letter reasons repeated the offending value
    /// (`invalid type: integer `46701234567``), which may be a phone number.
    #[test]
    fn decode_errors_name_the_field_and_problem_but_never_the_value() {
        let good = serde_json::to_value(data_record()).unwrap();
        let with = |k: &str, v: serde_json::Value| {
            let mut o = good.clone();
            o[k] = v;
            o.to_string()
        };
        let cases = [
            (
                with("msisdn", 46701234567u64.into()),
                "field msisdn: invalid type: integer, expected",
            ),
            (
                with("kind", "46701234567".into()),
                "field kind: unknown variant, expected one of `moc`",
            ),
            (
                with("local_seq_no", "46701234567".into()),
                "field local_seq_no: invalid type: string, expected u64",
            ),
            (
                with("start_time", "46701234567".into()),
                "field start_time: invalid value, expected",
            ),
            (
                with("46701234567", 1.into()),
                "unknown field (its name is not repeated)",
            ),
            (
                with("colour", "46701234567".into()),
                "unknown field `colour`, not in the contract",
            ),
            (
                {
                    let mut o = good.clone();
                    o.as_object_mut().unwrap().remove("imsi");
                    o.to_string()
                },
                "missing field `imsi`",
            ),
            (
                r#"{"msisdn": "46701234567""#.to_string(),
                "EOF while parsing",
            ),
        ];
        for (line, want) in cases {
            let e = decode_record(line.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(!e.contains("46701234567"), "{e:?} repeats the value");
            assert!(e.contains("(line 1, column "), "{e:?} lacks the position");
        }
        let e = decode_control(
            br#"{"type":"consent","msisdn":46701234567,"at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap_err();
        assert!(
            e.starts_with("field msisdn: invalid type: integer") && !e.contains("46701234567"),
            "{e}"
        );
        let e =
            decode_control(br#"{"type":"consent","msisdn":"+46701234567","at":"+46701234567"}"#)
                .unwrap_err();
        assert!(
            e.starts_with("field at: invalid value") && !e.contains("4670"),
            "{e}"
        );
    }
}
