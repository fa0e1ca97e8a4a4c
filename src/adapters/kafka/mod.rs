//! `cdrguard run`: the pure core against Kafka. Records come from the input topic's
//! partitions, copies go to the route topics with their tags as headers, refused records
//! to the dead-letter topic, opened retention windows to the schedule topic, all in one
//! transaction with the input offsets. The consent table follows the control topic.
//!
//! - [`config`]: the TOML file and environment overrides, validated in one pass.
//! - [`consent`]: the consent table and the thread that follows the control topic.
//! - [`pipeline`]: group membership, per-partition tasks, the commit coordinator.
//! - [`stats`]: the run's counters.
//! - [`sink`]: the producer and the two delivery guarantees.
//! - [`topics`]: the topics a configuration needs, and their creation.
//! - [`produce`]: feeds record and control files into a configuration's topics.

pub mod clock;
pub mod config;
pub mod consent;
pub mod keys;
pub mod pipeline;
pub mod produce;
pub mod retention;
pub mod sink;
pub mod stats;
pub mod topics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use tokio::sync::Notify;

use self::config::{Guarantee, RunConfig};
use self::consent::{ConsentStore, FollowError, FollowerConfig, spawn_follower};
use self::pipeline::{PipelineError, PipelineInputs, run_pipeline};
use self::stats::RunStats;
use crate::adapters::telemetry::status::{NotReady, ReadinessCheck};
use crate::adapters::telemetry::{self, Status, names};
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

/// librdkafka settings of a reader outside the group (the consent table's, the retention
/// timers'): assigned partitions, never committing; `role` names its group id, which
/// only shows in the broker's logs.
pub fn reader_config(cfg: &RunConfig, role: &str) -> ClientConfig {
    let mut c = common(cfg);
    // See `consumer_config`: readers that must catch up fast must not idle a second
    // after each full queue.
    c.set("fetch.queue.backoff.ms", "10");
    for (k, v) in &cfg.consumer_properties {
        c.set(k, v);
    }
    c.set("group.id", format!("{}.{role}", cfg.group_id));
    c
}

/// librdkafka settings of the group consumer. Offsets are only ever committed by
/// cdrguard (with the transaction, or after the flush), never automatically.
pub fn consumer_config(cfg: &RunConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("auto.offset.reset", "earliest")
        .set("queued.min.messages", "10000")
        // librdkafka waits this long before fetching again for a partition whose queue
        // was full (1 s by default): a partition drained in less would sit idle.
        .set("fetch.queue.backoff.ms", "10");
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
        // Only failures are acted on (see `SinkContext::delivery`): a report per
        // delivered copy would cost a callback, an allocation and a wake-up each.
        .set("delivery.report.only.error", "true")
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

/// What a caller can watch while `run` goes: the consent table, the counters, and what
/// the health endpoints and the lag gauge read.
#[derive(Clone)]
pub struct RunHandles {
    /// The consent table.
    pub store: Arc<ConsentStore>,
    /// Counters, kept across pipeline restarts.
    pub stats: Arc<RunStats>,
    /// Liveness, readiness and partition lag.
    pub status: Arc<Status>,
}

impl RunHandles {
    /// Fresh handles for a configuration.
    pub fn new(cfg: &RunConfig) -> RunHandles {
        RunHandles {
            store: Arc::new(ConsentStore::new(cfg.control_max_staleness)),
            stats: Arc::new(RunStats::default()),
            status: Arc::new(Status::default()),
        }
    }
}

/// Ready means records are being routed as the policy says: the consent table was read
/// to its end and is proven current now (so routing neither pauses nor fails closed),
/// a pipeline is up, and it owns input partitions.
fn readiness(store: Arc<ConsentStore>, stats: Arc<RunStats>) -> ReadinessCheck {
    Box::new(move || -> Result<(), NotReady> {
        if !store.caught_up() {
            return Err("consent table: still reading the control topic");
        }
        if !store.fresh(std::time::Instant::now()) {
            return Err("consent table not proven current: routing paused or fail closed");
        }
        if !stats.pipeline_up.load(Ordering::Acquire) {
            return Err("pipeline not running (starting, rebuilding or stopping)");
        }
        if stats.assigned.load(Ordering::Acquire) == 0 {
            return Err("no input partitions assigned");
        }
        Ok(())
    })
}

/// Every second: the runtime's heartbeat (liveness), and the gauges read from the
/// consent table and the counters.
fn spawn_sampler(
    status: Arc<Status>,
    store: Arc<ConsentStore>,
    stats: Arc<RunStats>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            status.beat();
            let flag = |b: bool| if b { 1.0 } else { 0.0 };
            metrics::gauge!(names::READY).set(flag(status.ready().is_ok()));
            metrics::gauge!(names::CONSENT_SUBSCRIBERS).set(store.len() as f64);
            metrics::gauge!(names::CONSENT_FRESH).set(flag(store.fresh(std::time::Instant::now())));
            metrics::gauge!(names::CONSENT_SUSPECTS).set(store.suspects() as f64);
            metrics::gauge!(names::ROUTING_PAUSED).set(flag(stats.paused.load(Ordering::Relaxed)));
            metrics::gauge!(names::CROWD_WITHHELD)
                .set(stats.withheld.load(Ordering::Relaxed) as f64);
            metrics::counter!(names::CONTROL_EVENTS, "outcome" => "applied")
                .absolute(store.applied.load(Ordering::Relaxed));
            metrics::counter!(names::CONTROL_EVENTS, "outcome" => "refused")
                .absolute(store.refused.load(Ordering::Relaxed));
        }
    })
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
    let RunHandles {
        store,
        stats,
        status,
    } = handles;
    let cfg = cfg.with_policy(&policy)?;
    store.heed(policy.clone());
    let routes: Vec<_> = policy.declared().map(|r| r.purpose).collect();
    telemetry::tally::register_zero(&routes, cfg.input_format);
    status.set_readiness(readiness(store.clone(), stats.clone()));
    let sampler = spawn_sampler(status.clone(), store.clone(), stats.clone());
    let keys = keys::KeyCell::new(keys);
    let watcher = keys::spawn_watcher(cfg.key_file.clone(), keys.clone())
        .map_err(|e| RunError::Internal(format!("watching for SIGHUP: {e}")))?;
    let result = run_with(cfg, policy, keys, stop, store, stats, status).await;
    watcher.abort();
    sampler.abort();
    result
}

