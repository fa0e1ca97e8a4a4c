//! The output side: the producers that write copies, dead letters and schedule entries,
//! and commit them with the input offsets, either in Kafka transactions (exactly once)
//! or by flushing before the offsets are committed (at least once).
//!
//! Exactly once uses two transactional producers ("lanes") taking turns: while one
//! commits the transaction it was filled with, the other takes the next records'
//! copies. The next lane's first send waits until the sealed lane's messages are
//! acknowledged (copies keep their input order per key, as with one producer), but not
//! for the sealed transaction's offsets and EndTxn round trips. A transaction must not
//! commit before the one sealed ahead of it, and its records follow the earlier one's:
//! the coordinator commits them one at a time, in order, and an abort aborts both.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::TopicPartitionList;

use super::config::Guarantee;
use crate::adapters::telemetry::{CommitPhases, names};

/// How long one transactional call or flush may block.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a retriable transactional call is repeated before the pipeline gives up.
const RETRY_FOR: Duration = Duration::from_secs(120);
/// How long past its own timeout a transactional call may take before it counts as hung.
const HUNG_GRACE: Duration = Duration::from_secs(15);
/// The same while a stop is under way: its deadline comes first.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Counts deliveries the broker refused after librdkafka's own retries: in at-least-once
/// mode any such failure keeps the offsets from being committed.
#[derive(Default)]
pub struct SinkContext {
    failed: AtomicU64,
    throttle: super::Throttle,
    delivery_throttle: super::Throttle,
}

impl SinkContext {
    /// Deliveries the broker refused so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl ClientContext for SinkContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::client_log(&self.throttle, "producer", level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        super::client_error(&self.throttle, "producer", &error, reason);
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = r {
            self.failed.fetch_add(1, Ordering::Relaxed);
            // Topic and error only: the message may hold identifiers.
            if let Some(held) = self.delivery_throttle.ready() {
                tracing::warn!(topic = m.topic(), error = %e, held_back = held, "delivery failed");
            }
        }
    }
}

/// Why a send or commit failed, sorted by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The open transaction (or the uncommitted batch) is lost: abort, rewind the input to
    /// the last committed offsets, go on.
    #[error("abortable: {0}")]
    Abortable(KafkaError),
    /// The producer can no longer be used: build a new pipeline.
    #[error("fatal: {0}")]
    Fatal(KafkaError),
    /// A send of the open transaction failed: it must be aborted.
    #[error("a send of the open transaction failed")]
    SendFailed,
    /// The partitions were taken away before they could be committed.
    #[error("the partition assignment was lost")]
    AssignmentLost,
    /// The producer could not be made: its configuration is refused (not retried).
    #[error("producer: {0}")]
    Client(KafkaError),
    /// A transactional call may be repeated (internal to [`retry`]).
    #[error("retriable: {0}")]
    Retriable(KafkaError),
    /// A transactional call did not return (see `guarded`): the producer is abandoned.
    #[error("{0} did not return")]
    Hung(&'static str),
    /// The pipeline is being torn down: nothing more may be sent.
    #[error("the producer was abandoned by a failed pipeline")]
    Abandoned,
    /// The consumer has no group membership to commit offsets with (between rebalances):
    /// treated like an abortable error.
    #[error("the consumer is not in its group")]
    NotInGroup,
    /// The broker fenced this producer: its transaction timed out, or another instance
    /// uses the same transactional id (which must be unique per instance).
    #[error(
        "producer fenced (transaction timed out, or another instance uses this transactional id): {0}"
    )]
    Fenced(KafkaError),
}

fn classify(e: KafkaError) -> SinkError {
    let fenced = matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
    );
    match &e {
        _ if fenced => SinkError::Fenced(e),
        KafkaError::Transaction(t) if t.is_fatal() => SinkError::Fatal(e),
        KafkaError::Transaction(t) if t.txn_requires_abort() => SinkError::Abortable(e),
        // Neither retriable (retried by `retry`), nor abortable: the transaction's state
        // is unknown, so only a new producer is safe.
        KafkaError::Transaction(_) => SinkError::Fatal(e),
        // A produce call refused (e.g. the transaction already failed): abort it.
        _ => SinkError::Abortable(e),
    }
}

