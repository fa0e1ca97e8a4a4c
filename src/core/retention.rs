//! The retention schedule: groups copies into windows per route and subscriber, starts
//! clocks on anchors, and yields one expiry per window once its deadline has passed.
//!
//! Pure and deterministic: time comes in as arguments. The file replay keeps it in
//! memory; the Kafka retention service persists the same windows per partition.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::control::{Change, ControlEvent};
use super::process::{ScheduleEntry, subscriber_ref};
use super::pseudonym::Keyring;
use super::purpose::Purpose;
use super::time::{DAY_MS, HOUR_MS, Millis};
use crate::policy::{Anchor, Policy, Retention};

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
    /// First record time covered.
    pub window_start: Millis,
    /// Last record time covered (inclusive).
    pub window_end: Millis,
    /// When the copies had to be deleted by.
    pub deadline: Millis,
    /// The rule id, or the right that ended the copies early.
    pub reason: Reason,
    /// `policy@version`.
    pub policy: String,
}

/// Buckets of windows ended early by a right sit far below every day or hour bucket, one
/// per event instant, so a later right never relabels or re-times an earlier one.
const ENDED_BASE: i64 = i64::MIN / 2;

#[derive(Clone, Debug)]
struct Window {
    from: Millis,
    to: Millis,
    deadline: Option<Millis>,
    reason: Reason,
}

/// All windows of one route and subscriber, by bucket: the day of the record time for
/// event-time rules, the hour for invoice rules (so an invoice period's edge does not cut
/// a window), one bucket for contract-anchored rules.
type Buckets = BTreeMap<i64, Window>;

/// The retention schedule of one policy.
#[derive(Debug, Default)]
pub struct Schedule {
    subjects: [HashMap<Box<str>, Buckets>; Purpose::COUNT],
    due: BTreeSet<(Millis, u8, Box<str>, i64)>,
    policy: String,
}

fn bucket_of(anchor: Anchor, t: Millis) -> i64 {
    match anchor {
        Anchor::ContractEnd => 0,
        Anchor::EventTime => t.0.div_euclid(DAY_MS),
        Anchor::InvoiceSettled => t.0.div_euclid(HOUR_MS),
    }
}

/// The deadline of the event-time window holding `t`: the period after the end of its
/// UTC day, so never before any of the window's records' own deadline.
pub fn event_time_deadline(rule: &Retention, t: Millis) -> Millis {
    rule.period
        .after(Millis((t.0.div_euclid(DAY_MS) + 1) * DAY_MS))
}

/// The window a copy falls in (its bucket) and the window's deadline where the copy alone
/// decides it: event-time rules always, contract-anchored rules once the contract ended.
/// Invoice-anchored windows wait for their settlement.
pub fn window_of(e: &ScheduleEntry<'_>, contract_ended: Option<Millis>) -> (i64, Option<Millis>) {
    let rule = e.rule;
    let deadline = match rule.anchor {
        Anchor::EventTime => Some(event_time_deadline(rule, e.record_time)),
        Anchor::ContractEnd => contract_ended.map(|t| rule.period.after(t)),
        Anchor::InvoiceSettled => None,
    };
    (bucket_of(rule.anchor, e.record_time), deadline)
}

/// A retention window opened or extended by copies since the last flush: what the Kafka
/// runtime writes to the schedule topic, in the same transaction as the copies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowUpdate<'p> {
    /// Always `retention_window`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Route holding the copies.
    pub route: &'static str,
    /// Purpose (same id as the route).
    pub purpose: Purpose,
    /// The subscriber as the route's copies name them; `None` for anonymised copies.
    pub subscriber: Option<String>,
    /// Bucket of the window: UTC day (event time), hour (invoice) or 0 (contract).
    pub bucket: i64,
    /// Earliest record time seen in this batch.
    pub window_start: Millis,
    /// Latest record time seen in this batch.
    pub window_end: Millis,
    /// The clock's anchor.
    pub anchor: &'static str,
    /// The rule id.
    pub rule: &'p str,
    /// The retention period, e.g. `6 months`.
    pub after: &'p str,
    /// The deadline if the copies alone decide it, else `None` (set later by a control
    /// event: invoice settlement or contract end).
    pub deadline: Option<Millis>,
    /// `policy@version`.
    pub policy: &'p str,
}

impl WindowUpdate<'_> {
    /// The compaction key: one per route, subscriber and window.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.purpose.id(),
            self.subscriber.as_deref().unwrap_or(""),
            self.bucket
        )
    }
}

#[derive(Debug)]
struct Pending {
    from: Millis,
    to: Millis,
    deadline: Option<Millis>,
}

