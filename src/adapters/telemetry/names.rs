//! Every metric `cdrguard run` exports, by name, with its labels: the one place a
//! dashboard, an alert rule or the README looks names up. Prometheus naming: the
//! `cdrguard_` prefix, base units (seconds), `_total` on counters. Labels take small fixed
//! value sets only (route ids, kinds, formats, reason classes, outcomes, assigned input
//! partitions), never a subscriber, a key or a raw value.

/// Counter: input records committed (routed or dead-lettered), by `kind` (`moc`, `mtc`,
/// `sms_mo`, `sms_mt`, `data`, or `unknown` for a record sent to the dead letter, whose
/// kind is not to be trusted) and `format` (`json`, `binary`).
pub const RECORDS: &str = "cdrguard_records_total";
/// Counter: records processed in transactions that were aborted (they are read and
/// processed again, so they are not in [`RECORDS`]).
pub const RECORDS_ABORTED: &str = "cdrguard_records_aborted_total";
/// Counter: records committed that were routed while the consent table was stale (fail
/// closed: only purposes needing no consent got copies).
pub const RECORDS_FAIL_CLOSED: &str = "cdrguard_records_fail_closed_total";
/// Counter: copies committed, by `route` (purpose id). Anonymised copies count when their
/// crowd is released.
pub const COPIES: &str = "cdrguard_copies_total";
/// Counter: records committed to the dead-letter topic, by `reason` (`malformed`,
/// `invalid`, `out_of_bounds`, `too_large`).
pub const DEAD_LETTERS: &str = "cdrguard_dead_letters_total";
/// Counter: fields replaced by an irreversible pseudonym in committed copies, by `route`.
pub const PSEUDONYMISED: &str = "cdrguard_pseudonymised_fields_total";
/// Counter: fields replaced by a reversible FF1 token in committed copies, by `route`.
pub const TOKENISED: &str = "cdrguard_tokenised_fields_total";
/// Histogram: time a partition task spends per record (decode, core, encode, hand to the
/// producer): one observation per batch of up to 512 records, its mean per record.
pub const RECORD_PROCESSING: &str = "cdrguard_record_processing_seconds";
/// Histogram: from a record's batch being processed to the commit holding it.
pub const RECORD_COMMIT_LATENCY: &str = "cdrguard_record_commit_latency_seconds";
/// Counter: transactions (at least once: offset commits), by `outcome` (`committed`,
/// `aborted`).
pub const TRANSACTIONS: &str = "cdrguard_transactions_total";
/// Histogram: how long a commit held every partition (sending what the transaction still
/// lacked, then committing it).
pub const COMMIT_DURATION: &str = "cdrguard_commit_duration_seconds";
/// Histogram: how long each step of a commit took, by `phase`: `lock` (waiting for every
/// partition's lock: their batches in progress end first), `seal` (locked: the timers'
/// expiries and schedule entries sent, the offsets taken), `offsets` (exactly once:
/// `send_offsets_to_transaction`; at least once: the offset commit), `acks` (waiting
/// until the broker acknowledged every message of the transaction), `end` (exactly
/// once: `commit_transaction`), `relock` (exactly once: taking the locks back after the
/// commit, for its bookkeeping), and `late` (how long after its scheduled instant a
/// commit began: a commit longer than the interval, or a busy runtime, delays the next).
pub const COMMIT_PHASE: &str = "cdrguard_commit_phase_seconds";
/// The `phase` values of [`COMMIT_PHASE`].
pub const COMMIT_PHASES: [&str; 7] = ["late", "lock", "seal", "offsets", "acks", "end", "relock"];
/// Histogram: how long a send waited for the lane sealed before it to be acknowledged
/// (exactly once: copies keep their input order per key across the two producers);
/// observed only for sends that found the sealed lane unacknowledged.
pub const SEND_GATE_WAIT: &str = "cdrguard_send_gate_wait_seconds";
/// Counter: partition tasks woken by the backstop timer (not by their queue) that then
/// found records waiting: a lost wake-up, which delayed those records by up to 500 ms.
pub const PARTITION_WAKEUPS_MISSED: &str = "cdrguard_partition_wakeups_missed_total";
/// Counter: pipelines rebuilt after a failure a fresh consumer and producer overcome.
pub const PIPELINE_REBUILDS: &str = "cdrguard_pipeline_rebuilds_total";
/// Counter: rebalance events, by `event` (`assigned`, `revoked`, `lost`).
pub const REBALANCES: &str = "cdrguard_rebalances_total";
/// Gauge: input partitions this instance owns.
pub const ASSIGNED_PARTITIONS: &str = "cdrguard_assigned_partitions";
/// Gauge: records of an owned input `partition` not yet committed, measured against its
/// last stable offset (see `kafka::pipeline::lag`); only owned partitions have a series.
pub const CONSUMER_LAG: &str = "cdrguard_consumer_lag_records";
/// Gauge: subscribers in the consent table.
pub const CONSENT_SUBSCRIBERS: &str = "cdrguard_consent_subscribers";
/// Gauge: 1 while the consent table is proven current, else 0 (routing pauses, then
/// routes fail closed).
pub const CONSENT_FRESH: &str = "cdrguard_consent_fresh";
/// Gauge: subscribers routed fail closed because of an unreadable control event.
pub const CONSENT_SUSPECTS: &str = "cdrguard_consent_suspect_subscribers";
/// Counter: control events taken from the control topic, by `outcome` (`applied`,
/// `refused`).
pub const CONTROL_EVENTS: &str = "cdrguard_control_events_total";
/// Counter: control events for a purpose the policy does not declare, by `purpose`.
pub const CONTROL_UNDECLARED: &str = "cdrguard_control_undeclared_purpose_total";
/// Histogram: from a live control event's Kafka timestamp to its effect on routing.
pub const CONTROL_APPLY_DELAY: &str = "cdrguard_control_apply_delay_seconds";
/// Gauge: 1 while routing is paused waiting for a stale consent table, else 0.
pub const ROUTING_PAUSED: &str = "cdrguard_routing_paused";
/// Gauge: 1 while `/readyz` answers 200, else 0.
pub const READY: &str = "cdrguard_ready";
/// Gauge: retention windows open (pending expiry) in the owned partitions' timers.
pub const RETENTION_WINDOWS: &str = "cdrguard_retention_windows_pending";
/// Counter: retention-expiry events committed, by `route` and `reason` (`rule`,
/// `consent_withdrawn`, `objection`, `erasure`).
pub const RETENTION_EXPIRIES: &str = "cdrguard_retention_expiries_total";
/// Gauge: how long (real seconds) the most overdue window has been past its deadline; 0
/// when none is.
pub const RETENTION_OVERDUE: &str = "cdrguard_retention_oldest_overdue_seconds";
/// Histogram: from a window's deadline to its expiry committed (real seconds).
pub const RETENTION_LATENESS: &str = "cdrguard_retention_expiry_lateness_seconds";
/// Histogram: how long reading a partition's timers back from the schedule topic took.
pub const RETENTION_REBUILD: &str = "cdrguard_retention_rebuild_duration_seconds";
/// Gauge: owned partitions whose timers are still being read back.
pub const RETENTION_REBUILDING: &str = "cdrguard_retention_partitions_rebuilding";
/// Counter: schedule-topic messages that could not be read back.
pub const SCHEDULE_UNREADABLE: &str = "cdrguard_retention_schedule_unreadable_total";
/// Counter: schedule-topic messages (windows, tombstones, markers) committed.
pub const SCHEDULE_WRITES: &str = "cdrguard_retention_schedule_writes_total";
/// Gauge: anonymised copies withheld because their month's crowd stayed under the
/// threshold (as the partition that last released counted them).
pub const CROWD_WITHHELD: &str = "cdrguard_crowd_withheld_copies";
/// Gauge: always 1, with the `version` label.
pub const BUILD_INFO: &str = "cdrguard_build_info";

