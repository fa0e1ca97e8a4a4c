//! Windows a Kafka transaction opened or extended: one schedule-topic update per route,
//! subscriber and bucket, written in the same transaction as the copies.

use std::collections::HashMap;

use serde::Serialize;

use super::{Anchors, span_of, window_of};
use crate::core::retention::ScheduleEntry;
use crate::policy::Policy;
use crate::vocab::purpose::Purpose;
use crate::vocab::time::Millis;

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
    pub fn add(&mut self, e: &ScheduleEntry<'_>, anchors: Anchors) {
        let (bucket, deadline) = window_of(e, anchors);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::time::{DAY_MS, HOUR_MS};

    const M: &str = "+46701234567";
    const OTHER: &str = "+46701112233";

    fn policy(name: &str) -> Policy {
        let text = crate::policy::shipped(name).expect("shipped policy");
        crate::policy::parse_policy(text, name).expect("policy loads")
    }

    fn t(s: &str) -> Millis {
        Millis::parse(s).expect("time")
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
            Anchors::default(),
        );
        b.add(
            &entry(Purpose::Fraud, Some(M), "2026-03-02T19:00:00.001Z"),
            Anchors::default(),
        );
        b.add(
            &entry(Purpose::Fraud, Some(M), "2026-03-03T01:00:00.000Z"),
            Anchors::default(),
        );
        b.add(
            &entry(Purpose::Fraud, Some(OTHER), "2026-03-02T10:00:00.000Z"),
            Anchors::default(),
        );
        b.add(
            &entry(Purpose::Billing, Some(M), "2026-03-02T10:15:30.250Z"),
            Anchors::default(),
        );
        b.add(
            &entry(Purpose::Billing, Some(M), "2026-03-02T10:59:00.000Z"),
            Anchors::default(),
        );
        let ended = Anchors {
            contract_ended: Some(t("2026-06-30T00:00:00.000Z")),
            settled: None,
        };
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
            Anchors::default(),
        );
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.drain(&policy).count(), 0);
    }
}
