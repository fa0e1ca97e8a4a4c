//! The retention service's part of each commit, with every partition locked: timers read
//! back take over, control events reach the windows they act on (each exactly once), and
//! due windows fire: their `retention_expired` event and the tombstone of their schedule
//! entry go into the same transaction as the copies and the input offsets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Shared;
use super::slot::{Slot, SlotState};
use crate::adapters::kafka::retention::entries::{self, window_key};
use crate::adapters::kafka::retention::timers::{Ready, Timers};
use crate::adapters::kafka::sink::{self, Out, SinkError};
use crate::adapters::kafka::stats::DelayHistogram;
use crate::adapters::telemetry::{Tally, names};
use crate::core::retention::schedule::{Persist, WindowKey};
use crate::vocab::time::Millis;

/// Bursts of at least this many expiries are logged when worked off.
const BURST_LOGGED: u64 = 100;

/// The fewest expiries a commit may fire, however slow commits are: a burst must drain.
const LEAST_FIRE_BUDGET: usize = 50;

/// The next commit's fire budget, after one that fired `fired` of `allowed` and held the
/// partitions for `hold`, where commits that fire nothing hold them `usual` (a moving
/// average). A million windows due at once must not hold the copies back for more than
/// `interval` beyond a usual commit: halve the budget after a commit that took longer,
/// double it after one that used it all within half of that, so a slow broker is
/// answered within a commit or two and a deadline shared by thousands of windows is
/// back at full rate within a few. It starts at `ceiling` (`retention.fire_batch`) and
/// never exceeds it.
pub(super) fn next_fire_budget(
    allowed: usize,
    fired: usize,
    hold: Duration,
    usual: Duration,
    interval: Duration,
    ceiling: usize,
) -> usize {
    let next = if hold > usual + interval {
        allowed / 2
    } else if fired >= allowed && hold < usual + interval / 2 {
        allowed * 2
    } else {
        allowed
    };
    next.clamp(LEAST_FIRE_BUDGET.min(ceiling), ceiling)
}

/// The moving average of how long commits that fire nothing hold the partitions, with a
/// new one that took `hold` (weight 1/8: a few slow commits on a busy machine move it
/// little).
pub(super) fn usual_hold(average: Duration, hold: Duration) -> Duration {
    (average * 7 + hold) / 8
}

/// A run of commits that each fired expiries.
pub(super) struct Burst {
    started: Instant,
    last_commit: Instant,
    fired: u64,
    commits: u64,
    hold_max_ms: u64,
    /// The longest a commit took to send its messages (its expiries among them).
    sending_max_ms: u64,
    /// Deadline to commit, in real time.
    lateness: DelayHistogram,
}

/// Control events applied in one commit at most, so a burst never holds a commit back.
const CONTROL_PER_COMMIT: usize = 10_000;

impl Shared {
    /// Timers read back take over (and the control reader goes back to where they
    /// stopped); queued control events are applied to every partition whose timers have
    /// not applied them yet. In memory only: the next commit writes what changed.
    pub(super) fn advance_timers(
        &self,
        slots: &[Arc<Slot>],
        guards: &mut [tokio::sync::MutexGuard<'_, SlotState>],
    ) {
        let mut newly_ready = false;
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            match g.timers.finish_reading(&self.policy, self.clock.now()) {
                None => {}
                Some(Ok(read)) => {
                    newly_ready = true;
                    metrics::histogram!(names::RETENTION_REBUILD).record(read.took.as_secs_f64());
                    tracing::info!(
                        partition = slot.partition,
                        messages = read.messages,
                        windows = read.windows,
                        took_ms = read.took.as_millis() as u64,
                        control_from_table = read.control_from_table,
                        "retention timers read back"
                    );
                    if !read.unreadable.is_empty() {
                        // Where, never what: entries name subscribers.
                        tracing::error!(
                            topic = %self.cfg.schedule_topic,
                            partition = slot.partition,
                            count = read.unreadable.len(),
                            offsets = ?&read.unreadable[..read.unreadable.len().min(20)],
                            "schedule entries unreadable; those whose key names a window are expired at once"
                        );
                        self.stats
                            .schedule_unreadable
                            .fetch_add(read.unreadable.len() as u64, Ordering::Relaxed);
                        metrics::counter!(names::SCHEDULE_UNREADABLE)
                            .increment(read.unreadable.len() as u64);
                    }
                }
                Some(Err(e)) => self.fail(super::PipelineError::Internal(e.to_string())),
            }
        }
        if newly_ready {
            self.control_feed.read_from(resume_offsets(guards));
        }
        let events = self.control_feed.take(CONTROL_PER_COMMIT);
        if events.is_empty() {
            return;
        }
        let keys = self.keys.active();
        for g in guards.iter_mut() {
            let Timers::Ready(r) = &mut g.timers else {
                continue;
            };
            for d in &events {
                if r.applied.get(&d.partition).is_some_and(|a| *a >= d.offset) {
                    continue;
                }
                r.schedule.control(&self.policy, &keys, &d.event);
                r.applied.insert(d.partition, d.offset);
                if !r.applied_changed.contains(&d.partition) {
                    r.applied_changed.push(d.partition);
                }
            }
        }
    }

