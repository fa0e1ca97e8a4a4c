//! Wire formats: records and control events in, copies and expiry events out, as JSON or
//! the bincode-compatible binary encoding (via `wincode`).
//!
//! Decoding checks cheaply first and borrows from the input buffer; a record that fails
//! comes back as a [`DeadLetter`] reason instead of stopping the stream. Copies are
//! written through one output cursor (`cursor`); a record's JSON fields are written once
//! for all of its copies (`json::RecordJson`), as the input's own bytes where the input
//! is laid out as copies are written.

/// Runs `$body` once for each field, in record order, with `$f` naming it as a constant:
/// each `match` on the field then folds away, which a loop over `Field::ALL` did not
/// allow (a test holds the list to `Field::ALL`).
macro_rules! each_field {
    ($f:ident => $body:expr) => {{
        {
            const $f: Field = Field::RecordId;
            $body
        }
        {
            const $f: Field = Field::Kind;
            $body
        }
        {
            const $f: Field = Field::Msisdn;
            $body
        }
        {
            const $f: Field = Field::Imsi;
            $body
        }
        {
            const $f: Field = Field::Imei;
            $body
        }
        {
            const $f: Field = Field::OtherParty;
            $body
        }
        {
            const $f: Field = Field::StartTime;
            $body
        }
        {
            const $f: Field = Field::DurationS;
            $body
        }
        {
            const $f: Field = Field::CloseCause;
            $body
        }
        {
            const $f: Field = Field::Cell;
            $body
        }
        {
            const $f: Field = Field::ServingPlmn;
            $body
        }
        {
            const $f: Field = Field::ServiceCentre;
            $body
        }
        {
            const $f: Field = Field::Apn;
            $body
        }
        {
            const $f: Field = Field::ChargingId;
            $body
        }
        {
            const $f: Field = Field::Rat;
            $body
        }
        {
            const $f: Field = Field::UeIp;
            $body
        }
        {
            const $f: Field = Field::Usage;
            $body
        }
        {
            const $f: Field = Field::RecordingEntity;
            $body
        }
        {
            const $f: Field = Field::LocalSeqNo;
            $body
        }
    }};
}

pub mod binary;
mod cursor;
#[cfg(test)]
mod field_table;
pub mod json;
mod json_fast;

use std::fmt::Write;

use crate::core::process::Copy;
use crate::core::process::Envelope;
use crate::core::record::{CloseCause, Kind, Rat};
use crate::core::treat::{CellOut, Text, Treated, UsageOut};
use crate::policy::{Policy, PurposeRule};
use crate::vocab::consent::ConsentTag;
use crate::vocab::purpose::{Field, Purpose};
use crate::vocab::time::Millis;
use crate::vocab::treatment::Treatment;

/// The largest record accepted, in both modes: a CDR is a few hundred bytes, so anything
/// this large is a broken feed, and the limit bounds what one record can cost in memory.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// The dead-letter reason of a record over [`MAX_RECORD_BYTES`], the same in both modes.
pub fn too_large(len: u64) -> String {
    format!(
        "record of {len} bytes is larger than the limit of {MAX_RECORD_BYTES} bytes; the dead letter holds its first {MAX_RECORD_BYTES} bytes"
    )
}

/// Input and output encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per message or line.
    Json,
    /// bincode-compatible binary (fixed-width little-endian integers, u64 lengths).
    Binary,
}

/// The UTF-8 byte-order mark that some editors (Notepad, Excel's "UTF-8 CSV") write at
/// the start of a text file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `bytes` without a leading UTF-8 byte-order mark. A JSON-lines file saved with one
/// carries it at the start of its first line, which is otherwise a good record or event:
/// the decoders skip it rather than send that line to the dead letter.
pub fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(BOM).unwrap_or(bytes)
}

/// Why a record could not be processed: goes to the dead letter with its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not parseable in the format, or unknown fields.
    #[error("malformed {format}: {detail}")]
    Malformed {
        /// `json` or `binary`.
        format: &'static str,
        /// The parser's account.
        detail: String,
    },
    /// Parsed, but breaks the record contract.
    #[error("invalid record: {0}")]
    Invalid(#[from] crate::core::record::RecordError),
}

