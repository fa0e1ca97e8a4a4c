//! `cdrguard run`: the pure core against Kafka. Records come from the input topic's
//! partitions, copies go to the route topics with their tags as headers, refused records
//! to the dead-letter topic, opened retention windows to the schedule topic, all in one
//! transaction with the input offsets. The consent table follows the control topic.
//!
//! - [`config`]: the TOML file and environment overrides, validated in one pass.
//! - [`consent`]: the consent table and the thread that follows the control topic.
//! - [`pipeline`]: group consumer, per-partition tasks, commits and rebalances.
//! - [`sink`]: the producer and the two delivery guarantees.
//! - [`topics`]: the topics a configuration needs, and their creation.
//! - [`produce`]: feeds record and control files into a configuration's topics.

pub mod config;
pub mod consent;
pub mod pipeline;
pub mod produce;
pub mod sink;
pub mod topics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use tokio::sync::Notify;

use self::config::{Guarantee, RunConfig};
use self::consent::{ConsentStore, FollowError, FollowerConfig, spawn_follower};
use self::pipeline::{PipelineError, PipelineInputs, RunStats, run_pipeline};
use crate::core::pseudonym::Keyring;
use crate::policy::Policy;

/// The longest wait before rebuilding a failed pipeline.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Fencing this often within [`FENCING_WINDOW`] means two live instances share a
/// transactional id; rebuilding would only fence the other one back.
const MAX_FENCED: usize = 3;
/// See [`MAX_FENCED`].
const FENCING_WINDOW: Duration = Duration::from_secs(300);

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The policy's route topics do not fit the configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The control topic could not be followed.
    #[error(transparent)]
    Control(#[from] FollowError),
    /// The pipeline failed and could not be rebuilt.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A task of our own failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// Lets a repeated warning through once per period, so a broker outage does not flood
/// the log; the lines held back are counted and reported with the next one let through.
#[derive(Default)]
pub(crate) struct Throttle {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    held: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// `Some(lines held back since the last one)` if this line may be logged now.
    pub(crate) fn ready(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

/// Routes a client's librdkafka log lines and global errors into `tracing`, throttled.
/// Broker outages make librdkafka report the same connection failure many times a second;
/// the first is enough, with a count of the rest.
pub(crate) fn client_log(
    throttle: &Throttle,
    client: &'static str,
    level: rdkafka::config::RDKafkaLogLevel,
    fac: &str,
    message: &str,
) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
            if let Some(held) = throttle.ready() {
                tracing::warn!(
                    client,
                    facility = fac,
                    held_back = held,
                    "librdkafka: {message}"
                );
            }
        }
        _ => tracing::debug!(client, facility = fac, "librdkafka: {message}"),
    }
}

/// The same for global errors.
pub(crate) fn client_error(
    throttle: &Throttle,
    client: &'static str,
    e: &rdkafka::error::KafkaError,
    reason: &str,
) {
    if let Some(held) = throttle.ready() {
        tracing::warn!(client, error = %e, held_back = held, "{reason}");
    }
}

