//! One run of the Kafka pipeline: the group consumer, one task per assigned partition
//! around the pure core, and the coordinator that commits copies, schedule entries and
//! input offsets together.
//!
//! Each partition's state sits behind its own async mutex, held while a batch of its
//! records is processed. A commit takes every partition's mutex (in partition order), so
//! nothing is produced between "these offsets" and "commit": the transaction holds
//! exactly the copies of the records up to the offsets it commits. Rebalance callbacks
//! run on the group thread and take the same locks, so revoked partitions are committed
//! before they are given away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;

use super::config::{Guarantee, RunConfig};
use super::consent::ConsentStore;
use super::sink::{Out, Sink, SinkError};
use crate::codec::{self, Envelopes, Format, binary, json};
use crate::core::bounds::TimeBounds;
use crate::core::process::{Decision, process_into};
use crate::core::pseudonym::Keyring;
use crate::core::record::Record;
use crate::core::retention::WindowBatch;
use crate::policy::Policy;
use crate::vocab::purpose::Purpose;
use crate::vocab::time::Millis;

/// Records a partition task processes before it lets others (and commits) in.
const BATCH: usize = 512;

/// The largest input record routed (the same limit as replay's); larger ones go to the
/// dead letter, truncated.
pub use crate::codec::MAX_RECORD_BYTES;

/// The longest input key a dead letter carries; a longer one is cut, so a dead letter
/// always fits the broker's message size and cannot wedge its partition.
pub const MAX_DEAD_LETTER_KEY_BYTES: usize = 1024;

/// Aborts in a row, with no commit between them, after which the pipeline is rebuilt: a
/// cause that outlives a fresh transaction (a deleted or forbidden topic) would otherwise
/// spin silently, re-reading the same records.
const MAX_ABORTS_IN_ROW: u32 = 5;

/// Counters of a run, readable while it goes.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Records routed (valid ones).
    pub records: AtomicU64,
    /// Records sent to the dead-letter topic.
    pub dead_letters: AtomicU64,
    /// Records routed while the consent table was stale (fail closed).
    pub fail_closed: AtomicU64,
    /// Whether routing is paused, waiting for the consent table.
    pub paused: AtomicBool,
    /// Copies per route.
    pub copies: [AtomicU64; Purpose::COUNT],
    /// Schedule entries written.
    pub windows: AtomicU64,
    /// Transactions (or at-least-once batches) committed.
    pub commits: AtomicU64,
    /// Transactions aborted (input rewound).
    pub aborts: AtomicU64,
}

impl RunStats {
    /// One line for the log.
    pub fn line(&self) -> String {
        let c: Vec<String> = Purpose::ALL
            .iter()
            .map(|p| {
                format!(
                    "{}={}",
                    p.id(),
                    self.copies[*p as usize].load(Ordering::Relaxed)
                )
            })
            .collect();
        format!(
            "records={} dead_letters={} fail_closed={} copies[{}] windows={} commits={} aborts={}",
            self.records.load(Ordering::Relaxed),
            self.dead_letters.load(Ordering::Relaxed),
            self.fail_closed.load(Ordering::Relaxed),
            c.join(" "),
            self.windows.load(Ordering::Relaxed),
            self.commits.load(Ordering::Relaxed),
            self.aborts.load(Ordering::Relaxed),
        )
    }
}

/// Why a pipeline run ended early.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A Kafka client could not be made or asked.
    #[error("kafka: {what}: {source}")]
    Kafka {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: KafkaError,
    },
    /// Topics are missing or too small.
    #[error("topics: {0}")]
    Topics(String),
    /// The producer failed.
    #[error("producer: {0}")]
    Sink(#[from] SinkError),
    /// A message reached the group's main queue instead of its partition queue; the
    /// pipeline restarts so its order is kept.
    #[error("a message of partition {0} bypassed its partition queue")]
    Stray(i32),
    /// Something of our own failed (a thread, a task, a partition queue); a fresh
    /// pipeline may not hit it again.
    #[error("internal: {0}")]
    Internal(String),
    /// Transactions kept aborting without a commit between them.
    #[error("{0} transactions aborted in a row without a commit; last cause: {1}")]
    Stuck(u32, String),
    /// The group consumer hit a fatal error (e.g. a fenced static member).
    #[error("group consumer: {0}")]
    ConsumerFatal(KafkaError),
    /// A stop's last commit failed; its transaction was ended (see `run_pipeline`), so
    /// nothing is lost.
    #[error("the last commit of a stop failed: {0}")]
    FinalCommit(Box<PipelineError>),
}

