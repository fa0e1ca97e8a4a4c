//! What the probes and the lag gauge read while a run goes: a heartbeat from the async
//! runtime (liveness), the run's readiness check, and the consumer lag of the input
//! partitions owned right now.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::names;

/// A heartbeat older than this means the runtime's threads no longer run its tasks.
pub const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(10);

/// Why the process is not ready, for the body of a 503.
pub type NotReady = &'static str;

/// The run's answer to "may traffic count on this instance now?".
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), NotReady> + Send + Sync>;

/// Shared by the run (which writes it) and the telemetry server (which reads it).
pub struct Status {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last heartbeat, plus one (0: none yet).
    heartbeat_ms: AtomicU64,
    readiness: OnceLock<ReadinessCheck>,
    /// Lag per owned input partition; revoked partitions are removed at once, so their
    /// series vanish with the ownership.
    lag: Mutex<BTreeMap<i32, i64>>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            epoch: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            readiness: OnceLock::new(),
            lag: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Status {
    /// Called by a task of the async runtime every second or so.
    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms + 1, Ordering::Release);
    }

    /// Whether the runtime beat recently: `Err` says for how long it has not.
    pub fn live(&self) -> Result<(), String> {
        match self.heartbeat_ms.load(Ordering::Acquire) {
            0 if self.epoch.elapsed() < HEARTBEAT_MAX_AGE => Ok(()),
            0 => Err("the runtime never beat".into()),
            ms => {
                let age = self
                    .epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1));
                if age <= HEARTBEAT_MAX_AGE {
                    Ok(())
                } else {
                    Err(format!("no heartbeat from the runtime for {age:?}"))
                }
            }
        }
    }

    /// Installs the run's readiness check (once; later calls are ignored).
    pub fn set_readiness(&self, check: ReadinessCheck) {
        let _ = self.readiness.set(check);
    }

    /// Whether the process may count as ready.
    pub fn ready(&self) -> Result<(), NotReady> {
        match self.readiness.get() {
            Some(check) => check(),
            None => Err("starting"),
        }
    }

    /// Replaces the lag of every owned partition.
    pub fn set_lag(&self, lag: BTreeMap<i32, i64>) {
        *self.lag.lock().unwrap_or_else(|p| p.into_inner()) = lag;
    }

    /// Drops the lag of partitions no longer owned.
    pub fn forget_lag(&self, partitions: &[i32]) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for p in partitions {
            lag.remove(p);
        }
    }

    /// The lag family in the Prometheus text format (empty when no partition is owned).
    /// Rendered here rather than through the recorder, which cannot drop a series: a
    /// revoked partition's lag must not linger as a stale value.
    pub fn render_lag(&self, out: &mut String) {
        let lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        if lag.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "# HELP {} Records of an owned input partition not yet committed, against its last stable offset.",
            names::CONSUMER_LAG
        );
        let _ = writeln!(out, "# TYPE {} gauge", names::CONSUMER_LAG);
        for (p, n) in lag.iter() {
            let _ = writeln!(out, "{}{{partition=\"{p}\"}} {n}", names::CONSUMER_LAG);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_series_are_those_of_owned_partitions_only() {
        let s = Status::default();
        let mut out = String::new();
        s.render_lag(&mut out);
        assert_eq!(out, "", "no family without partitions");
        s.set_lag(BTreeMap::from([(0, 5), (3, 0)]));
        s.forget_lag(&[0]);
        s.render_lag(&mut out);
        assert!(
            out.contains("cdrguard_consumer_lag_records{partition=\"3\"} 0\n"),
            "{out}"
        );
        assert!(!out.contains("partition=\"0\""), "{out}");
        assert!(out.contains("# TYPE cdrguard_consumer_lag_records gauge\n"));
    }

    #[test]
    fn not_ready_until_a_check_says_so_and_live_while_beating() {
        let s = Status::default();
        assert_eq!(s.ready(), Err("starting"));
        s.set_readiness(Box::new(|| Ok(())));
        assert_eq!(s.ready(), Ok(()));
        assert!(
            s.live().is_ok(),
            "a fresh process is live before its first beat"
        );
        s.beat();
        assert!(s.live().is_ok());
    }
}
