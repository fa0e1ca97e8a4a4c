//! A partition owned by the pipeline: what its task keeps between commits, and how to
//! wake and stop the task. The task, the coordinator and the rebalance callbacks all lock
//! it, so it sits apart from each of them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::adapters::kafka::retention::timers::Timers;
use crate::adapters::telemetry::Tally;

/// What a partition task keeps between commits.
pub(super) struct SlotState {
    /// Offset after the last committed record.
    pub(super) committed: Option<i64>,
    /// Offset after the last record processed.
    pub(super) next: Option<i64>,
    /// First offset processed since the last commit: where an abort rewinds to.
    pub(super) txn_first: Option<i64>,
    /// Records processed since the last commit.
    pub(super) records: u64,
    /// The partition's retention timers.
    pub(super) timers: Timers,
    /// Set by an abort: seek here before reading on.
    pub(super) rewind: Option<i64>,
    /// What was processed since the last commit, for the counters once it commits.
    pub(super) tally: Tally,
    /// The partition's part of the transaction being committed, while the next one fills
    /// (exactly once); `txn_first`, `records` and `tally` then describe the next one.
    pub(super) sealed: Option<SealedPart>,
}

/// A partition's part of a transaction closed for its commit.
pub(super) struct SealedPart {
    /// The offset stored once it commits.
    pub(super) next: Option<i64>,
    /// Its first offset: where an abort rewinds to.
    pub(super) first: Option<i64>,
    /// Its records.
    pub(super) records: u64,
    /// What it holds, counted once it commits.
    pub(super) tally: Tally,
}

impl SlotState {
    /// A partition's state when it is assigned.
    pub(super) fn new(timers: Timers) -> SlotState {
        SlotState {
            committed: None,
            next: None,
            txn_first: None,
            records: 0,
            timers,
            rewind: None,
            tally: Tally::default(),
            sealed: None,
        }
    }
}

/// A partition owned by this pipeline: its state, its task and how to wake it.
pub(super) struct Slot {
    pub(super) partition: i32,
    pub(super) state: tokio::sync::Mutex<SlotState>,
    pub(super) wake: Notify,
    pub(super) stop: AtomicBool,
    /// Uncommitted records (`state.records` and those sealed) as of the task's last
    /// batch, readable without the lock (the lag sampler adds it to what is still
    /// unread).
    pub(super) pending: AtomicU64,
    /// The partition's task. A revocation waits for it: its queue handle must be gone
    /// before the partition is assigned again, since dropping it disables the wake-up
    /// callback of the partition's (shared) librdkafka queue.
    pub(super) task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Slot {
    /// Asks the task to stop (the caller may hold the state lock) .
    pub(super) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Waits until the task has stopped (the caller must not hold the state lock).
    pub(super) async fn join(&self) {
        let h = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.await;
        }
    }
}
