//! The counters of a run, readable while it goes and kept across pipeline rebuilds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::vocab::purpose::Purpose;

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
    /// Retention-expiry events committed, per route.
    pub expiries: [AtomicU64; Purpose::COUNT],
    /// Schedule-topic messages that could not be read back.
    pub schedule_unreadable: AtomicU64,
    /// Anonymised copies withheld so far (their month's crowd stayed under the threshold),
    /// as the last partition to release counted them.
    pub withheld: AtomicU64,
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
            "records={} dead_letters={} fail_closed={} copies[{}] windows={} expiries={} commits={} aborts={}",
            self.records.load(Ordering::Relaxed),
            self.dead_letters.load(Ordering::Relaxed),
            self.fail_closed.load(Ordering::Relaxed),
            c.join(" "),
            self.windows.load(Ordering::Relaxed),
            self.expiries
                .iter()
                .map(|e| e.load(Ordering::Relaxed))
                .sum::<u64>(),
            self.commits.load(Ordering::Relaxed),
            self.aborts.load(Ordering::Relaxed),
        )
    }
}
