//! Operator policies: the compiled decision table the core consults for every record.
//!
//! `load` turns a policy file into a [`Policy`] (refusing a bad one with every problem
//! listed), `citation` fixes the shape of a citation of the operator's text, `explain`
//! renders a policy as the GDPR Art. 30 record of processing.

pub mod citation;
pub mod explain;
pub mod load;

use serde::Serialize;

use crate::vocab::consent::ConsentTag;
use crate::vocab::purpose::{Category, Field, Purpose};
use crate::vocab::treatment::Treatment;

pub use load::{PolicyError, load_file, parse_policy};

/// A GDPR Art. 6(1) legal basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// 6(1)(a).
    Consent,
    /// 6(1)(b).
    Contract,
    /// 6(1)(c).
    LegalObligation,
    /// 6(1)(d).
    VitalInterests,
    /// 6(1)(e).
    PublicTask,
    /// 6(1)(f).
    LegitimateInterest,
}

impl Basis {
    /// Every basis.
    pub const ALL: [Basis; 6] = [
        Basis::Consent,
        Basis::Contract,
        Basis::LegalObligation,
        Basis::VitalInterests,
        Basis::PublicTask,
        Basis::LegitimateInterest,
    ];
    /// The id used in policy files, envelopes and headers.
    pub const fn id(self) -> &'static str {
        match self {
            Basis::Consent => "consent",
            Basis::Contract => "contract",
            Basis::LegalObligation => "legal_obligation",
            Basis::VitalInterests => "vital_interests",
            Basis::PublicTask => "public_task",
            Basis::LegitimateInterest => "legitimate_interest",
        }
    }
    /// The article, e.g. `6(1)(b)`.
    pub const fn article(self) -> &'static str {
        match self {
            Basis::Consent => "6(1)(a)",
            Basis::Contract => "6(1)(b)",
            Basis::LegalObligation => "6(1)(c)",
            Basis::VitalInterests => "6(1)(d)",
            Basis::PublicTask => "6(1)(e)",
            Basis::LegitimateInterest => "6(1)(f)",
        }
    }
    /// Looks a basis up by id.
    pub fn from_id(s: &str) -> Option<Basis> {
        Basis::ALL.into_iter().find(|b| b.id() == s)
    }
}

/// Where a rule comes from: the operator's text, or an assumption the file makes openly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cite {
    /// Seed file and section (and quote) stating the rule.
    Source(String),
    /// The source is silent; the file fills the gap with this reason.
    Assumption(String),
}

impl Cite {
    /// Whether the rule is an assumption rather than the operator's statement.
    pub fn is_assumption(&self) -> bool {
        matches!(self, Cite::Assumption(_))
    }
    /// The text of the citation or the assumption's reason.
    pub fn text(&self) -> &str {
        match self {
            Cite::Source(s) | Cite::Assumption(s) => s,
        }
    }
}

/// What a purpose does without the consent it requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WithoutConsent {
    /// No copy is made.
    NoCopy,
    /// An anonymised copy (the purpose's `anonymised` field map) is made.
    Anonymised,
}

/// What a right does to a purpose: the effect and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RightRule {
    /// True: the purpose stops (restriction, objection) or its copies expire (erasure).
    pub stops: bool,
    /// Where the rule comes from.
    pub cite: Cite,
}

/// When a retention clock starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Anchor {
    /// The record's own start time.
    EventTime,
    /// The settlement of the invoice whose period holds the record.
    InvoiceSettled,
    /// The end of the subscriber's contract.
    ContractEnd,
}

impl Anchor {
    /// The id used in policy files.
    pub const fn id(self) -> &'static str {
        match self {
            Anchor::EventTime => "event_time",
            Anchor::InvoiceSettled => "invoice_settled",
            Anchor::ContractEnd => "contract_end",
        }
    }
}

/// A retention period in calendar units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Whole days.
    Days(u32),
    /// Calendar months.
    Months(u32),
}

