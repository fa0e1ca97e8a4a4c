//! The transaction and commit coordinator: a commit takes every partition's lock and
//! sends the expiries due, the crowds released, the timers' changes and the offsets with
//! the transaction; a failed commit is aborted and every partition rewound to its last
//! committed offset, or the pipeline is rebuilt.
//!
//! The decisions (what an attempt does, what follows a failure, how a partition's state
//! moves on a commit or an abort) are plain functions, tested without a broker; the
//! methods on [`Shared`] carry them out against Kafka.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;

use super::slot::{SealedPart, Slot, SlotState};
use super::{PipelineError, Shared, retention};
use crate::adapters::kafka::config::Guarantee;
use crate::adapters::kafka::sink::{Sealed, SinkError};
use crate::adapters::telemetry::{Aborted, CommitPhases, Committed, Tally};
use crate::vocab::time::Millis;

/// Aborts in a row, with no commit between them, after which the pipeline is rebuilt: a
/// cause that outlives a fresh transaction (a deleted or forbidden topic) would otherwise
/// spin silently, re-reading the same records.
const MAX_ABORTS_IN_ROW: u32 = 5;

/// What a commit attempt does, decided with every partition locked.
#[derive(Debug)]
pub(super) enum Plan {
    /// Nothing was processed since the last commit.
    Nothing,
    /// Commit the open transaction with the offsets.
    Commit,
    /// Nothing of the open transaction may commit: abort it.
    Abort(SinkError),
}

/// Decides a commit attempt. A lost assignment (another member may own the partitions
/// already) or a send that failed in the transaction (some record's copies are
/// incomplete) rules out committing anything of it.
pub(super) fn plan(assignment_lost: bool, send_failed: bool, has_work: bool) -> Plan {
    if assignment_lost {
        Plan::Abort(SinkError::AssignmentLost)
    } else if send_failed {
        Plan::Abort(SinkError::SendFailed)
    } else if has_work {
        Plan::Commit
    } else {
        Plan::Nothing
    }
}

/// What follows a commit (or abort) that failed.
#[derive(Debug)]
pub(super) enum AfterFailure {
    /// The pipeline is being torn down already: nothing to do.
    Ignore,
    /// The producer cannot go on: a fresh pipeline (new producer, same transactional id)
    /// aborts the open transaction when it starts.
    Rebuild(PipelineError),
    /// Abort the transaction and rewind every partition to its committed offset.
    AbortAndRewind(SinkError),
}

/// Sorts a failure into what follows it.
pub(super) fn after_failure(e: SinkError) -> AfterFailure {
    match e {
        SinkError::Abandoned => AfterFailure::Ignore,
        e @ (SinkError::Fatal(_)
        | SinkError::Fenced(_)
        | SinkError::Client(_)
        | SinkError::Hung(_)) => AfterFailure::Rebuild(e.into()),
        e => AfterFailure::AbortAndRewind(e),
    }
}

/// After the `in_row`-th abort without a commit between: go on, or rebuild (stuck).
pub(super) fn after_abort(in_row: u32, cause: &SinkError) -> Result<(), PipelineError> {
    if in_row >= MAX_ABORTS_IN_ROW {
        Err(PipelineError::Stuck(in_row, cause.to_string()))
    } else {
        Ok(())
    }
}

impl SlotState {
    /// Whether the partition has processed anything since the last seal, or its timers
    /// have something to write or fire at `now`.
    pub(super) fn has_work(&self, now: Millis) -> bool {
        self.records > 0 || self.timers.has_work(now)
    }

    /// Records processed and not yet committed: the open transaction's and the sealed
    /// one's.
    pub(super) fn uncommitted(&self) -> u64 {
        self.records + self.sealed.as_ref().map_or(0, |s| s.records)
    }

    /// The input offset the next commit stores, if the partition moved since the last.
    pub(super) fn offset_to_commit(&self) -> Option<i64> {
        self.next.filter(|n| Some(*n) != self.committed)
    }

    /// The open transaction is closed for its commit: what was processed so far belongs
    /// to it, what follows to the next transaction.
    pub(super) fn on_seal(&mut self) {
        self.sealed = Some(SealedPart {
            next: self.next,
            first: self.txn_first.take(),
            records: std::mem::take(&mut self.records),
            tally: std::mem::take(&mut self.tally),
        });
        self.timers.on_seal();
    }

    /// The sealed transaction committed: what it processed is done. Returns its tally,
    /// for the counters.
    pub(super) fn on_commit(&mut self) -> Tally {
        let Some(sealed) = self.sealed.take() else {
            return Tally::default();
        };
        self.committed = sealed.next;
        self.timers.on_commit();
        sealed.tally
    }

