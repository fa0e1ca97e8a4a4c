//! One run of the Kafka pipeline: the group consumer, one task per assigned partition
//! around the pure core, and the coordinator that commits copies, schedule entries and
//! input offsets together.
//!
//! - [`group`]: group membership: the rebalance callbacks, the thread that serves them,
//!   and the topics a run needs.
//! - [`partition`]: a partition's task: records from its queue through the core to the
//!   producer.
//! - [`slot`]: a partition's state between commits, which all of them lock.
//! - [`commit`]: the transaction and commit coordinator: what a commit holds, and what
//!   follows a failed one (abort and rewind, or a rebuild).
//! - [`lag`]: the owned partitions' consumer lag, against their last stable offsets.
//! - this file: what they share, and a run's start-up and shutdown.
//!
//! Each partition's state sits behind its own async mutex, held while a batch of its
//! records is processed. A commit takes every partition's mutex (in partition order), so
//! nothing is produced between "these offsets" and "commit": the transaction holds
//! exactly the copies of the records up to the offsets it commits. Rebalance callbacks
//! run on the group thread and take the same locks, so revoked partitions are committed
//! before they are given away.

mod commit;
mod group;
mod lag;
mod partition;
mod retention;
mod slot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tokio::sync::Notify;

use self::group::{GroupContext, GroupThread, check_topics};
use self::slot::Slot;
use super::config::{Guarantee, RunConfig};
use super::consent::ConsentStore;
use super::sink::{Sink, SinkError};
use super::stats::RunStats;
use crate::adapters::kafka::clock::Clock;
use crate::adapters::kafka::keys::KeyCell;
use crate::adapters::kafka::reader_config;
use crate::adapters::kafka::retention::control::ControlFeed;
use crate::adapters::kafka::retention::timers::Source;
use crate::adapters::telemetry::{Status, names};
use crate::codec::Envelopes;
use crate::policy::Policy;

pub use self::partition::{MAX_DEAD_LETTER_KEY_BYTES, MAX_RECORD_BYTES};

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

/// Everything the tasks, the coordinator and the rebalance callbacks share.
pub struct Shared {
    cfg: RunConfig,
    policy: Arc<Policy>,
    /// The policy's envelopes, encoded once.
    envelopes: Envelopes,
    /// The run's clock.
    clock: Clock,
    /// Where partitions' retention timers are read back from.
    timer_source: Source,
    /// The control events the retention timers act on.
    control_feed: ControlFeed,
    keys: Arc<KeyCell>,
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
    /// Partition lag for `/metrics`.
    status: Arc<Status>,
    /// A burst of expiries being fired, for its log line.
    burst: Mutex<Option<retention::Burst>>,
    /// Expiries the next commit may fire: adapted so a commit that fires holds the
    /// partitions about `commit_interval` at most (see `retention::next_fire_budget`).
    fire_budget: AtomicUsize,
    /// How long commits that fire nothing hold the partitions (moving average).
    usual_hold: Mutex<Duration>,
    rt: tokio::runtime::Handle,
}

impl Shared {
    /// The group consumer (set once, before subscribing).
    fn consumer(&self) -> &Arc<BaseConsumer<GroupContext>> {
        self.consumer
            .get()
            .expect("consumer set before subscribing")
    }

    /// Ends the pipeline with `e` (the first failure wins): nothing more is sent.
    fn fail(&self, e: PipelineError) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::warn!(error = %e, "pipeline failed");
            *f = Some(e);
        }
        self.sink.abandon();
        self.fail_notify.notify_one();
    }

    /// The partitions owned now, in partition order (the order their locks are taken).
    fn snapshot(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Publishes how many partitions are owned now (after an assignment or revocation).
    fn note_assignment(&self) {
        let n = self.slots.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.stats.assigned.store(n, Ordering::Release);
        metrics::gauge!(names::ASSIGNED_PARTITIONS).set(n as f64);
    }

    /// Whether the pipeline failed (or its producer was abandoned).
    fn has_failed(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            || self.sink.abandoned()
    }
}

/// The shared inputs of a pipeline run.
pub struct PipelineInputs {
    /// Configuration.
    pub cfg: RunConfig,
    /// The policy.
    pub policy: Arc<Policy>,
    /// Pseudonym keys: those in use, and those read since, switched to at a commit.
    pub keys: Arc<KeyCell>,
    /// The consent table (caught up before the run starts).
    pub store: Arc<ConsentStore>,
    /// Counters, kept across pipeline restarts.
    pub stats: Arc<RunStats>,
    /// librdkafka properties for the group consumer.
    pub consumer_config: ClientConfig,
    /// librdkafka properties for the producer.
    pub producer_config: ClientConfig,
    /// The run's clock, kept across pipeline rebuilds.
    pub clock: Clock,
    /// What the health endpoints and the lag gauge read.
    pub status: Arc<Status>,
}

