//! A partition's task: records from its queue, through the pure core, to the producer;
//! refused records to the dead letter; windows and offsets kept for the next commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::consumer::Consumer;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};

use super::group::GroupContext;
use super::slot::{Slot, SlotState};
use super::{PipelineError, Shared};
use crate::adapters::kafka::retention::crowds::{Anonymised, fingerprint};
use crate::adapters::kafka::retention::timers::Timers;
use crate::adapters::kafka::sink::{self, Out, SinkError};
use crate::adapters::telemetry::names::{self, DeadLetterReason};
use crate::codec::{self, DecodeError, Format, binary, json};
use crate::core::bounds::TimeBounds;
use crate::core::process::{Decision, process_into};
use crate::core::retention::Anchors;
use crate::vocab::time::Millis;

/// Records a partition task processes before it lets others (and commits) in.
const BATCH: usize = 512;

/// The largest input record routed (the same limit as replay's); larger ones go to the
/// dead letter, truncated.
pub use crate::codec::MAX_RECORD_BYTES;

/// The longest input key a dead letter carries; a longer one is cut, so a dead letter
/// always fits the broker's message size and cannot wedge its partition.
pub const MAX_DEAD_LETTER_KEY_BYTES: usize = 1024;

impl Shared {
    /// A partition's task: batches of records from its queue while it owns the
    /// partition, waking when the queue has more.
    pub(super) async fn partition_task(
        self: Arc<Self>,
        slot: Arc<Slot>,
        mut queue: PartitionQueue<GroupContext>,
    ) {
        {
            let s = slot.clone();
            queue.set_nonempty_callback(move || s.wake.notify_one());
        }
        let mut task = Task {
            slot: &slot,
            queue: &queue,
            scratch: Scratch {
                buf: Vec::new(),
                fields: Vec::new(),
                treatments: String::new(),
                bounds: None,
                keys: self.keys.active(),
            },
            throttle: crate::adapters::kafka::Throttle::default(),
            backstop: false,
            persisted: Instant::now(),
        };
        loop {
            match self.step(&mut task).await {
                Step::More => tokio::task::yield_now().await,
                // The queue's callback wakes the task; the timeout is a backstop so a
                // lost wake-up costs at most a moment, never a stalled partition.
                Step::Idle => {
                    task.backstop =
                        tokio::time::timeout(Duration::from_millis(500), slot.wake.notified())
                            .await
                            .is_err();
                }
                Step::Paused => tokio::time::sleep(Duration::from_millis(100)).await,
                Step::Stop => return,
            }
        }
    }

    /// One turn of a partition's task with its state locked: a seek the last abort asked
    /// for, then a batch of records (or a pause while the consent table is stale).
    async fn step(&self, task: &mut Task<'_>) -> Step {
        let slot = task.slot;
        let mut st = slot.state.lock().await;
        if slot.stop.load(Ordering::Acquire) || self.closing.load(Ordering::Acquire) {
            return Step::Stop;
        }
        if let Some(off) = st.rewind.take()
            && let Err(e) = self.seek(slot.partition, off).await
        {
            self.fail(PipelineError::Kafka {
                what: "rewinding a partition",
                source: e,
            });
            return Step::Stop;
        }
        let now = self.clock.now();
        task.scratch.bounds = Some(TimeBounds::new(&self.policy, now, self.cfg.time_limits));
        let instant = Instant::now();
        let fresh = self.store.fresh(instant);
        // A stale table first pauses routing: the records wait in Kafka, so a short
        // outage of the control topic costs latency, not consent-based copies. Only a
        // longer one routes fail closed.
        if !fresh && self.store.stale_for(instant) < self.cfg.stale_pause {
            if let Some(held) = task.throttle.ready() {
                tracing::warn!(
                    partition = slot.partition,
                    held_back = held,
                    "consent table stale: routing paused"
                );
            }
            self.stats.paused.store(true, Ordering::Relaxed);
            return Step::Paused;
        }
        self.stats.paused.store(false, Ordering::Relaxed);
        let before = st.records;
        let keys = self.keys.active();
        if !Arc::ptr_eq(&keys, &task.scratch.keys) {
            task.scratch.keys = keys;
        }
        let mut step = self.batch(task, &mut st, now, fresh).await;
        if matches!(step, Step::More | Step::Idle)
            && let Some(end) = self.persist_batch(task, &mut st).await
        {
            step = end;
        }
        // Counted per batch: one clock read and one histogram call for up to BATCH
        // records.
        let n = (st.records - before) as u32;
        st.tally.batch(instant, n, instant.elapsed());
        if std::mem::take(&mut task.backstop) && n > 0 {
            metrics::counter!(names::PARTITION_WAKEUPS_MISSED).increment(1);
        }
        slot.pending.store(st.uncommitted(), Ordering::Relaxed);
        step
    }

