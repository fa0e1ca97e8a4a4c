//! What a policy does to one field of a copy.

use serde::Serialize;

/// What happens to one field in a purpose's copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Treatment {
    /// Passed as it is.
    Keep,
    /// Absent from the copy.
    Drop,
    /// Reduced: time to the hour, cell to its area, IP to its network, IMEI to its TAC,
    /// a duration to its class, volumes to their order of magnitude (see `core::treat`).
    Generalise,
    /// Only the first and last characters kept, the rest replaced by `*`.
    Mask {
        /// Characters kept at the start.
        first: u8,
        /// Characters kept at the end.
        last: u8,
    },
    /// Replaced by a keyed, irreversible pseudonym (per-purpose key).
    Pseudonymise,
    /// Replaced by a reversible FF1 token that the key holder can decrypt.
    Tokenise,
}

impl Treatment {
    /// The name used in envelopes and headers.
    pub const fn id(self) -> &'static str {
        match self {
            Treatment::Keep => "keep",
            Treatment::Drop => "drop",
            Treatment::Generalise => "generalise",
            Treatment::Mask { .. } => "mask",
            Treatment::Pseudonymise => "pseudonymise",
            Treatment::Tokenise => "tokenise",
        }
    }
    /// Whether the copy holds any value derived from the field.
    pub const fn passes_data(self) -> bool {
        !matches!(self, Treatment::Drop)
    }
}
