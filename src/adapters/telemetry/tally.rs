//! What a partition processed since its last commit, counted in plain integers and
//! handed to the exported counters only when the transaction holding it commits: an
//! aborted transaction's records are processed again, and counting them twice would
//! make `records` disagree with what was delivered. Per record this costs a few integer
//! additions under the partition's lock, which the task holds anyway; the exporter sees
//! one call per series per commit.

use std::time::{Duration, Instant};

use super::names::{self, DeadLetterReason, EXPIRY_REASONS, KINDS};
use crate::codec::Format;
use crate::core::process::Copy;
use crate::core::record::Kind;
use crate::core::retention::Reason;
use crate::vocab::purpose::Purpose;

/// Counts of work not yet committed (a partition's, or a whole commit's once merged).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Input records by kind ([`KINDS`] order; the last: dead-lettered).
    pub records: [u64; KINDS.len()],
    /// Records routed fail closed.
    pub fail_closed: u64,
    /// Copies sent, per route.
    pub copies: [u64; Purpose::COUNT],
    /// Pseudonymised fields in those copies, per route.
    pub pseudonymised: [u64; Purpose::COUNT],
    /// Tokenised fields in those copies, per route.
    pub tokenised: [u64; Purpose::COUNT],
    /// Dead letters, per reason class.
    pub dead_letters: [u64; DeadLetterReason::COUNT],
    /// Expiry events, per route and reason class ([`EXPIRY_REASONS`] order).
    pub expiries: [[u64; EXPIRY_REASONS.len()]; Purpose::COUNT],
    /// Schedule-topic messages.
    pub schedule_writes: u64,
    /// Each batch processed: when it began and how many records it took, for the
    /// record-to-commit latency (a batch's records count from its start: an upper bound).
    pub batches: Vec<(Instant, u32)>,
}

impl Tally {
    /// A routed record.
    #[inline]
    pub fn record(&mut self, kind: Kind, fail_closed: bool) {
        self.records[kind as usize] += 1;
        self.fail_closed += u64::from(fail_closed);
    }

    /// A record sent to the dead letter.
    #[inline]
    pub fn dead_letter(&mut self, reason: DeadLetterReason) {
        self.records[KINDS.len() - 1] += 1;
        self.dead_letters[reason as usize] += 1;
    }

    /// A copy sent. The fields it pseudonymised or tokenised are those of its consent
    /// state's field map that its input carried: two bit operations, no walk over fields.
    #[inline]
    pub fn copy(&mut self, c: &Copy<'_>) {
        let p = c.envelope.purpose as usize;
        let present = c.envelope.present;
        self.copies[p] += 1;
        self.pseudonymised[p] += u64::from((present & c.envelope.facts.pseudonymised).count_ones());
        self.tokenised[p] += u64::from((present & c.envelope.facts.tokenised).count_ones());
    }

    /// `n` anonymised copies of one crowd released.
    pub fn released(&mut self, p: Purpose, n: u64) {
        self.copies[p as usize] += n;
    }

    /// An expiry event sent.
    pub fn expiry(&mut self, p: Purpose, reason: &Reason) {
        let r = match reason {
            Reason::Rule(_) => 0,
            Reason::ConsentWithdrawn => 1,
            Reason::Objection => 2,
            Reason::Erasure => 3,
        };
        self.expiries[p as usize][r] += 1;
    }

    /// A batch of `n` records that began at `started` and took `took`: its records wait
    /// for the commit from `started`, and each took `took / n` to process. That mean is
    /// observed once per batch: observing it once per record would say nothing more and
    /// cost a sample per record.
    pub fn batch(&mut self, started: Instant, n: u32, took: Duration) {
        if n == 0 {
            return;
        }
        self.batches.push((started, n));
        metrics::histogram!(names::RECORD_PROCESSING).record(took.as_secs_f64() / f64::from(n));
    }

    /// Input records counted (routed and dead-lettered).
    pub fn records_in(&self) -> u64 {
        self.records.iter().sum()
    }

    /// Records routed (not dead-lettered).
    pub fn routed(&self) -> u64 {
        self.records[..KINDS.len() - 1].iter().sum()
    }

