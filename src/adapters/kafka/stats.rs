//! The counters of a run, readable while it goes and kept across pipeline rebuilds. They
//! count what was committed (the exported metrics add the same tallies at the same
//! moment), and work thrown away by an abort apart.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::adapters::telemetry::Tally;
use crate::vocab::purpose::Purpose;

/// Counters of a run, readable while it goes.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Records routed (valid ones), committed.
    pub records: AtomicU64,
    /// Records processed in aborted transactions (read and processed again).
    pub aborted: AtomicU64,
    /// Input partitions owned now.
    pub assigned: AtomicUsize,
    /// Whether a pipeline is up (between its start and its end).
    pub pipeline_up: AtomicBool,
    /// Records sent to the dead-letter topic.
    pub dead_letters: AtomicU64,
    /// Records routed while the consent table was stale (fail closed).
    pub fail_closed: AtomicU64,
    /// Whether routing is paused, waiting for the consent table.
    pub paused: AtomicBool,
    /// Copies per route.
    pub copies: [AtomicU64; Purpose::COUNT],
    /// Schedule-topic messages committed.
    pub windows: AtomicU64,
    /// Transactions (or at-least-once batches) committed.
    pub commits: AtomicU64,
    /// Transactions aborted (input rewound).
    pub aborts: AtomicU64,
    /// Retention-expiry events committed, per route.
    pub expiries: [AtomicU64; Purpose::COUNT],
    /// Schedule-topic messages that could not be read back.
    pub schedule_unreadable: AtomicU64,
    /// Anonymised copies withheld so far (their month's crowd stayed under the threshold),
    /// as the last partition to release counted them.
    pub withheld: AtomicU64,
    /// From each window's deadline to its expiry committed, in real time.
    pub expiry_lateness: DelayHistogram,
    /// The longest a commit held every partition (records wait meanwhile), in ms, since
    /// the progress line last reported it.
    pub commit_hold_max_ms: AtomicU64,
}

impl RunStats {
    /// Adds what a commit held.
    pub fn add_committed(&self, t: &Tally) {
        self.records.fetch_add(t.routed(), Ordering::Relaxed);
        self.dead_letters
            .fetch_add(t.dead_lettered(), Ordering::Relaxed);
        self.fail_closed.fetch_add(t.fail_closed, Ordering::Relaxed);
        for p in Purpose::ALL {
            let i = p as usize;
            self.copies[i].fetch_add(t.copies[i], Ordering::Relaxed);
            self.expiries[i].fetch_add(t.expiries[i].iter().sum(), Ordering::Relaxed);
        }
        self.windows.fetch_add(t.schedule_writes, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

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
            "records={} dead_letters={} fail_closed={} copies[{}] windows={} expiries={} expiry_lateness_p99_ms={} commits={} aborts={} aborted_records={}",
            self.records.load(Ordering::Relaxed),
            self.dead_letters.load(Ordering::Relaxed),
            self.fail_closed.load(Ordering::Relaxed),
            c.join(" "),
            self.windows.load(Ordering::Relaxed),
            self.expiries
                .iter()
                .map(|e| e.load(Ordering::Relaxed))
                .sum::<u64>(),
            self.expiry_lateness
                .quantile_upper_ms(0.99)
                .map_or_else(|| "-".to_string(), |v| v.to_string()),
            self.commits.load(Ordering::Relaxed),
            self.aborts.load(Ordering::Relaxed),
            self.aborted.load(Ordering::Relaxed),
        )
    }
}

/// Upper bounds (ms) of the delay histogram's buckets; the last bucket is open.
const DELAY_BOUNDS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 60000,
];

/// A histogram of delays: from a control event's Kafka timestamp to its effect on
/// routing, or from a window's deadline to its expiry committed.
#[derive(Debug, Default)]
pub struct DelayHistogram {
    buckets: [AtomicU64; DELAY_BOUNDS_MS.len() + 1],
    max_ms: AtomicU64,
}

impl DelayHistogram {
    /// Counts one delay.
    pub fn record(&self, d: Duration) {
        let ms = d.as_millis() as u64;
        let i = DELAY_BOUNDS_MS.partition_point(|&b| b < ms);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.max_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Events counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound (ms) of the bucket holding quantile `q` (0..=1): the true value is
    /// at most this. `None` before the first event.
    pub fn quantile_upper_ms(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let max = self.max_ms.load(Ordering::Relaxed);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                // No value exceeds the largest seen: a bound above it says less.
                return Some(DELAY_BOUNDS_MS.get(i).map_or(max, |&b| b.min(max)));
            }
        }
        Some(max)
    }

    /// The largest delay seen (ms).
    pub fn max_ms(&self) -> u64 {
        self.max_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_quantiles_bound_the_values() {
        let h = DelayHistogram::default();
        assert_eq!(h.quantile_upper_ms(0.99), None);
        for ms in [3, 4, 4, 8, 40, 40, 40, 40, 40, 900] {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.quantile_upper_ms(0.5), Some(50));
        assert_eq!(
            h.quantile_upper_ms(0.99),
            Some(900),
            "never above the largest"
        );
        assert_eq!(h.max_ms(), 900);
    }
}
