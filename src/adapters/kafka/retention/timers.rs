//! One input partition's retention timers: read back from the schedule topic when the
//! partition is assigned, then kept in step with the copies, the control events and the
//! expiries, every change journalled for the next transaction.
//!
//! While the partition is read back, its records keep being routed: their windows are
//! written as the transaction's batch (partial states, merged when read back) and kept to
//! join the timers once the reading is done; those windows are then written again whole,
//! before compaction could leave only their partial state (the schedule topic's
//! `min.compaction.lag.ms` keeps older entries long enough).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::ClientConfig;

use super::crowds::{Anonymised, Crowds};
use super::rebuild::{RebuildError, Restored, read_back};
use crate::core::retention::schedule::{Schedule, WindowKey};
use crate::core::retention::{Anchors, ScheduleEntry, WindowBatch};
use crate::policy::Policy;
use crate::vocab::purpose::Purpose;
use crate::vocab::time::Millis;

/// A copy whose window joins the timers once they are read back.
#[derive(Clone, Debug)]
struct PendingCopy {
    purpose: Purpose,
    subject: Option<Box<str>>,
    record_time: Millis,
    anchors: Anchors,
}

/// The timers while their partition is read back.
pub struct Rebuilding {
    /// Windows the open transaction's copies touched, written with it.
    pub batch: WindowBatch,
    /// Every copy since the reading began, to join the timers.
    pending: Vec<PendingCopy>,
    /// How many of `pending` were committed (an abort drops the rest).
    committed: usize,
    /// How many of `pending` the transaction being committed holds (exactly once
    /// commits one transaction while the next one fills).
    sealed: usize,
    /// Anonymised copies since the reading began, to join the crowds.
    anonymised: Vec<Anonymised>,
    /// How many of `anonymised` were committed.
    anonymised_committed: usize,
    /// How many of `anonymised` the transaction being committed holds.
    anonymised_sealed: usize,
    /// Keys written meanwhile (partial states), written again whole once ready.
    pub written: Vec<WindowKey>,
    /// The consent table's position in the control topic when the reading began (the
    /// next offset per partition): where timers that find nothing start applying events.
    table_at: BTreeMap<i32, i64>,
    result: Arc<Mutex<Option<Result<Restored, RebuildError>>>>,
    stop: Arc<AtomicBool>,
}

/// The timers of a partition that was read back.
pub struct Ready {
    /// The windows and remembered settlements, journalled.
    pub schedule: Schedule,
    /// Control-topic offsets up to which events are applied here, by control partition.
    pub applied: BTreeMap<i32, i64>,
    /// Control partitions whose offset moved since the last commit.
    pub applied_changed: Vec<i32>,
    /// Anonymised copies held back per month.
    pub crowds: Crowds,
}

/// A partition's timers.
pub enum Timers {
    /// Being read back.
    Rebuilding(Rebuilding),
    /// In step.
    Ready(Box<Ready>),
}

/// What the reading back of a partition found, for the log.
pub struct ReadBack {
    /// Messages read.
    pub messages: u64,
    /// Windows open after the copies routed meanwhile joined.
    pub windows: usize,
    /// Offsets that could not be read.
    pub unreadable: Vec<i64>,
    /// How long it took.
    pub took: std::time::Duration,
    /// Whether they found nothing and apply control events from the consent table's
    /// position.
    pub control_from_table: bool,
}

/// Where a partition's timers are read back from.
#[derive(Clone)]
pub struct Source {
    /// Brokers and security settings.
    pub client: ClientConfig,
    /// The schedule topic.
    pub topic: String,
}

