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

/// Buckets of windows ended early by a right sit far below every day or hour bucket, one
/// per event instant, so a later right never relabels or re-times an earlier one.
const ENDED_BASE: i64 = i64::MIN / 2;

/// Whether a bucket key is a window still running under its rule (not one a right ended).
fn is_rule_bucket(b: i64) -> bool {
    b >= ENDED_BASE / 2
}

#[derive(Clone, Debug)]
struct Window {
    /// Start of the first bucket covered.
    from: Millis,
    /// Last instant of the last bucket covered.
    to: Millis,
    deadline: Option<Millis>,
    reason: Reason,
}

impl Window {
    fn widen(&mut self, from: Millis, to: Millis) {
        self.from = self.from.min(from);
        self.to = self.to.max(to);
    }
}

/// All windows of one route and subscriber, by bucket: the day of the record time for
/// event-time rules, the hour for invoice rules until the invoice is settled (then the
/// period's first hour holds the merged window), one bucket for contract-anchored rules.
type Buckets = BTreeMap<i64, Window>;

/// A settled invoice period of one route and subscriber, remembered until its deadline
/// so a record arriving after the settlement gets the settled deadline at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Settlement {
    start: Millis,
    end: Millis,
    deadline: Millis,
}

/// The retention schedule of one policy.
#[derive(Debug, Default)]
pub struct Schedule {
    subjects: [HashMap<Box<str>, Buckets>; Purpose::COUNT],
    due: BTreeSet<(Millis, u8, Box<str>, i64)>,
    /// Settled periods per route and subject, and when each may be forgotten.
    settled: [HashMap<Box<str>, Vec<Settlement>>; Purpose::COUNT],
    forget: BTreeSet<(Millis, u8, Box<str>)>,
    policy: String,
}