/// [`run`] once its telemetry is set up.
async fn run_with(
    cfg: RunConfig,
    policy: Arc<Policy>,
    keys: Arc<keys::KeyCell>,
    stop: Arc<Notify>,
    store: Arc<ConsentStore>,
    stats: Arc<RunStats>,
    status: Arc<Status>,
) -> Result<(), RunError> {
    let follower_stop = Arc::new(AtomicBool::new(false));
    let Some(follower) = start_follower(&cfg, &store, &follower_stop, &stop).await? else {
        return Ok(());
    };
    let watch = Watch::start(stop, follower);
    let result = async {
        // Fail closed from the first record: none is routed before the table is whole and
        // proven current (a round trip after the initial read; routing before it would
        // pause, or with a short stale_pause_ms route fail closed, at every start).
        wait_until_fresh(&store, &watch).await;
        let inputs = PipelineInputs {
            consumer_config: consumer_config(&cfg),
            producer_config: producer_config(&cfg),
            clock: clock::Clock::new(cfg.clock),
            cfg: cfg.clone(),
            policy,
            keys,
            store: store.clone(),
            stats: stats.clone(),
            status,
        };
        let reporter = spawn_reporter(stats.clone(), store.clone());
        let out = rebuild_loop(&inputs, &watch).await;
        reporter.abort();
        out
    }
    .await;
    follower_stop.store(true, Ordering::Release);
    let handle = watch
        .follower
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(h) = handle {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    result
}

/// Starts the thread that follows the control topic. A broker that does not answer yet
/// (the instance started before its cluster) is waited for, with backoff; a control
/// topic that does not exist is the operator's to create, and stops the run. `None` when
/// a stop came first.
async fn start_follower(
    cfg: &RunConfig,
    store: &Arc<ConsentStore>,
    follower_stop: &Arc<AtomicBool>,
    stop: &Notify,
) -> Result<Option<std::thread::JoinHandle<()>>, RunError> {
    let client = reader_config(cfg, "control-reader");
    let mut backoff = Backoff::default();
    loop {
        let (follower_cfg, store, follower_stop) = (
            FollowerConfig {
                client: client.clone(),
                topic: cfg.control_topic.clone(),
            },
            store.clone(),
            follower_stop.clone(),
        );
        // Asking for the control topic's partitions blocks: not on a worker.
        match tokio::task::spawn_blocking(move || {
            spawn_follower(follower_cfg, store, follower_stop)
        })
        .await
        .map_err(|e| RunError::Internal(e.to_string()))?
        {
            Ok(h) => return Ok(Some(h)),
            Err(e @ FollowError::Missing(_)) => return Err(e.into()),
            Err(e) => {
                let wait = backoff.next();
                tracing::warn!(error = %e, backoff = ?wait, "cannot read the control topic yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.notified() => return Ok(None),
                }
            }
        }
    }
}

/// What ends a run from outside the pipeline: a stop (SIGTERM, SIGINT), or the control
/// follower's death (a panic: the table would never be proven current again, so routing
/// would stay paused, then fail closed, for good; the run stops instead, so that its
/// supervisor restarts it). Either wakes `ended`.
struct Watch {
    stopping: Arc<AtomicBool>,
    follower_died: Arc<AtomicBool>,
    follower: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    ended: Arc<Notify>,
}

impl Watch {
    fn start(stop: Arc<Notify>, follower: std::thread::JoinHandle<()>) -> Watch {
        let w = Watch {
            stopping: Arc::new(AtomicBool::new(false)),
            follower_died: Arc::new(AtomicBool::new(false)),
            follower: Arc::new(std::sync::Mutex::new(Some(follower))),
            ended: Arc::new(Notify::new()),
        };
        let (stopping, died, follower, ended) = (
            w.stopping.clone(),
            w.follower_died.clone(),
            w.follower.clone(),
            w.ended.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.notified() => {
                        stopping.store(true, Ordering::Release);
                        break;
                    }
                    _ = tick.tick() => {
                        let gone = follower
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .is_some_and(|h| h.is_finished());
                        if gone {
                            tracing::error!("the control-topic follower stopped; stopping the run");
                            died.store(true, Ordering::Release);
                            break;
                        }
                    }
                }
            }
            ended.notify_one();
        });
        w
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn follower_died(&self) -> bool {
        self.follower_died.load(Ordering::Acquire)
    }
}