/// Every histogram, with its bucket bounds (seconds).
pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    (RECORD_PROCESSING, PROCESSING_BUCKETS),
    (RECORD_COMMIT_LATENCY, COMMIT_BUCKETS),
    (COMMIT_DURATION, COMMIT_BUCKETS),
    (COMMIT_PHASE, PHASE_BUCKETS),
    (SEND_GATE_WAIT, PHASE_BUCKETS),
    (CONTROL_APPLY_DELAY, DELAY_BUCKETS),
    (RETENTION_LATENESS, DELAY_BUCKETS),
    (RETENTION_REBUILD, REBUILD_BUCKETS),
];

/// A record takes microseconds (about 1.6 us of core time plus the producer's share).
const PROCESSING_BUCKETS: &[f64] = &[1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2];
/// Around the 100 ms commit interval: a record waits up to one interval plus the commit.
const COMMIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0,
];
/// A commit's steps: round trips of a millisecond or two on a quiet broker, hundreds
/// when a step stalls.
const PHASE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5,
];
/// Control events take effect within the proof cycle (half a second); expiries are
/// committed within a commit interval of their deadline unless a backlog holds them.
const DELAY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// A partition's timers read back: milliseconds for an empty schedule, seconds for
/// millions of windows.
const REBUILD_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Every label value of `kind` on [`RECORDS`], indexed as `Kind as usize`, then the one
/// for records sent to the dead letter.
pub const KINDS: [&str; 6] = ["moc", "mtc", "sms_mo", "sms_mt", "data", "unknown"];

/// The reason classes of [`DEAD_LETTERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Not parseable in the input format, or unknown fields.
    Malformed = 0,
    /// Parsed, but breaks the record contract.
    Invalid = 1,
    /// Its time is in the future or older than every route keeps.
    OutOfBounds = 2,
    /// Larger than the record size limit.
    TooLarge = 3,
}

impl DeadLetterReason {
    /// Number of classes.
    pub const COUNT: usize = 4;
    /// Every class, indexed as `DeadLetterReason as usize`.
    pub const ALL: [DeadLetterReason; 4] = [
        DeadLetterReason::Malformed,
        DeadLetterReason::Invalid,
        DeadLetterReason::OutOfBounds,
        DeadLetterReason::TooLarge,
    ];
    /// The label value.
    pub const fn id(self) -> &'static str {
        match self {
            DeadLetterReason::Malformed => "malformed",
            DeadLetterReason::Invalid => "invalid",
            DeadLetterReason::OutOfBounds => "out_of_bounds",
            DeadLetterReason::TooLarge => "too_large",
        }
    }
}

/// Counter: key files read again (on SIGHUP or a change), by `outcome` (`staged`: checked
/// and taking over at the next commit; `refused`: the old keys kept; `unchanged`).
pub const KEY_RELOADS: &str = "cdrguard_key_reloads_total";
/// Counter: key switches made at a transaction boundary.
pub const KEY_SWITCHES: &str = "cdrguard_key_switches_total";

/// The reason classes of [`RETENTION_EXPIRIES`], indexed as the expiry's reason.
pub const EXPIRY_REASONS: [&str; 4] = ["rule", "consent_withdrawn", "objection", "erasure"];