    /// Up to [`BATCH`] records from the partition's queue, with its state locked.
    async fn batch(
        &self,
        task: &mut Task<'_>,
        st: &mut SlotState,
        now: Millis,
        fresh: bool,
    ) -> Step {
        for _ in 0..BATCH {
            // The table can go stale while a batch runs (sends may wait for a full
            // queue): no record is routed on a freshness that has lapsed.
            if fresh && !self.store.fresh(Instant::now()) {
                return Step::Idle;
            }
            match task.queue.poll(Duration::ZERO) {
                None => return Step::Idle,
                Some(Ok(m)) => {
                    let handled = self.handle(&m, st, now, fresh, &mut task.scratch).await;
                    if let Some(end) = self.after_send(task, handled) {
                        return end;
                    }
                }
                Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                    self.fail(PipelineError::ConsumerFatal(e));
                    return Step::Stop;
                }
                Some(Err(e)) => {
                    if let Some(held) = task.throttle.ready() {
                        tracing::warn!(partition = task.slot.partition, error = %e, held_back = held, "consumer error");
                    }
                }
            }
        }
        Step::More
    }

    /// After a batch: the timers' changes so far go into the open transaction (see
    /// `persist_changes`), at most every quarter of the commit interval, so that a
    /// window several batches of one transaction touch is still written about once.
    async fn persist_batch(&self, task: &mut Task<'_>, st: &mut SlotState) -> Option<Step> {
        let Timers::Ready(r) = &mut st.timers else {
            return None;
        };
        if !r.schedule.has_changes() || task.persisted.elapsed() < self.cfg.commit_interval / 4 {
            return None;
        }
        task.persisted = Instant::now();
        match self.persist_changes(task.slot.partition, r).await {
            Ok(n) => {
                st.tally.schedule_writes += n;
                None
            }
            Err(e) => self.after_send(task, Err(e)),
        }
    }

    /// What a failed record does to the batch: an abortable failure ends it (the
    /// coordinator aborts the transaction and rewinds this partition), others end the
    /// task.
    fn after_send(&self, task: &Task<'_>, handled: Result<(), SinkError>) -> Option<Step> {
        match handled {
            Ok(()) => None,
            Err(SinkError::Abortable(e)) => {
                if let Some(held) = task.throttle.ready() {
                    tracing::warn!(partition = task.slot.partition, error = %e, held_back = held, "send failed; the transaction will be aborted");
                }
                self.poisoned.store(true, Ordering::Release);
                self.commit_now.notify_one();
                Some(Step::Idle)
            }
            Err(SinkError::Abandoned) => Some(Step::Stop),
            Err(e) => {
                self.fail(e.into());
                Some(Step::Stop)
            }
        }
    }

    /// Moves a partition's read position back (after an abort). Messages fetched before
    /// the seek are discarded by librdkafka.
    async fn seek(&self, partition: i32, offset: i64) -> Result<(), KafkaError> {
        let c = self.consumer().clone();
        let topic = self.cfg.input_topic.clone();
        tokio::task::spawn_blocking(move || {
            c.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
    }

    /// One record: refused to the dead letter, or processed and its copies sent; the
    /// offset and the windows it opened are kept for the next commit.
    async fn handle(
        &self,
        m: &BorrowedMessage<'_>,
        st: &mut SlotState,
        now: Millis,
        fresh: bool,
        scratch: &mut Scratch,
    ) -> Result<(), SinkError> {
        // Before anything is sent: an abort must rewind to this record at the latest.
        st.txn_first.get_or_insert(m.offset());
        let full = m.payload().unwrap_or(&[]);
        // A record this large is no CDR; refusing it here keeps every copy and dead
        // letter far below the broker's message size, so one record cannot wedge a
        // partition.
        let (payload, decoded): (&[u8], Result<json::Decoded<'_>, (DeadLetterReason, String)>) =
            if full.len() > MAX_RECORD_BYTES {
                (
                    &full[..MAX_RECORD_BYTES],
                    Err((
                        DeadLetterReason::TooLarge,
                        crate::codec::too_large(full.len() as u64),
                    )),
                )
            } else {
                // JSON keeps where the record's fields sit, for its JSON copies.
                let d = match self.cfg.input_format {
                    Format::Json => json::decode_record_laid_out(full),
                    Format::Binary => binary::decode_record(full).map(json::Decoded::from),
                };
                // A record from the future or older than every route keeps anything is
                // refused, as replay refuses it.
                let d = d
                    .map_err(|e| {
                        let class = match e {
                            DecodeError::Malformed { .. } => DeadLetterReason::Malformed,
                            DecodeError::Invalid(_) => DeadLetterReason::Invalid,
                        };
                        (class, e.to_string())
                    })
                    .and_then(|r| {
                        match scratch
                            .bounds
                            .as_ref()
                            .map(|b| b.check(r.record.start_time))
                        {
                            Some(Err(e)) => Err((DeadLetterReason::OutOfBounds, e.to_string())),
                            _ => Ok(r),
                        }
                    });
                (full, d)
            };
        match decoded {
            Err((class, reason)) => {
                let (partition, offset) = (m.partition().to_string(), m.offset().to_string());
                let headers = sink::headers([
                    ("dlq.reason", reason.as_str()),
                    ("dlq.topic", m.topic()),
                    ("dlq.partition", partition.as_str()),
                    ("dlq.offset", offset.as_str()),
                ]);
                self.sink
                    .send(Out {
                        topic: &self.cfg.dead_letter_topic,
                        partition: None,
                        key: m
                            .key()
                            .map(|k| &k[..k.len().min(MAX_DEAD_LETTER_KEY_BYTES)]),
                        payload: Some(payload),
                        headers: Some(headers),
                    })
                    .await?;
                st.tally.dead_letter(class);
            }
            Ok(decoded) => {
                let r = &decoded.record;
                let state = self.store.view(&r.msisdn, fresh);
                // Filled in place: a decision is ~6 KB, returning one by value copies it.
                // (Its copies borrow the message, so it cannot outlive this record.)
                let mut d = Decision::default();
                process_into(r, &self.policy, &state, &scratch.keys, now, &mut d);
                // The record's fields as JSON once, for all its JSON copies.
                let fields = (self.cfg.output_format == Format::Json)
                    .then(|| json::RecordJson::of_input(&decoded, &mut scratch.fields));
                for c in &d.copies {
                    let Some(topic) = self.cfg.routes[c.envelope.purpose as usize].as_deref()
                    else {
                        continue;
                    };
                    scratch.buf.clear();
                    match &fields {
                        Some(fields) => fields.encode_copy(&self.envelopes, c, &mut scratch.buf),
                        None => binary::encode_copy(&self.envelopes, c, &mut scratch.buf),
                    }
                    let entry = c.schedule_entry();
                    let tags = codec::headers(&self.envelopes, c, &mut scratch.treatments);
                    if c.is_anonymised() {
                        // Held back with its month's crowd (see retention::crowds); counted
                        // as a copy when released.
                        st.timers.hold_anonymised(
                            Anonymised {
                                purpose: c.envelope.purpose,
                                record_time: c.record_time,
                                content: scratch.buf.clone(),
                                headers: tags
                                    .iter()
                                    .map(|(k, v)| (k.to_string(), v.to_string()))
                                    .collect(),
                                subscriber: fingerprint(&scratch.keys, &r.msisdn),
                            },
                            now,
                        );
                        st.timers.track(&entry, Anchors::of(&state));
                        continue;
                    }
                    let headers = sink::headers(tags);
                    {
                        self.sink
                            .send(Out {
                                topic,
                                partition: None,
                                key: entry.subscriber.map(str::as_bytes),
                                payload: Some(&scratch.buf),
                                headers: Some(headers),
                            })
                            .await?;
                    }
                    st.timers.track(&entry, Anchors::of(&state));
                    st.tally.copy(c);
                }
                st.tally.record(r.kind, !fresh);
            }
        }
        st.next = Some(m.offset() + 1);
        st.records += 1;
        if self.uncommitted.fetch_add(1, Ordering::Relaxed) + 1 >= self.cfg.commit_max_records {
            self.commit_now.notify_one();
        }
        Ok(())
    }
}

/// How a turn of a partition's task ended.
enum Step {
    /// A full batch: more records are probably waiting.
    More,
    /// The queue is empty (or the batch had to end): wait for the next wake-up.
    Idle,
    /// Routing is paused while the consent table is stale.
    Paused,
    /// The task ends (the partition was revoked, the pipeline stops or failed).
    Stop,
}

/// What a partition's task keeps across its turns.
struct Task<'a> {
    slot: &'a Slot,
    queue: &'a PartitionQueue<GroupContext>,
    scratch: Scratch,
    throttle: crate::adapters::kafka::Throttle,
    /// The last wait for records ended by its backstop timer, not by a wake-up.
    backstop: bool,
    /// When the task last wrote its timers' changes (`persist_batch`).
    persisted: Instant,
}

/// Buffers a partition task reuses for every copy.
struct Scratch {
    buf: Vec<u8>,
    /// A JSON record's fields written once (`json::RecordJson`), where its input's are not.
    fields: Vec<u8>,
    treatments: String,
    /// The record times accepted at the batch's clock.
    bounds: Option<TimeBounds>,
    /// The keys of the batch: taken with the partition's lock, which a key switch holds
    /// too, so one transaction's copies name subscribers under one keyring.
    keys: Arc<crate::core::pseudonym::Keyring>,
}
