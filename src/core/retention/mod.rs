//! Retention: which window a copy falls in, when that window must be deleted, and the
//! expiry event that tells downstream stores to delete it.
//!
//! - [`schedule`]: the windows still open, in memory, compact, and the expiries they yield.
//! - [`batch`]: the windows a Kafka transaction opened or extended, for the schedule topic.
//!
//! Pure and deterministic: time comes in as arguments.

pub mod batch;
pub mod schedule;

use serde::Serialize;

use crate::core::control::{Settled, SubscriberState};
use crate::policy::{Anchor, Retention};
use crate::vocab::purpose::Purpose;
use crate::vocab::time::{DAY_MS, HOUR_MS, Millis};

pub use batch::{WindowBatch, WindowUpdate};
pub use schedule::Schedule;

/// An entry the retention schedule needs to know this copy exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleEntry<'c> {
    /// Route.
    pub purpose: Purpose,
    /// The subscriber as the route's copies name them; `None` for anonymised copies.
    pub subscriber: Option<&'c str>,
    /// When the record happened.
    pub record_time: Millis,
    /// The rule.
    pub rule: &'c Retention,
}

/// What the consent table knows of a subscriber's anchored clocks when a copy is
/// tracked, so a copy arriving after its clock started gets its deadline at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Anchors {
    /// When the subscriber's contract ended.
    pub contract_ended: Option<Millis>,
    /// How far the subscriber's invoices are settled.
    pub settled: Option<Settled>,
}

impl Anchors {
    /// The anchors a subscriber's state holds.
    pub fn of(s: &SubscriberState) -> Anchors {
        Anchors {
            contract_ended: s.contract_ended,
            settled: s.settled,
        }
    }
}

/// Why a window expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Consent for the route was withdrawn (Art. 7(3), 17(1)(b)).
    ConsentWithdrawn,
    /// The subscriber objected (Art. 21).
    Objection,
    /// The subscriber asked for erasure (Art. 17).
    Erasure,
    /// The retention rule ran out (carries the rule id).
    #[serde(untagged)]
    Rule(String),
}

/// A retention-expiry event (DESIGN.md): downstream deletes the window's copies.
///
/// Its window bounds are bucket bounds (a UTC day or an hour), never a record's own time:
/// a pseudonymised route's copies carry the hour at most, and an exact time here would let
/// anyone holding both routes link the pseudonym to a billing record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Expiry {
    /// Always `retention_expired`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The route whose store must delete.
    pub route: &'static str,
    /// The purpose (same id as the route).
    pub purpose: Purpose,
    /// The subscriber as that route's copies carry it; `None` for anonymised copies.
    pub subscriber: Option<String>,
    /// Start of the window's first bucket.
    pub window_start: Millis,
    /// Last instant of the window's last bucket (inclusive), e.g. `23:59:59.999`.
    pub window_end: Millis,
    /// When the copies had to be deleted by.
    pub deadline: Millis,
    /// The rule id, or the right that ended the copies early.
    pub reason: Reason,
    /// `policy@version`.
    pub policy: String,
}

pub(crate) fn bucket_of(anchor: Anchor, t: Millis) -> i64 {
    match anchor {
        Anchor::ContractEnd => 0,
        Anchor::EventTime => t.0.div_euclid(DAY_MS),
        Anchor::InvoiceSettled => t.0.div_euclid(HOUR_MS),
    }
}

/// The record times a copy's window stands for: the UTC day holding `t` (event-time and
/// contract rules) or its hour (invoice rules), as first and last instant. Expiries and
/// schedule entries carry only these, never the record's own time, so they reveal no
/// finer time than any route's copies (generalised copies carry the hour).
pub fn span_of(anchor: Anchor, t: Millis) -> (Millis, Millis) {
    let unit = match anchor {
        Anchor::InvoiceSettled => HOUR_MS,
        Anchor::EventTime | Anchor::ContractEnd => DAY_MS,
    };
    let start = t.0.div_euclid(unit) * unit;
    (Millis(start), Millis(start + (unit - 1)))
}

/// The deadline of the event-time window holding `t`: the period after the end of its
/// UTC day, so never before any of the window's records' own deadline.
pub fn event_time_deadline(rule: &Retention, t: Millis) -> Millis {
    rule.period
        .after(Millis((t.0.div_euclid(DAY_MS) + 1) * DAY_MS))
}

/// The window a copy falls in (its bucket) and the window's deadline where the copy and
/// the subscriber's anchors decide it: event-time rules always, contract-anchored rules
/// once the contract ended, invoice-anchored rules once a period at or after the copy's
/// was settled (with settlements in period order the latest bounds every earlier one,
/// the same bound `process` refuses late records by). Otherwise the window waits.
pub fn window_of(e: &ScheduleEntry<'_>, anchors: Anchors) -> (i64, Option<Millis>) {
    let rule = e.rule;
    let deadline = match rule.anchor {
        Anchor::EventTime => Some(event_time_deadline(rule, e.record_time)),
        Anchor::ContractEnd => anchors.contract_ended.map(|t| rule.period.after(t)),
        Anchor::InvoiceSettled => anchors
            .settled
            .filter(|s| e.record_time < s.through)
            .map(|s| rule.period.after(s.at)),
    };
    (bucket_of(rule.anchor, e.record_time), deadline)
}

/// Buckets of windows ended early by a right sit far below every day or hour bucket, one
/// per event instant, so a later right never relabels or re-times an earlier one.
pub(crate) const ENDED_BASE: i64 = i64::MIN / 2;