/// Waits until the consent table is whole and proven current, woken by each proof, or
/// until the run ends; logs now and then while it reads.
async fn wait_until_fresh(store: &ConsentStore, watch: &Watch) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        if watch.stopping() || watch.follower_died() {
            return;
        }
        tokio::select! {
            _ = store.until_fresh() => return,
            _ = tick.tick() => tracing::info!(
                events = store.applied.load(Ordering::Relaxed),
                "reading the control topic before routing any record"
            ),
            // The watch's end wakes this once; the flags above tell why.
            _ = watch.ended.notified() => {
                watch.ended.notify_one();
                return;
            }
        }
    }
}

/// Logs the counters every 10 s.
fn spawn_reporter(stats: Arc<RunStats>, store: Arc<ConsentStore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            tracing::info!(
                stats = %stats.line(),
                control_events = store.applied.load(Ordering::Relaxed),
                control_delay_p99_ms = store.delays.quantile_upper_ms(0.99),
                commit_hold_max_ms = stats.commit_hold_max_ms.swap(0, Ordering::Relaxed),
                "progress"
            );
        }
    })
}

/// Runs pipelines until a stop, rebuilding after every failure a fresh consumer and
/// producer can overcome (a broker outage, a timed-out or fenced transaction).
async fn rebuild_loop(inputs: &PipelineInputs, watch: &Watch) -> Result<(), RunError> {
    let mut backoff = Backoff::default();
    let mut fencing = Fencing::default();
    loop {
        let started = std::time::Instant::now();
        if watch.follower_died() {
            return Err(RunError::Internal(
                "the control-topic follower stopped".into(),
            ));
        }
        if watch.stopping() {
            return Ok(());
        }
        let outcome = run_pipeline(inputs, &watch.ended).await;
        let e = match decide(outcome, watch.stopping(), watch.follower_died()) {
            Next::Done(r) => return r,
            Next::Rebuild(e) => e,
        };
        if e.fenced() && fencing.too_often(std::time::Instant::now()) {
            tracing::error!(
                transactional_id = %inputs.cfg.transactional_id,
                "fenced {MAX_FENCED} times within {FENCING_WINDOW:?}: another instance uses this transactional id"
            );
            return Err(e.into());
        }
        // A pipeline that ran healthy for a minute starts the backoff over.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Backoff::default();
        }
        let wait = backoff.next();
        metrics::counter!(names::PIPELINE_REBUILDS).increment(1);
        tracing::warn!(error = %e, backoff = ?wait, "rebuilding the pipeline");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = watch.ended.notified() => {}
        }
    }
}