impl DecodeError {
    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// A record that went to the dead letter: reason, where it was, and its original bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Why.
    pub reason: String,
    /// Where: `file:line` in replay, `topic/partition@offset` in Kafka mode.
    pub position: String,
    /// The original input, as text (lossy for binary input: then hex).
    pub original: String,
}

/// The constant runs of the envelopes of one purpose's copies in one consent state,
/// encoded once per policy: the encoders copy each in one piece instead of writing its
/// tags one by one. Only the record id, the key id and which fields the input carried
/// vary per copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvelopeBytes {
    /// Binary: `purpose`, `legal_basis`, `gdpr_article`, `policy` and `consent`, each a
    /// string (rows 21-25 of `CopyWire` in `schemas/binary.md`).
    pub binary_tags: Box<[u8]>,
    /// Binary: the treatment code of every field (row 26) as if the input carried them
    /// all, padded to 24 bytes; a copy sets 0xFF over the fields its input lacked.
    pub binary_codes: [u8; 24],
    /// Binary: the retention rule id (row 28).
    pub binary_rule: Box<[u8]>,
    /// JSON: from `,"purpose":` to the opening brace of `"treatments"`.
    pub json_tags: Box<[u8]>,
    /// JSON: from `,"retention":` to the envelope's closing brace.
    pub json_tail: Box<[u8]>,
    /// JSON: `"name":"treatment",` for every field under the map, in record order, and
    /// where each sits: a copy's changed fields are runs of these.
    pub json_treatments: (Box<[u8]>, [(u16, u16); Field::COUNT]),
    /// The `treatments` header's `name=treatment,` for every field under the map, in
    /// record order, and where each sits, as `json_treatments`.
    pub header_treatments: (Box<str>, [(u16, u16); Field::COUNT]),
}

/// Every envelope's constant runs for one policy, built from the compiled policy once
/// (the policy itself knows nothing of encodings). Copies are encoded with the table of
/// the policy that made them.
#[derive(Clone, Debug)]
pub struct Envelopes {
    policy: String,
    table: [[EnvelopeBytes; 3]; Purpose::COUNT],
}

impl Envelopes {
    /// The table of `policy`'s declared purposes in every consent state.
    pub fn new(policy: &Policy) -> Envelopes {
        let mut table: [[EnvelopeBytes; 3]; Purpose::COUNT] = Default::default();
        for rule in policy.declared() {
            table[rule.purpose as usize] =
                ConsentTag::ALL.map(|c| envelope_bytes(rule, c, &policy.tag));
        }
        Envelopes {
            policy: policy.tag.clone(),
            table,
        }
    }

    /// The constant runs of a copy's envelope.
    #[inline(always)]
    pub(crate) fn of(&self, e: &Envelope<'_>) -> &EnvelopeBytes {
        debug_assert_eq!(
            e.policy, self.policy,
            "a copy encoded with another policy's table"
        );
        &self.table[e.purpose as usize][e.consent as usize]
    }
}

fn envelope_bytes(rule: &PurposeRule, consent: ConsentTag, policy: &str) -> EnvelopeBytes {
    let (legal_basis, gdpr_article) = rule.basis_tags(consent);
    let tags = [
        rule.purpose.id(),
        legal_basis,
        gdpr_article,
        policy,
        consent.id(),
    ];
    let mut binary_codes = [0u8; 24];
    for (code, t) in binary_codes.iter_mut().zip(rule.map(consent)) {
        *code = binary::treatment_code(*t);
    }
    EnvelopeBytes {
        binary_tags: binary::strings(&tags),
        binary_codes,
        binary_rule: binary::strings(&[&rule.retention.rule_id]),
        json_tags: json::envelope_tags(tags),
        json_tail: json::envelope_tail(&rule.retention),
        json_treatments: json::treatment_pieces(rule.map(consent)),
        header_treatments: header_treatment_pieces(rule.map(consent)),
    }
}

/// `name=treatment,` for every field under `map`, in record order, and where each sits.
fn header_treatment_pieces(
    map: &[Treatment; Field::COUNT],
) -> (Box<str>, [(u16, u16); Field::COUNT]) {
    let mut out = String::new();
    let mut spans = [(0, 0); Field::COUNT];
    for f in Field::ALL {
        let start = out.len() as u16;
        let _ = write!(out, "{}={},", f.name(), map[f as usize].id());
        spans[f as usize] = (start, out.len() as u16);
    }
    (out.into_boxed_str(), spans)
}