/// Repeats a transactional call while librdkafka says the same call may be retried
/// (e.g. a commit that timed out: aborting then would be refused as a conflict), for
/// [`RETRY_FOR`] or until `until`, whichever comes first.
fn retry(
    until: &dyn Fn() -> Option<Instant>,
    mut op: impl FnMut() -> Result<(), SinkError>,
) -> Result<(), SinkError> {
    let started = Instant::now();
    loop {
        match op() {
            Ok(()) => return Ok(()),
            // `until` is asked each time: a stop may begin while a commit is retried.
            Err(SinkError::Retriable(e))
                if Instant::now() < earliest(started + RETRY_FOR, until()) =>
            {
                tracing::warn!(error = %e, "transactional call failed; retrying it");
            }
            Err(SinkError::Retriable(e)) => return Err(classify(e)),
            Err(e) => return Err(e),
        }
    }
}

/// Runs one transactional call on a thread of its own and waits at most
/// [`TXN_TIMEOUT`] plus a grace period for it. librdkafka can block in
/// `send_offsets_to_transaction` far past its own timeout when the group coordinator
/// went away during a broker outage (librdkafka issues 5456 and 5511). Such a call is
/// left behind, with its thread and this producer, and reported as [`SinkError::Hung`]
/// so the pipeline is rebuilt around a new producer (whose same transactional id fences
/// the old one).
fn guarded(
    producer: &ThreadedProducer<SinkContext>,
    what: &'static str,
    until: &dyn Fn() -> Option<Instant>,
    op: impl FnOnce(&ThreadedProducer<SinkContext>, Duration) -> Result<(), KafkaError> + Send + 'static,
) -> Result<(), SinkError> {
    let timeout = call_timeout(until());
    // A call may overrun its own timeout (that is what this guards against): give it a
    // grace period. A stop's deadline cuts the wait short (see `guarded_for`).
    guarded_for(producer, what, timeout + HUNG_GRACE, until, move |p| {
        op(p, timeout)
    })
}

/// The time since `lap`, and `lap` moved to now.
fn since(lap: &mut Instant) -> Duration {
    let now = Instant::now();
    let d = now.saturating_duration_since(*lap);
    *lap = now;
    d
}

/// The earlier of `at` and `until`.
fn earliest(at: Instant, until: Option<Instant>) -> Instant {
    until.map_or(at, |u| u.min(at))
}

/// How long one transactional call may take: [`TXN_TIMEOUT`], or what is left before
/// `until` (a stop's deadline), but never nothing.
fn call_timeout(until: Option<Instant>) -> Duration {
    let left = until.map_or(TXN_TIMEOUT, |u| u.saturating_duration_since(Instant::now()));
    left.min(TXN_TIMEOUT).max(Duration::from_millis(100))
}

/// Waits at most `wait` for `op`, or until `until` (asked as it waits, so a stop that
/// begins during a long call still ends it in time) plus a moment.
fn guarded_for(
    producer: &ThreadedProducer<SinkContext>,
    what: &'static str,
    wait: Duration,
    until: &dyn Fn() -> Option<Instant>,
    op: impl FnOnce(&ThreadedProducer<SinkContext>) -> Result<(), KafkaError> + Send + 'static,
) -> Result<(), SinkError> {
    let p = producer.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("cdrguard-txn".into())
        .spawn(move || {
            let _ = tx.send(op(&p));
        })
        .map_err(|_| SinkError::Hung(what))?;
    let started = Instant::now();
    let answer = loop {
        let deadline = earliest(started + wait, until().map(|u| u + STOP_GRACE));
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(std::sync::mpsc::RecvTimeoutError::Timeout);
        }
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            other => break other,
        }
    };
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(KafkaError::Transaction(t))) if t.is_retriable() => {
            Err(SinkError::Retriable(KafkaError::Transaction(t)))
        }
        Ok(Err(e)) => Err(classify(e)),
        Err(_) => {
            tracing::error!(
                call = what,
                "transactional call hung past its timeout; rebuilding the pipeline"
            );
            Err(SinkError::Hung(what))
        }
    }
}