fn bucket_of(anchor: Anchor, t: Millis) -> i64 {
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
    /// Start of the bucket (for contract rules: of the first UTC day with a copy in this
    /// batch). Never a record's own time (see [`span_of`]).
    pub window_start: Millis,
    /// Last instant of the bucket (for contract rules: of the last UTC day with a copy in
    /// this batch), inclusive.
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
        let (from, to) = span_of(e.rule.anchor, e.record_time);
        let subject = e.subscriber.unwrap_or("");
        let list = match self.windows.get_mut(subject) {
            Some(l) => l,
            None => self.windows.entry(subject.into()).or_default(),
        };
        let p = e.purpose as u8;
        if let Some((_, _, w)) = list.iter_mut().find(|(q, b, _)| *q == p && *b == bucket) {
            w.from = w.from.min(from);
            w.to = w.to.max(to);
            return;
        }
        list.push((p, bucket, Pending { from, to, deadline }));
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

    /// The bucket and deadline of an invoice-anchored copy at `t`. Inside a remembered
    /// settled period it joins the period's merged window (or opens one) with the settled
    /// deadline. Before a remembered period, its own period was settled earlier and is
    /// already forgotten (settlements come in period order, see the README), so the
    /// earliest later settlement's deadline bounds it. Otherwise it waits.
    fn invoice_window(&self, p: Purpose, subject: &str, t: Millis) -> (i64, Option<Millis>) {
        let hour = bucket_of(Anchor::InvoiceSettled, t);
        let Some(list) = self.settled[p as usize].get(subject) else {
            return (hour, None);
        };
        if let Some(s) = list.iter().find(|s| s.start <= t && t < s.end) {
            return (bucket_of(Anchor::InvoiceSettled, s.start), Some(s.deadline));
        }
        let later = list
            .iter()
            .filter(|s| t < s.start)
            .map(|s| s.deadline)
            .min();
        (hour, later)
    }

    /// Records that a copy exists. `contract_ended` is the subscriber's contract end, if
    /// known, so a late record on a contract-anchored route gets its deadline at once; a
    /// late record on an invoice-anchored route gets its settled deadline the same way.
    pub fn track(&mut self, e: &ScheduleEntry<'_>, contract_ended: Option<Millis>) {
        let rule: &Retention = e.rule;
        let subject = e.subscriber.unwrap_or("");
        let p = e.purpose;
        let (bucket, deadline) = match rule.anchor {
            Anchor::InvoiceSettled => self.invoice_window(p, subject, e.record_time),
            _ => window_of(e, contract_ended),
        };
        let (from, to) = span_of(rule.anchor, e.record_time);
        let buckets = match self.subjects[p as usize].get_mut(subject) {
            Some(b) => b,
            None => self.subjects[p as usize].entry(subject.into()).or_default(),
        };
        match buckets.get_mut(&bucket) {
            // An open window keeps its deadline: it is never earlier than the copy's own
            // (same day, same contract end, or the same settlement).
            Some(w) => w.widen(from, to),
            None => {
                buckets.insert(
                    bucket,
                    Window {
                        from,
                        to,
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
            let settles = match (&ev.change, rule.retention.anchor) {
                (
                    Change::InvoiceSettled {
                        period_start,
                        period_end,
                    },
                    Anchor::InvoiceSettled,
                ) => Some((*period_start, *period_end)),
                _ => None,
            };
            let contract = matches!(
                (&ev.change, rule.retention.anchor),
                (Change::ContractEnded, Anchor::ContractEnd)
            );
            if ends.is_none() && settles.is_none() && !contract {
                continue;
            }
            let Some(subject) = subscriber_ref(rule, keys, &ev.msisdn) else {
                continue;
            };
            let subject = subject.as_str();
            if let Some(reason) = ends {
                self.end(p, subject, reason, ev.at);
            } else if let Some((start, end)) = settles {
                let deadline = rule.retention.period.after(ev.at);
                self.settle(p, subject, start, end, deadline);
            } else {
                // The contract's clock: every window still waiting gets its deadline.
                let deadline = rule.retention.period.after(ev.at);
                self.start_waiting(p, subject, deadline, |_| true);
            }
        }
    }

    /// Gives every waiting window of a route and subject that `within` accepts a deadline.
    fn start_waiting(
        &mut self,
        p: Purpose,
        subject: &str,
        deadline: Millis,
        within: impl Fn(&Window) -> bool,
    ) {
        let Some(buckets) = self.subjects[p as usize].get_mut(subject) else {
            return;
        };
        let mut armed = Vec::new();
        for (b, w) in buckets.iter_mut() {
            if is_rule_bucket(*b) && w.deadline.is_none() && within(w) {
                w.deadline = Some(deadline);
                armed.push(*b);
            }
        }
        for b in armed {
            self.arm(p, subject, b, deadline);
        }
    }

    /// Ends everything a route holds on a subject in one window, due at `at`. A window
    /// whose own deadline is at or before `at` is left to its rule: it ran out first.
    fn end(&mut self, p: Purpose, subject: &str, reason: Reason, at: Millis) {
        let Some(mut buckets) = self.subjects[p as usize].remove(subject) else {
            return;
        };
        let open: Vec<i64> = buckets
            .iter()
            .filter(|(b, w)| {
                is_rule_bucket(**b)
                    && matches!(w.reason, Reason::Rule(_))
                    && w.deadline.is_none_or(|d| d > at)
            })
            .map(|(b, _)| *b)
            .collect();
        let mut merged: Option<Window> = None;
        for b in open {
            let Some(w) = buckets.remove(&b) else {
                continue;
            };
            self.disarm(p, subject, b, &w);
            match merged.as_mut() {
                None => merged = Some(w),
                Some(m) => m.widen(w.from, w.to),
            }
        }
        if let Some(mut m) = merged {
            m.deadline = Some(at);
            m.reason = reason;
            let key = ENDED_BASE + at.0;
            match buckets.get_mut(&key) {
                // Two rights at the same instant end the same copies once.
                Some(w) => w.widen(m.from, m.to),
                None => {
                    self.arm(p, subject, key, at);
                    buckets.insert(key, m);
                }
            }
        }
        if !buckets.is_empty() {
            self.subjects[p as usize].insert(subject.into(), buckets);
        }
    }

    /// Settles an invoice period: its hour windows still waiting become one window, due
    /// at `deadline`, and the period is remembered until then for late records.
    fn settle(&mut self, p: Purpose, subject: &str, start: Millis, end: Millis, deadline: Millis) {
        let list = self.settled[p as usize].entry(subject.into()).or_default();
        // A repeated settlement of the same period does not restart its clock.
        let deadline = match list.iter_mut().find(|s| s.start == start && s.end == end) {
            Some(s) => {
                s.deadline = s.deadline.min(deadline);
                s.deadline
            }
            None => {
                list.push(Settlement {
                    start,
                    end,
                    deadline,
                });
                deadline
            }
        };
        self.forget.insert((deadline, p as u8, subject.into()));
        let Some(mut buckets) = self.subjects[p as usize].remove(subject) else {
            return;
        };
        // Periods are hour-aligned (control events refuse others), so an hour window is
        // either inside the period or outside it.
        let inside: Vec<i64> = buckets
            .iter()
            .filter(|(b, w)| {
                is_rule_bucket(**b) && w.deadline.is_none() && w.from >= start && w.to < end
            })
            .map(|(b, _)| *b)
            .collect();
        let mut merged: Option<Window> = None;
        for b in inside {
            if let Some(w) = buckets.remove(&b) {
                match merged.as_mut() {
                    None => merged = Some(w),
                    Some(m) => m.widen(w.from, w.to),
                }
            }
        }
        if let Some(mut m) = merged {
            let key = bucket_of(Anchor::InvoiceSettled, start);
            let rearm = match buckets.get_mut(&key) {
                // The period's first hour already holds a window with a deadline (an
                // earlier settlement of the period, or a late record bounded by a later
                // one): the earlier deadline holds for both.
                Some(w) => {
                    w.widen(m.from, m.to);
                    let old = w.deadline;
                    w.deadline = Some(old.map_or(deadline, |d| d.min(deadline)));
                    (old != w.deadline).then_some(old)
                }
                None => {
                    m.deadline = Some(deadline);
                    buckets.insert(key, m);
                    Some(None)
                }
            };
            if let Some(old) = rearm {
                if let Some(d) = old {
                    self.due
                        .remove(&(d, p as u8, Box::<str>::from(subject), key));
                }
                self.arm(p, subject, key, deadline);
            }
        }
        if !buckets.is_empty() {
            self.subjects[p as usize].insert(subject.into(), buckets);
        }
    }

    /// Removes and returns every window whose deadline is at or before `now`, deadline
    /// first. Each window yields exactly one expiry. Settlements whose deadline passed
    /// are forgotten: a record of theirs arriving now is refused by `process`.
    pub fn due(&mut self, now: Millis) -> Vec<Expiry> {
        let mut out = Vec::new();
        while self.due.first().is_some_and(|f| f.0 <= now) {
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
        while self.forget.first().is_some_and(|f| f.0 <= now) {
            let Some((_, p, subject)) = self.forget.pop_first() else {
                break;
            };
            let map = &mut self.settled[p as usize];
            if let Some(list) = map.get_mut(&subject) {
                list.retain(|s| s.deadline > now);
                if list.is_empty() {
                    map.remove(&subject);
                }
            }
        }
        out
    }
}
