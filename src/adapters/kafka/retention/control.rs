//! The control events the retention timers act on: a reader of the whole control topic
//! that hands each event on with its partition and offset, from where the timers it
//! serves last stopped.
//!
//! Each partition's timers keep, in the schedule topic and in the same transactions as
//! their windows, the offset up to which they applied each control partition's events. So
//! a right is applied to a window exactly once: after a restart or a rebalance the reader
//! goes back to the lowest of those offsets, and timers skip what they already applied.
//! (Consent for routing is the consent table's, read by its own follower.) An event is
//! handed on only once that table has applied it too: a late record then finds a
//! settlement in the table whenever the timers already acted on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::adapters::kafka::consent::ConsentStore;
use crate::codec::json;
use crate::core::control::ControlEvent;

/// One control event with where it sits.
pub struct Delivered {
    /// Control-topic partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The event.
    pub event: ControlEvent,
}

/// Control events waiting for the timers, at most this many.
const QUEUE: usize = 20_000;

/// The reader: a thread, and the queue it fills.
pub struct ControlFeed {
    events: Mutex<Receiver<Delivered>>,
    /// Where to read from next, set by the timers; taken by the thread.
    from: Arc<Mutex<Option<BTreeMap<i32, i64>>>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ControlFeed {
    /// Starts a reader of `topic` that reads nothing until told where to start, and
    /// hands on each event once `table` has applied it.
    pub fn start(client: ClientConfig, topic: String, table: Arc<ConsentStore>) -> ControlFeed {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let from = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (from.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("cdrguard-retention-control".into())
            .spawn(move || read(client, &topic, &f, &s, &tx, &table))
            .map_err(|e| tracing::error!(error = %e, "cannot start the retention control reader"))
            .ok();
        ControlFeed {
            events: Mutex::new(rx),
            from,
            stop,
            thread: Mutex::new(thread),
        }
    }

    /// Reads from these offsets on (the next offset to read, by partition; a partition
    /// not named is read from its beginning). Events already queued may come again:
    /// timers skip what they applied.
    pub fn read_from(&self, next: BTreeMap<i32, i64>) {
        *self.from.lock().unwrap_or_else(|p| p.into_inner()) = Some(next);
    }

    /// Up to `max` queued events, in the order read.
    pub fn take(&self, max: usize) -> Vec<Delivered> {
        let rx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::from_fn(|| rx.try_recv().ok())
            .take(max)
            .collect()
    }
}

impl Drop for ControlFeed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn read(
    client: ClientConfig,
    topic: &str,
    from: &Mutex<Option<BTreeMap<i32, i64>>>,
    stop: &AtomicBool,
    tx: &SyncSender<Delivered>,
    table: &ConsentStore,
) {
    let consumer: BaseConsumer = match client
        .clone()
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the retention control reader");
            return;
        }
    };
    let throttle = crate::adapters::kafka::Throttle::default();
    let mut held: Option<Delivered> = None;
    while !stop.load(Ordering::Acquire) {
        if let Some(next) = from.lock().unwrap_or_else(|p| p.into_inner()).take() {
            held = None;
            if let Err(e) = assign(&consumer, topic, &next) {
                tracing::warn!(topic, error = %e, "retention control reader cannot seek");
            }
        }
        // A full queue waits: the reader never runs ahead of the timers by more than it.
        // So does an event the consent table has not applied yet (it reads the same
        // topic, and is mostly ahead).
        if let Some(d) = held.take() {
            if !table.has_applied(d.partition, d.offset) {
                held = Some(d);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            match tx.try_send(d) {
                Ok(()) => {}
                Err(TrySendError::Full(d)) => {
                    held = Some(d);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Ok(m)) => {
                let Some(payload) = m.payload() else {
                    // A tombstone: the key's event is gone; windows have nothing to undo.
                    continue;
                };
                match json::decode_control(payload) {
                    Ok(event) => {
                        held = Some(Delivered {
                            partition: m.partition(),
                            offset: m.offset(),
                            event,
                        })
                    }
                    // Logged where, never what (it may quote an msisdn); the consent table
                    // routes its subscriber fail closed.
                    Err(_) => tracing::warn!(
                        topic,
                        partition = m.partition(),
                        offset = m.offset(),
                        "control event unreadable: no window acts on it"
                    ),
                }
            }
            Some(Err(e)) => {
                if let Some(n) = throttle.ready() {
                    tracing::warn!(topic, error = %e, held_back = n, "retention control reader error");
                }
            }
        }
    }
}

/// Assigns every partition of the topic at the given next offsets (the beginning for one
/// not named).
fn assign(
    consumer: &BaseConsumer,
    topic: &str,
    next: &BTreeMap<i32, i64>,
) -> Result<(), rdkafka::error::KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let at = next
                .get(&p.id())
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(topic, p.id(), at)?;
        }
    }
    consumer.assign(&tpl)
}