/// The instance's producers and its delivery guarantee.
pub struct Sink {
    /// Exactly once: two transactional producers, `<transactional.id>` and
    /// `<transactional.id>.2`, each with a transaction always begun. At least once: one
    /// producer.
    lanes: Vec<ThreadedProducer<SinkContext>>,
    /// The lane sends go to; switched by [`Sink::seal`] only.
    filling: AtomicUsize,
    /// The lane sealed last while some of its messages may be unacknowledged
    /// ([`NO_LANE`] once they are not). Sends wait for it: a copy sent by the other
    /// lane could otherwise land in an output partition before an earlier copy of the
    /// same subscriber still in flight, and copies keep their input order per key.
    flushing: AtomicUsize,
    guarantee: Guarantee,
    /// Failures already accounted for by an earlier commit.
    failed_seen: AtomicU64,
    /// Set when the pipeline fails: sends stop at once instead of waiting for a queue
    /// that a broken transaction will never drain.
    abandoned: AtomicBool,
    /// Set when the run stops: transactional calls and their retries end by then, so the
    /// stop can still abort what they could not finish.
    until: Mutex<Option<Instant>>,
}

/// No lane (see `Sink::flushing`).
const NO_LANE: usize = usize::MAX;

/// A lane closed by [`Sink::seal`]: what it sent since its last commit is committed by
/// [`Sink::commit_sealed`] (or aborted by [`Sink::abort`]).
#[derive(Debug, Clone, Copy)]
pub struct Sealed(usize);

/// The transactional id of a lane: the configured one for the first, with `.2`
/// appended for the second (both must be unique to the instance).
pub fn lane_transactional_id(configured: &str, lane: usize) -> String {
    if lane == 0 {
        configured.to_string()
    } else {
        format!("{configured}.{}", lane + 1)
    }
}

/// Kafka headers from name and value pairs (a copy's tags, a dead letter's position).
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> OwnedHeaders {
    let pairs = pairs.into_iter();
    let mut h = OwnedHeaders::new_with_capacity(pairs.size_hint().0);
    for (k, v) in pairs {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    h
}

/// One message to send.
pub struct Out<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition, or `None` for the key's partition.
    pub partition: Option<i32>,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Payload; `None` for a tombstone (a compacted topic then forgets the key).
    pub payload: Option<&'a [u8]>,
    /// Headers.
    pub headers: Option<OwnedHeaders>,
}

impl Sink {
    /// Creates the producer; in exactly-once mode initialises transactions (fencing any
    /// earlier instance with the same transactional id and aborting its open
    /// transaction) and begins the first one. Blocks: call from a blocking context.
    pub fn create(client: &ClientConfig, guarantee: Guarantee) -> Result<Sink, SinkError> {
        Sink::create_until(client, guarantee, None)
    }

    /// [`Sink::create`], giving up on initialising transactions at `until`.
    pub fn create_until(
        client: &ClientConfig,
        guarantee: Guarantee,
        until: Option<Instant>,
    ) -> Result<Sink, SinkError> {
        let lanes = match guarantee {
            Guarantee::AtLeastOnce => 1,
            Guarantee::ExactlyOnce => 2,
        };
        let configured = client.get("transactional.id").map(str::to_string);
        let mut producers = Vec::with_capacity(lanes);
        for lane in 0..lanes {
            let mut client = client.clone();
            if let Some(id) = &configured {
                client.set("transactional.id", lane_transactional_id(id, lane));
            }
            let producer: ThreadedProducer<SinkContext> = client
                .create_with_context(SinkContext::default())
                .map_err(SinkError::Client)?;
            if guarantee == Guarantee::ExactlyOnce {
                let until = &|| until;
                retry(until, || {
                    guarded(&producer, "init_transactions", until, |p, t| {
                        p.init_transactions(t)
                    })
                })?;
                producer.begin_transaction().map_err(classify)?;
            }
            producers.push(producer);
        }
        Ok(Sink {
            lanes: producers,
            filling: AtomicUsize::new(0),
            flushing: AtomicUsize::new(NO_LANE),
            guarantee,
            failed_seen: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
            until: Mutex::new(None),
        })
    }