/// Windows touched since the last flush, one entry per route, subscriber and bucket, so a
/// subscriber with many records in one batch yields one update, not one per copy.
#[derive(Debug, Default)]
pub struct WindowBatch {
    /// By subject first, so the common case (a subscriber already seen in this batch) is
    /// found without allocating a key; a subject has few windows per batch.
    windows: HashMap<Box<str>, Vec<(u8, i64, Pending)>>,
    count: usize,
}

impl WindowBatch {
    /// Notes a copy's window.
    pub fn add(&mut self, e: &ScheduleEntry<'_>, contract_ended: Option<Millis>) {
        let (bucket, deadline) = window_of(e, contract_ended);
        let subject = e.subscriber.unwrap_or("");
        let list = match self.windows.get_mut(subject) {
            Some(l) => l,
            None => self.windows.entry(subject.into()).or_default(),
        };
        let p = e.purpose as u8;
        if let Some((_, _, w)) = list.iter_mut().find(|(q, b, _)| *q == p && *b == bucket) {
            w.from = w.from.min(e.record_time);
            w.to = w.to.max(e.record_time);
            return;
        }
        list.push((
            p,
            bucket,
            Pending {
                from: e.record_time,
                to: e.record_time,
                deadline,
            },
        ));
        self.count += 1;
    }

    /// Windows pending.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Takes every pending update, leaving the batch empty.
    pub fn drain<'a>(&'a mut self, policy: &'a Policy) -> impl Iterator<Item = WindowUpdate<'a>> {
        self.count = 0;
        let flat = self.windows.drain().flat_map(|(subject, l)| {
            l.into_iter()
                .map(move |(p, b, w)| (subject.clone(), p, b, w))
        });
        flat.filter_map(move |(subject, p, bucket, w)| {
            let purpose = Purpose::ALL[p as usize];
            let rule = &policy.rule(purpose)?.retention;
            Some(WindowUpdate {
                kind: "retention_window",
                route: purpose.id(),
                purpose,
                subscriber: (!subject.is_empty()).then(|| subject.into_string()),
                bucket,
                window_start: w.from,
                window_end: w.to,
                anchor: rule.anchor.id(),
                rule: &rule.rule_id,
                after: &rule.after,
                deadline: w.deadline,
                policy: &policy.tag,
            })
        })
    }

    /// Forgets everything pending (the transaction that would have carried it aborted).
    pub fn clear(&mut self) {
        self.windows.clear();
        self.count = 0;
    }
}

impl Schedule {
    /// An empty schedule for a policy's copies.
    pub fn new(policy: &Policy) -> Schedule {
        Schedule {
            policy: policy.tag.clone(),
            ..Default::default()
        }
    }

    /// How many windows are open (for metrics and tests).
    pub fn open_windows(&self) -> usize {
        self.subjects
            .iter()
            .flat_map(|m| m.values())
            .map(BTreeMap::len)
            .sum()
    }

    fn arm(&mut self, p: Purpose, subject: &str, bucket: i64, deadline: Millis) {
        self.due.insert((deadline, p as u8, subject.into(), bucket));
    }

    fn disarm(&mut self, p: Purpose, subject: &str, bucket: i64, w: &Window) {
        if let Some(d) = w.deadline {
            self.due
                .remove(&(d, p as u8, Box::<str>::from(subject), bucket));
        }
    }

    /// Records that a copy exists. `contract_ended` is the subscriber's contract end, if
    /// known, so a late record on a contract-anchored route gets its deadline at once.
    pub fn track(&mut self, e: &ScheduleEntry<'_>, contract_ended: Option<Millis>) {
        let rule: &Retention = e.rule;
        let subject = e.subscriber.unwrap_or("");
        let (bucket, deadline) = window_of(e, contract_ended);
        let p = e.purpose;
        let buckets = match self.subjects[p as usize].get_mut(subject) {
            Some(b) => b,
            None => self.subjects[p as usize].entry(subject.into()).or_default(),
        };
        match buckets.get_mut(&bucket) {
            Some(w) => {
                w.from = w.from.min(e.record_time);
                w.to = w.to.max(e.record_time);
            }
            None => {
                buckets.insert(
                    bucket,
                    Window {
                        from: e.record_time,
                        to: e.record_time,
                        deadline,
                        reason: Reason::Rule(rule.rule_id.clone()),
                    },
                );
                if let Some(d) = deadline {
                    self.arm(p, subject, bucket, d);
                }
            }
        }
    }