    /// Dead letters counted.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_letters.iter().sum()
    }

    /// Adds `other` to this one.
    pub fn add(&mut self, other: &Tally) {
        fn sum<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        sum(&mut self.records, &other.records);
        self.fail_closed += other.fail_closed;
        sum(&mut self.copies, &other.copies);
        sum(&mut self.pseudonymised, &other.pseudonymised);
        sum(&mut self.tokenised, &other.tokenised);
        sum(&mut self.dead_letters, &other.dead_letters);
        for (a, b) in self.expiries.iter_mut().zip(&other.expiries) {
            sum(a, b);
        }
        self.schedule_writes += other.schedule_writes;
        self.batches.extend_from_slice(&other.batches);
    }

    /// Forgets everything counted, keeping the batch list's memory.
    pub fn clear(&mut self) {
        let mut batches = std::mem::take(&mut self.batches);
        batches.clear();
        *self = Tally {
            batches,
            ..Tally::default()
        };
    }
}

/// A transaction (at least once: an offset commit) that committed `tally`, of input in
/// `format`, at `at`, after holding the partitions for `took`.
pub struct Committed<'a> {
    /// What it held.
    pub tally: &'a Tally,
    /// The input format.
    pub format: Format,
    /// When it committed.
    pub at: Instant,
    /// How long it held every partition.
    pub took: Duration,
}

impl Committed<'_> {
    /// Adds what was committed to the exported counters; only non-zero series are
    /// touched (every series was registered at zero when the run started).
    pub fn emit(&self) {
        let t = self.tally;
        let format = format_id(self.format);
        for (kind, n) in KINDS.iter().zip(t.records) {
            if n > 0 {
                metrics::counter!(names::RECORDS, "kind" => *kind, "format" => format).increment(n);
            }
        }
        if t.fail_closed > 0 {
            metrics::counter!(names::RECORDS_FAIL_CLOSED).increment(t.fail_closed);
        }
        for p in Purpose::ALL {
            let i = p as usize;
            let route = p.id();
            if t.copies[i] > 0 {
                metrics::counter!(names::COPIES, "route" => route).increment(t.copies[i]);
            }
            if t.pseudonymised[i] > 0 {
                metrics::counter!(names::PSEUDONYMISED, "route" => route)
                    .increment(t.pseudonymised[i]);
            }
            if t.tokenised[i] > 0 {
                metrics::counter!(names::TOKENISED, "route" => route).increment(t.tokenised[i]);
            }
            for (reason, n) in EXPIRY_REASONS.iter().zip(t.expiries[i]) {
                if n > 0 {
                    metrics::counter!(names::RETENTION_EXPIRIES, "route" => route, "reason" => *reason)
                        .increment(n);
                }
            }
        }
        for (r, n) in DeadLetterReason::ALL.iter().zip(t.dead_letters) {
            if n > 0 {
                metrics::counter!(names::DEAD_LETTERS, "reason" => r.id()).increment(n);
            }
        }
        if t.schedule_writes > 0 {
            metrics::counter!(names::SCHEDULE_WRITES).increment(t.schedule_writes);
        }
        metrics::counter!(names::TRANSACTIONS, "outcome" => "committed").increment(1);
        metrics::histogram!(names::COMMIT_DURATION).record(self.took.as_secs_f64());
        let latency = metrics::histogram!(names::RECORD_COMMIT_LATENCY);
        for (started, n) in &t.batches {
            latency.record_many(
                self.at.saturating_duration_since(*started).as_secs_f64(),
                *n as usize,
            );
        }
    }
}

/// How long the steps of one commit took (see [`names::COMMIT_PHASE`]); a step the
/// commit did not take stays `None` and is not observed.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitPhases {
    /// How long after its scheduled instant the commit began.
    pub late: Option<Duration>,
    /// Waiting for every partition's lock.
    pub lock: Option<Duration>,
    /// Sealing, every partition locked.
    pub seal: Option<Duration>,
    /// Sending (or committing) the offsets.
    pub offsets: Option<Duration>,
    /// Waiting for the acknowledgements.
    pub acks: Option<Duration>,
    /// Ending the transaction.
    pub end: Option<Duration>,
    /// Taking the locks back after the commit.
    pub relock: Option<Duration>,
}