    /// After a commit: how late its expiries were committed, how long it held the
    /// partitions, and whether a burst of expiries (a backlog after a restart, or many
    /// windows sharing a deadline) goes on or has just been worked off.
    /// `sent`: how long of `hold` went to sending (the rest: the commit itself).
    pub(super) fn after_fired(&self, deadlines: &[Millis], sent: Duration, hold: Duration) {
        let hold_ms = hold.as_millis() as u64;
        self.stats
            .commit_hold_max_ms
            .fetch_max(hold_ms, Ordering::Relaxed);
        let mut burst = self.burst.lock().unwrap_or_else(|p| p.into_inner());
        if deadlines.is_empty() {
            if let Some(b) = burst.take()
                && b.fired >= BURST_LOGGED
            {
                let took = b.last_commit.duration_since(b.started);
                tracing::info!(
                    expiries = b.fired,
                    commits = b.commits,
                    took_ms = took.as_millis() as u64,
                    per_second = (b.fired as f64 / took.as_secs_f64().max(1e-3)) as u64,
                    commit_hold_max_ms = b.hold_max_ms,
                    sending_max_ms = b.sending_max_ms,
                    lateness_p99_ms = b.lateness.quantile_upper_ms(0.99),
                    lateness_max_ms = b.lateness.max_ms(),
                    "expiry burst worked off"
                );
            }
            return;
        }
        let b = burst.get_or_insert_with(|| Burst {
            started: Instant::now() - hold,
            last_commit: Instant::now(),
            fired: 0,
            commits: 0,
            hold_max_ms: 0,
            sending_max_ms: 0,
            lateness: DelayHistogram::default(),
        });
        // Lateness in real time: a rehearsal clock running faster stretches it.
        let now = self.clock.now();
        let speed = i64::from(self.clock.speed());
        let lateness = metrics::histogram!(names::RETENTION_LATENESS);
        for d in deadlines {
            let late = Duration::from_millis(((now.0 - d.0).max(0) / speed) as u64);
            self.stats.expiry_lateness.record(late);
            lateness.record(late.as_secs_f64());
            b.lateness.record(late);
        }
        b.fired += deadlines.len() as u64;
        b.commits += 1;
        b.hold_max_ms = b.hold_max_ms.max(hold_ms);
        b.sending_max_ms = b.sending_max_ms.max(sent.as_millis() as u64);
        b.last_commit = Instant::now();
    }