/// librdkafka settings every client shares: brokers, TLS, SASL.
pub fn common(cfg: &RunConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// librdkafka settings of the group consumer. Offsets are only ever committed by
/// cdrguard (with the transaction, or after the flush), never automatically.
pub fn consumer_config(cfg: &RunConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("auto.offset.reset", "earliest")
        .set("queued.min.messages", "10000");
    for (k, v) in cfg.properties.iter().chain(&cfg.consumer_properties) {
        c.set(k, v);
    }
    // Bounded prefetch per partition, so lag does not become memory; its own setting
    // (processing.queued_max_kbytes) wins over a property.
    c.set(
        "queued.max.messages.kbytes",
        cfg.queued_max_kbytes.to_string(),
    );
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Input written by transactional producers: never route aborted records.
        .set("isolation.level", "read_committed");
    c
}

/// librdkafka settings of the producer.
pub fn producer_config(cfg: &RunConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        // Java clients' partitioner, so keyed copies land where Java consumers expect.
        .set("partitioner", "murmur2_random")
        // A crashed instance's open transaction blocks read_committed readers until it
        // times out: keep that short.
        .set(
            "transaction.timeout.ms",
            config::DEFAULT_TXN_TIMEOUT_MS.to_string(),
        )
        // A commit flushes everything queued: a smaller queue keeps commits short.
        .set("queue.buffering.max.kbytes", "16384")
        // No reordering or duplicates on retries; at least once may turn it off.
        .set("enable.idempotence", "true");
    for (k, v) in cfg.properties.iter().chain(&cfg.producer_properties) {
        c.set(k, v);
    }
    if cfg.guarantee == Guarantee::ExactlyOnce {
        c.set("enable.idempotence", "true")
            .set("transactional.id", &cfg.transactional_id);
    }
    c
}

/// What a caller can watch while `run` goes: the consent table and the counters.
#[derive(Clone)]
pub struct RunHandles {
    /// The consent table.
    pub store: Arc<ConsentStore>,
    /// Counters, kept across pipeline restarts.
    pub stats: Arc<RunStats>,
}

impl RunHandles {
    /// Fresh handles for a configuration.
    pub fn new(cfg: &RunConfig) -> RunHandles {
        RunHandles {
            store: Arc::new(ConsentStore::new(cfg.control_max_staleness)),
            stats: Arc::new(RunStats::default()),
        }
    }
}

/// Runs until `stop` is notified: follows the control topic, waits until the consent
/// table has caught up, then routes records, rebuilding the pipeline after a failure
/// that a fresh consumer and producer can overcome.
pub async fn run(
    cfg: RunConfig,
    policy: Arc<Policy>,
    keys: Arc<Keyring>,
    stop: Arc<Notify>,
    handles: RunHandles,
) -> Result<(), RunError> {
    let RunHandles { store, stats } = handles;
    let cfg = cfg.with_policy(&policy)?;
    store.heed(policy.clone());
    let follower_stop = Arc::new(AtomicBool::new(false));
    let follower_cfg = FollowerConfig {
        client: {
            let mut c = common(&cfg);
            for (k, v) in &cfg.consumer_properties {
                c.set(k, v);
            }
            c.set("group.id", format!("{}.control-reader", cfg.group_id));
            c
        },
        topic: cfg.control_topic.clone(),
    };
    let stopping = Arc::new(AtomicBool::new(false));
    // A broker that does not answer yet (the instance started before its cluster) is
    // waited for, with backoff; a control topic that does not exist is the operator's to
    // create, and stops the run.
    let follower = {
        let mut backoff = Duration::from_millis(500);
        loop {
            let (cfg, store, follower_stop) = (
                FollowerConfig {
                    client: follower_cfg.client.clone(),
                    topic: follower_cfg.topic.clone(),
                },
                store.clone(),
                follower_stop.clone(),
            );
            // Asking for the control topic's partitions blocks: not on a worker.
            match tokio::task::spawn_blocking(move || spawn_follower(cfg, store, follower_stop))
                .await
                .map_err(|e| RunError::Internal(e.to_string()))?
            {
                Ok(h) => break h,
                Err(e @ FollowError::Missing(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "cannot read the control topic yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.notified() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    };
    let follower = Arc::new(std::sync::Mutex::new(Some(follower)));
    // Set when the follower thread ended on its own (a panic): the table would never be
    // confirmed again, so routing would stay paused, then fail closed, for good. The run
    // stops instead, so that its supervisor restarts it.
    let follower_died = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let stopping = stopping.clone();
        let inner = Arc::new(Notify::new());
        let inner2 = inner.clone();
        let (follower, died) = (follower.clone(), follower_died.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.notified() => {
                        stopping.store(true, Ordering::Release);
                        break;
                    }
                    _ = tick.tick() => {
                        let ended = follower
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .is_some_and(|h| h.is_finished());
                        if ended {
                            tracing::error!("the control-topic follower stopped; stopping the run");
                            died.store(true, Ordering::Release);
                            break;
                        }
                    }
                }
            }
            inner2.notify_one();
        });
        inner
    };

    let result = async {
        // Fail closed from the first record: none is routed before the table is whole and
        // proven current (a round trip after the initial read; routing before it would
        // pause, or with a short stale_pause_ms route fail closed, at every start).
        let mut waited = 0u64;
        while !store.fresh(std::time::Instant::now()) {
            if stopping.load(Ordering::Acquire) || follower_died.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 20;
            if waited.is_multiple_of(5000) {
                tracing::info!(
                    events = store.applied.load(Ordering::Relaxed),
                    "reading the control topic before routing any record"
                );
            }
        }
        let inputs = PipelineInputs {
            consumer_config: consumer_config(&cfg),
            producer_config: producer_config(&cfg),
            cfg: cfg.clone(),
            policy,
            keys,
            store: store.clone(),
            stats: stats.clone(),
        };
        let reporter = {
            let stats = stats.clone();
            let store = store.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    tracing::info!(
                        stats = %stats.line(),
                        control_events = store.applied.load(Ordering::Relaxed),
                        control_delay_p99_ms = store.delays.quantile_upper_ms(0.99),
                        "progress"
                    );
                }
            })
        };
        // A pipeline is rebuilt after every failure a fresh consumer and producer can
        // overcome (a broker outage, a timed-out or fenced transaction), with a backoff
        // that grows while failures repeat and resets after a healthy minute.
        let mut backoff = Duration::from_millis(500);
        let mut fenced: Vec<std::time::Instant> = Vec::new();
        let out = loop {
            let started = std::time::Instant::now();
            if follower_died.load(Ordering::Acquire) {
                break Err(RunError::Internal("the control-topic follower stopped".into()));
            }
            if stopping.load(Ordering::Acquire) {
                break Ok(());
            }
            match run_pipeline(&inputs, &watcher).await {
                Ok(()) if follower_died.load(Ordering::Acquire) => {
                    break Err(RunError::Internal("the control-topic follower stopped".into()));
                }
                Ok(()) => break Ok(()),
                // A stop whose last commit failed: its transaction was ended (or is left
                // to the broker's timeout), and records not committed are read again by
                // whoever owns them next. Nothing is lost, so the stop is still a clean one
                // (logged by the pipeline).
                Err(PipelineError::FinalCommit(_)) => break Ok(()),
                // A failure a rebuild would overcome, met while stopping: there is nothing
                // left to rebuild for.
                Err(e) if stopping.load(Ordering::Acquire) && e.restartable() => {
                    tracing::warn!(error = %e, "the pipeline failed while stopping");
                    break Ok(());
                }
                Err(e) if e.restartable() => {
                    if e.fenced() {
                        fenced.retain(|t| t.elapsed() < FENCING_WINDOW);
                        fenced.push(std::time::Instant::now());
                        if fenced.len() >= MAX_FENCED {
                            tracing::error!(
                                transactional_id = %cfg.transactional_id,
                                "fenced {MAX_FENCED} times within {FENCING_WINDOW:?}: another instance uses this transactional id"
                            );
                            break Err(e.into());
                        }
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(500);
                    }
                    tracing::warn!(error = %e, ?backoff, "rebuilding the pipeline");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = watcher.notified() => continue,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => break Err(e.into()),
            }
        };
        reporter.abort();
        out
    }
    .await;
    follower_stop.store(true, Ordering::Release);
    let handle = follower.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(h) = handle {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    result
}