impl Timers {
    /// Starts reading partition `partition` back (on a thread of its own: it blocks).
    /// `table_at`: the consent table's position now (see [`Timers::finish_reading`]).
    pub fn start(
        source: &Source,
        partition: i32,
        policy: Arc<Policy>,
        now: Millis,
        table_at: BTreeMap<i32, i64>,
    ) -> Timers {
        let result = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, src) = (result.clone(), stop.clone(), source.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("cdrguard-timers-{partition}"))
            .spawn(move || {
                let out = read_back(&src.client, &src.topic, partition, &policy, now, &s);
                *r.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
            });
        if let Err(e) = spawned {
            *result.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(RebuildError::Kafka {
                topic: source.topic.clone(),
                partition,
                source: rdkafka::error::KafkaError::Canceled,
            }));
            tracing::error!(partition, error = %e, "cannot start reading the timers back");
        }
        Timers::Rebuilding(Rebuilding {
            batch: WindowBatch::default(),
            pending: Vec::new(),
            committed: 0,
            sealed: 0,
            anonymised: Vec::new(),
            anonymised_committed: 0,
            anonymised_sealed: 0,
            written: Vec::new(),
            table_at,
            result,
            stop,
        })
    }

    /// Notes a copy's window.
    pub fn track(&mut self, e: &ScheduleEntry<'_>, anchors: Anchors) {
        match self {
            Timers::Ready(r) => r.schedule.track(e, anchors),
            Timers::Rebuilding(b) => {
                b.batch.add(e, anchors);
                b.pending.push(PendingCopy {
                    purpose: e.purpose,
                    subject: e.subscriber.map(Into::into),
                    record_time: e.record_time,
                    anchors,
                });
            }
        }
    }

    /// Takes the read-back timers once they are there: the copies routed meanwhile join
    /// them, and the windows written partially meanwhile are marked to be written whole.
    /// `None` while still reading; `Some(Err)` if the reading failed.
    ///
    /// Timers that found nothing (no window, no settlement, no control offset: a new
    /// deployment, or a partition that never held anything) apply control events from
    /// where the consent table stood when the reading began, not from the topic's start.
    /// Every earlier event is in that table, which routed each copy since and gave it its
    /// anchors (a contract end, a settlement), and there was no window for it to act on.
    /// A run thus does not replay years of control history through its timers.
    pub fn finish_reading(
        &mut self,
        policy: &Policy,
        now: Millis,
    ) -> Option<Result<ReadBack, RebuildError>> {
        let Timers::Rebuilding(b) = self else {
            return None;
        };
        let done = b.result.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let mut restored = match done {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let found_nothing = restored.applied.is_empty() && restored.schedule.is_empty();
        let (applied, applied_changed) = if found_nothing {
            // Offsets kept are the last applied; the table's are the next to apply.
            let applied: BTreeMap<i32, i64> =
                b.table_at.iter().map(|(p, next)| (*p, next - 1)).collect();
            let changed = applied.keys().copied().collect();
            (applied, changed)
        } else {
            (std::mem::take(&mut restored.applied), Vec::new())
        };
        for c in b.pending.drain(..) {
            let Some(rule) = policy.rule(c.purpose) else {
                continue;
            };
            restored.schedule.track(
                &ScheduleEntry {
                    purpose: c.purpose,
                    subscriber: c.subject.as_deref(),
                    record_time: c.record_time,
                    rule: &rule.retention,
                },
                c.anchors,
            );
        }
        for k in b.written.drain(..) {
            restored.schedule.touch(&k);
        }
        // Copies held back while reading join their crowds (those of a month already
        // released are withheld, as they would have been had they come later).
        for a in b.anonymised.drain(..) {
            restored.crowds.hold(a, now);
        }
        let read = ReadBack {
            messages: restored.messages,
            windows: restored.schedule.open_windows(),
            unreadable: restored.unreadable.iter().map(|(o, _)| *o).collect(),
            took: restored.took,
            control_from_table: found_nothing,
        };
        *self = Timers::Ready(Box::new(Ready {
            schedule: restored.schedule,
            applied,
            applied_changed,
            crowds: restored.crowds,
        }));
        Some(Ok(read))
    }

    /// The transaction last sealed (see [`Timers::on_seal`]) committed.
    pub fn on_commit(&mut self) {
        if let Timers::Rebuilding(b) = self {
            b.committed = b.sealed;
            b.anonymised_committed = b.anonymised_sealed;
        }
    }

    /// The open transaction was closed for its commit (which may still fail): what it
    /// holds is what [`Timers::on_commit`] marks committed; what follows belongs to the
    /// next transaction.
    pub fn on_seal(&mut self) {
        if let Timers::Rebuilding(b) = self {
            b.sealed = b.pending.len();
            b.anonymised_sealed = b.anonymised.len();
        }
    }

    /// Holds an anonymised copy back until its month's crowd is known.
    pub fn hold_anonymised(&mut self, a: Anonymised, now: Millis) {
        match self {
            Timers::Ready(r) => r.crowds.hold(a, now),
            Timers::Rebuilding(b) => b.anonymised.push(a),
        }
    }

    /// The open transaction was aborted. While reading back, its batch and the copies it
    /// held are dropped (the records are read again). Ready timers may hold changes that
    /// never reached the topic: they are read back again.
    pub fn on_abort(
        &mut self,
        source: &Source,
        partition: i32,
        policy: Arc<Policy>,
        now: Millis,
        table_at: BTreeMap<i32, i64>,
    ) {
        match self {
            Timers::Rebuilding(b) => {
                b.batch.clear();
                b.pending.truncate(b.committed);
                b.anonymised.truncate(b.anonymised_committed);
                b.sealed = b.committed;
                b.anonymised_sealed = b.anonymised_committed;
            }
            Timers::Ready(_) => *self = Timers::start(source, partition, policy, now, table_at),
        }
    }

    /// Stops a reading under way (the partition was revoked).
    pub fn stop(&self) {
        if let Timers::Rebuilding(b) = self {
            b.stop.store(true, Ordering::Release);
        }
    }

    /// Whether the timers were read back.
    pub fn is_ready(&self) -> bool {
        matches!(self, Timers::Ready(_))
    }

    /// Empty timers, in step (a partition whose schedule holds nothing, in tests).
    pub fn empty(policy: &Policy) -> Timers {
        Timers::Ready(Box::new(Ready {
            schedule: Schedule::new(policy).with_journal(),
            applied: BTreeMap::new(),
            applied_changed: Vec::new(),
            crowds: Crowds::default(),
        }))
    }

    /// Whether the next commit has something of the timers to write or fire at `now`.
    pub fn has_work(&self, now: Millis) -> bool {
        match self {
            Timers::Rebuilding(b) => !b.batch.is_empty(),
            Timers::Ready(r) => {
                r.schedule.has_changes()
                    || r.schedule.has_due(now)
                    || !r.applied_changed.is_empty()
                    || r.crowds.has_changes()
                    || r.crowds.has_due(now)
            }
        }
    }
}

impl Drop for Rebuilding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
