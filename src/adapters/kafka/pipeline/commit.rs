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

use super::slot::{Slot, SlotState};
use super::{PipelineError, Shared, retention};
use crate::adapters::kafka::sink::SinkError;
use crate::adapters::telemetry::{Aborted, Committed, Tally};
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
    /// Whether the partition has processed anything since the last commit, or its timers
    /// have something to write or fire at `now`.
    pub(super) fn has_work(&self, now: Millis) -> bool {
        self.records > 0 || self.timers.has_work(now)
    }

    /// The input offset the next commit stores, if the partition moved since the last.
    pub(super) fn offset_to_commit(&self) -> Option<i64> {
        self.next.filter(|n| Some(*n) != self.committed)
    }

    /// The transaction committed: what was processed is done (and was counted).
    pub(super) fn on_commit(&mut self) {
        self.committed = self.next;
        self.txn_first = None;
        self.records = 0;
        self.tally.clear();
        self.timers.on_commit();
    }

    /// The transaction was aborted: everything processed since the last commit is read
    /// again, from the first offset of the transaction. Returns whether the partition
    /// must seek (its task is woken for it).
    pub(super) fn on_abort(&mut self) -> bool {
        let rewind = self.txn_first.take();
        if let Some(first) = rewind {
            self.rewind = Some(first);
            self.next = self.committed;
        }
        self.records = 0;
        self.tally.clear();
        rewind.is_some()
    }
}

/// The coordinator: commits on the interval, early when enough records wait, and a last
/// time when the pipeline stops. It is the only place a commit starts outside a
/// rebalance, so the final commit cannot overlap another.
pub(super) fn spawn_coordinator(
    shared: Arc<Shared>,
    shutdown: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(shared.cfg.commit_interval) => {}
                _ = shared.commit_now.notified() => {}
                _ = shutdown.notified() => {}
            }
            if shared.has_failed() {
                return;
            }
            let last = shared.closing.load(Ordering::Acquire);
            if let Err(e) = shared.commit_cycle().await {
                shared.fail(e);
                return;
            }
            if last {
                return;
            }
        }
    })
}

impl Shared {
    /// One commit: takes every partition's lock, writes the pending schedule entries and
    /// commits them with the copies and offsets; on an abortable failure, aborts and
    /// rewinds every partition to its last committed offset.
    pub(super) async fn commit_cycle(self: &Arc<Self>) -> Result<(), PipelineError> {
        let _g = self.commit_lock.lock().await;
        let slots = self.snapshot();
        let mut guards = Vec::with_capacity(slots.len());
        for s in &slots {
            guards.push(s.state.lock().await);
        }
        let held_since = std::time::Instant::now();
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
            Plan::Commit => self.commit_locked(&slots, &mut guards, held_since).await,
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

    /// Sends what the open transaction still lacks (expiries due, released crowds, the
    /// timers' changes) and commits it with the offsets; the caller holds every
    /// partition's lock, since `held_since`.
    pub(super) async fn commit_locked(
        &self,
        slots: &[Arc<Slot>],
        guards: &mut [tokio::sync::MutexGuard<'_, SlotState>],
        held_since: std::time::Instant,
    ) -> Result<(), SinkError> {
        // What this commit holds beyond the partitions' own tallies: expiries, released
        // crowds, schedule writes.
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
        let sent = held_since.elapsed();
        let mut tpl = TopicPartitionList::new();
        for (slot, g) in slots.iter().zip(guards.iter()) {
            if let Some(next) = g.offset_to_commit() {
                tpl.add_partition_offset(
                    &self.cfg.input_topic,
                    slot.partition,
                    Offset::Offset(next),
                )
                .map_err(SinkError::Abortable)?;
            }
        }
        let consumer = self.consumer().clone();
        let sink = self.sink.clone();
        // librdkafka's commit blocks: keep it off the async workers.
        tokio::task::spawn_blocking(move || sink.commit(&tpl, &consumer))
            .await
            .map_err(|_| SinkError::Abandoned)??;
        let committed_at = std::time::Instant::now();
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            total.add(&g.tally);
            g.on_commit();
            slot.pending.store(0, Ordering::Relaxed);
        }
        self.uncommitted.store(0, Ordering::Relaxed);
        self.aborts_in_row.store(0, Ordering::Relaxed);
        // A transaction boundary, every partition still locked: keys read since the last
        // one take over for the next transaction.
        self.keys.switch();
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
        Ok(())
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
        let mut records = 0;
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            records += g.tally.records_in();
            if g.on_abort() {
                slot.wake.notify_one();
            }
            slot.pending.store(0, Ordering::Relaxed);
            g.timers
                .on_abort(&self.timer_source, slot.partition, self.policy.clone(), now);
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
        s.on_commit();
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
}