/// A copy's fields as the cursor writers read them: from a copy itself (its record,
/// field map and computed values) or from a built treated record (a record's own fields,
/// written once for its copies by `json::RecordJson`).
pub(crate) trait CopyFields {
    /// Text field `f`, where carried.
    fn text(&self, f: Field) -> Option<&str>;
    /// The kind, where carried.
    fn kind(&self) -> Option<Kind>;
    /// The start time, where carried.
    fn start_time(&self) -> Option<Millis>;
    /// The duration, where carried.
    fn duration_s(&self) -> Option<u32>;
    /// The close cause, where carried.
    fn close_cause(&self) -> Option<CloseCause>;
    /// The cell, where carried.
    fn cell(&self) -> Option<CellOut<'_>>;
    /// The charging id, where carried.
    fn charging_id(&self) -> Option<u64>;
    /// The radio technology, where carried.
    fn rat(&self) -> Option<Rat>;
    /// The volumes, where carried.
    fn usage(&self) -> Option<UsageOut<'_>>;
    /// The sequence number, where carried.
    fn local_seq_no(&self) -> Option<u64>;
}

impl CopyFields for Copy<'_> {
    #[inline(always)]
    fn text(&self, f: Field) -> Option<&str> {
        Copy::text(self, f)
    }
    #[inline(always)]
    fn kind(&self) -> Option<Kind> {
        Copy::kind(self)
    }
    #[inline(always)]
    fn start_time(&self) -> Option<Millis> {
        Copy::start_time(self)
    }
    #[inline(always)]
    fn duration_s(&self) -> Option<u32> {
        Copy::duration_s(self)
    }
    #[inline(always)]
    fn close_cause(&self) -> Option<CloseCause> {
        Copy::close_cause(self)
    }
    #[inline(always)]
    fn cell(&self) -> Option<CellOut<'_>> {
        Copy::cell(self)
    }
    #[inline(always)]
    fn charging_id(&self) -> Option<u64> {
        Copy::charging_id(self)
    }
    #[inline(always)]
    fn rat(&self) -> Option<Rat> {
        Copy::rat(self)
    }
    #[inline(always)]
    fn usage(&self) -> Option<UsageOut<'_>> {
        Copy::usage(self)
    }
    #[inline(always)]
    fn local_seq_no(&self) -> Option<u64> {
        Copy::local_seq_no(self)
    }
}

impl CopyFields for Treated<'_> {
    #[inline(always)]
    fn text(&self, f: Field) -> Option<&str> {
        match f {
            Field::RecordId => self.record_id.as_ref(),
            Field::Msisdn => self.msisdn.as_ref(),
            Field::Imsi => self.imsi.as_ref(),
            Field::Imei => self.imei.as_ref(),
            Field::OtherParty => self.other_party.as_ref(),
            Field::ServingPlmn => self.serving_plmn.as_ref(),
            Field::ServiceCentre => self.service_centre.as_ref(),
            Field::Apn => self.apn.as_ref(),
            Field::UeIp => self.ue_ip.as_ref(),
            Field::RecordingEntity => self.recording_entity.as_ref(),
            _ => None,
        }
        .map(Text::as_str)
    }
    #[inline(always)]
    fn kind(&self) -> Option<Kind> {
        self.kind
    }
    #[inline(always)]
    fn start_time(&self) -> Option<Millis> {
        self.start_time
    }
    #[inline(always)]
    fn duration_s(&self) -> Option<u32> {
        self.duration_s
    }
    #[inline(always)]
    fn close_cause(&self) -> Option<CloseCause> {
        self.close_cause
    }
    #[inline(always)]
    fn cell(&self) -> Option<CellOut<'_>> {
        self.cell.clone()
    }
    #[inline(always)]
    fn charging_id(&self) -> Option<u64> {
        self.charging_id
    }
    #[inline(always)]
    fn rat(&self) -> Option<Rat> {
        self.rat
    }
    #[inline(always)]
    fn usage(&self) -> Option<UsageOut<'_>> {
        self.usage.clone()
    }
    #[inline(always)]
    fn local_seq_no(&self) -> Option<u64> {
        self.local_seq_no
    }
}