    /// Every transaction not yet committed (the sealed one, if its commit failed, and
    /// the one filling) was aborted: everything processed since the last commit is read
    /// again, from the first offset of the earliest. Returns whether the partition must
    /// seek (its task is woken for it).
    pub(super) fn on_abort(&mut self) -> bool {
        let open = self.txn_first.take();
        let rewind = self.sealed.take().and_then(|s| s.first).or(open);
        if let Some(first) = rewind {
            self.rewind = Some(first);
            self.next = self.committed;
        }
        self.records = 0;
        self.tally.clear();
        rewind.is_some()
    }

    /// Records an abort now drops: the sealed transaction's and the open one's.
    pub(super) fn aborted_records(&self) -> u64 {
        self.tally.records_in() + self.sealed.as_ref().map_or(0, |s| s.tally.records_in())
    }
}

/// A transaction sealed by [`Shared::seal_locked`], on its way to commit.
pub(super) struct Sealing {
    lane: Sealed,
    offsets: TopicPartitionList,
    /// Its expiries, released crowds and schedule writes (the partitions' own tallies
    /// are added when it commits).
    total: Tally,
    /// The deadlines of the expiries it fires.
    deadlines: Vec<Millis>,
    /// The fire budget it was sealed with.
    allowed: usize,
    /// How long sealing held the partitions.
    sent: Duration,
}

/// The coordinator: commits on the interval, early when enough records wait, and a last
/// time when the pipeline stops. It is the only place a commit starts outside a
/// rebalance, so the final commit cannot overlap another.
pub(super) fn spawn_coordinator(
    shared: Arc<Shared>,
    shutdown: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Commits start on the interval, not an interval after the last one ended: the
        // time a commit takes (routing goes on meanwhile) is not added to every record's
        // wait.
        let mut next = tokio::time::Instant::now() + shared.cfg.commit_interval;
        loop {
            // How late a commit due on the interval begins: a commit longer than the
            // interval, or a runtime too busy to wake the coordinator, delays it.
            let late = tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    Some(tokio::time::Instant::now().saturating_duration_since(next))
                }
                _ = shared.commit_now.notified() => None,
                _ = shutdown.notified() => None,
            };
            if shared.has_failed() {
                return;
            }
            let last = shared.closing.load(Ordering::Acquire);
            next = tokio::time::Instant::now() + shared.cfg.commit_interval;
            if let Err(e) = shared.commit_cycle(late).await {
                shared.fail(e);
                return;
            }
            if last {
                return;
            }
        }
    })
}

/// Locks every partition's state, in partition order.
async fn lock_all(slots: &[Arc<Slot>]) -> Vec<tokio::sync::MutexGuard<'_, SlotState>> {
    let mut guards = Vec::with_capacity(slots.len());
    for s in slots {
        guards.push(s.state.lock().await);
    }
    guards
}

impl Shared {
    /// One commit: takes every partition's lock, seals the open transaction with the
    /// schedule entries and offsets it lacks, and (exactly once) lets the partitions go
    /// on into the other lane's transaction while it commits; on an abortable failure,
    /// aborts every uncommitted transaction and rewinds every partition to its last
    /// committed offset.
    /// `late` is how long after its scheduled instant it began (for the metrics).
    pub(super) async fn commit_cycle(
        self: &Arc<Self>,
        late: Option<Duration>,
    ) -> Result<(), PipelineError> {
        let mut phases = CommitPhases {
            late,
            ..CommitPhases::default()
        };
        let _g = self.commit_lock.lock().await;
        let slots = self.snapshot();
        let locking = std::time::Instant::now();
        let mut guards = lock_all(&slots).await;
        let held_since = std::time::Instant::now();
        phases.lock = Some(held_since.saturating_duration_since(locking));
        self.advance_timers(&slots, &mut guards);
        let send_failed = self.poisoned.swap(false, Ordering::AcqRel);
        let now = self.clock.now();
        let has_work = guards.iter().any(|g| g.has_work(now));
        let outcome = match plan(false, send_failed, has_work) {
            Plan::Nothing => {
                // Nothing is uncommitted: a boundary as good as a commit.
                self.keys.switch();
                // Nothing fired: a burst of expiries, if one was going, is over.
                self.after_fired(&[], Duration::ZERO, held_since.elapsed());
                Ok(())
            }
            Plan::Commit => match self.seal_locked(&slots, &mut guards, held_since).await {
                Err(e) => Err(e),
                Ok(sealing) => {
                    phases.seal = Some(sealing.sent);
                    // Exactly once: the partitions fill the other lane's transaction
                    // meanwhile. At least once flushes its one producer, which sends
                    // would only lengthen: the locks stay.
                    let overlap = self.cfg.guarantee == Guarantee::ExactlyOnce;
                    if overlap {
                        drop(std::mem::take(&mut guards));
                    }
                    let committed = self.commit_sealed(&sealing, &mut phases).await;
                    if overlap {
                        let relocking = std::time::Instant::now();
                        guards = lock_all(&slots).await;
                        phases.relock = Some(relocking.elapsed());
                    }
                    committed.map(|()| {
                        phases.emit();
                        self.finish_commit(&slots, &mut guards, sealing, held_since)
                    })
                }
            },
            Plan::Abort(e) => Err(e),
        };
        // After firing: what is still overdue is what this commit could not fire.
        self.retention_gauges(&guards);
        let Err(e) = outcome else {
            return Ok(());
        };
        match after_failure(e) {
            AfterFailure::Ignore => Ok(()),
            AfterFailure::Rebuild(e) => Err(e),
            AfterFailure::AbortAndRewind(e) => {
                self.abort_locked(&slots, &mut guards, &e).await?;
                let n = self.aborts_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                after_abort(n, &e)
            }
        }
    }