/// What follows a pipeline that ended.
#[derive(Debug)]
enum Next {
    /// The run ends with this.
    Done(Result<(), RunError>),
    /// Build a new pipeline (after the backoff).
    Rebuild(PipelineError),
}

/// Decides what follows a pipeline's end.
fn decide(outcome: Result<(), PipelineError>, stopping: bool, follower_died: bool) -> Next {
    match outcome {
        Ok(()) if follower_died => Next::Done(Err(RunError::Internal(
            "the control-topic follower stopped".into(),
        ))),
        Ok(()) => Next::Done(Ok(())),
        // A stop whose last commit failed: its transaction was ended (or is left to the
        // broker's timeout), and records not committed are read again by whoever owns them
        // next. Nothing is lost, so the stop is still a clean one (logged by the pipeline).
        Err(PipelineError::FinalCommit(_)) => Next::Done(Ok(())),
        // A failure a rebuild would overcome, met while stopping: there is nothing left to
        // rebuild for.
        Err(e) if stopping && e.restartable() => {
            tracing::warn!(error = %e, "the pipeline failed while stopping");
            Next::Done(Ok(()))
        }
        Err(e) if e.restartable() => Next::Rebuild(e),
        Err(e) => Next::Done(Err(e.into())),
    }
}

/// A wait that doubles while failures repeat, from half a second to [`MAX_BACKOFF`].
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(500))
    }
}

impl Backoff {
    /// The wait before the next attempt.
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        now
    }
}

/// The times this instance's producer was fenced, within [`FENCING_WINDOW`].
#[derive(Debug, Default)]
struct Fencing(Vec<std::time::Instant>);

impl Fencing {
    /// Notes a fencing at `now`; true when it happened [`MAX_FENCED`] times within the
    /// window: another live instance shares the transactional id, and rebuilding would only
    /// fence it back.
    fn too_often(&mut self, now: std::time::Instant) -> bool {
        self.0
            .retain(|t| now.saturating_duration_since(*t) < FENCING_WINDOW);
        self.0.push(now);
        self.0.len() >= MAX_FENCED
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::*;
    use crate::adapters::kafka::sink::SinkError;

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(
            waits,
            [
                500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000
            ]
        );
    }

    #[test]
    fn three_fencings_within_the_window_mean_a_shared_transactional_id() {
        let t0 = std::time::Instant::now();
        let mut f = Fencing::default();
        assert!(!f.too_often(t0));
        assert!(!f.too_often(t0 + Duration::from_secs(10)));
        assert!(f.too_often(t0 + Duration::from_secs(20)));
        // Spread out beyond the window, fencings are outages, not a rival instance.
        let mut f = Fencing::default();
        for i in 0..10 {
            assert!(!f.too_often(t0 + FENCING_WINDOW * i), "fencing {i}");
        }
    }

    #[test]
    fn a_pipeline_is_rebuilt_only_for_failures_a_fresh_one_overcomes() {
        let timed_out = || {
            PipelineError::Sink(SinkError::Abortable(KafkaError::Global(
                RDKafkaErrorCode::OperationTimedOut,
            )))
        };
        assert!(matches!(decide(Ok(()), false, false), Next::Done(Ok(()))));
        assert!(matches!(decide(Ok(()), false, true), Next::Done(Err(_))));
        assert!(matches!(
            decide(Err(timed_out()), false, false),
            Next::Rebuild(_)
        ));
        assert!(
            matches!(decide(Err(timed_out()), true, false), Next::Done(Ok(()))),
            "nothing to rebuild for while stopping"
        );
        assert!(matches!(
            decide(
                Err(PipelineError::FinalCommit(Box::new(timed_out()))),
                true,
                false
            ),
            Next::Done(Ok(()))
        ));
        assert!(
            matches!(
                decide(
                    Err(PipelineError::Topics("missing: x".into())),
                    false,
                    false
                ),
                Next::Done(Err(_))
            ),
            "a missing topic is the operator's to create"
        );
    }
}
