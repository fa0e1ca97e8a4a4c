//! Telemetry of `cdrguard run`: Prometheus metrics, the health endpoints and the log
//! output. An adapter like the others: the pure core never counts or logs; the Kafka
//! runtime counts what it committed and hands it here.
//!
//! - [`names`]: every metric's name, labels and buckets.
//! - [`tally`]: counts kept per partition until their transaction commits, and the typed
//!   events that export them.
//! - [`status`]: liveness heartbeat, readiness check, partition lag.
//! - [`http`]: the listener serving `/metrics`, `/healthz` and `/readyz`.

mod http;
pub mod names;
pub mod status;
pub mod tally;

use std::net::SocketAddr;
use std::sync::Arc;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

pub use self::status::Status;
pub use self::tally::{Aborted, CommitPhases, Committed, Tally};

/// The address `telemetry.listen` takes by default.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9464";

/// How `run` writes its logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields as keys.
    Json,
}

/// The `[telemetry]` table of a run configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// Log output format.
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            log_format: LogFormat::Text,
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The listen address cannot be bound (in use, not local, not permitted).
    #[error("telemetry.listen {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The listener's thread or runtime could not be made.
    #[error("telemetry: cannot start the listener thread: {0}")]
    Runtime(std::io::Error),
    /// A metrics recorder was installed already (telemetry started twice in a process).
    #[error("telemetry: a metrics recorder is installed already")]
    Installed,
}

/// Installs the Prometheus recorder as the process's metrics recorder and serves it with
/// the health endpoints on `listen`. Returns the bound address (port 0 picks one), which
/// is also logged as `telemetry listening addr=...`.
pub fn start(listen: SocketAddr, status: Arc<Status>) -> Result<SocketAddr, TelemetryError> {
    let recorder = recorder();
    let handle = recorder.handle();
    let addr = http::spawn(listen, http::Endpoints { handle, status })?;
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::Installed)?;
    describe();
    tracing::info!(%addr, "telemetry listening");
    Ok(addr)
}

/// A Prometheus recorder with the buckets of [`names::HISTOGRAMS`] (not installed).
pub fn recorder() -> PrometheusRecorder {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in names::HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
            .expect("bucket lists are not empty");
    }
    builder.build_recorder()
}

/// The help text of every metric, shown on `/metrics`.
fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h};
    use names as n;
    c!(n::RECORDS, "Input records committed, by kind and format.");
    c!(
        n::RECORDS_ABORTED,
        "Records processed in aborted transactions (processed again)."
    );
    c!(
        n::RECORDS_FAIL_CLOSED,
        "Records committed that were routed fail closed."
    );
    c!(n::COPIES, "Copies committed, by route.");
    c!(
        n::DEAD_LETTERS,
        "Records committed to the dead-letter topic, by reason class."
    );
    c!(
        n::PSEUDONYMISED,
        "Fields pseudonymised in committed copies, by route."
    );
    c!(
        n::TOKENISED,
        "Fields tokenised in committed copies, by route."
    );
    h!(
        n::RECORD_PROCESSING,
        metrics::Unit::Seconds,
        "Processing time per record."
    );
    h!(
        n::RECORD_COMMIT_LATENCY,
        metrics::Unit::Seconds,
        "From a record's batch to its commit."
    );
    c!(
        n::TRANSACTIONS,
        "Transactions (or offset commits), by outcome."
    );
    h!(
        n::COMMIT_DURATION,
        metrics::Unit::Seconds,
        "How long a commit held the partitions."
    );
    h!(
        n::COMMIT_PHASE,
        metrics::Unit::Seconds,
        "How long each step of a commit took, by phase."
    );
    h!(
        n::SEND_GATE_WAIT,
        metrics::Unit::Seconds,
        "How long a send waited for the sealed lane's acknowledgements."
    );
    c!(
        n::PARTITION_WAKEUPS_MISSED,
        "Partition tasks woken by the backstop timer with records waiting."
    );
    c!(n::PIPELINE_REBUILDS, "Pipelines rebuilt after a failure.");
    c!(n::REBALANCES, "Rebalance events, by event.");
    g!(n::ASSIGNED_PARTITIONS, "Input partitions owned.");
    g!(n::CONSENT_SUBSCRIBERS, "Subscribers in the consent table.");
    g!(
        n::CONSENT_FRESH,
        "1 while the consent table is proven current."
    );
    g!(
        n::CONSENT_SUSPECTS,
        "Subscribers routed fail closed for an unreadable control event."
    );
    c!(
        n::CONTROL_EVENTS,
        "Control events taken from the control topic, by outcome."
    );
    c!(
        n::CONTROL_UNDECLARED,
        "Control events for a purpose the policy does not declare."
    );
    h!(
        n::CONTROL_APPLY_DELAY,
        metrics::Unit::Seconds,
        "From a control event's timestamp to its effect."
    );
    g!(
        n::ROUTING_PAUSED,
        "1 while routing waits for a stale consent table."
    );
    g!(n::READY, "1 while /readyz answers 200.");
    g!(
        n::RETENTION_WINDOWS,
        "Retention windows open in the owned partitions."
    );
    c!(
        n::RETENTION_EXPIRIES,
        "Retention-expiry events committed, by route and reason."
    );
    g!(
        n::RETENTION_OVERDUE,
        metrics::Unit::Seconds,
        "Age of the most overdue window past its deadline."
    );
    h!(
        n::RETENTION_LATENESS,
        metrics::Unit::Seconds,
        "From a window's deadline to its expiry committed."
    );
    h!(
        n::RETENTION_REBUILD,
        metrics::Unit::Seconds,
        "Reading a partition's timers back."
    );
    g!(
        n::RETENTION_REBUILDING,
        "Owned partitions whose timers are being read back."
    );
    c!(
        n::SCHEDULE_UNREADABLE,
        "Schedule-topic messages that could not be read back."
    );
    c!(n::SCHEDULE_WRITES, "Schedule-topic messages committed.");
    g!(
        n::CROWD_WITHHELD,
        "Anonymised copies withheld: their crowd stayed too small."
    );
    g!(
        n::BUILD_INFO,
        "Always 1; the version label names the build."
    );
}

/// Installs `run`'s log output on stderr: `RUST_LOG` (default `info`), in `format`, with
/// terminal colours only when `ansi`. Fields are structured in both formats; no field or
/// message carries a raw identifier (see the leak-scan test).
pub fn init_logs(format: LogFormat, ansi: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