    /// Fires the partition's due windows (within `budget`, shared by the partitions of
    /// one commit) and writes what changed in its timers to its partition of the schedule
    /// topic. Returns the schedule messages written.
    pub(super) async fn fire_and_persist(
        &self,
        partition: i32,
        timers: &mut Timers,
        budget: &mut usize,
        deadlines: &mut Vec<Millis>,
        tally: &mut Tally,
    ) -> Result<u64, SinkError> {
        let mut written = 0u64;
        match timers {
            Timers::Rebuilding(b) => {
                // Partial states, merged when the partition is read back; written again
                // whole once it is.
                let mut line = Vec::with_capacity(512);
                for w in b.batch.drain(&self.policy) {
                    line.clear();
                    // Serialising owned strings and numbers into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut line, &w);
                    let key = w.key();
                    self.send_schedule(partition, &key, Some(&line)).await?;
                    b.written.push(WindowKey {
                        purpose: w.purpose,
                        subject: w.subscriber.clone().unwrap_or_default(),
                        bucket: w.bucket,
                    });
                    written += 1;
                }
            }
            Timers::Ready(r) => {
                let now = self.clock.now();
                let mut fired = Vec::new();
                let _ = r.schedule.due_keyed(now, *budget, |_, e| {
                    fired.push(e);
                    Ok::<(), std::convert::Infallible>(())
                });
                *budget -= fired.len();
                for e in &fired {
                    // Serialising owned strings and numbers into a Vec cannot fail.
                    let payload = serde_json::to_vec(e).unwrap_or_default();
                    let key = entries::expiry_key(e);
                    self.sink
                        .send(Out {
                            topic: &self.cfg.retention_topic,
                            partition: None,
                            key: Some(key.as_bytes()),
                            payload: Some(&payload),
                            headers: None,
                        })
                        .await?;
                    tally.expiry(e.purpose, &e.reason);
                    deadlines.push(e.deadline);
                }
                written += self.persist_changes(partition, r).await?;
                for released in r.crowds.release(now, budget) {
                    let Some(topic) = self.cfg.routes[released.purpose as usize].as_deref() else {
                        continue;
                    };
                    let c = &released.crowd;
                    // The same tags on every copy of the crowd: built once.
                    let headers =
                        sink::headers(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                    for _ in 0..c.copies {
                        let headers = headers.clone();
                        self.sink
                            .send(Out {
                                topic,
                                partition: None,
                                key: None,
                                payload: Some(&c.content),
                                headers: Some(headers),
                            })
                            .await?;
                    }
                    tally.released(released.purpose, c.copies);
                }
                for (key, value) in r.crowds.drain() {
                    self.send_schedule(partition, &key, value.as_deref())
                        .await?;
                    written += 1;
                }
                self.stats
                    .withheld
                    .store(r.crowds.withheld, Ordering::Relaxed);
                for cp in r.applied_changed.drain(..) {
                    let offset = r.applied.get(&cp).copied().unwrap_or(-1);
                    let (key, value) = entries::encode_applied(cp, offset);
                    self.send_schedule(partition, &key, Some(&value)).await?;
                    written += 1;
                }
            }
        }
        Ok(written)
    }

    /// Writes the windows and settlements that changed since the last drain to the
    /// partition's schedule topic partition, into the open transaction. Returns the
    /// messages written.
    ///
    /// The seal calls it for what is left; a partition task calls it after its batches
    /// too (`Shared::persist_batch`), so that the seal does not send a whole interval's
    /// entries at once while it holds every partition, and the transaction's commit
    /// does not then wait for that burst to be acknowledged.
    pub(super) async fn persist_changes(
        &self,
        partition: i32,
        r: &mut Ready,
    ) -> Result<u64, SinkError> {
        let mut written = 0;
        for change in r.schedule.drain_changes() {
            let (key, value) = entries::encode(&change, &self.policy);
            self.send_schedule(partition, &key, value.as_deref())
                .await?;
            if let Persist::Window(k, None) = &change {
                debug_assert_eq!(key, window_key(k));
            }
            written += 1;
        }
        Ok(written)
    }

    /// Sets the retention gauges from the owned partitions' timers (the caller holds every
    /// partition's lock): windows pending, partitions still reading back, and how long the
    /// most overdue window has waited past its deadline, in real seconds.
    pub(super) fn retention_gauges(&self, guards: &[tokio::sync::MutexGuard<'_, SlotState>]) {
        let (mut windows, mut rebuilding, mut earliest) = (0usize, 0usize, None::<Millis>);
        for g in guards {
            match &g.timers {
                Timers::Rebuilding(_) => rebuilding += 1,
                Timers::Ready(r) => {
                    windows += r.schedule.open_windows();
                    if let Some(d) = r.schedule.earliest_deadline() {
                        earliest = Some(earliest.map_or(d, |e: Millis| e.min(d)));
                    }
                }
            }
        }
        let now = self.clock.now();
        let overdue_ms =
            earliest.map_or(0, |d| (now.0 - d.0).max(0)) / i64::from(self.clock.speed());
        metrics::gauge!(names::RETENTION_WINDOWS).set(windows as f64);
        metrics::gauge!(names::RETENTION_REBUILDING).set(rebuilding as f64);
        metrics::gauge!(names::RETENTION_OVERDUE).set(overdue_ms as f64 / 1000.0);
    }

    /// One message (or tombstone) to the schedule topic, to the partition of the input
    /// partition whose timers it belongs to: the partition's owner owns its timers.
    async fn send_schedule(
        &self,
        partition: i32,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), SinkError> {
        self.sink
            .send(Out {
                topic: &self.cfg.schedule_topic,
                partition: Some(partition),
                key: Some(key.as_bytes()),
                payload: value,
                headers: None,
            })
            .await
    }
}

/// Where the control reader resumes: for each control partition, after the lowest offset
/// any partition's timers applied; from its beginning if some timers applied none of it.
fn resume_offsets(guards: &[tokio::sync::MutexGuard<'_, SlotState>]) -> BTreeMap<i32, i64> {
    let ready: Vec<&BTreeMap<i32, i64>> = guards
        .iter()
        .filter_map(|g| match &g.timers {
            Timers::Ready(r) => Some(&r.applied),
            Timers::Rebuilding(_) => None,
        })
        .collect();
    let mut out = BTreeMap::new();
    if let Some(first) = ready.first() {
        for cp in first.keys() {
            let lowest = ready.iter().map(|a| a.get(cp)).collect::<Option<Vec<_>>>();
            if let Some(l) = lowest.and_then(|v| v.into_iter().min().copied()) {
                out.insert(*cp, l + 1);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_fire_budget_keeps_a_commit_within_the_interval_beyond_a_usual_one() {
        let interval = 100 * MS;
        let usual = 40 * MS;
        // Too slow (more than 140 ms): halved, down to the floor but never to nothing.
        assert_eq!(
            next_fire_budget(1_000, 1_000, 150 * MS, usual, interval, 5_000),
            500
        );
        assert_eq!(
            next_fire_budget(60, 60, 900 * MS, usual, interval, 5_000),
            50
        );
        // Fast (under 90 ms) and used up: grows, up to the configured ceiling.
        assert_eq!(
            next_fire_budget(1_000, 1_000, 80 * MS, usual, interval, 5_000),
            2_000
        );
        assert_eq!(
            next_fire_budget(4_500, 4_500, 20 * MS, usual, interval, 5_000),
            5_000
        );
        // Not used up (the burst ended), or between the two: kept.
        assert_eq!(
            next_fire_budget(1_000, 10, 20 * MS, usual, interval, 5_000),
            1_000
        );
        assert_eq!(
            next_fire_budget(1_000, 1_000, 120 * MS, usual, interval, 5_000),
            1_000
        );
        // A slow machine's usual commit is not held against the expiries.
        assert_eq!(
            next_fire_budget(1_000, 1_000, 580 * MS, 550 * MS, interval, 5_000),
            2_000
        );
        // A ceiling below the floor is still the ceiling.
        assert_eq!(next_fire_budget(10, 10, 900 * MS, usual, interval, 10), 10);
    }

    #[test]
    fn the_usual_hold_follows_commits_slowly() {
        assert_eq!(usual_hold(80 * MS, 80 * MS), 80 * MS);
        assert_eq!(usual_hold(80 * MS, 880 * MS), 180 * MS);
    }
}