/// Runs one pipeline until `stop` is notified (graceful: the open transaction is
/// committed, the group left) or it fails.
pub async fn run_pipeline(inputs: &PipelineInputs, stop: &Notify) -> Result<(), PipelineError> {
    let shared = start_shared(inputs).await?;
    let consumer = match start_consumer(inputs, &shared).await {
        Ok(c) => c,
        Err(e) => {
            close(shared).await;
            return Err(e);
        }
    };
    let group = match GroupThread::start(&shared, &consumer) {
        Ok(g) => g,
        Err(e) => {
            drop(consumer);
            close(shared).await;
            return Err(e);
        }
    };
    let shutdown = Arc::new(Notify::new());
    let coordinator = commit::spawn_coordinator(shared.clone(), shutdown.clone());
    let lag = lag::spawn_sampler(shared.clone());
    shared.stats.pipeline_up.store(true, Ordering::Release);

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
        shared.budget_stop(stopped_at, inputs.cfg.shutdown_timeout);
    }
    // Partition tasks stop at their next batch once `closing` is set, and the coordinator
    // makes its last commit, which holds everything they processed.
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
            if stop_requested && inputs.cfg.guarantee == Guarantee::ExactlyOnce && !e.fenced() {
                end_open_transaction(inputs, stopped_at, &e).await;
            }
            if stop_requested && !failed_before_stop {
                Err(PipelineError::FinalCommit(Box::new(e)))
            } else {
                Err(e)
            }
        }
    };
    shared.stats.pipeline_up.store(false, Ordering::Release);
    lag.abort();
    stop_partition_tasks(&shared).await;
    tracing::debug!("partition tasks stopped; leaving the group");
    drop(consumer);
    group.leave().await;
    // Whatever the revocations left: this pipeline owns nothing any more.
    shared.stats.assigned.store(0, Ordering::Release);
    metrics::gauge!(names::ASSIGNED_PARTITIONS).set(0.0);
    shared.status.set_lag(BTreeMap::new());
    tracing::info!(stats = %shared.stats.line(), "pipeline stopped");
    close(shared).await;
    result
}

/// The producer and the state every part of the pipeline shares.
async fn start_shared(inputs: &PipelineInputs) -> Result<Arc<Shared>, PipelineError> {
    let cfg = &inputs.cfg;
    let producer_config = inputs.producer_config.clone();
    let guarantee = cfg.guarantee;
    let sink = tokio::task::spawn_blocking(move || Sink::create(&producer_config, guarantee))
        .await
        .map_err(|e| PipelineError::Internal(format!("producer start-up: {e}")))??;
    Ok(Arc::new(Shared {
        cfg: cfg.clone(),
        policy: inputs.policy.clone(),
        envelopes: Envelopes::new(&inputs.policy),
        clock: inputs.clock.clone(),
        timer_source: Source {
            client: reader_config(cfg, "retention-reader"),
            topic: cfg.schedule_topic.clone(),
        },
        control_feed: ControlFeed::start(
            reader_config(cfg, "retention-reader"),
            cfg.control_topic.clone(),
            inputs.store.clone(),
        ),
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
        status: inputs.status.clone(),
        burst: Mutex::new(None),
        fire_budget: AtomicUsize::new(cfg.fire_batch),
        usual_hold: Mutex::new(cfg.commit_interval),
        rt: tokio::runtime::Handle::current(),
    }))
}

/// The group consumer: made, the topics checked, subscribed. Creating it, asking for
/// metadata and subscribing block, so this runs off the async workers.
async fn start_consumer(
    inputs: &PipelineInputs,
    shared: &Arc<Shared>,
) -> Result<Arc<BaseConsumer<GroupContext>>, PipelineError> {
    let ctx = GroupContext {
        shared: OnceLock::new(),
        throttle: crate::adapters::kafka::Throttle::default(),
    };
    let _ = ctx.shared.set(Arc::downgrade(shared));
    let config = inputs.consumer_config.clone();
    let cfg = inputs.cfg.clone();
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
}

/// A stop whose last commit failed, for good: no next producer may come soon, and until
/// the broker times the transaction out, read_committed readers of every route wait
/// behind it. A new producer under the same transactional id ends it now: it aborts it,
/// or completes it if its commit had already reached the coordinator (records and
/// offsets together either way).
async fn end_open_transaction(inputs: &PipelineInputs, stopped_at: Instant, e: &PipelineError) {
    let producer_config = inputs.producer_config.clone();
    let until = stopped_at + inputs.cfg.shutdown_timeout * 7 / 10;
    let ended = tokio::task::spawn_blocking(move || {
        Sink::create_until(&producer_config, Guarantee::ExactlyOnce, Some(until)).map(drop)
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

/// Stops every partition task and waits until each has.
async fn stop_partition_tasks(shared: &Shared) {
    let slots = shared.snapshot();
    for s in &slots {
        s.request_stop();
    }
    for s in &slots {
        s.join().await;
    }
}

/// Drops the shared state off the async workers: closing the consumer and the producer
/// blocks (leaving the group, purging, joining threads).
async fn close(shared: Arc<Shared>) {
    let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
}

impl Shared {
    /// Shares a stop's time out: the last commit with its retries gets the first 40%,
    /// ending what it could not finish runs until 70% (see `end_open_transaction`),
    /// leaving the group until 90%, and the rest is for closing the clients.
    fn budget_stop(&self, stopped_at: Instant, timeout: Duration) {
        self.sink.finish_by(stopped_at + timeout * 2 / 5);
        *self.leave_by.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(stopped_at + timeout * 9 / 10);
    }
}
