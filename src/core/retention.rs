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
use super::treat::Text;
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
            // Copies written before a key rotation name the subscriber under the key of
            // their time, so their windows sit under that key's reference: the event
            // reaches every key's. A reference the same under every key (a kept msisdn)
            // is handled once.
            let mut subjects: Vec<(bool, Text<'_>)> = Vec::new();
            for (i, k) in keys.each_key().enumerate() {
                if let Some(s) = subscriber_ref(rule, k, &ev.msisdn)
                    && !subjects.iter().any(|(_, t)| t.as_str() == s.as_str())
                {
                    subjects.push((i == 0, s));
                }
            }
            for (active, subject) in &subjects {
                let subject = subject.as_str();
                // No copy is written under an older key any more: only windows it already
                // holds matter, and no settlement is remembered for it.
                if !active && !self.subjects[p as usize].contains_key(subject) {
                    continue;
                }
                if let Some(reason) = &ends {
                    self.end(p, subject, reason.clone(), ev.at);
                } else if let Some((start, end)) = settles {
                    let deadline = rule.retention.period.after(ev.at);
                    self.settle(p, subject, start, end, deadline, *active);
                } else {
                    // The contract's clock: every window still waiting gets its deadline.
                    let deadline = rule.retention.period.after(ev.at);
                    self.start_waiting(p, subject, deadline, |_| true);
                }
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
    /// at `deadline`, and the period is remembered until then for late records if
    /// `remember` (records are written under the active key only).
    fn settle(
        &mut self,
        p: Purpose,
        subject: &str,
        start: Millis,
        end: Millis,
        deadline: Millis,
        remember: bool,
    ) {
        let deadline = if remember {
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
            deadline
        } else {
            deadline
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pseudonym::MasterKey;

    const M: &str = "+46701234567";
    const OTHER: &str = "+46701112233";

    fn policy(name: &str) -> Policy {
        let text = crate::policy::shipped(name).expect("shipped policy");
        crate::policy::parse_policy(text, name).expect("policy loads")
    }

    fn keys() -> Keyring {
        Keyring::new(&[MasterKey::new("t", &[9u8; 32]).expect("key")]).expect("keyring")
    }

    fn t(s: &str) -> Millis {
        Millis::parse(s).expect("time")
    }

    /// The schedule under test with the policy and keys its control events need.
    struct Fixture {
        policy: Policy,
        keys: Keyring,
        s: Schedule,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            Fixture::with_policy(policy(name))
        }

        fn with_policy(policy: Policy) -> Fixture {
            let s = Schedule::new(&policy);
            Fixture {
                policy,
                keys: keys(),
                s,
            }
        }

        /// How the route's copies (and expiries) name `msisdn`.
        fn subject(&self, p: Purpose, msisdn: &str) -> String {
            let rule = self.policy.rule(p).expect("declared");
            subscriber_ref(rule, &self.keys, msisdn)
                .expect("the route names its subscriber")
                .as_str()
                .to_string()
        }

        fn copy(&mut self, p: Purpose, msisdn: &str, at: &str, contract_ended: Option<Millis>) {
            let subject = self.subject(p, msisdn);
            let rule = &self.policy.rule(p).expect("declared").retention;
            let e = ScheduleEntry {
                purpose: p,
                subscriber: Some(&subject),
                record_time: t(at),
                rule,
            };
            self.s.track(&e, contract_ended);
        }

        fn control(&mut self, msisdn: &str, at: &str, change: Change) {
            let ev = ControlEvent {
                msisdn: msisdn.into(),
                at: t(at),
                change,
            };
            self.s.control(&self.policy, &self.keys, &ev);
        }

        fn settle(&mut self, msisdn: &str, at: &str, start: &str, end: &str) {
            let change = Change::InvoiceSettled {
                period_start: t(start),
                period_end: t(end),
            };
            self.control(msisdn, at, change);
        }

        fn due(&mut self, now: &str) -> Vec<Expiry> {
            self.s.due(t(now))
        }
    }

    /// `(route, window_start, window_end, deadline, reason)` of each expiry, as text.
    fn brief(es: &[Expiry]) -> Vec<(&'static str, String, String, String, String)> {
        es.iter()
            .map(|e| {
                let reason = match &e.reason {
                    Reason::Rule(r) => r.clone(),
                    other => serde_json::to_value(other)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                };
                (
                    e.route,
                    e.window_start.to_string(),
                    e.window_end.to_string(),
                    e.deadline.to_string(),
                    reason,
                )
            })
            .collect()
    }

    fn row(
        route: &'static str,
        from: &str,
        to: &str,
        deadline: &str,
        reason: &str,
    ) -> (&'static str, String, String, String, String) {
        (
            route,
            from.into(),
            to.into(),
            deadline.into(),
            reason.into(),
        )
    }

    #[test]
    fn spans_are_whole_utc_days_or_hours() {
        let (a, b) = span_of(Anchor::EventTime, t("2026-03-02T10:15:30.250Z"));
        assert_eq!(
            (a.to_string(), b.to_string()),
            (
                "2026-03-02T00:00:00.000Z".into(),
                "2026-03-02T23:59:59.999Z".into()
            )
        );
        let (a, b) = span_of(Anchor::InvoiceSettled, t("2026-03-02T10:15:30.250Z"));
        assert_eq!(
            (a.to_string(), b.to_string()),
            (
                "2026-03-02T10:00:00.000Z".into(),
                "2026-03-02T10:59:59.999Z".into()
            )
        );
        // Contract windows are one bucket, but their bounds are still whole days.
        assert_eq!(
            span_of(Anchor::ContractEnd, t("2026-03-02T10:15:30.250Z")),
            span_of(Anchor::EventTime, t("2026-03-02T00:00:00.000Z"))
        );
        // Before the epoch too.
        let (a, _) = span_of(Anchor::EventTime, t("1969-12-31T23:00:00.000Z"));
        assert_eq!(a.to_string(), "1969-12-31T00:00:00.000Z");
    }

    #[test]
    fn expiries_carry_bucket_bounds_never_record_times() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Fraud, M, "2026-03-02T10:15:30.250Z", None);
        f.copy(Purpose::Fraud, M, "2026-03-02T17:42:01.999Z", None);
        f.copy(Purpose::Billing, M, "2026-03-02T10:15:30.250Z", None);
        f.settle(
            M,
            "2026-04-15T08:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        let got = f.due("2027-01-01T00:00:00.000Z");
        assert_eq!(
            brief(&got),
            vec![
                row(
                    "fraud",
                    "2026-03-02T00:00:00.000Z",
                    "2026-03-02T23:59:59.999Z",
                    "2026-09-03T00:00:00.000Z",
                    "excedo.fraud"
                ),
                row(
                    "billing",
                    "2026-03-02T10:00:00.000Z",
                    "2026-03-02T10:59:59.999Z",
                    "2026-10-15T08:00:00.000Z",
                    "excedo.billing"
                ),
            ]
        );
        for e in &got {
            assert_eq!(e.window_start.0 % HOUR_MS, 0, "{e:?}");
            assert_eq!((e.window_end.0 + 1) % HOUR_MS, 0, "{e:?}");
        }
    }

    /// The key file after a rotation: a new key first, the fixture's old key after it.
    fn rotated() -> Keyring {
        Keyring::new(&[
            MasterKey::new("new", &[10u8; 32]).expect("key"),
            MasterKey::new("t", &[9u8; 32]).expect("key"),
        ])
        .expect("keyring")
    }

    /// `(route, subscriber, window_start, deadline, reason)` of each expiry, sorted.
    fn named(es: &[Expiry]) -> Vec<(&'static str, String, String, String, String)> {
        let mut out: Vec<_> = es
            .iter()
            .map(|e| {
                let reason = serde_json::to_value(&e.reason).expect("reason");
                (
                    e.route,
                    e.subscriber
                        .clone()
                        .expect("a route that names its subscriber"),
                    e.window_start.to_string(),
                    e.deadline.to_string(),
                    reason.as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn named_row(
        route: &'static str,
        who: &str,
        from: &str,
        deadline: &str,
        reason: &str,
    ) -> (&'static str, String, String, String, String) {
        (
            route,
            who.into(),
            from.into(),
            deadline.into(),
            reason.into(),
        )
    }

    /// Regression: a right looked for windows only under the active key's reference, so
    /// after a rotation the windows of copies written under the old key (and the copies
    /// downstream) were never ended early.
    #[test]
    fn rights_reach_windows_written_under_an_older_key() {
        let mut f = Fixture::new("excedo");
        let (a, mk, ts) = (
            Purpose::Analytics,
            Purpose::Marketing,
            Purpose::Troubleshooting,
        );
        for p in [a, mk, ts] {
            f.copy(p, M, "2026-03-02T09:00:00.000Z", None);
        }
        let (old_a, old_mk) = (f.subject(a, M), f.subject(mk, M));
        f.keys = rotated();
        for p in [a, mk] {
            f.copy(p, M, "2026-03-03T09:00:00.000Z", None);
        }
        let (new_a, new_mk) = (f.subject(a, M), f.subject(mk, M));
        assert!(new_a != old_a && new_mk != old_mk, "the rotation renames");
        let withdraw = Change::Consent {
            purpose: a,
            granted: false,
        };
        f.control(M, "2026-03-05T12:00:00.000Z", withdraw);
        f.control(M, "2026-03-06T00:00:00.000Z", Change::Erasure);
        let (d2, d3) = ("2026-03-02T00:00:00.000Z", "2026-03-03T00:00:00.000Z");
        let (withdrawn, erased) = ("2026-03-05T12:00:00.000Z", "2026-03-06T00:00:00.000Z");
        let mut want = vec![
            named_row("analytics", &old_a, d2, withdrawn, "consent_withdrawn"),
            named_row("analytics", &new_a, d3, withdrawn, "consent_withdrawn"),
            named_row("marketing", &old_mk, d2, erased, "erasure"),
            named_row("marketing", &new_mk, d3, erased, "erasure"),
            // Troubleshooting keeps the msisdn: the same under both keys, ended once.
            named_row("troubleshooting", M, d2, erased, "erasure"),
        ];
        want.sort();
        assert_eq!(named(&f.due(erased)), want);
        assert_eq!(f.s.open_windows(), 0);
    }

    /// The same for anchored clocks: a contract end or a settlement starts the windows
    /// written under an older key too, or they would wait for ever. The shipped policies
    /// keep the msisdn on their contract and invoice routes, so this one pseudonymises it.
    #[test]
    fn contract_ends_and_settlements_reach_windows_written_under_an_older_key() {
        let text = crate::policy::shipped("excedo").expect("shipped policy");
        let pseudonymised = text
            .replace(
                "msisdn = { treatment = \"keep\", assumption = 'The user who reports the fault.' }",
                "msisdn = { treatment = \"pseudonymise\", assumption = 'Test.' }",
            )
            .replace(
                "msisdn = { treatment = \"keep\", assumption = 'The invoiced user.' }",
                "msisdn = { treatment = \"pseudonymise\", assumption = 'Test.' }",
            );
        assert_ne!(pseudonymised, text);
        let policy = crate::policy::parse_policy(&pseudonymised, "x").expect("policy loads");
        let mut f = Fixture::with_policy(policy);
        let (b, ts) = (Purpose::Billing, Purpose::Troubleshooting);
        f.copy(ts, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(b, M, "2026-03-02T09:00:00.000Z", None);
        let (old_ts, old_b) = (f.subject(ts, M), f.subject(b, M));
        f.keys = rotated();
        f.copy(ts, M, "2026-03-20T09:00:00.000Z", None);
        f.copy(b, M, "2026-03-20T09:00:00.000Z", None);
        let (new_ts, new_b) = (f.subject(ts, M), f.subject(b, M));
        assert!(new_ts != old_ts && new_b != old_b, "the rotation renames");
        f.settle(
            M,
            "2026-04-15T00:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        // The settled period is remembered for late records under the active key only:
        // no record is written under the old key again.
        let remembered: Vec<&str> = f.s.settled[b as usize].keys().map(|k| &**k).collect();
        assert_eq!(remembered, [new_b.as_str()]);
        f.control(M, "2026-06-30T00:00:00.000Z", Change::ContractEnded);
        let (d2, d20) = ("2026-03-02T00:00:00.000Z", "2026-03-20T00:00:00.000Z");
        let (h2, h20) = ("2026-03-02T09:00:00.000Z", "2026-03-20T09:00:00.000Z");
        let (paid, ended) = ("2026-10-15T00:00:00.000Z", "2027-06-30T00:00:00.000Z");
        let mut want = vec![
            named_row("billing", &old_b, h2, paid, "excedo.billing"),
            named_row("billing", &new_b, h20, paid, "excedo.billing"),
            named_row(
                "troubleshooting",
                &old_ts,
                d2,
                ended,
                "excedo.troubleshooting",
            ),
            named_row(
                "troubleshooting",
                &new_ts,
                d20,
                ended,
                "excedo.troubleshooting",
            ),
        ];
        want.sort();
        assert_eq!(named(&f.due(ended)), want);
        assert_eq!(f.s.open_windows(), 0);
    }

    #[test]
    fn a_right_ends_every_open_window_of_the_route_in_one_expiry_at_the_event() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Analytics, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Analytics, M, "2026-03-04T21:30:00.000Z", None);
        f.copy(Purpose::Analytics, OTHER, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Fraud, M, "2026-03-02T09:00:00.000Z", None);
        let withdraw = Change::Consent {
            purpose: Purpose::Analytics,
            granted: false,
        };
        f.control(M, "2026-03-05T12:00:00.000Z", withdraw.clone());
        let got = f.due("2026-03-05T12:00:00.000Z");
        assert_eq!(
            brief(&got),
            vec![row(
                "analytics",
                "2026-03-02T00:00:00.000Z",
                "2026-03-04T23:59:59.999Z",
                "2026-03-05T12:00:00.000Z",
                "consent_withdrawn"
            )]
        );
        assert_eq!(
            got[0].subscriber.as_deref(),
            Some(f.subject(Purpose::Analytics, M).as_str())
        );
        // Nothing before the deadline, and each window once.
        assert!(f.due("2026-03-05T12:00:00.000Z").is_empty());
        // The other subscriber's window and the fraud window run on.
        assert_eq!(f.s.open_windows(), 2);
    }

    #[test]
    fn rights_keep_their_own_expiries_and_the_same_instant_merges() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Marketing, M, "2026-03-02T09:00:00.000Z", None);
        // Objection and withdrawal at the same instant: one expiry, not two.
        f.control(
            M,
            "2026-03-03T12:00:00.000Z",
            Change::Objection {
                purpose: Purpose::Marketing,
            },
        );
        f.control(
            M,
            "2026-03-03T12:00:00.000Z",
            Change::Consent {
                purpose: Purpose::Marketing,
                granted: false,
            },
        );
        // A later record (consent given again) and a later erasure: its own expiry; the
        // erasure does not relabel or re-time the objection's window (ENDED_BASE bucket).
        f.copy(Purpose::Marketing, M, "2026-03-06T09:00:00.000Z", None);
        f.control(M, "2026-03-07T00:00:00.000Z", Change::Erasure);
        assert_eq!(
            brief(&f.due("2026-04-01T00:00:00.000Z")),
            vec![
                row(
                    "marketing",
                    "2026-03-02T00:00:00.000Z",
                    "2026-03-02T23:59:59.999Z",
                    "2026-03-03T12:00:00.000Z",
                    "objection"
                ),
                row(
                    "marketing",
                    "2026-03-06T00:00:00.000Z",
                    "2026-03-06T23:59:59.999Z",
                    "2026-03-07T00:00:00.000Z",
                    "erasure"
                ),
            ]
        );
        assert_eq!(f.s.open_windows(), 0);
    }

    #[test]
    fn a_right_leaves_a_window_already_past_its_own_deadline_to_its_rule() {
        let mut f = Fixture::new("excedo");
        // Analytics: 12 months after the day's end, so due 2027-03-03.
        f.copy(Purpose::Analytics, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Analytics, M, "2027-03-10T09:00:00.000Z", None);
        f.control(M, "2027-03-20T00:00:00.000Z", Change::Erasure);
        assert_eq!(
            brief(&f.due("2027-03-20T00:00:00.000Z")),
            vec![
                row(
                    "analytics",
                    "2026-03-02T00:00:00.000Z",
                    "2026-03-02T23:59:59.999Z",
                    "2027-03-03T00:00:00.000Z",
                    "excedo.analytics"
                ),
                row(
                    "analytics",
                    "2027-03-10T00:00:00.000Z",
                    "2027-03-10T23:59:59.999Z",
                    "2027-03-20T00:00:00.000Z",
                    "erasure"
                ),
            ]
        );
    }

    #[test]
    fn erasure_spares_routes_held_by_legal_obligation() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Fraud, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(Purpose::Billing, M, "2026-03-02T09:00:00.000Z", None);
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-02T09:00:00.000Z",
            None,
        );
        f.control(M, "2026-03-03T00:00:00.000Z", Change::Erasure);
        assert_eq!(
            brief(&f.due("2026-03-03T00:00:00.000Z")),
            vec![row(
                "troubleshooting",
                "2026-03-02T00:00:00.000Z",
                "2026-03-02T23:59:59.999Z",
                "2026-03-03T00:00:00.000Z",
                "erasure"
            )]
        );
        assert_eq!(f.s.open_windows(), 2);
    }

    #[test]
    fn settlement_merges_the_periods_hour_windows_into_one_and_nothing_else() {
        let mut f = Fixture::new("excedo");
        for at in [
            "2026-02-28T23:30:00.000Z", // previous period
            "2026-03-02T10:15:00.000Z",
            "2026-03-02T10:45:00.000Z",
            "2026-03-17T23:00:00.000Z",
            "2026-03-31T23:59:59.999Z",
            "2026-04-01T00:00:00.000Z", // next period
        ] {
            f.copy(Purpose::Billing, M, at, None);
        }
        f.copy(Purpose::Billing, OTHER, "2026-03-02T10:20:00.000Z", None);
        assert_eq!(f.s.open_windows(), 6);
        f.settle(
            M,
            "2026-04-15T08:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        // One March window for M; February, April and the other subscriber still wait.
        assert_eq!(f.s.open_windows(), 4);
        assert_eq!(
            brief(&f.due("2030-01-01T00:00:00.000Z")),
            vec![row(
                "billing",
                "2026-03-02T10:00:00.000Z",
                "2026-03-31T23:59:59.999Z",
                "2026-10-15T08:00:00.000Z",
                "excedo.billing"
            )]
        );
    }

    #[test]
    fn a_record_after_its_settlement_gets_the_settled_deadline_at_once() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Billing, M, "2026-03-02T10:15:00.000Z", None);
        f.settle(
            M,
            "2026-04-15T08:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        // Late: joins the period's window, which keeps its deadline.
        f.copy(Purpose::Billing, M, "2026-03-20T08:00:00.000Z", None);
        assert_eq!(f.s.open_windows(), 1);
        // A period settled before any of its copies arrived: the late copy's window is due
        // at that settlement's deadline, not left waiting.
        f.settle(
            OTHER,
            "2026-04-16T00:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        f.copy(Purpose::Billing, OTHER, "2026-03-05T10:00:00.000Z", None);
        assert!(f.due("2026-10-15T07:59:59.999Z").is_empty());
        assert_eq!(
            brief(&f.due("2026-10-16T00:00:00.000Z")),
            vec![
                row(
                    "billing",
                    "2026-03-02T10:00:00.000Z",
                    "2026-03-20T08:59:59.999Z",
                    "2026-10-15T08:00:00.000Z",
                    "excedo.billing"
                ),
                row(
                    "billing",
                    "2026-03-05T10:00:00.000Z",
                    "2026-03-05T10:59:59.999Z",
                    "2026-10-16T00:00:00.000Z",
                    "excedo.billing"
                ),
            ]
        );
        // Past their deadlines the settlements are forgotten: memory stays bounded.
        assert!(f.s.settled.iter().all(HashMap::is_empty));
        assert!(f.s.forget.is_empty());
    }

    #[test]
    fn a_settlement_is_remembered_only_until_its_deadline() {
        let mut f = Fixture::new("excedo");
        f.settle(
            M,
            "2026-04-15T08:00:00.000Z",
            "2026-03-01T00:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
        );
        assert!(f.due("2026-10-15T07:59:59.999Z").is_empty());
        assert_eq!(f.s.settled[Purpose::Billing as usize].len(), 1);
        assert!(f.due("2026-10-15T08:00:00.000Z").is_empty());
        assert!(f.s.settled[Purpose::Billing as usize].is_empty());
    }

    #[test]
    fn a_late_record_before_a_remembered_period_is_bounded_by_it() {
        let mut f = Fixture::new("excedo");
        f.settle(
            M,
            "2026-05-15T08:00:00.000Z",
            "2026-04-01T00:00:00.000Z",
            "2026-05-01T00:00:00.000Z",
        );
        // March was settled before April (in order) and is no longer remembered: April's
        // deadline bounds it, so it never waits for ever.
        f.copy(Purpose::Billing, M, "2026-03-10T10:00:00.000Z", None);
        // After every remembered period: its own settlement is still to come.
        f.copy(Purpose::Billing, M, "2026-05-10T10:00:00.000Z", None);
        assert_eq!(
            brief(&f.due("2030-01-01T00:00:00.000Z")),
            vec![row(
                "billing",
                "2026-03-10T10:00:00.000Z",
                "2026-03-10T10:59:59.999Z",
                "2026-11-15T08:00:00.000Z",
                "excedo.billing"
            )]
        );
        assert_eq!(f.s.open_windows(), 1);
    }

    #[test]
    fn settling_a_period_again_does_not_restart_its_clock() {
        let mut f = Fixture::new("excedo");
        f.copy(Purpose::Billing, M, "2026-03-02T10:15:00.000Z", None);
        let settle = |f: &mut Fixture, at| {
            f.settle(
                M,
                at,
                "2026-03-01T00:00:00.000Z",
                "2026-04-01T00:00:00.000Z",
            )
        };
        settle(&mut f, "2026-04-15T08:00:00.000Z");
        f.copy(Purpose::Billing, M, "2026-03-03T10:15:00.000Z", None);
        settle(&mut f, "2026-05-20T00:00:00.000Z");
        let got = f.due("2030-01-01T00:00:00.000Z");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].deadline, t("2026-10-15T08:00:00.000Z"));
        assert_eq!(got[0].window_end, t("2026-03-03T10:59:59.999Z"));
    }

    #[test]
    fn contract_end_starts_the_waiting_window_and_dates_late_records() {
        let mut f = Fixture::new("excedo");
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-02T09:00:00.000Z",
            None,
        );
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-05-20T18:00:00.000Z",
            None,
        );
        // No clock before the contract ends.
        assert!(f.due("2100-01-01T00:00:00.000Z").is_empty());
        f.control(M, "2026-06-30T00:00:00.000Z", Change::ContractEnded);
        // A late record joins the one contract window.
        let ended = Some(t("2026-06-30T00:00:00.000Z"));
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-06-29T23:00:00.000Z",
            ended,
        );
        assert!(f.due("2027-06-29T23:59:59.999Z").is_empty());
        assert_eq!(
            brief(&f.due("2027-06-30T00:00:00.000Z")),
            vec![row(
                "troubleshooting",
                "2026-03-02T00:00:00.000Z",
                "2026-06-29T23:59:59.999Z",
                "2027-06-30T00:00:00.000Z",
                "excedo.troubleshooting"
            )]
        );
        // A record arriving after that expiry opens a new window with the deadline at once.
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-06-29T23:30:00.000Z",
            ended,
        );
        assert_eq!(
            brief(&f.due("2027-07-01T00:00:00.000Z")),
            vec![row(
                "troubleshooting",
                "2026-06-29T00:00:00.000Z",
                "2026-06-29T23:59:59.999Z",
                "2027-06-30T00:00:00.000Z",
                "excedo.troubleshooting"
            )]
        );
    }

    #[test]
    fn due_is_deadline_ordered_never_early_and_emits_each_window_once() {
        let mut f = Fixture::new("hektor-mobil");
        // Troubleshooting: 180 days after the day's end; fraud: 6 months.
        f.copy(Purpose::Fraud, M, "2026-03-05T09:00:00.000Z", None);
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-02T09:00:00.000Z",
            None,
        );
        f.copy(
            Purpose::Troubleshooting,
            M,
            "2026-03-01T09:00:00.000Z",
            None,
        );
        let deadlines = |es: &[Expiry]| es.iter().map(|e| e.deadline).collect::<Vec<_>>();
        // One millisecond before the first deadline: nothing.
        assert!(f.due("2026-08-28T23:59:59.999Z").is_empty());
        let first = f.due("2026-08-29T00:00:00.000Z");
        assert_eq!(deadlines(&first), vec![t("2026-08-29T00:00:00.000Z")]);
        let rest = f.due("2027-01-01T00:00:00.000Z");
        assert_eq!(
            deadlines(&rest),
            vec![t("2026-08-30T00:00:00.000Z"), t("2026-09-06T00:00:00.000Z")]
        );
        assert!(f.due("2030-01-01T00:00:00.000Z").is_empty());
        assert_eq!(f.s.open_windows(), 0);
        for e in first.iter().chain(&rest) {
            assert!(e.window_end < e.deadline, "{e:?}");
        }
    }

    #[test]
    fn window_batch_has_one_update_per_route_subject_and_bucket_with_bucket_bounds() {
        let policy = policy("excedo");
        let rule = |p| &policy.rule(p).expect("declared").retention;
        let entry = |p, s, at| ScheduleEntry {
            purpose: p,
            subscriber: s,
            record_time: t(at),
            rule: rule(p),
        };
        let mut b = WindowBatch::default();
        assert!(b.is_empty());
        b.add(
            &entry(Purpose::Fraud, Some(M), "2026-03-02T10:15:30.250Z"),
            None,
        );
        b.add(
            &entry(Purpose::Fraud, Some(M), "2026-03-02T19:00:00.001Z"),
            None,
        );
        b.add(
            &entry(Purpose::Fraud, Some(M), "2026-03-03T01:00:00.000Z"),
            None,
        );
        b.add(
            &entry(Purpose::Fraud, Some(OTHER), "2026-03-02T10:00:00.000Z"),
            None,
        );
        b.add(
            &entry(Purpose::Billing, Some(M), "2026-03-02T10:15:30.250Z"),
            None,
        );
        b.add(
            &entry(Purpose::Billing, Some(M), "2026-03-02T10:59:00.000Z"),
            None,
        );
        let ended = Some(t("2026-06-30T00:00:00.000Z"));
        let ts = Purpose::Troubleshooting;
        b.add(&entry(ts, Some(M), "2026-03-02T10:15:30.250Z"), ended);
        b.add(&entry(ts, Some(M), "2026-03-09T08:00:00.000Z"), ended);
        assert_eq!(b.len(), 5);
        let mut got: Vec<(String, String, String, Option<String>)> = b
            .drain(&policy)
            .map(|u| {
                (
                    u.key(),
                    u.window_start.to_string(),
                    u.window_end.to_string(),
                    u.deadline.map(|d| d.to_string()),
                )
            })
            .collect();
        got.sort();
        let day = t("2026-03-02T00:00:00.000Z").0 / DAY_MS;
        let hour = t("2026-03-02T10:00:00.000Z").0 / HOUR_MS;
        let want = |k: String, a: &str, z: &str, d: Option<&str>| {
            (k, a.to_string(), z.to_string(), d.map(str::to_string))
        };
        let mut expected = vec![
            want(
                format!("billing/{M}/{hour}"),
                "2026-03-02T10:00:00.000Z",
                "2026-03-02T10:59:59.999Z",
                None,
            ),
            want(
                format!("fraud/{M}/{day}"),
                "2026-03-02T00:00:00.000Z",
                "2026-03-02T23:59:59.999Z",
                Some("2026-09-03T00:00:00.000Z"),
            ),
            want(
                format!("fraud/{M}/{}", day + 1),
                "2026-03-03T00:00:00.000Z",
                "2026-03-03T23:59:59.999Z",
                Some("2026-09-04T00:00:00.000Z"),
            ),
            want(
                format!("fraud/{OTHER}/{day}"),
                "2026-03-02T00:00:00.000Z",
                "2026-03-02T23:59:59.999Z",
                Some("2026-09-03T00:00:00.000Z"),
            ),
            want(
                format!("troubleshooting/{M}/0"),
                "2026-03-02T00:00:00.000Z",
                "2026-03-09T23:59:59.999Z",
                Some("2027-06-30T00:00:00.000Z"),
            ),
        ];
        expected.sort();
        assert_eq!(got, expected);
        assert!(b.is_empty());
        assert_eq!(b.drain(&policy).count(), 0);
        b.add(
            &entry(Purpose::Fraud, Some(M), "2026-03-02T10:15:30.250Z"),
            None,
        );
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.drain(&policy).count(), 0);
    }
}