    /// Seals and commits the open transaction holding every partition's lock all along
    /// (before partitions go); the caller holds them since `held_since`.
    pub(super) async fn commit_locked(
        &self,
        slots: &[Arc<Slot>],
        guards: &mut [tokio::sync::MutexGuard<'_, SlotState>],
        held_since: std::time::Instant,
    ) -> Result<(), SinkError> {
        let sealing = self.seal_locked(slots, guards, held_since).await?;
        self.commit_sealed(&sealing, &mut CommitPhases::default())
            .await?;
        self.finish_commit(slots, guards, sealing, held_since);
        Ok(())
    }

    /// Sends what the open transaction still lacks (expiries due, released crowds, the
    /// timers' changes) and closes it for its commit: sends go to the other lane from
    /// here. The caller holds every partition's lock, since `held_since`, and no earlier
    /// sealed transaction is still committing (the commit lock).
    async fn seal_locked(
        &self,
        slots: &[Arc<Slot>],
        guards: &mut [tokio::sync::MutexGuard<'_, SlotState>],
        held_since: std::time::Instant,
    ) -> Result<Sealing, SinkError> {
        let mut total = Tally::default();
        let allowed = self.fire_budget.load(Ordering::Relaxed);
        let mut budget = allowed;
        let mut deadlines = Vec::new();
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            total.schedule_writes += self
                .fire_and_persist(
                    slot.partition,
                    &mut g.timers,
                    &mut budget,
                    &mut deadlines,
                    &mut total,
                )
                .await?;
        }
        let mut offsets = TopicPartitionList::new();
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            if let Some(next) = g.offset_to_commit() {
                offsets
                    .add_partition_offset(
                        &self.cfg.input_topic,
                        slot.partition,
                        Offset::Offset(next),
                    )
                    .map_err(SinkError::Abortable)?;
            }
            g.on_seal();
        }
        self.uncommitted.store(0, Ordering::Relaxed);
        // A transaction boundary, every partition still locked: keys read since the last
        // one take over for the next transaction.
        self.keys.switch();
        let lane = self.sink.seal();
        Ok(Sealing {
            lane,
            offsets,
            total,
            deadlines,
            allowed,
            sent: held_since.elapsed(),
        })
    }

    /// Commits a sealed transaction with its offsets; how long its steps took goes to
    /// `phases`.
    async fn commit_sealed(
        &self,
        sealing: &Sealing,
        phases: &mut CommitPhases,
    ) -> Result<(), SinkError> {
        let consumer = self.consumer().clone();
        let sink = self.sink.clone();
        let (lane, offsets) = (sealing.lane, sealing.offsets.clone());
        let mut steps = *phases;
        // librdkafka's commit blocks: keep it off the async workers.
        let (result, steps) = tokio::task::spawn_blocking(move || {
            let r = sink.commit_sealed(lane, &offsets, &consumer, &mut steps);
            (r, steps)
        })
        .await
        .map_err(|_| SinkError::Abandoned)?;
        *phases = steps;
        result
    }