impl PipelineError {
    /// Whether a fresh pipeline (new consumer and producer) may succeed where this failed.
    /// Missing topics and refused client settings are an operator's mistake and stop the
    /// run; a fenced producer usually means the broker timed out a transaction during an
    /// outage, so it is rebuilt (`run` gives up when fencing keeps repeating).
    pub fn restartable(&self) -> bool {
        !matches!(
            self,
            PipelineError::Topics(_)
                | PipelineError::Sink(SinkError::Client(_))
                | PipelineError::Kafka {
                    source: KafkaError::ClientCreation(_),
                    ..
                }
        )
    }

    /// Whether the producer was fenced.
    pub fn fenced(&self) -> bool {
        matches!(self, PipelineError::Sink(SinkError::Fenced(_)))
    }
}

/// What a partition task keeps between commits.
#[derive(Default)]
struct SlotState {
    /// Offset after the last committed record.
    committed: Option<i64>,
    /// Offset after the last record processed.
    next: Option<i64>,
    /// First offset processed since the last commit: where an abort rewinds to.
    txn_first: Option<i64>,
    /// Records processed since the last commit.
    records: u64,
    /// Retention windows touched since the last commit.
    windows: WindowBatch,
    /// Set by an abort: seek here before reading on.
    rewind: Option<i64>,
    /// Anonymised copies made since the last commit (route, copy, headers), sent sorted
    /// at the commit (see [`Shared::commit_locked`]).
    anonymised: Vec<(Purpose, Vec<u8>, OwnedHeaders)>,
}

struct Slot {
    partition: i32,
    state: tokio::sync::Mutex<SlotState>,
    wake: Notify,
    stop: AtomicBool,
    /// The partition's task. A revocation waits for it: its queue handle must be gone
    /// before the partition is assigned again, since dropping it disables the wake-up
    /// callback of the partition's (shared) librdkafka queue.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Slot {
    /// Asks the task to stop (the caller may hold the state lock) .
    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Waits until the task has stopped (the caller must not hold the state lock).
    async fn join(&self) {
        let h = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.await;
        }
    }
}

/// Everything the tasks, the coordinator and the rebalance callbacks share.
pub struct Shared {
    cfg: RunConfig,
    policy: Arc<Policy>,
    /// The policy's envelopes, encoded once.
    envelopes: Envelopes,
    keys: Arc<Keyring>,
    store: Arc<ConsentStore>,
    sink: Arc<Sink>,
    consumer: OnceLock<Arc<BaseConsumer<GroupContext>>>,
    /// Partition queues split while partitions are being assigned, until their slots
    /// take them.
    queues: Mutex<BTreeMap<i32, PartitionQueue<GroupContext>>>,
    slots: Mutex<BTreeMap<i32, Arc<Slot>>>,
    /// Serialises commits (coordinator, rebalances, shutdown) and slot registration.
    commit_lock: tokio::sync::Mutex<()>,
    uncommitted: AtomicUsize,
    commit_now: Notify,
    /// A send failed in the open transaction: the next commit aborts instead.
    poisoned: AtomicBool,
    failed: Mutex<Option<PipelineError>>,
    fail_notify: Notify,
    closing: AtomicBool,
    /// Aborts since the last commit.
    aborts_in_row: std::sync::atomic::AtomicU32,
    /// Partitions of the schedule topic, as last seen: an input partition beyond them
    /// has nowhere to write its windows.
    schedule_partitions: AtomicUsize,
    /// When a stop must have left the group by.
    leave_by: Mutex<Option<Instant>>,
    stats: Arc<RunStats>,
    rt: tokio::runtime::Handle,
}

/// The group consumer's context: rebalance callbacks reach the shared state through it.
pub struct GroupContext {
    shared: OnceLock<Weak<Shared>>,
    throttle: super::Throttle,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::client_log(&self.throttle, "group", level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        super::client_error(&self.throttle, "group", &error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        let Some(shared) = self.shared.get().and_then(Weak::upgrade) else {
            return;
        };
        if let Rebalance::Assign(tpl) = r {
            // Split before librdkafka starts fetching, so no message of these partitions
            // ever reaches the group's main queue. No lock: a commit may be running.
            let consumer = shared.consumer();
            let mut stash = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                if let Some(q) = consumer.split_partition_queue(e.topic(), e.partition()) {
                    stash.insert(e.partition(), q);
                }
            }
        }
        if let Rebalance::Revoke(tpl) = r {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let lost = consumer.assignment_lost();
            tracing::info!(?parts, lost, "partitions revoked");
            let s = shared.clone();
            // The group thread is not a runtime thread, so it may block on the commit;
            // the revocation must not complete before it.
            shared
                .rt
                .block_on(async move { s.revoke(&parts, lost).await });
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        let Some(shared) = self.shared.get().and_then(Weak::upgrade) else {
            return;
        };
        match r {
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?parts, "partitions assigned");
                let s = shared.clone();
                shared.rt.block_on(async move { s.assign(&parts).await });
            }
            // rust-rdkafka unassigns everything after a rebalance error, without the
            // revocation this pipeline's offsets depend on: start over from the committed
            // offsets instead.
            Rebalance::Error(e) => {
                shared.fail(PipelineError::Internal(format!("rebalance error: {e}")))
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

fn now_millis() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    )
}

impl Shared {
    fn consumer(&self) -> &Arc<BaseConsumer<GroupContext>> {
        self.consumer
            .get()
            .expect("consumer set before subscribing")
    }