impl CommitPhases {
    /// Observes each step taken.
    pub fn emit(&self) {
        let steps = [
            self.late,
            self.lock,
            self.seal,
            self.offsets,
            self.acks,
            self.end,
            self.relock,
        ];
        for (phase, took) in names::COMMIT_PHASES.iter().zip(steps) {
            if let Some(d) = took {
                metrics::histogram!(names::COMMIT_PHASE, "phase" => *phase).record(d.as_secs_f64());
            }
        }
        // One line per commit, for finding which step stalled when (the histograms say
        // how often, not when); off unless asked for.
        let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
        tracing::debug!(
            late_ms = ms(self.late),
            lock_ms = ms(self.lock),
            seal_ms = ms(self.seal),
            offsets_ms = ms(self.offsets),
            acks_ms = ms(self.acks),
            end_ms = ms(self.end),
            relock_ms = ms(self.relock),
            "commit phases"
        );
    }
}

/// A transaction aborted after its partitions had processed `records` input records,
/// which are read and processed again.
pub struct Aborted {
    /// Input records processed in it.
    pub records: u64,
}

impl Aborted {
    /// Counts the abort and the work it threw away.
    pub fn emit(&self) {
        metrics::counter!(names::TRANSACTIONS, "outcome" => "aborted").increment(1);
        metrics::counter!(names::RECORDS_ABORTED).increment(self.records);
    }
}

/// The label value of an input format.
pub fn format_id(f: Format) -> &'static str {
    match f {
        Format::Json => "json",
        Format::Binary => "binary",
    }
}

/// Registers every counter series a run of `routes` (the policy's declared purposes) on
/// `format` input can have, at zero, so that rates and alerts see a series from the first
/// scrape rather than from the first event of its kind.
pub fn register_zero(routes: &[Purpose], format: Format) {
    let format = format_id(format);
    for kind in KINDS {
        metrics::counter!(names::RECORDS, "kind" => kind, "format" => format).increment(0);
    }
    for p in routes {
        let route = p.id();
        metrics::counter!(names::COPIES, "route" => route).increment(0);
        metrics::counter!(names::PSEUDONYMISED, "route" => route).increment(0);
        metrics::counter!(names::TOKENISED, "route" => route).increment(0);
        for reason in EXPIRY_REASONS {
            metrics::counter!(names::RETENTION_EXPIRIES, "route" => route, "reason" => reason)
                .increment(0);
        }
    }
    for r in DeadLetterReason::ALL {
        metrics::counter!(names::DEAD_LETTERS, "reason" => r.id()).increment(0);
    }
    for outcome in ["committed", "aborted"] {
        metrics::counter!(names::TRANSACTIONS, "outcome" => outcome).increment(0);
    }
    for event in ["assigned", "revoked", "lost"] {
        metrics::counter!(names::REBALANCES, "event" => event).increment(0);
    }
    for outcome in ["applied", "refused"] {
        metrics::counter!(names::CONTROL_EVENTS, "outcome" => outcome).increment(0);
    }
    for name in [
        names::RECORDS_ABORTED,
        names::RECORDS_FAIL_CLOSED,
        names::PIPELINE_REBUILDS,
        names::PARTITION_WAKEUPS_MISSED,
        names::SCHEDULE_UNREADABLE,
        names::SCHEDULE_WRITES,
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_every_count_and_clearing_forgets_them() {
        let t0 = Instant::now();
        let mut a = Tally::default();
        a.record(Kind::Data, true);
        a.dead_letter(DeadLetterReason::Malformed);
        a.released(Purpose::Analytics, 3);
        a.expiry(Purpose::Marketing, &Reason::Objection);
        a.batches.push((t0, 2));
        let mut b = Tally::default();
        b.record(Kind::Moc, false);
        b.expiry(Purpose::Marketing, &Reason::Rule("x".into()));
        b.batches.push((t0, 1));
        b.add(&a);
        assert_eq!(b.records_in(), 3);
        assert_eq!(b.routed(), 2);
        assert_eq!(b.dead_lettered(), 1);
        assert_eq!(b.fail_closed, 1);
        assert_eq!(b.copies[Purpose::Analytics as usize], 3);
        assert_eq!(b.expiries[Purpose::Marketing as usize], [1, 0, 1, 0]);
        assert_eq!(b.batches.len(), 2);
        b.clear();
        assert_eq!(b.records_in(), 0);
        assert!(b.batches.is_empty() && b.batches.capacity() >= 2);
    }
}
