//! JSON: records and control events in, copies and expiry events out.

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

use super::DecodeError;
use crate::core::control::{ControlEvent, RawControl};
use crate::core::process::{Copy, Envelope};
use crate::core::record::Record;

/// Decodes and validates one record; strings borrow from `bytes` where unescaped.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    let r: Record<'_> = serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed {
        format: "json",
        detail: e.to_string(),
    })?;
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
pub fn encode_copy(c: &Copy<'_>, out: &mut Vec<u8>) {
    // Serialising borrowed strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(out, c);
}