impl Period {
    /// Adds the period to an instant.
    pub fn after(self, t: crate::vocab::time::Millis) -> crate::vocab::time::Millis {
        match self {
            Period::Days(d) => crate::vocab::time::Millis(
                t.0.saturating_add(d as i64 * crate::vocab::time::DAY_MS),
            ),
            Period::Months(m) => t.add_months(m),
        }
    }
    /// A lower bound of the period in milliseconds, whatever instant it is added to: a
    /// calendar month is never shorter than 28 days, even when the day is clamped.
    pub fn shortest_ms(self) -> i64 {
        let days = match self {
            Period::Days(d) => d as i64,
            Period::Months(m) => m as i64 * 28,
        };
        days.saturating_mul(crate::vocab::time::DAY_MS)
    }
    /// Human form, e.g. `6 months`.
    pub fn describe(self) -> String {
        match self {
            Period::Days(1) => "1 day".to_string(),
            Period::Days(d) => format!("{d} days"),
            Period::Months(12) => "1 year".to_string(),
            Period::Months(m) if m % 12 == 0 => format!("{} years", m / 12),
            Period::Months(1) => "1 month".to_string(),
            Period::Months(m) => format!("{m} months"),
        }
    }
}

/// How long a purpose's copies live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retention {
    /// Stable id (`policy.purpose`), carried in envelopes and expiry events.
    pub rule_id: String,
    /// When the clock starts.
    pub anchor: Anchor,
    /// How long after the anchor copies are deleted.
    pub period: Period,
    /// The period as text (`6 months`), precomputed for envelopes.
    pub after: String,
    /// Source or assumption.
    pub cite: Cite,
}

/// Everything the policy says about one purpose: the row of the decision table.
#[derive(Clone, Debug, Serialize)]
pub struct PurposeRule {
    /// Which purpose.
    pub purpose: Purpose,
    /// What it is for, in the operator's terms.
    pub description: String,
    /// The route's default topic (`topic` in the file, else `cdr.<purpose id>`); a
    /// deployment may still map the route elsewhere.
    pub topic: String,
    /// Where `topic` is set, for errors that name it: the `topic` key, or the purpose's
    /// table when the topic is the default.
    #[serde(skip)]
    pub topic_at: Place,
    /// Legal bases per data category, primary first; empty when the category is not used.
    pub basis: [Vec<Basis>; 2],
    /// Where the bases are stated.
    pub basis_cite: Cite,
    /// The purpose whose consent grants this one, if any category rests on consent.
    pub consent_key: Option<Purpose>,
    /// Without that consent.
    pub without_consent: WithoutConsent,
    /// Why consent is keyed and handled so (`[purposes.X.consent]`), when it is needed.
    pub consent_cite: Option<Cite>,
    /// Treatment per field, indexed by `Field as usize`.
    pub fields: [Treatment; Field::COUNT],
    /// Why the copy holds these fields (the table-level cite of `fields`).
    pub fields_cite: Cite,
    /// Per-field source or assumption, where the file gives one.
    pub field_notes: [Option<Cite>; Field::COUNT],
    /// Treatment per field of the anonymised copy, when `without_consent` is anonymised.
    pub anonymised: Option<[Treatment; Field::COUNT]>,
    /// Why the anonymised copy holds these fields, when there is one.
    pub anonymised_cite: Option<Cite>,
    /// Per-field source or assumption of the anonymised copy.
    pub anonymised_notes: [Option<Cite>; Field::COUNT],
    /// Under restriction (Art. 18).
    pub restriction: RightRule,
    /// On objection (Art. 21).
    pub objection: RightRule,
    /// On erasure (Art. 17); `stops == false` means held by obligation or legal claim.
    pub erasure: RightRule,
    /// Retention of this purpose's copies.
    pub retention: Retention,
    /// The field naming the subscriber in this route's copies (and in its expiries).
    pub subscriber_field: Option<Field>,
    /// What holds for every copy of this purpose in each consent state (indexed by
    /// `ConsentTag as usize`), decided when the policy is loaded; see [`ConsentFacts`].
    #[serde(skip)]
    pub facts: [ConsentFacts; 3],
}

/// A key's place in a policy file: its 1-based line and dotted path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Place {
    /// 1-based line.
    pub line: usize,
    /// Dotted path, e.g. `purposes.analytics.topic`.
    pub path: String,
}