/// The header values of a copy, in DESIGN.md's order, so Kafka consumers can filter
/// without parsing. `scratch` holds the treatments list and is reused across copies;
/// the list is made of runs of the policy's pieces (formatting each entry cost more than
/// the rest of the headers).
pub fn headers<'c>(
    env: &'c Envelopes,
    c: &'c Copy<'_>,
    scratch: &'c mut String,
) -> [(&'static str, &'c str); 9] {
    let e = &c.envelope;
    scratch.clear();
    let mut changed = e.facts.changed & e.present;
    if changed != 0 {
        let (pieces, spans) = &env.of(e).header_treatments;
        let (mut start, mut end) = spans[changed.trailing_zeros() as usize];
        changed &= changed - 1;
        while changed != 0 {
            let (s, e) = spans[changed.trailing_zeros() as usize];
            changed &= changed - 1;
            if s != end {
                scratch.push_str(&pieces[start as usize..end as usize]);
                start = s;
            }
            end = e;
        }
        // Without the last entry's comma.
        scratch.push_str(&pieces[start as usize..end as usize - 1]);
    }
    [
        ("record_id", e.record_id.as_ref().map_or("", |t| t.as_str())),
        ("purpose", e.purpose.id()),
        ("legal_basis", e.legal_basis),
        ("gdpr_article", e.gdpr_article),
        ("policy", e.policy),
        ("consent", e.consent.id()),
        ("treatments", scratch.as_str()),
        ("key_id", e.key_id.unwrap_or("")),
        ("retention", e.retention.rule_id.as_str()),
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::adapters::generate::{GenConfig, Line, generate};
    use crate::core::control::SubscriberState;
    use crate::core::process::{Copy, process};
    use crate::core::pseudonym::tests::test_keyring;
    use crate::core::record::Record;
    use crate::policy::{SHIPPED, parse_policy};
    use crate::vocab::purpose::{Purpose, PurposeSet};

    /// Runs `check` on every copy that the generator's records make under every shipped
    /// policy and a range of subscriber states, so hand-written encoders can be compared
    /// with their reference. Some records carry strings that JSON must escape.
    pub(crate) fn for_every_copy(mut check: impl FnMut(&super::Envelopes, &Record<'_>, &Copy<'_>)) {
        let cfg = GenConfig {
            records: 1_500,
            subscribers: 100,
            malformed_rate: 0.0,
            ..GenConfig::default()
        };
        let mut records: Vec<_> = generate(&cfg)
            .lines
            .into_iter()
            .filter_map(|l| match l {
                Line::Record(r) => Some(r),
                Line::Malformed(_) => None,
            })
            .collect();
        for r in records.iter_mut().step_by(40) {
            r.record_id = format!("{}\"\\\n\u{1}\u{1f}é\u{7f}", r.record_id).into();
            r.recording_entity = format!("{}\t\u{8}\u{c}\r/", r.recording_entity).into();
        }
        // Copies longer than the binary encoder's chunk (long usage lists) and values longer
        // than its inline small copies (long record ids).
        for r in records.iter_mut().skip(7).step_by(30) {
            if let Some(u) = &mut r.usage {
                let e = u[0];
                u.resize(45, e);
            }
            r.record_id = format!("{:x<128}", r.record_id).into();
        }
        let all = {
            let mut s = PurposeSet::EMPTY;
            Purpose::ALL.iter().for_each(|p| s.set(*p, true));
            s
        };
        let states = [
            SubscriberState::default(),
            SubscriberState {
                consented: all,
                ..Default::default()
            },
            SubscriberState {
                consented: all,
                objected: all,
                ..Default::default()
            },
            SubscriberState {
                restricted: true,
                ..Default::default()
            },
        ];
        let keys = test_keyring();
        for (name, text) in SHIPPED {
            let policy = parse_policy(text, name).unwrap();
            let envelopes = super::Envelopes::new(&policy);
            for r in &records {
                for s in &states {
                    for c in &process(r, &policy, s, &keys, r.start_time).copies {
                        check(&envelopes, r, c);
                    }
                }
            }
        }
    }
}
