//! Group membership: the consumer's rebalance callbacks (partitions registered on
//! assignment, committed before they are given away on revocation), the thread that
//! polls the group so those callbacks fire, and the topics a run checks before it joins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use tokio::sync::Notify;

use super::commit::{AfterFailure, Plan, after_failure, plan};
use super::slot::{Slot, SlotState};
use super::{PipelineError, Shared};
use crate::adapters::kafka::config::RunConfig;
use crate::adapters::kafka::retention::timers::Timers;
use crate::adapters::telemetry::names;
use crate::policy::Policy;

/// The group consumer's context: rebalance callbacks reach the shared state through it.
pub struct GroupContext {
    pub(super) shared: OnceLock<Weak<Shared>>,
    pub(super) throttle: crate::adapters::kafka::Throttle,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::adapters::kafka::client_log(&self.throttle, "group", level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        crate::adapters::kafka::client_error(&self.throttle, "group", &error, reason);
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
            let event = if lost { "lost" } else { "revoked" };
            metrics::counter!(names::REBALANCES, "event" => event).increment(1);
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
                metrics::counter!(names::REBALANCES, "event" => "assigned").increment(1);
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

impl Shared {
    /// Registers newly assigned partitions and starts their tasks.
    pub(super) async fn assign(self: &Arc<Self>, parts: &[i32]) {
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
                state: tokio::sync::Mutex::new(SlotState::new(Timers::start(
                    &self.timer_source,
                    p,
                    self.policy.clone(),
                    self.clock.now(),
                    self.store.positions(),
                ))),
                wake: Notify::new(),
                stop: AtomicBool::new(false),
                pending: std::sync::atomic::AtomicU64::new(0),
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
        self.note_assignment();
    }

    /// Fails the pipeline (for good: an operator must add partitions) when input
    /// partition `top` has no schedule partition of the same number, as happens when the
    /// input topic grew after start. Runs on the group thread, which may block.
    pub(super) fn check_schedule_partitions(&self, top: i32) {
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

    /// Commits (or, when the assignment was lost, aborts) before partitions go.
    pub(super) async fn revoke(self: &Arc<Self>, parts: &[i32], lost: bool) {
        let _g = self.commit_lock.lock().await;
        let slots = self.snapshot();
        let mut guards = Vec::with_capacity(slots.len());
        for s in &slots {
            guards.push(s.state.lock().await);
        }
        // A failed pipeline commits nothing more: the next one's producer (same
        // transactional id) aborts the open transaction when it starts.
        if !self.has_failed() {
            let held_since = std::time::Instant::now();
            self.advance_timers(&slots, &mut guards);
            let send_failed = self.poisoned.swap(false, Ordering::AcqRel);
            let now = self.clock.now();
            let has_work = guards.iter().any(|g| g.has_work(now));
            let outcome = match plan(lost, send_failed, has_work) {
                Plan::Nothing => Ok(()),
                Plan::Commit => self.commit_locked(&slots, &mut guards, held_since).await,
                Plan::Abort(e) => Err(e),
            };
            if let Err(e) = outcome {
                match after_failure(e) {
                    AfterFailure::Ignore => {}
                    AfterFailure::Rebuild(e) => self.fail(e),
                    AfterFailure::AbortAndRewind(e) => {
                        if let Err(fatal) = self.abort_locked(&slots, &mut guards, &e).await {
                            self.fail(fatal.into());
                        }
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
        self.status.forget_lag(parts);
        self.note_assignment();
        for s in gone {
            s.join().await;
        }
    }
}

/// Polls the group until asked to stop, then leaves the group.
fn group_thread(
    shared: &Arc<Shared>,
    consumer: &Arc<BaseConsumer<GroupContext>>,
    stop: &AtomicBool,
) {
    let throttle = crate::adapters::kafka::Throttle::default();
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

/// The thread that polls the group's main queue so rebalance callbacks fire; it may block
/// in them (commits), which is why it is not an async task.
pub(super) struct GroupThread {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl GroupThread {
    /// Starts the thread.
    pub(super) fn start(
        shared: &Arc<Shared>,
        consumer: &Arc<BaseConsumer<GroupContext>>,
    ) -> Result<GroupThread, PipelineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, consumer, stop2) = (shared.clone(), consumer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("cdrguard-group".into())
            .spawn(move || group_thread(&shared, &consumer, &stop2))
            .map(|handle| GroupThread { stop, handle })
            .map_err(|e| PipelineError::Internal(format!("cannot start the group thread: {e}")))
    }

    /// Leaves the group (the thread unsubscribes and waits for the revocation) and joins
    /// the thread.
    pub(super) async fn leave(self) {
        self.stop.store(true, Ordering::Release);
        let h = self.handle;
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
}

/// Refuses to start when a topic is missing or the schedule topic has fewer partitions
/// than the input (each input partition writes its windows to the same partition);
/// returns the schedule topic's partition count.
pub(super) fn check_topics(
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
        &cfg.retention_topic,
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