/// What holds for every copy of one purpose in one consent state, decided once when the
/// policy is loaded, not for every copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsentFacts {
    /// The fields whose treatment changes them (bit per field): the envelope lists those
    /// the input carried.
    pub changed: u32,
    /// Whether the field map pseudonymises or tokenises a field, so the copy names its
    /// key.
    pub keyed: bool,
    /// The fields the map pseudonymises (bit per field), for counting them per copy.
    pub pseudonymised: u32,
    /// The fields the map tokenises (bit per field).
    pub tokenised: u32,
    /// The text fields whose treatment computes a value, neither keeping nor dropping it
    /// (bit per field): a copy holds one computed value for each the input carries.
    pub computed: u32,
    /// The copy's `legal_basis` and `gdpr_article` tags ([`PurposeRule::basis_tags`]).
    pub basis_tags: (&'static str, &'static str),
}

impl PurposeRule {
    /// The bases for a category.
    pub fn bases(&self, c: Category) -> &[Basis] {
        &self.basis[c as usize]
    }
    /// The basis a consented or consent-free copy is tagged with: traffic first, since a
    /// CDR copy is traffic data.
    pub fn primary_basis(&self) -> Basis {
        self.basis[Category::Traffic as usize]
            .first()
            .or_else(|| self.basis[Category::Subscriber as usize].first())
            .copied()
            .unwrap_or(Basis::Contract)
    }
    /// The field map a copy made in this consent state applies: the anonymised one when
    /// consent is absent (and the purpose has one).
    pub fn map(&self, consent: ConsentTag) -> &[Treatment; Field::COUNT] {
        match (consent, &self.anonymised) {
            (ConsentTag::Absent, Some(anon)) => anon,
            _ => &self.fields,
        }
    }
    /// The `legal_basis` and `gdpr_article` tags of a copy made in this consent state.
    pub fn basis_tags(&self, consent: ConsentTag) -> (&'static str, &'static str) {
        match consent {
            ConsentTag::Absent => ("anonymous", "recital 26"),
            ConsentTag::Granted => ("consent", "6(1)(a)"),
            ConsentTag::NotRequired => {
                let b = self.primary_basis();
                (b.id(), b.article())
            }
        }
    }
    /// What holds for every copy made in this consent state.
    #[inline(always)]
    pub fn facts(&self, consent: ConsentTag) -> &ConsentFacts {
        &self.facts[consent as usize]
    }
    /// Works out [`PurposeRule::facts`] for one consent state from the rule.
    pub fn consent_facts(&self, consent: ConsentTag) -> ConsentFacts {
        let map = self.map(consent);
        let bits = |which: Treatment| {
            map.iter()
                .enumerate()
                .filter(|(_, t)| **t == which)
                .fold(0u32, |bits, (i, _)| bits | 1 << i)
        };
        ConsentFacts {
            changed: map
                .iter()
                .enumerate()
                .filter(|(_, t)| **t != Treatment::Keep)
                .fold(0u32, |bits, (i, _)| bits | 1 << i),
            keyed: map
                .iter()
                .any(|t| matches!(t, Treatment::Pseudonymise | Treatment::Tokenise)),
            pseudonymised: bits(Treatment::Pseudonymise),
            tokenised: bits(Treatment::Tokenise),
            computed: map
                .iter()
                .enumerate()
                .filter(|(_, t)| !matches!(t, Treatment::Keep | Treatment::Drop))
                .fold(0u32, |bits, (i, _)| bits | 1 << i)
                & crate::vocab::purpose::TEXT_FIELDS,
            basis_tags: self.basis_tags(consent),
        }
    }
    /// The treatment of one field.
    pub fn treatment(&self, f: Field) -> Treatment {
        self.fields[f as usize]
    }
}

/// Something the source states that does not become a route (recipients, other purposes,
/// rights handled outside the CDR stream); shown by `policy explain`.
#[derive(Clone, Debug, Serialize)]
pub struct Note {
    /// Heading, e.g. "recipients".
    pub topic: String,
    /// The statement.
    pub text: String,
    /// Source or assumption.
    pub cite: Cite,
}

