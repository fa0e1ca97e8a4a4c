//! Consent as a copy's envelope states it.

use serde::Serialize;

/// Consent as the envelope states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentTag {
    /// The purpose rests on consent and the subscriber gave it.
    Granted,
    /// The purpose does not rest on consent.
    NotRequired,
    /// The purpose rests on consent, none is recorded: only an anonymised copy is made.
    Absent,
}

impl ConsentTag {
    /// Every state, in declaration order (the index of `PurposeRule::envelopes`).
    pub const ALL: [ConsentTag; 3] = [
        ConsentTag::Granted,
        ConsentTag::NotRequired,
        ConsentTag::Absent,
    ];
    /// The header value.
    pub const fn id(self) -> &'static str {
        match self {
            ConsentTag::Granted => "granted",
            ConsentTag::NotRequired => "not_required",
            ConsentTag::Absent => "absent",
        }
    }
}