    /// What follows a committed transaction: the partitions' committed offsets and
    /// counters, the commit's metrics and the next fire budget. The caller holds every
    /// partition's lock.
    fn finish_commit(
        &self,
        slots: &[Arc<Slot>],
        guards: &mut [tokio::sync::MutexGuard<'_, SlotState>],
        sealing: Sealing,
        held_since: std::time::Instant,
    ) {
        let committed_at = std::time::Instant::now();
        let Sealing {
            mut total,
            deadlines,
            allowed,
            sent,
            ..
        } = sealing;
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            total.add(&g.on_commit());
            slot.pending.store(g.uncommitted(), Ordering::Relaxed);
        }
        self.aborts_in_row.store(0, Ordering::Relaxed);
        // From the seal to the commit: how long its records waited for it.
        let hold = held_since.elapsed();
        self.stats.add_committed(&total);
        Committed {
            tally: &total,
            format: self.cfg.input_format,
            at: committed_at,
            took: hold,
        }
        .emit();
        let mut usual = self.usual_hold.lock().unwrap_or_else(|p| p.into_inner());
        if deadlines.is_empty() {
            *usual = retention::usual_hold(*usual, hold);
        } else {
            self.fire_budget.store(
                retention::next_fire_budget(
                    allowed,
                    deadlines.len(),
                    hold,
                    *usual,
                    self.cfg.commit_interval,
                    self.cfg.fire_batch,
                ),
                Ordering::Relaxed,
            );
        }
        drop(usual);
        self.after_fired(&deadlines, sent, hold);
    }