    fn fail(&self, e: PipelineError) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::warn!(error = %e, "pipeline failed");
            *f = Some(e);
        }
        self.sink.abandon();
        self.fail_notify.notify_one();
    }

    fn snapshot(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Registers newly assigned partitions and starts their tasks.
    async fn assign(self: &Arc<Self>, parts: &[i32]) {
        // Before the lock: it may ask the broker, and commits should not wait for that.
        if let Some(&top) = parts.iter().max() {
            self.check_schedule_partitions(top);
        }
        let _g = self.commit_lock.lock().await;
        for &p in parts {
            let exists = self
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&p);
            if exists {
                // Not expected (revocation removes slots). The open transaction may hold
                // copies of the old task's records, which a new task would read again
                // from the committed offset: only a fresh pipeline is safe.
                self.fail(PipelineError::Internal(format!(
                    "partition {p} assigned while still owned"
                )));
                return;
            }
            let stashed = self
                .queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&p);
            let Some(queue) = stashed else {
                self.fail(PipelineError::Internal(format!(
                    "no queue for partition {p} of {}",
                    self.cfg.input_topic
                )));
                continue;
            };
            let slot = Arc::new(Slot {
                partition: p,
                state: tokio::sync::Mutex::new(SlotState::default()),
                wake: Notify::new(),
                stop: AtomicBool::new(false),
                task: Mutex::new(None),
            });
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(p, slot.clone());
            let me = self.clone();
            let s = slot.clone();
            let h = self
                .rt
                .spawn(async move { me.partition_task(s, queue).await });
            *slot.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        }
    }

    /// Fails the pipeline (for good: an operator must add partitions) when input
    /// partition `top` has no schedule partition of the same number, as happens when the
    /// input topic grew after start. Runs on the group thread, which may block.
    fn check_schedule_partitions(&self, top: i32) {
        let needed = top as usize + 1;
        if self.schedule_partitions.load(Ordering::Acquire) >= needed {
            return;
        }
        let md = self
            .consumer()
            .fetch_metadata(Some(&self.cfg.schedule_topic), Duration::from_secs(10));
        let have = md.ok().and_then(|md| {
            md.topics()
                .iter()
                .find(|t| t.name() == self.cfg.schedule_topic && t.error().is_none())
                .map(|t| t.partitions().len())
        });
        match have {
            Some(n) => {
                self.schedule_partitions.store(n, Ordering::Release);
                if n < needed {
                    self.fail(PipelineError::Topics(format!(
                        "{} has {n} partitions, but partition {top} of {} was assigned: give it at least as many partitions as the input",
                        self.cfg.schedule_topic, self.cfg.input_topic
                    )));
                }
            }
            None => self.fail(PipelineError::Internal(format!(
                "cannot read the partitions of {}",
                self.cfg.schedule_topic
            ))),
        }
    }

    fn has_failed(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            || self.sink.abandoned()
    }

    /// Commits (or, when the assignment was lost, aborts) before partitions go.
    async fn revoke(self: &Arc<Self>, parts: &[i32], lost: bool) {
        let _g = self.commit_lock.lock().await;
        let slots = self.snapshot();
        let mut guards = Vec::with_capacity(slots.len());
        for s in &slots {
            guards.push(s.state.lock().await);
        }
        // A failed pipeline commits nothing more: the next one's producer (same
        // transactional id) aborts the open transaction when it starts.
        if !self.has_failed() {
            let outcome = if lost {
                // Another member may already own them: nothing of this transaction may
                // commit.
                Err(SinkError::AssignmentLost)
            } else if self.poisoned.swap(false, Ordering::AcqRel) {
                Err(SinkError::SendFailed)
            } else {
                self.commit_locked(&slots, &mut guards).await
            };
            match outcome {
                Ok(()) | Err(SinkError::Abandoned) => {}
                Err(
                    e @ (SinkError::Fatal(_)
                    | SinkError::Fenced(_)
                    | SinkError::Client(_)
                    | SinkError::Hung(_)),
                ) => self.fail(e.into()),
                Err(e) => {
                    if let Err(fatal) = self.abort_locked(&slots, &mut guards, &e).await {
                        self.fail(fatal.into());
                    }
                }
            }
        }
        let mut gone = Vec::new();
        {
            let mut reg = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            for s in &slots {
                if parts.contains(&s.partition) {
                    s.request_stop();
                    reg.remove(&s.partition);
                    gone.push(s.clone());
                }
            }
        }
        drop(guards);
        for s in gone {
            s.join().await;
        }
    }

    /// One commit: takes every partition's lock, writes the pending schedule entries and
    /// commits them with the copies and offsets; on an abortable failure, aborts and
    /// rewinds every partition to its last committed offset.
    async fn commit_cycle(self: &Arc<Self>) -> Result<(), PipelineError> {
        let _g = self.commit_lock.lock().await;
        let slots = self.snapshot();
        let mut guards = Vec::with_capacity(slots.len());
        for s in &slots {
            guards.push(s.state.lock().await);
        }
        // Checked with every partition locked: a send that failed in this transaction
        // means some record's copies are incomplete, so nothing of it may commit.
        let outcome = if self.poisoned.swap(false, Ordering::AcqRel) {
            Err(SinkError::SendFailed)
        } else {
            self.commit_locked(&slots, &mut guards).await
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(
                e @ (SinkError::Fatal(_)
                | SinkError::Fenced(_)
                | SinkError::Client(_)
                | SinkError::Hung(_)),
            ) => Err(e.into()),
            Err(SinkError::Abandoned) => Ok(()),
            Err(e) => {
                self.abort_locked(&slots, &mut guards, &e).await?;
                let n = self.aborts_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= MAX_ABORTS_IN_ROW {
                    return Err(PipelineError::Stuck(n, e.to_string()));
                }
                Ok(())
            }
        }
    }

    async fn commit_locked(
        &self,
        slots: &[Arc<Slot>],
        guards: &mut [tokio::sync::MutexGuard<'_, SlotState>],
    ) -> Result<(), SinkError> {
        if !guards
            .iter()
            .any(|g| g.records > 0 || !g.windows.is_empty())
        {
            return Ok(());
        }
        // Anonymised copies go out last, sorted by content: sent as they were made, each
        // would sit among timed copies and carry its own timestamp, which would give its
        // record's time away. Their order and timestamps now tell only the transaction.
        // (Fewer subscribers share a transaction than a month of files, so nothing is
        // withheld here; a window with a minimum count needs state that outlives a
        // transaction.)
        let mut anonymised: Vec<_> = guards
            .iter_mut()
            .flat_map(|g| g.anonymised.drain(..))
            .collect();
        anonymised.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (p, payload, headers) in anonymised {
            if let Some(topic) = self.cfg.routes[p as usize].as_deref() {
                self.sink
                    .send(Out {
                        topic,
                        partition: None,
                        key: None,
                        payload: &payload,
                        headers: Some(headers),
                    })
                    .await?;
            }
        }
        let mut line = Vec::with_capacity(512);
        let mut windows = 0u64;
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            for w in g.windows.drain(&self.policy) {
                line.clear();
                // Serialising owned strings and numbers into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut line, &w);
                let key = w.key();
                // Same partition as the input: the partition's owner owns its timers.
                self.sink
                    .send(Out {
                        topic: &self.cfg.schedule_topic,
                        partition: Some(slot.partition),
                        key: Some(key.as_bytes()),
                        payload: &line,
                        headers: None,
                    })
                    .await?;
                windows += 1;
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (slot, g) in slots.iter().zip(guards.iter()) {
            if let Some(next) = g.next.filter(|n| Some(*n) != g.committed) {
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
        for g in guards.iter_mut() {
            g.committed = g.next;
            g.txn_first = None;
            g.records = 0;
        }
        self.uncommitted.store(0, Ordering::Relaxed);
        self.aborts_in_row.store(0, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats.windows.fetch_add(windows, Ordering::Relaxed);
        Ok(())
    }

    async fn abort_locked(
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
        for (slot, g) in slots.iter().zip(guards.iter_mut()) {
            if let Some(first) = g.txn_first.take() {
                g.rewind = Some(first);
                g.next = g.committed;
                slot.wake.notify_one();
            }
            g.records = 0;
            g.windows.clear();
            g.anonymised.clear();
        }
        self.uncommitted.store(0, Ordering::Relaxed);
        self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn partition_task(
        self: Arc<Self>,
        slot: Arc<Slot>,
        mut queue: PartitionQueue<GroupContext>,
    ) {
        {
            let s = slot.clone();
            queue.set_nonempty_callback(move || s.wake.notify_one());
        }
        let mut scratch = Scratch::default();
        let throttle = super::Throttle::default();
        loop {
            let more = {
                let mut st = slot.state.lock().await;
                if slot.stop.load(Ordering::Acquire) || self.closing.load(Ordering::Acquire) {
                    break;
                }
                if let Some(off) = st.rewind.take() {
                    let c = self.consumer().clone();
                    let topic = self.cfg.input_topic.clone();
                    let p = slot.partition;
                    // Messages fetched before the seek are discarded by librdkafka.
                    let r = tokio::task::spawn_blocking(move || {
                        c.seek(&topic, p, Offset::Offset(off), Duration::from_secs(10))
                    })
                    .await
                    .unwrap_or(Err(KafkaError::Canceled));
                    if let Err(e) = r {
                        self.fail(PipelineError::Kafka {
                            what: "rewinding a partition",
                            source: e,
                        });
                        break;
                    }
                }
                let now = now_millis();
                scratch.bounds = Some(TimeBounds::new(&self.policy, now, self.cfg.time_limits));
                let instant = Instant::now();
                let fresh = self.store.fresh(instant);
                // A stale table first pauses routing: the records wait in Kafka, so a
                // short outage of the control topic costs latency, not consent-based
                // copies. Only a longer one routes fail closed.
                if !fresh && self.store.stale_for(instant) < self.cfg.stale_pause {
                    if let Some(held) = throttle.ready() {
                        tracing::warn!(
                            partition = slot.partition,
                            held_back = held,
                            "consent table stale: routing paused"
                        );
                    }
                    self.stats.paused.store(true, Ordering::Relaxed);
                    drop(st);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                self.stats.paused.store(false, Ordering::Relaxed);
                let mut n = 0;
                while n < BATCH {
                    // The table can go stale while a batch runs (sends may wait for a full
                    // queue): no record is routed on a freshness that has lapsed.
                    if fresh && !self.store.fresh(Instant::now()) {
                        break;
                    }
                    match queue.poll(Duration::ZERO) {
                        None => break,
                        Some(Ok(m)) => {
                            match self.handle(&m, &mut st, now, fresh, &mut scratch).await {
                                Ok(()) => {}
                                // The transaction cannot commit any more: stop here, the
                                // coordinator aborts it and rewinds this partition.
                                Err(SinkError::Abortable(e)) => {
                                    if let Some(held) = throttle.ready() {
                                        tracing::warn!(partition = slot.partition, error = %e, held_back = held, "send failed; the transaction will be aborted");
                                    }
                                    self.poisoned.store(true, Ordering::Release);
                                    self.commit_now.notify_one();
                                    break;
                                }
                                Err(SinkError::Abandoned) => return,
                                Err(e) => {
                                    self.fail(e.into());
                                    return;
                                }
                            }
                        }
                        Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                            self.fail(PipelineError::ConsumerFatal(e));
                            return;
                        }
                        Some(Err(e)) => {
                            if let Some(held) = throttle.ready() {
                                tracing::warn!(partition = slot.partition, error = %e, held_back = held, "consumer error");
                            }
                        }
                    }
                    n += 1;
                }
                n == BATCH
            };
            if more {
                tokio::task::yield_now().await;
            } else {
                // The queue's callback wakes the task; the timeout is a backstop so a
                // lost wake-up costs at most a moment, never a stalled partition.
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), slot.wake.notified()).await;
            }
        }
    }

    async fn handle(
        &self,
        m: &BorrowedMessage<'_>,
        st: &mut SlotState,
        now: Millis,
        fresh: bool,
        scratch: &mut Scratch,
    ) -> Result<(), SinkError> {
        // Before anything is sent: an abort must rewind to this record at the latest.
        st.txn_first.get_or_insert(m.offset());
        let full = m.payload().unwrap_or(&[]);
        // A record this large is no CDR; refusing it here keeps every copy and dead
        // letter far below the broker's message size, so one record cannot wedge a
        // partition.
        let (payload, decoded): (&[u8], Result<Record<'_>, String>) =
            if full.len() > MAX_RECORD_BYTES {
                (
                    &full[..MAX_RECORD_BYTES],
                    Err(crate::codec::too_large(full.len() as u64)),
                )
            } else {
                let d = match self.cfg.input_format {
                    Format::Json => json::decode_record(full),
                    Format::Binary => binary::decode_record(full),
                };
                // A record from the future or older than every route keeps anything is
                // refused, as replay refuses it.
                let d = d.map_err(|e| e.to_string()).and_then(|r| {
                    match scratch.bounds.as_ref().map(|b| b.check(r.start_time)) {
                        Some(Err(e)) => Err(e.to_string()),
                        _ => Ok(r),
                    }
                });
                (full, d)
            };
        match decoded {
            Err(reason) => {
                let headers = OwnedHeaders::new_with_capacity(4)
                    .insert(Header {
                        key: "dlq.reason",
                        value: Some(&reason),
                    })
                    .insert(Header {
                        key: "dlq.topic",
                        value: Some(m.topic()),
                    })
                    .insert(Header {
                        key: "dlq.partition",
                        value: Some(&m.partition().to_string()),
                    })
                    .insert(Header {
                        key: "dlq.offset",
                        value: Some(&m.offset().to_string()),
                    });
                self.sink
                    .send(Out {
                        topic: &self.cfg.dead_letter_topic,
                        partition: None,
                        key: m
                            .key()
                            .map(|k| &k[..k.len().min(MAX_DEAD_LETTER_KEY_BYTES)]),
                        payload,
                        headers: Some(headers),
                    })
                    .await?;
                self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => {
                let state = self.store.view(&r.msisdn, fresh);
                // Filled in place: a decision is ~6 KB, returning one by value copies it.
                // (Its copies borrow the message, so it cannot outlive this record.)
                let mut d = Decision::default();
                process_into(&r, &self.policy, &state, &self.keys, now, &mut d);
                for c in &d.copies {
                    let Some(topic) = self.cfg.routes[c.envelope.purpose as usize].as_deref()
                    else {
                        continue;
                    };
                    scratch.buf.clear();
                    match self.cfg.output_format {
                        Format::Json => json::encode_copy(&self.envelopes, c, &mut scratch.buf),
                        Format::Binary => binary::encode_copy(&self.envelopes, c, &mut scratch.buf),
                    }
                    let mut headers = OwnedHeaders::new_with_capacity(9);
                    for (k, v) in codec::headers(c, &mut scratch.treatments) {
                        headers = headers.insert(Header {
                            key: k,
                            value: Some(v),
                        });
                    }
                    let entry = c.schedule_entry();
                    if c.is_anonymised() {
                        st.anonymised
                            .push((c.envelope.purpose, scratch.buf.clone(), headers));
                    } else {
                        self.sink
                            .send(Out {
                                topic,
                                partition: None,
                                key: entry.subscriber.map(str::as_bytes),
                                payload: &scratch.buf,
                                headers: Some(headers),
                            })
                            .await?;
                    }
                    st.windows.add(&entry, state.contract_ended);
                    self.stats.copies[c.envelope.purpose as usize].fetch_add(1, Ordering::Relaxed);
                }
                if !fresh {
                    self.stats.fail_closed.fetch_add(1, Ordering::Relaxed);
                }
                self.stats.records.fetch_add(1, Ordering::Relaxed);
            }
        }
        st.next = Some(m.offset() + 1);
        st.records += 1;
        if self.uncommitted.fetch_add(1, Ordering::Relaxed) + 1 >= self.cfg.commit_max_records {
            self.commit_now.notify_one();
        }
        Ok(())
    }
}

/// Buffers a partition task reuses for every copy.
#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
    treatments: String,
    /// The record times accepted at the batch's clock.
    bounds: Option<TimeBounds>,
}

/// The shared inputs of a pipeline run.
pub struct PipelineInputs {
    /// Configuration.
    pub cfg: RunConfig,
    /// The policy.
    pub policy: Arc<Policy>,
    /// Pseudonym keys.
    pub keys: Arc<Keyring>,
    /// The consent table (caught up before the run starts).
    pub store: Arc<ConsentStore>,
    /// Counters, kept across pipeline restarts.
    pub stats: Arc<RunStats>,
    /// librdkafka properties for the group consumer.
    pub consumer_config: ClientConfig,
    /// librdkafka properties for the producer.
    pub producer_config: ClientConfig,
}

/// Runs one pipeline until `stop` is notified (graceful: the open transaction is
/// committed, the group left) or it fails.
pub async fn run_pipeline(inputs: &PipelineInputs, stop: &Notify) -> Result<(), PipelineError> {
    let cfg = &inputs.cfg;
    let producer_config = inputs.producer_config.clone();
    let guarantee = cfg.guarantee;
    let sink = tokio::task::spawn_blocking(move || Sink::create(&producer_config, guarantee))
        .await
        .map_err(|e| PipelineError::Internal(format!("producer start-up: {e}")))??;

    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        policy: inputs.policy.clone(),
        envelopes: Envelopes::new(&inputs.policy),
        keys: inputs.keys.clone(),
        store: inputs.store.clone(),
        sink: Arc::new(sink),
        consumer: OnceLock::new(),
        queues: Mutex::new(BTreeMap::new()),
        slots: Mutex::new(BTreeMap::new()),
        commit_lock: tokio::sync::Mutex::new(()),
        uncommitted: AtomicUsize::new(0),
        commit_now: Notify::new(),
        poisoned: AtomicBool::new(false),
        failed: Mutex::new(None),
        fail_notify: Notify::new(),
        closing: AtomicBool::new(false),
        aborts_in_row: std::sync::atomic::AtomicU32::new(0),
        schedule_partitions: AtomicUsize::new(0),
        leave_by: Mutex::new(None),
        stats: inputs.stats.clone(),
        rt: tokio::runtime::Handle::current(),
    });
    let ctx = GroupContext {
        shared: OnceLock::new(),
        throttle: super::Throttle::default(),
    };
    let _ = ctx.shared.set(Arc::downgrade(&shared));
    // Creating the consumer, asking for metadata and subscribing block: keep them off the
    // workers.
    let started = {
        let config = inputs.consumer_config.clone();
        let cfg = cfg.clone();
        let policy = inputs.policy.clone();
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer<GroupContext> =
                config
                    .create_with_context(ctx)
                    .map_err(|source| PipelineError::Kafka {
                        what: "creating the group consumer",
                        source,
                    })?;
            let schedule_partitions = check_topics(&consumer, &cfg, &policy)?;
            shared
                .schedule_partitions
                .store(schedule_partitions, Ordering::Release);
            let consumer = Arc::new(consumer);
            let _ = shared.consumer.set(consumer.clone());
            consumer
                .subscribe(&[&cfg.input_topic])
                .map_err(|source| PipelineError::Kafka {
                    what: "subscribing to the input topic",
                    source,
                })?;
            Ok::<_, PipelineError>(consumer)
        })
        .await
        .map_err(|e| PipelineError::Internal(format!("consumer start-up: {e}")))
        .and_then(|r| r)
    };
    let consumer = match started {
        Ok(c) => c,
        Err(e) => {
            // Closing the producer blocks (purge, flush, thread joins).
            let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
            return Err(e);
        }
    };

    // The group thread polls the main queue so rebalance callbacks fire; it may block in
    // them (commits), which is why it is not an async task.
    let group_stop = Arc::new(AtomicBool::new(false));
    let group = {
        let shared2 = shared.clone();
        let consumer2 = consumer.clone();
        let group_stop = group_stop.clone();
        match std::thread::Builder::new()
            .name("cdrguard-group".into())
            .spawn(move || group_thread(&shared2, &consumer2, &group_stop))
        {
            Ok(h) => h,
            Err(e) => {
                drop(consumer);
                let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
                return Err(PipelineError::Internal(format!(
                    "cannot start the group thread: {e}"
                )));
            }
        }
    };

    // The coordinator commits on its interval, early when a batch is full, and a last
    // time when the pipeline stops; it is the only place a commit starts outside a
    // rebalance, so the final commit cannot overlap another.
    let shutdown = Arc::new(Notify::new());
    let coordinator = {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
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
                // Partition tasks stop at their next batch once `closing` is set, so the
                // last commit holds everything they processed.
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
    };

    // A stop is seen even when a failure is ready too; whether the failure came first is
    // told by `failed` below, not by which branch won.
    let stop_requested = tokio::select! {
        biased;
        _ = stop.notified() => {
            tracing::info!("stopping: committing the open transaction");
            true
        }
        _ = shared.fail_notify.notified() => false,
    };
    let stopped_at = Instant::now();
    let failed_before_stop = shared
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some();
    if stop_requested {
        // The stop's time is shared out: the last commit with its retries gets the first
        // 40%, ending what it could not finish runs until 70%, leaving the group until
        // 90%, and the rest is for closing the clients.
        shared
            .sink
            .finish_by(stopped_at + cfg.shutdown_timeout * 2 / 5);
        *shared.leave_by.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(stopped_at + cfg.shutdown_timeout * 9 / 10);
    }
    shared.closing.store(true, Ordering::Release);
    shutdown.notify_one();
    let _ = coordinator.await;
    let failed = shared
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let result = match failed {
        None => Ok(()),
        Some(e) => {
            // Nothing more is sent or committed; the open transaction is aborted by the
            // next producer with this transactional id (or times out on the broker).
            shared.sink.abandon();
            if stop_requested && cfg.guarantee == Guarantee::ExactlyOnce && !e.fenced() {
                // Stopping for good: no next producer may come soon, and until the broker
                // times the transaction out, read_committed readers of every route wait
                // behind it. A new producer under the same transactional id ends it now:
                // it aborts it, or completes it if its commit had already reached the
                // coordinator (records and offsets together either way).
                let producer_config = inputs.producer_config.clone();
                let until = stopped_at + cfg.shutdown_timeout * 7 / 10;
                let ended = tokio::task::spawn_blocking(move || {
                    Sink::create_until(&producer_config, Guarantee::ExactlyOnce, Some(until))
                        .map(drop)
                })
                .await;
                match ended {
                    Ok(Ok(())) => tracing::warn!(
                        error = %e,
                        "the last commit failed; a new producer ended its transaction (records not committed are read again by the next owner)"
                    ),
                    _ => tracing::error!(
                        error = %e,
                        "the last commit failed and its transaction could not be ended; the broker aborts it after transaction.timeout.ms"
                    ),
                }
            }
            if stop_requested && !failed_before_stop {
                Err(PipelineError::FinalCommit(Box::new(e)))
            } else {
                Err(e)
            }
        }
    };
    let slots = shared.snapshot();
    for s in &slots {
        s.request_stop();
    }
    for s in &slots {
        s.join().await;
    }
    tracing::debug!("partition tasks stopped; leaving the group");
    group_stop.store(true, Ordering::Release);
    drop(consumer);
    let _ = tokio::task::spawn_blocking(move || group.join()).await;
    tracing::info!(stats = %shared.stats.line(), "pipeline stopped");
    // Closing the consumer and the producer blocks (leaving the group, joining threads).
    let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
    result
}