    /// Applies a control event: starts anchored clocks, or ends a route's windows early
    /// for a withdrawal, objection or erasure (deadline = the event's time).
    pub fn control(&mut self, policy: &Policy, keys: &Keyring, ev: &ControlEvent) {
        for rule in policy.declared() {
            let p = rule.purpose;
            let ends = match &ev.change {
                Change::Consent {
                    purpose,
                    granted: false,
                } if rule.consent_key == Some(*purpose) => Some(Reason::ConsentWithdrawn),
                Change::Objection { purpose } if *purpose == p && rule.objection.stops => {
                    Some(Reason::Objection)
                }
                Change::Erasure if rule.erasure.stops => Some(Reason::Erasure),
                _ => None,
            };
            let starts = match (&ev.change, rule.retention.anchor) {
                (Change::ContractEnded, Anchor::ContractEnd) => {
                    Some((Millis(i64::MIN), Millis(i64::MAX)))
                }
                (
                    Change::InvoiceSettled {
                        period_start,
                        period_end,
                    },
                    Anchor::InvoiceSettled,
                ) => Some((*period_start, *period_end)),
                _ => None,
            };
            if ends.is_none() && starts.is_none() {
                continue;
            }
            let Some(subject) = subscriber_ref(rule, keys, &ev.msisdn) else {
                continue;
            };
            let subject = subject.as_str();
            let Some(mut buckets) = self.subjects[p as usize].remove(subject) else {
                continue;
            };
            if let Some(reason) = ends {
                // One expiry for everything the route holds on the subscriber.
                let mut merged: Option<Window> = None;
                let open: Vec<i64> = buckets
                    .iter()
                    .filter(|(b, w)| **b >= ENDED_BASE / 2 && matches!(w.reason, Reason::Rule(_)))
                    .map(|(b, _)| *b)
                    .collect();
                for b in open {
                    let Some(w) = buckets.remove(&b) else {
                        continue;
                    };
                    self.disarm(p, subject, b, &w);
                    merged = Some(match merged {
                        None => w,
                        Some(m) => Window {
                            from: m.from.min(w.from),
                            to: m.to.max(w.to),
                            ..m
                        },
                    });
                }
                if let Some(mut m) = merged {
                    // A window whose own deadline came first keeps that deadline.
                    let deadline = m.deadline.map_or(ev.at, |d| d.min(ev.at));
                    m.deadline = Some(deadline);
                    m.reason = reason;
                    let key = ENDED_BASE + ev.at.0;
                    match buckets.get_mut(&key) {
                        // Two rights at the same instant end the same copies once.
                        Some(w) => {
                            w.from = w.from.min(m.from);
                            w.to = w.to.max(m.to);
                        }
                        None => {
                            self.arm(p, subject, key, deadline);
                            buckets.insert(key, m);
                        }
                    }
                }
            } else if let Some((ps, pe)) = starts {
                let deadline = rule.retention.period.after(ev.at);
                let pending: Vec<i64> = buckets
                    .iter()
                    // Hour windows inside the invoiced period. Periods are hour-aligned in
                    // practice; a window straddling an unaligned boundary settles with the
                    // invoice that covers its end (documented in the README).
                    .filter(|(_, w)| w.deadline.is_none() && w.to < pe && w.to >= ps)
                    .map(|(b, _)| *b)
                    .collect();
                for b in pending {
                    if let Some(w) = buckets.get_mut(&b) {
                        w.deadline = Some(deadline);
                    }
                    self.arm(p, subject, b, deadline);
                }
            }
            self.subjects[p as usize].insert(subject.into(), buckets);
        }
    }

    /// Removes and returns every window whose deadline is at or before `now`, deadline
    /// first. Each window yields exactly one expiry.
    pub fn due(&mut self, now: Millis) -> Vec<Expiry> {
        let mut out = Vec::new();
        while let Some(first) = self.due.first() {
            if first.0 > now {
                break;
            }
            let Some((deadline, p, subject, bucket)) = self.due.pop_first() else {
                break;
            };
            let purpose = Purpose::ALL[p as usize];
            let map = &mut self.subjects[p as usize];
            let Some(buckets) = map.get_mut(&subject) else {
                continue;
            };
            let Some(w) = buckets.remove(&bucket) else {
                continue;
            };
            if buckets.is_empty() {
                map.remove(&subject);
            }
            out.push(Expiry {
                kind: "retention_expired",
                route: purpose.id(),
                purpose,
                subscriber: (!subject.is_empty()).then(|| subject.to_string()),
                window_start: w.from,
                window_end: w.to,
                deadline,
                reason: w.reason,
                policy: self.policy.clone(),
            });
        }
        out
    }
}
