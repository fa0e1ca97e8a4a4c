//! Reading one partition of the schedule topic back into timers, on assignment: from its
//! beginning to the end it had when the reading started (the compacted topic is the
//! truth; nothing of a partition's timers lives only in memory).
//!
//! Entries of one window fold in offset order: a tombstone removes it, an entry merges
//! with what is open under its key (entries written while the partition was being read
//! back before carry only that moment's copies). A value that cannot be read but whose key
//! names a window expires that window at once: deleting early is safe, late is not.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::crowds::Crowds;
use super::entries::{Entry, EntryError, decode};
use crate::core::retention::ENDED_BASE;
use crate::core::retention::Reason;
use crate::core::retention::schedule::{Schedule, WindowKey, WindowState};
use crate::policy::{Anchor, Policy};
use crate::vocab::time::{DAY_MS, HOUR_MS, Millis};

/// Offsets at the end of a partition that may hold transaction markers rather than
/// messages: past the last message, the position is asked for (any gap works; a small
/// one keeps the asking rare).
const MARKERS_AT_END: i64 = 64;

/// A partition's timers as read back.
pub struct Restored {
    /// The windows and remembered settlements.
    pub schedule: Schedule,
    /// Control-topic offsets up to which events were applied, by control partition.
    pub applied: BTreeMap<i32, i64>,
    /// Anonymised copies held back.
    pub crowds: Crowds,
    /// Messages read.
    pub messages: u64,
    /// Offsets of messages that could not be read (logged, counted; never their content).
    pub unreadable: Vec<(i64, EntryError)>,
    /// How long the reading took.
    pub took: Duration,
}

/// Why a partition could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The broker could not be asked or read.
    #[error("reading back partition {partition} of {topic}: {source}")]
    Kafka {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The cause.
        source: KafkaError,
    },
    /// The partition's owner went away while it was read.
    #[error("stopped")]
    Stopped,
}

/// Reads partition `partition` of `topic` from its beginning to its current end.
/// `client` holds the brokers and security settings; `now` dates windows whose value
/// could not be read (they expire at once).
pub fn read_back(
    client: &ClientConfig,
    topic: &str,
    partition: i32,
    policy: &Policy,
    now: Millis,
    stop: &AtomicBool,
) -> Result<Restored, RebuildError> {
    let started = Instant::now();
    let err = |source| RebuildError::Kafka {
        topic: topic.to_string(),
        partition,
        source,
    };
    let consumer: BaseConsumer = client
        .clone()
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        // A small queue, refilled at once: librdkafka waits `fetch.queue.backoff.ms`
        // (1 s by default) before fetching for a full queue, which would leave a
        // partition of millions of small entries idle most of the time (a measured 25 s
        // for 500,000 entries, 1 s with this). Small fetches keep the reading of several
        // partitions at once well under the timers it builds (a compressed batch is held
        // decompressed; the bounds count what was fetched).
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.max.bytes", "2097152")
        .set("max.partition.fetch.bytes", "1048576")
        .set("queued.max.messages.kbytes", "4096")
        .create()
        .map_err(err)?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(err)?;
    let mut out = Restored {
        schedule: Schedule::new(policy).with_journal(),
        applied: BTreeMap::new(),
        crowds: Crowds::default(),
        messages: 0,
        unreadable: Vec::new(),
        took: Duration::ZERO,
    };
    if high > low {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(low))
            .map_err(err)?;
        consumer.assign(&tpl).map_err(err)?;
        // Read until the position reaches the end taken at the start: the position stands
        // past transaction markers too, where the last message's offset may not. Asking
        // for it takes the partition's lock, which the fetcher needs too: only when the
        // last message read could be the end, or nothing came.
        loop {
            if stop.load(Ordering::Acquire) {
                return Err(RebuildError::Stopped);
            }
            let mut maybe_end = true;
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    out.messages += 1;
                    // Markers (a commit's, one offset each) may follow the last message.
                    maybe_end = m.offset() + MARKERS_AT_END >= high;
                    let key = m.key().unwrap_or_default();
                    match decode(key, m.payload()) {
                        Ok(e) => apply(&mut out, e),
                        Err(e) => {
                            if let EntryError::Window(k) = &e {
                                expire_at_once(&mut out.schedule, policy, k, now);
                            }
                            out.unreadable.push((m.offset(), e));
                        }
                    }
                }
                Some(Err(e)) => return Err(err(e)),
                None => {}
            }
            if !maybe_end {
                continue;
            }
            let pos = consumer.position().map_err(err)?;
            if let Some(Offset::Offset(o)) =
                pos.find_partition(topic, partition).map(|e| e.offset())
                && o >= high
            {
                break;
            }
        }
    }
    // Read back, not changed: nothing of it needs writing again.
    out.schedule.drain_changes();
    out.took = started.elapsed();
    Ok(out)
}

fn apply(out: &mut Restored, e: Entry) {
    match e {
        Entry::Window(k, Some(st)) => out.schedule.restore_window(&k, &st),
        Entry::Window(k, None) => {
            out.schedule.remove_window(&k);
        }
        Entry::Settlement {
            purpose,
            subject,
            start,
            period: Some((end, deadline)),
        } => out
            .schedule
            .restore_settlement(purpose, &subject, start, end, deadline),
        Entry::Settlement {
            purpose,
            subject,
            start,
            period: None,
        } => out.schedule.remove_settlement(purpose, &subject, start),
        Entry::Applied { partition, offset } => {
            out.applied.insert(partition, offset);
        }
        Entry::Crowd(k, c) => out.crowds.restore(k, c),
    }
}

/// A window whose value cannot be read, due now: its bounds as wide as its key allows
/// (the bucket's own day or hour, else everything up to now).
fn expire_at_once(schedule: &mut Schedule, policy: &Policy, k: &WindowKey, now: Millis) {
    let rule = policy.rule(k.purpose).map(|r| &r.retention);
    let span = |unit: i64| {
        let start = k.bucket.saturating_mul(unit);
        (Millis(start), Millis(start + unit - 1))
    };
    let (from, to) = match rule.map(|r| r.anchor) {
        _ if k.bucket < ENDED_BASE / 2 => (Millis(0), Millis(k.bucket - ENDED_BASE)),
        Some(Anchor::EventTime) => span(DAY_MS),
        Some(Anchor::InvoiceSettled) => span(HOUR_MS),
        _ => (Millis(0), now),
    };
    schedule.restore_window(
        k,
        &WindowState {
            from,
            to,
            deadline: Some(now),
            reason: Reason::Rule(rule.map_or_else(String::new, |r| r.rule_id.clone())),
        },
    );
}