    /// From now on, transactional calls and their retries end by `until`.
    pub fn finish_by(&self, until: Instant) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    }

    fn until(&self) -> Option<Instant> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one message. A full local queue is waited out (the producer thread drains
    /// it as the broker acknowledges), so memory stays bounded under back-pressure.
    pub async fn send(&self, out: Out<'_>) -> Result<(), SinkError> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(out.topic);
        if let Some(p) = out.payload {
            record = record.payload(p);
        }
        if let Some(k) = out.key {
            record = record.key(k);
        }
        if let Some(p) = out.partition {
            record = record.partition(p);
        }
        if let Some(h) = out.headers {
            record = record.headers(h);
        }
        self.wait_for_sealed().await?;
        loop {
            if self.abandoned() {
                return Err(SinkError::Abandoned);
            }
            let lane = &self.lanes[self.filling.load(Ordering::Acquire)];
            match lane.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // A queue that does not drain (the broker is away) must not hold a
                    // stop past its deadline.
                    if self.until().is_some_and(|u| Instant::now() >= u) {
                        return Err(SinkError::Abandoned);
                    }
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(classify(e)),
            }
        }
    }

    /// Waits until the lane sealed last has every message acknowledged (see
    /// `flushing`); at once when it has.
    async fn wait_for_sealed(&self) -> Result<(), SinkError> {
        let sealed = self.flushing.load(Ordering::Acquire);
        if sealed == NO_LANE {
            return Ok(());
        }
        let waiting = Instant::now();
        let mut waited = false;
        while !self.acknowledged(&self.lanes[sealed], None)? {
            waited = true;
            // As for a full queue: a lane that does not drain must not hold a stop past
            // its deadline.
            if self.until().is_some_and(|u| Instant::now() >= u) {
                return Err(SinkError::Abandoned);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ =
            self.flushing
                .compare_exchange(sealed, NO_LANE, Ordering::AcqRel, Ordering::Acquire);
        if waited {
            metrics::histogram!(names::SEND_GATE_WAIT).record(waiting.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Closes the filling transaction for its commit; sends go to the other lane from
    /// now on (exactly once). The caller must keep every send out while it seals (it
    /// holds every partition's lock), and must have finished the commit sealed before.
    pub fn seal(&self) -> Sealed {
        let lane = self.filling.load(Ordering::Acquire);
        let next = (lane + 1) % self.lanes.len();
        if next != lane {
            self.flushing.store(lane, Ordering::Release);
        }
        self.filling.store(next, Ordering::Release);
        Sealed(lane)
    }

    /// Makes everything sent since the last commit durable together with `offsets` (the
    /// next offset to read per input partition), holding sends out all along: a seal and
    /// its commit. Blocks: call from a blocking context.
    pub fn commit<C: ConsumerContext>(
        &self,
        offsets: &TopicPartitionList,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), SinkError> {
        let sealed = self.seal();
        self.commit_sealed(sealed, offsets, consumer, &mut CommitPhases::default())
    }

    /// Makes what the sealed lane sent durable together with `offsets`, and begins its
    /// next transaction (exactly once); sends may go on meanwhile into the other lane.
    /// How long its steps took goes to `phases`. Blocks: call from a blocking context.
    pub fn commit_sealed<C: ConsumerContext>(
        &self,
        sealed: Sealed,
        offsets: &TopicPartitionList,
        consumer: &BaseConsumer<C>,
        phases: &mut CommitPhases,
    ) -> Result<(), SinkError> {
        if self.abandoned() {
            return Err(SinkError::Abandoned);
        }
        let producer = &self.lanes[sealed.0];
        match self.guarantee {
            Guarantee::ExactlyOnce => {
                // The offsets first: their round trips to the group coordinator overlap
                // the copies' acknowledgements.
                let mut lap = Instant::now();
                if offsets.count() > 0 {
                    let cgm: ConsumerGroupMetadata =
                        consumer.group_metadata().ok_or(SinkError::NotInGroup)?;
                    let cgm = std::sync::Arc::new(cgm);
                    retry(&|| self.until(), || {
                        let (offsets, cgm) = (offsets.clone(), cgm.clone());
                        guarded(
                            producer,
                            "send_offsets_to_transaction",
                            &|| self.until(),
                            move |p, t| p.send_offsets_to_transaction(&offsets, &cgm, t),
                        )
                    })?;
                    phases.offsets = Some(since(&mut lap));
                }
                // Every copy acknowledged, so the commit's own flush returns at once.
                self.wait_acknowledged(producer)?;
                phases.acks = Some(since(&mut lap));
                retry(&|| self.until(), || {
                    guarded(producer, "commit_transaction", &|| self.until(), |p, t| {
                        p.commit_transaction(t)
                    })
                })?;
                phases.end = Some(since(&mut lap));
                producer.begin_transaction().map_err(classify)
            }
            Guarantee::AtLeastOnce => {
                // Offsets follow delivery: every copy of every record up to the offsets
                // must be acknowledged before they are committed.
                let mut lap = Instant::now();
                self.wait_acknowledged(producer)?;
                phases.acks = Some(since(&mut lap));
                let failed = producer.context().failed.load(Ordering::Relaxed);
                if failed != self.failed_seen.swap(failed, Ordering::Relaxed) {
                    return Err(SinkError::Abortable(KafkaError::MessageProduction(
                        RDKafkaErrorCode::Fail,
                    )));
                }
                if offsets.count() > 0 {
                    consumer
                        .commit(offsets, CommitMode::Sync)
                        .map_err(SinkError::Abortable)?;
                    phases.offsets = Some(since(&mut lap));
                }
                Ok(())
            }
        }
    }

    /// Waits until the broker acknowledged (or refused) everything `producer` sent.
    /// Not rdkafka's `flush` (which `commit_transaction` calls first): it polls for
    /// delivery reports in steps of up to 100 ms, and with reports for failures only
    /// (`delivery.report.only.error`) each step lasts the whole 100 ms, which every
    /// commit then waited (101-103 ms per commit measured at low load).
    fn wait_acknowledged(&self, producer: &ThreadedProducer<SinkContext>) -> Result<(), SinkError> {
        let deadline = Instant::now() + call_timeout(self.until());
        while !self.acknowledged(producer, Some(deadline))? {
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }

    /// One look of the waits for acknowledgements: whether `producer` has nothing in
    /// flight, or why waiting must end (the pipeline failed, or `deadline` passed).
    fn acknowledged(
        &self,
        producer: &ThreadedProducer<SinkContext>,
        deadline: Option<Instant>,
    ) -> Result<bool, SinkError> {
        if producer.in_flight_count() == 0 {
            return Ok(true);
        }
        if self.abandoned() {
            return Err(SinkError::Abandoned);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(SinkError::Abortable(KafkaError::Flush(
                RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        Ok(false)
    }

    /// Drops everything sent since the last commit (exactly once: aborts both lanes'
    /// transactions, the one sealed and the one filling, and begins them again). Blocks:
    /// call from a blocking context.
    pub fn abort(&self) -> Result<(), SinkError> {
        match self.guarantee {
            Guarantee::ExactlyOnce => {
                for producer in &self.lanes {
                    retry(&|| self.until(), || {
                        guarded(producer, "abort_transaction", &|| self.until(), |p, t| {
                            p.abort_transaction(t)
                        })
                    })?;
                    producer.begin_transaction().map_err(classify)?;
                }
                Ok(())
            }
            // Already sent copies stay sent: at least once allows repeats.
            Guarantee::AtLeastOnce => {
                let producer = &self.lanes[0];
                let _ = self.wait_acknowledged(producer);
                let failed = producer.context().failed.load(Ordering::Relaxed);
                self.failed_seen.store(failed, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Stops every send from now on.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    /// Whether [`Sink::abandon`] was called.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer() -> ThreadedProducer<SinkContext> {
        // No broker needed: nothing here talks to one.
        ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .create_with_context(SinkContext::default())
            .unwrap()
    }

    /// A call that returns only when the test lets it (or, as a backstop, after a
    /// minute), and a flag set when it returned. Whether the wait ended before the call
    /// did is read from the flag, not the clock: a timed bound failed under load.
    fn held_call() -> (
        Call,
        std::sync::mpsc::Sender<()>,
        std::sync::Arc<AtomicBool>,
    ) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let returned = std::sync::Arc::new(AtomicBool::new(false));
        let flag = returned.clone();
        let call = move |_: &ThreadedProducer<SinkContext>| {
            // The backstop only turns a regression (waiting for the call) into a failure
            // instead of a hang; a pass never comes near it.
            let _ = held.recv_timeout(Duration::from_secs(60));
            flag.store(true, Ordering::SeqCst);
            Ok(())
        };
        (Box::new(call), release, returned)
    }

    type Call = Box<dyn FnOnce(&ThreadedProducer<SinkContext>) -> Result<(), KafkaError> + Send>;

    #[test]
    fn a_call_that_does_not_return_is_reported_hung_not_waited_for() {
        let p = producer();
        let (call, release, returned) = held_call();
        let r = guarded_for(&p, "test call", Duration::from_millis(100), &|| None, call);
        assert!(matches!(r, Err(SinkError::Hung("test call"))), "{r:?}");
        assert!(
            !returned.load(Ordering::SeqCst),
            "the wait ended only when the call returned"
        );
        let _ = release.send(());
    }

    #[test]
    fn a_stop_that_begins_during_a_long_call_cuts_the_wait_short() {
        let p = producer();
        let (call, release, returned) = held_call();
        // No stop when the call starts; from the second look on, a stop due at that
        // look. The call may take an hour: only the stop can end the wait before it.
        let looks = std::sync::atomic::AtomicU32::new(0);
        let stop = std::sync::OnceLock::new();
        let r = guarded_for(
            &p,
            "long call",
            Duration::from_secs(3_600),
            &|| (looks.fetch_add(1, Ordering::SeqCst) > 0).then(|| *stop.get_or_init(Instant::now)),
            call,
        );
        assert!(matches!(r, Err(SinkError::Hung("long call"))), "{r:?}");
        assert!(
            !returned.load(Ordering::SeqCst),
            "the wait went on past the stop's deadline until the call returned"
        );
        assert!(
            looks.load(Ordering::SeqCst) > 1,
            "the stop was asked for again"
        );
        let _ = release.send(());
    }

    #[test]
    fn call_results_are_classified() {
        let p = producer();
        assert!(guarded_for(&p, "ok", Duration::from_secs(5), &|| None, |_| Ok(())).is_ok());
        let r = guarded_for(&p, "refused", Duration::from_secs(5), &|| None, |_| {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::State))
        });
        assert!(matches!(r, Err(SinkError::Abortable(_))), "{r:?}");
        let fenced = guarded_for(&p, "fenced", Duration::from_secs(5), &|| None, |_| {
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::ProducerFenced,
            ))
        });
        assert!(matches!(fenced, Err(SinkError::Fenced(_))), "{fenced:?}");
    }
}