    /// Aborts the open transaction and rewinds every partition that processed records
    /// in it; the caller holds every partition's lock.
    pub(super) async fn abort_locked(
        &self,
        slots: &[Arc<Slot>],
        guards: &mut [tokio::sync::MutexGuard<'_, SlotState>],
        why: &SinkError,
    ) -> Result<(), SinkError> {
        tracing::warn!(error = %why, "aborting the open transaction and rewinding the input");
        let sink = self.sink.clone();
        tokio::task::spawn_blocking(move || sink.abort())
            .await
            .map_err(|_| SinkError::Abandoned)??;
        let now = self.clock.now();
        let table_at = self.store.positions();
        let mut records = 0;
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            records += g.aborted_records();
            if g.on_abort() {
                slot.wake.notify_one();
            }
            slot.pending.store(0, Ordering::Relaxed);
            g.timers.on_abort(
                &self.timer_source,
                slot.partition,
                self.policy.clone(),
                now,
                table_at.clone(),
            );
        }
        self.uncommitted.store(0, Ordering::Relaxed);
        self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        self.stats.aborted.fetch_add(records, Ordering::Relaxed);
        Aborted { records }.emit();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::*;
    use crate::adapters::kafka::retention::timers::Timers;

    /// A Kafka error of a given code.
    fn kafka(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::Global(code)
    }

    #[test]
    fn an_attempt_commits_only_a_transaction_that_may_commit() {
        assert!(matches!(plan(false, false, true), Plan::Commit));
        assert!(matches!(plan(false, false, false), Plan::Nothing));
        // A failed send: some record's copies are incomplete, nothing of it may commit,
        // even when nothing else happened since.
        assert!(matches!(
            plan(false, true, false),
            Plan::Abort(SinkError::SendFailed)
        ));
        assert!(matches!(
            plan(false, true, true),
            Plan::Abort(SinkError::SendFailed)
        ));
        // A lost assignment outranks everything: another member may own the partitions.
        assert!(matches!(
            plan(true, true, true),
            Plan::Abort(SinkError::AssignmentLost)
        ));
        assert!(matches!(
            plan(true, false, false),
            Plan::Abort(SinkError::AssignmentLost)
        ));
    }

    #[test]
    fn a_failure_the_producer_survives_is_aborted_others_rebuild() {
        for e in [
            SinkError::Abortable(kafka(RDKafkaErrorCode::OperationTimedOut)),
            SinkError::SendFailed,
            SinkError::AssignmentLost,
            SinkError::NotInGroup,
        ] {
            assert!(
                matches!(after_failure(e), AfterFailure::AbortAndRewind(_)),
                "abort and rewind"
            );
        }
        for e in [
            SinkError::Fatal(kafka(RDKafkaErrorCode::Fatal)),
            SinkError::Fenced(kafka(RDKafkaErrorCode::ProducerFenced)),
            SinkError::Hung("commit_transaction"),
        ] {
            match after_failure(e) {
                AfterFailure::Rebuild(p) => assert!(p.restartable(), "{p}"),
                other => panic!("{other:?}"),
            }
        }
        // A refused configuration rebuilds nothing: the run stops.
        match after_failure(SinkError::Client(kafka(RDKafkaErrorCode::InvalidArgument))) {
            AfterFailure::Rebuild(p) => assert!(!p.restartable(), "{p}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            after_failure(SinkError::Abandoned),
            AfterFailure::Ignore
        ));
    }

    #[test]
    fn aborts_in_a_row_without_a_commit_end_in_a_rebuild() {
        let cause = SinkError::SendFailed;
        for n in 1..MAX_ABORTS_IN_ROW {
            assert!(after_abort(n, &cause).is_ok(), "abort {n} goes on");
        }
        match after_abort(MAX_ABORTS_IN_ROW, &cause) {
            Err(e @ PipelineError::Stuck(..)) => {
                assert!(e.restartable());
                assert!(
                    e.to_string()
                        .contains("a send of the open transaction failed")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// A partition that processed offsets 10..15 since its commit at 10, then 15..18 after
    /// a commit, then had that transaction aborted: it commits 15, then rewinds to 15.
    #[test]
    fn a_commit_stores_the_next_offset_and_an_abort_rewinds_to_the_transactions_first() {
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo")
                .unwrap();
        let empty = || SlotState::new(Timers::empty(&policy));
        let now = Millis(0);
        let mut s = SlotState {
            committed: Some(10),
            ..empty()
        };
        assert!(!s.has_work(now));
        assert_eq!(s.offset_to_commit(), None, "nothing moved");
        for off in 10..15 {
            s.txn_first.get_or_insert(off);
            s.next = Some(off + 1);
            s.records += 1;
        }
        assert!(s.has_work(now));
        assert_eq!(s.offset_to_commit(), Some(15));
        s.on_seal();
        let _ = s.on_commit();
        assert_eq!((s.committed, s.txn_first, s.records), (Some(15), None, 0));
        assert_eq!(s.offset_to_commit(), None);
        for off in 15..18 {
            s.txn_first.get_or_insert(off);
            s.next = Some(off + 1);
            s.records += 1;
        }
        assert!(s.on_abort(), "the partition must seek");
        assert_eq!(
            s.rewind,
            Some(15),
            "read again from the transaction's first record"
        );
        assert_eq!(s.next, Some(15));
        assert_eq!(
            s.offset_to_commit(),
            None,
            "nothing of the aborted work commits"
        );
        assert!(!s.has_work(now));
        // A partition that processed nothing in the aborted transaction stays put.
        let mut idle = SlotState {
            committed: Some(3),
            next: Some(3),
            ..empty()
        };
        assert!(!idle.on_abort());
        assert_eq!(idle.rewind, None);
    }

    /// Exactly once commits a sealed transaction while the next fills: offsets 10..15
    /// sealed, 15..18 read meanwhile. Its commit stores 15 and leaves the open work
    /// alone; had it failed, the abort takes both back to 10.
    #[test]
    fn a_sealed_transaction_commits_apart_from_the_open_one_and_an_abort_takes_both() {
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo")
                .unwrap();
        let filled = || {
            let mut s = SlotState {
                committed: Some(10),
                ..SlotState::new(Timers::empty(&policy))
            };
            for off in 10..15 {
                s.txn_first.get_or_insert(off);
                s.next = Some(off + 1);
                s.records += 1;
                s.tally.record(crate::core::record::Kind::Moc, false);
            }
            assert_eq!(s.offset_to_commit(), Some(15));
            s.on_seal();
            for off in 15..18 {
                s.txn_first.get_or_insert(off);
                s.next = Some(off + 1);
                s.records += 1;
                s.tally.record(crate::core::record::Kind::Moc, false);
            }
            s
        };
        let mut s = filled();
        assert_eq!(
            s.uncommitted(),
            8,
            "sealed and open records are both uncommitted"
        );
        let committed = s.on_commit();
        assert_eq!(
            committed.records_in(),
            5,
            "the sealed transaction's records count"
        );
        assert_eq!(s.committed, Some(15));
        assert_eq!((s.txn_first, s.records, s.uncommitted()), (Some(15), 3, 3));
        assert_eq!(s.offset_to_commit(), Some(18), "the open work commits next");

        let mut s = filled();
        assert_eq!(s.aborted_records(), 8);
        assert!(s.on_abort());
        assert_eq!(
            s.rewind,
            Some(10),
            "read again from the sealed transaction's first"
        );
        assert_eq!((s.next, s.committed), (Some(10), Some(10)));
        assert_eq!((s.uncommitted(), s.offset_to_commit()), (0, None));
        // A partition with nothing in the sealed transaction rewinds to the open one's.
        let mut s = SlotState {
            committed: Some(20),
            next: Some(20),
            ..SlotState::new(Timers::empty(&policy))
        };
        s.on_seal();
        s.txn_first = Some(20);
        s.next = Some(22);
        s.records = 2;
        assert!(s.on_abort());
        assert_eq!(s.rewind, Some(20));
    }
}