fn group_thread(
    shared: &Arc<Shared>,
    consumer: &Arc<BaseConsumer<GroupContext>>,
    stop: &AtomicBool,
) {
    let throttle = super::Throttle::default();
    while !stop.load(Ordering::Acquire) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                // Partition queues are split when partitions are assigned, before any
                // fetch; a message here means that did not hold. Processing it out of
                // order would break the offsets, so start over from the committed ones.
                shared.fail(PipelineError::Stray(m.partition()));
            }
            Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                shared.fail(PipelineError::ConsumerFatal(e));
            }
            Some(Err(e)) => {
                if let Some(held) = throttle.ready() {
                    tracing::warn!(error = %e, held_back = held, "group consumer error");
                }
            }
        }
    }
    // Leave the group here, where the revocation callback can run (it commits nothing:
    // the pipeline has committed already).
    consumer.unsubscribe();
    let mut deadline = Instant::now() + Duration::from_secs(10);
    if let Some(by) = *shared.leave_by.lock().unwrap_or_else(|p| p.into_inner()) {
        deadline = deadline.min(by);
    }
    while Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(100));
        if consumer
            .assignment()
            .map(|a| a.count() == 0)
            .unwrap_or(true)
        {
            break;
        }
    }
}

/// Refuses to start when a topic is missing or the schedule topic has fewer partitions
/// than the input (each input partition writes its windows to the same partition);
/// returns the schedule topic's partition count.
fn check_topics(
    consumer: &BaseConsumer<GroupContext>,
    cfg: &RunConfig,
    policy: &Policy,
) -> Result<usize, PipelineError> {
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(15))
        .map_err(|source| PipelineError::Kafka {
            what: "reading topic metadata",
            source,
        })?;
    let partitions = |name: &str| {
        md.topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len())
    };
    let mut missing = Vec::new();
    let mut needed: Vec<&str> = vec![
        &cfg.input_topic,
        &cfg.control_topic,
        &cfg.dead_letter_topic,
        &cfg.schedule_topic,
    ];
    for r in policy.declared() {
        if let Some(t) = cfg.routes[r.purpose as usize].as_deref() {
            needed.push(t);
        }
    }
    for t in &needed {
        if partitions(t).is_none() {
            missing.push(*t);
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing: {}", missing.join(", ")));
    }
    if let (Some(i), Some(s)) = (
        partitions(&cfg.input_topic),
        partitions(&cfg.schedule_topic),
    ) && s < i
    {
        problems.push(format!(
            "{} has {s} partitions, fewer than the {i} of {}",
            cfg.schedule_topic, cfg.input_topic
        ));
    }
    if problems.is_empty() {
        Ok(partitions(&cfg.schedule_topic).unwrap_or(0))
    } else {
        Err(PipelineError::Topics(problems.join("; ")))
    }
}
