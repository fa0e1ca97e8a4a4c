//! Wire formats: records and control events in, copies and expiry events out, as JSON or
//! the bincode-compatible binary encoding (via `wincode`).
//!
//! Decoding checks cheaply first and borrows from the input buffer; a record that fails
//! comes back as a [`DeadLetter`] reason instead of stopping the stream.

pub mod binary;
pub mod json;

use std::fmt::Write;

use crate::core::process::Copy;

/// Input and output encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per message or line.
    Json,
    /// bincode-compatible binary (fixed-width little-endian integers, u64 lengths).
    Binary,
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

/// The header values of a copy, in DESIGN.md's order, so Kafka consumers can filter
/// without parsing. `scratch` holds the treatments list and is reused across copies.
pub fn headers<'c>(c: &'c Copy<'_>, scratch: &'c mut String) -> [(&'static str, &'c str); 9] {
    let e = &c.envelope;
    scratch.clear();
    for (i, (f, t)) in e.changed().enumerate() {
        if i > 0 {
            scratch.push(',');
        }
        let _ = write!(scratch, "{}={}", f.name(), t.id());
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