/// A compiled operator policy.
#[derive(Clone, Debug, Serialize)]
pub struct Policy {
    /// Short id, e.g. `excedo`.
    pub id: String,
    /// Version of the policy file.
    pub version: String,
    /// `id@version`, as envelopes and headers carry it.
    pub tag: String,
    /// The controller.
    pub controller: String,
    /// Whose data it covers.
    pub covers: String,
    /// The source document.
    pub source: String,
    /// The file it was loaded from.
    pub file: String,
    /// Rules per purpose, indexed by `Purpose as usize`; `None` = not declared, never routed.
    pub purposes: [Option<PurposeRule>; Purpose::COUNT],
    /// Recipients and categories of recipients (Art. 30(1)(d), third countries (e)).
    pub recipients: Vec<Note>,
    /// Organisational and technical security measures the source states (Art. 30(1)(g)).
    pub measures: Vec<Note>,
    /// Other statements shown in the record of processing.
    pub notes: Vec<Note>,
}

impl Policy {
    /// The declared purposes in route order.
    pub fn declared(&self) -> impl Iterator<Item = &PurposeRule> {
        self.purposes.iter().flatten()
    }
    /// The rule for a purpose, if declared.
    pub fn rule(&self, p: Purpose) -> Option<&PurposeRule> {
        self.purposes[p as usize].as_ref()
    }
}

/// The policies shipped with cdrguard, built into the binary so the demo runs anywhere.
pub const SHIPPED: [(&str, &str); 5] = [
    (
        "hektor-mobil",
        include_str!("../../policies/hektor-mobil.toml"),
    ),
    ("excedo", include_str!("../../policies/excedo.toml")),
    ("alleato", include_str!("../../policies/alleato.toml")),
    ("partnersec", include_str!("../../policies/partnersec.toml")),
    (
        "select-telecom",
        include_str!("../../policies/select-telecom.toml"),
    ),
];

/// The text of a shipped policy by name.
pub fn shipped(name: &str) -> Option<&'static str> {
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::time::Millis;

    fn t(s: &str) -> Millis {
        Millis::parse(s).unwrap()
    }

    #[test]
    fn periods_add_calendar_days_and_months() {
        let jan31 = t("2026-01-31T12:00:00.000Z");
        assert_eq!(Period::Days(0).after(jan31), jan31);
        assert_eq!(Period::Days(1).after(jan31), t("2026-02-01T12:00:00.000Z"));
        assert_eq!(
            Period::Days(180).after(jan31),
            t("2026-07-30T12:00:00.000Z")
        );
        // A month after 31 January is the end of February (the day is clamped).
        assert_eq!(
            Period::Months(1).after(jan31),
            t("2026-02-28T12:00:00.000Z")
        );
        assert_eq!(
            Period::Months(1).after(t("2028-01-31T00:00:00.000Z")),
            t("2028-02-29T00:00:00.000Z")
        );
        assert_eq!(
            Period::Months(24).after(jan31),
            t("2028-01-31T12:00:00.000Z")
        );
        // Never before the instant, never overflowing.
        assert_eq!(
            Period::Days(u32::MAX).after(Millis(i64::MAX - 1)),
            Millis(i64::MAX)
        );
    }

    #[test]
    fn periods_describe_themselves_as_policy_files_write_them() {
        for (p, s) in [
            (Period::Days(0), "0 days"),
            (Period::Days(1), "1 day"),
            (Period::Days(180), "180 days"),
            (Period::Months(1), "1 month"),
            (Period::Months(6), "6 months"),
            (Period::Months(12), "1 year"),
            (Period::Months(24), "2 years"),
            (Period::Months(18), "18 months"),
        ] {
            assert_eq!(p.describe(), s);
            assert_eq!(load::parse_period(s), Some(p), "{s} reads back");
        }
    }

    #[test]
    fn bases_carry_their_article() {
        for b in Basis::ALL {
            assert_eq!(Basis::from_id(b.id()), Some(b));
        }
        assert_eq!(Basis::LegalObligation.article(), "6(1)(c)");
        assert_eq!(Basis::from_id("intresseavvägning"), None);
    }
}
