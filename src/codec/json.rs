//! JSON: records and control events in, copies and expiry events out.

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

use super::DecodeError;
use crate::core::control::{ControlEvent, RawControl};
use crate::core::process::{Copy, Envelope};
use crate::core::purpose::Field;
use crate::core::record::Record;
use crate::core::treat::{Text, Treated};
use crate::policy::Treatment;

/// Decodes and validates one record; strings borrow from `bytes` where unescaped.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    let r = match super::json_fast::record(bytes) {
        Some(r) => r,
        None => serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed {
            format: "json",
            detail: e.to_string(),
        })?,
    };
    r.validate()?;
    Ok(r)
}

/// Decodes and checks one control event.
pub fn decode_control(bytes: &[u8]) -> Result<ControlEvent, String> {
    let raw: RawControl<'_> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    raw.into_event().map_err(|e| e.to_string())
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
        m.serialize_field("record", &self.record)?;
        m.serialize_field("envelope", &self.envelope)?;
        m.end()
    }
}

/// Appends one copy as a JSON object (no newline) to `out`.
///
/// The bytes are exactly those `serde_json` writes for the copy's `Serialize` impls (a test
/// holds the two equal over every shipped policy). Written by hand because serde's generic
/// path, one escaped write per key and value, cost two thirds of the JSON pipeline.
pub fn encode_copy(c: &Copy<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"record\":");
    record(&c.record, out);
    out.extend_from_slice(b",\"envelope\":");
    envelope(&c.envelope, out);
    out.push(b'}');
}

/// A JSON string from input or a policy file: escaped the way serde_json escapes it.
fn string(out: &mut Vec<u8>, s: &str) {
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

fn record(r: &Treated<'_>, out: &mut Vec<u8>) {
    let mut m = Members::open(out);
    let txt = |m: &mut Members<'_>, f: Field, v: &Option<Text<'_>>| {
        if let Some(v) = v {
            string(m.key(field_key(f)), v.as_str());
        }
    };
    txt(&mut m, Field::RecordId, &r.record_id);
    if let Some(k) = r.kind {
        name(m.key(field_key(Field::Kind)), k.id());
    }
    txt(&mut m, Field::Msisdn, &r.msisdn);
    txt(&mut m, Field::Imsi, &r.imsi);
    txt(&mut m, Field::Imei, &r.imei);
    txt(&mut m, Field::OtherParty, &r.other_party);
    if let Some(t) = r.start_time {
        let out = m.key(field_key(Field::StartTime));
        out.push(b'"');
        out.extend_from_slice(t.to_buf().as_bytes());
        out.push(b'"');
    }
    if let Some(d) = r.duration_s {
        number(m.key(field_key(Field::DurationS)), d);
    }
    if let Some(c) = r.close_cause {
        name(m.key(field_key(Field::CloseCause)), c.id());
    }
    if let Some(c) = &r.cell {
        let mut cell = Members::open(m.key(field_key(Field::Cell)));
        string(cell.key(b",\"mcc\":"), c.mcc);
        string(cell.key(b",\"mnc\":"), c.mnc);
        number(cell.key(b",\"lac_or_tac\":"), c.lac_or_tac);
        if let Some(id) = c.cell_id {
            number(cell.key(b",\"cell_id\":"), id);
        }
        cell.close();
    }
    txt(&mut m, Field::ServingPlmn, &r.serving_plmn);
    txt(&mut m, Field::ServiceCentre, &r.service_centre);
    txt(&mut m, Field::Apn, &r.apn);
    if let Some(c) = r.charging_id {
        number(m.key(field_key(Field::ChargingId)), c);
    }
    if let Some(rat) = r.rat {
        name(m.key(field_key(Field::Rat)), rat.id());
    }
    txt(&mut m, Field::UeIp, &r.ue_ip);
    if let Some(usage) = r.usage {
        let out = m.key(field_key(Field::Usage));
        out.push(b'[');
        for (i, u) in usage.iter().enumerate() {
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
    txt(&mut m, Field::RecordingEntity, &r.recording_entity);
    if let Some(n) = r.local_seq_no {
        number(m.key(field_key(Field::LocalSeqNo)), n);
    }
    m.close();
}

fn envelope(e: &Envelope<'_>, out: &mut Vec<u8>) {
    let mut m = Members::open(out);
    let out = m.key(b",\"record_id\":");
    match &e.record_id {
        Some(t) => string(out, t.as_str()),
        None => out.extend_from_slice(b"null"),
    }
    name(m.key(b",\"purpose\":"), e.purpose.id());
    name(m.key(b",\"legal_basis\":"), e.legal_basis);
    name(m.key(b",\"gdpr_article\":"), e.gdpr_article);
    string(m.key(b",\"policy\":"), e.policy);
    name(m.key(b",\"consent\":"), e.consent.id());
    let mut t = Members::open(m.key(b",\"treatments\":"));
    for (f, tr) in e.changed() {
        t.key(field_key(f)).extend_from_slice(treatment_value(tr));
    }
    t.close();
    let out = m.key(b",\"key_id\":");
    match e.key_id {
        Some(k) => string(out, k),
        None => out.extend_from_slice(b"null"),
    }
    let r = e.retention;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::process::ConsentTag;
    use crate::core::record::{CloseCause, Kind, Rat};
    use crate::policy::{Anchor, Basis, Treatment};

    #[test]
    fn hand_written_copies_are_byte_for_byte_serde_json() {
        let (mut copies, mut anonymised, mut escaped) = (0, 0, 0);
        let mut out = Vec::new();
        super::super::tests::for_every_copy(|c| {
            out.clear();
            encode_copy(c, &mut out);
            let want = serde_json::to_vec(c).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want)
            );
            copies += 1;
            anonymised += usize::from(c.envelope.consent == ConsentTag::Absent);
            escaped += usize::from(want.windows(2).any(|w| w == b"\\u"));
        });
        // The comparison covered the cases that take different paths.
        assert!(copies > 10_000 && anonymised > 100 && escaped > 100);
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
        let purposes = crate::core::purpose::Purpose::ALL.map(|p| p.id());
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
