//! The consent table: every subscriber's routing state, built from the compacted
//! `subscriber.control` topic, read to its end before the first record is routed and then
//! followed live. It fails closed: while the table is not known to be current, records are
//! routed as if every subscriber had withdrawn consent, objected and restricted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::stats::DelayHistogram;
use crate::adapters::telemetry::names;
use crate::codec::json;
use crate::core::control::{Settled, SubscriberState};
use crate::policy::Policy;
use crate::vocab::purpose::{Purpose, PurposeSet};
use crate::vocab::time::Millis;

/// Subscriber states by msisdn, plus whether they can be trusted right now.
#[derive(Debug)]
pub struct ConsentStore {
    states: Table,
    /// Set once every control partition was read to its end at start.
    caught_up: AtomicBool,
    /// The latest instant as of which the table is proven to hold every committed control
    /// event, as ms since `epoch` plus one; 0 while it never was.
    confirmed_ms: AtomicU64,
    /// When the initial read finished (ms since `epoch`): a table is not stale for
    /// longer than it has been in use.
    caught_up_ms: AtomicU64,
    epoch: Instant,
    max_staleness: Duration,
    /// Woken whenever the table is proven current (or caught up), for whoever waits for
    /// it to become fresh.
    proven: tokio::sync::Notify,
    /// Control events applied.
    pub applied: AtomicU64,
    /// Control events refused (malformed); each is logged with its position.
    pub refused: AtomicU64,
    /// Subscribers with an unreadable control event on the topic, by the keys it sits
    /// under: that event may have been a withdrawal or an objection, so they are routed
    /// fail closed until a readable event (or a tombstone) replaces it under its key.
    suspects: DashMap<Box<str>, Vec<Box<str>>>,
    /// Entries in `suspects`, so the common case (none) costs one atomic load per record.
    suspect_count: std::sync::atomic::AtomicUsize,
    /// Readable events keyed under another msisdn than they name.
    pub mismatched_keys: AtomicU64,
    /// The policy events are checked against (see [`ConsentStore::heed`]).
    policy: std::sync::OnceLock<Arc<Policy>>,
    /// Consent and objection events naming a purpose the policy does not declare, per
    /// purpose: applied, but they change nothing (see [`Policy::undeclared`]).
    pub undeclared: [AtomicU64; Purpose::COUNT],
    /// Commit-to-effect delays.
    pub delays: DelayHistogram,
    /// The next offset to apply, per control partition: the retention timers act on an
    /// event only once routing sees it too (see [`ConsentStore::has_applied`]).
    positions: std::sync::Mutex<std::collections::BTreeMap<i32, i64>>,
}

/// The state to route with when the table may be stale: no consent, an objection to
/// every purpose, restriction in force. Only purposes that need none of these (billing
/// and fraud under contract or legal obligation) still get copies.
pub fn fail_closed(known: SubscriberState) -> SubscriberState {
    // What is known only ever stops more copies (a contract end, an erasure, a settled
    // invoice that makes late records expired), so it is kept.
    let mut s = SubscriberState {
        restricted: true,
        contract_ended: known.contract_ended,
        erased_at: known.erased_at,
        settled: known.settled,
        ..SubscriberState::default()
    };
    for p in Purpose::ALL {
        s.objected.set(p, true);
    }
    s
}

/// The subscriber states, compact: consent for 1,000,000 subscribers is held by every
/// instance, so its size is most of what an instance needs. An msisdn of up to 15
/// digits (E.164's longest), with or without E.164's leading `+`, is kept as one
/// integer, and a state as 40 bytes (dates without `Option`'s tag words) instead of 64
/// plus a heap string: 48 bytes a subscriber in the table, against about 100 before (the
/// hash tables' slack comes on top of either). Other msisdns keep their text.
#[derive(Default)]
struct Table {
    digits: DashMap<u64, Stored>,
    text: DashMap<Box<str>, Stored>,
}

/// Set in a packed msisdn written with a leading `+`.
const PLUS: u64 = 1 << 59;

/// An msisdn of 1 to 15 ASCII digits, after an optional `+`, as one integer: its value
/// (below 10^15 < 2^50), a bit for the `+`, and its length in the top bits so that
/// leading zeros still tell numbers apart. A `+` is kept apart rather than dropped:
/// `+4670...` and `4670...` are different keys on the control topic.
fn packed_msisdn(msisdn: &str) -> Option<u64> {
    let (plus, b) = match msisdn.as_bytes() {
        [b'+', rest @ ..] => (PLUS, rest),
        b => (0, b),
    };
    if b.is_empty() || b.len() > 15 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = b.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    Some(((b.len() as u64) << 60) | plus | value)
}

/// Counts only: the table's keys are msisdns, which no log may show.
impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("subscribers", &self.len())
            .finish()
    }
}

impl Table {
    fn get(&self, msisdn: &str) -> Option<SubscriberState> {
        match packed_msisdn(msisdn) {
            Some(k) => self.digits.get(&k).map(|s| s.unpack()),
            None => self.text.get(msisdn).map(|s| s.unpack()),
        }
    }

    /// Changes a subscriber's state, recording it first if it had none.
    fn upsert(&self, msisdn: &str, f: impl FnOnce(&mut SubscriberState)) {
        match packed_msisdn(msisdn) {
            Some(k) => self.digits.entry(k).or_default().change(f),
            None => self.text.entry(msisdn.into()).or_default().change(f),
        }
    }

    /// Changes a subscriber's state if it has one.
    fn update(&self, msisdn: &str, f: impl FnOnce(&mut SubscriberState)) {
        match packed_msisdn(msisdn) {
            Some(k) => {
                if let Some(mut s) = self.digits.get_mut(&k) {
                    s.change(f);
                }
            }
            None => {
                if let Some(mut s) = self.text.get_mut(msisdn) {
                    s.change(f);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.digits.len() + self.text.len()
    }

    fn is_empty(&self) -> bool {
        self.digits.is_empty() && self.text.is_empty()
    }
}

/// A [`SubscriberState`] in 40 bytes: the purpose sets and the restriction as bytes,
/// each date as milliseconds with [`NONE`] for its absence.
#[derive(Clone, Copy)]
struct Stored {
    sets: [u8; 4],
    dates: [i64; 4],
}

/// No date (no instant in a CDR's range is this).
const NONE: i64 = i64::MIN;

impl Default for Stored {
    fn default() -> Stored {
        Stored::pack(&SubscriberState::default())
    }
}

impl Stored {
    fn pack(s: &SubscriberState) -> Stored {
        let date = |d: Option<Millis>| d.map_or(NONE, |m| m.0);
        Stored {
            sets: [
                s.consented.bits(),
                s.objected.bits(),
                s.regranted.bits(),
                u8::from(s.restricted),
            ],
            dates: [
                date(s.contract_ended),
                date(s.erased_at),
                date(s.settled.map(|x| x.through)),
                date(s.settled.map(|x| x.at)),
            ],
        }
    }

    /// Applies `f` to the state this holds.
    fn change(&mut self, f: impl FnOnce(&mut SubscriberState)) {
        let mut s = self.unpack();
        f(&mut s);
        *self = Stored::pack(&s);
    }

    fn unpack(&self) -> SubscriberState {
        let date = |d: i64| (d != NONE).then_some(Millis(d));
        SubscriberState {
            consented: PurposeSet::from_bits(self.sets[0]),
            objected: PurposeSet::from_bits(self.sets[1]),
            regranted: PurposeSet::from_bits(self.sets[2]),
            restricted: self.sets[3] != 0,
            contract_ended: date(self.dates[0]),
            erased_at: date(self.dates[1]),
            settled: date(self.dates[2]).map(|through| Settled {
                through,
                at: Millis(self.dates[3]),
            }),
        }
    }
}

/// A control key's msisdn and the key itself: `msisdn/type[/purpose]`, UTF-8.
fn split_key(key: Option<&[u8]>) -> Option<(&str, &str)> {
    let key = std::str::from_utf8(key?).ok()?;
    let (msisdn, rest) = key.split_once('/')?;
    (!msisdn.is_empty() && !rest.is_empty()).then_some((msisdn, key))
}

impl ConsentStore {
    /// An empty table that counts as stale until the follower has caught up.
    pub fn new(max_staleness: Duration) -> ConsentStore {
        ConsentStore {
            states: Table::default(),
            caught_up: AtomicBool::new(false),
            confirmed_ms: AtomicU64::new(0),
            caught_up_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            max_staleness,
            proven: tokio::sync::Notify::new(),
            applied: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            suspects: DashMap::new(),
            suspect_count: std::sync::atomic::AtomicUsize::new(0),
            mismatched_keys: AtomicU64::new(0),
            policy: std::sync::OnceLock::new(),
            undeclared: Default::default(),
            delays: DelayHistogram::default(),
            positions: Default::default(),
        }
    }

    /// Notes that the control event at `offset` of `partition` was applied (or refused).
    pub fn note_position(&self, partition: i32, offset: i64) {
        let mut p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        let next = p.entry(partition).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// The next offset to apply, per control partition.
    pub fn positions(&self) -> std::collections::BTreeMap<i32, i64> {
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the table has applied the control event at `offset` of `partition`.
    ///
    /// Retention timers remember an invoice settlement only where the subscriber has
    /// windows, and a late record elsewhere takes its deadline from this table's view of
    /// the subscriber. So the timers must never act on a settlement before this table
    /// holds it: a record routed in between would open a window that waits for ever.
    pub fn has_applied(&self, partition: i32, offset: i64) -> bool {
        let p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        p.get(&partition).is_some_and(|next| *next > offset)
    }

    /// Checks every event applied from now on against `policy`, the one the run routes
    /// with: an event for a purpose it does not declare is counted in `undeclared` and
    /// logged the first time per purpose. A run has one policy; a second call is ignored.
    pub fn heed(&self, policy: Arc<Policy>) {
        let _ = self.policy.set(policy);
    }

    /// Counts an event for a purpose the policy does not declare. The first per purpose
    /// is logged (by purpose only, never the msisdn): more would say nothing new, and a
    /// consent system that names a purpose differently sends many.
    fn undeclared(&self, p: Purpose) {
        metrics::counter!(names::CONTROL_UNDECLARED, "purpose" => p.id()).increment(1);
        if self.undeclared[p as usize].fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                purpose = p.id(),
                "control event for a purpose the policy does not declare: it changes nothing; further ones for this purpose are only counted"
            );
        }
    }

    /// Whether the initial read of the control topic has finished.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Whether routing may trust the table at `now`: caught up, and confirmed at the end
    /// of the control topic within the staleness bound. Read once per batch, not per
    /// record.
    pub fn fresh(&self, now: Instant) -> bool {
        match self.confirmed() {
            Some(confirmed) if self.caught_up() => {
                now.saturating_duration_since(confirmed) <= self.max_staleness
            }
            _ => false,
        }
    }

    fn confirmed(&self) -> Option<Instant> {
        match self.confirmed_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms - 1)),
        }
    }

    /// How long the table has been stale at `now` (zero while it is fresh). A long
    /// initial read does not count: staleness starts at the catch-up at the earliest.
    pub fn stale_for(&self, now: Instant) -> Duration {
        let caught_up =
            self.epoch + Duration::from_millis(self.caught_up_ms.load(Ordering::Acquire));
        let since = match self.confirmed() {
            Some(c) => (c + self.max_staleness).max(caught_up),
            None => caught_up,
        };
        now.saturating_duration_since(since)
    }

    /// The state to route a subscriber's record with.
    pub fn view(&self, msisdn: &str, fresh: bool) -> SubscriberState {
        let known = self.states.get(msisdn).unwrap_or_default();
        if fresh && !self.suspect(msisdn) {
            known
        } else {
            fail_closed(known)
        }
    }

    /// Whether an unreadable event of this subscriber is on the control topic.
    fn suspect(&self, msisdn: &str) -> bool {
        self.suspect_count.load(Ordering::Acquire) > 0 && self.suspects.contains_key(msisdn)
    }

    /// Subscribers routed fail closed because of an unreadable control event.
    pub fn suspects(&self) -> usize {
        self.suspect_count.load(Ordering::Acquire)
    }

    /// Records that the message under `key` could not be read. Its msisdn comes from the
    /// key (`msisdn/type[/purpose]`), since the payload is what failed; a message without
    /// such a key names nobody and is only counted.
    fn refuse(&self, key: Option<&[u8]>) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let Some((msisdn, key)) = split_key(key) else {
            return;
        };
        let mut keys = self.suspects.entry(msisdn.into()).or_insert_with(|| {
            self.suspect_count.fetch_add(1, Ordering::AcqRel);
            Vec::new()
        });
        if !keys.iter().any(|k| &**k == key) {
            keys.push(key.into());
        }
    }

    /// A readable event or a tombstone under `key` replaces whatever was unreadable there.
    fn clear_suspect(&self, key: Option<&[u8]>) {
        if self.suspect_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let Some((msisdn, key)) = split_key(key) else {
            return;
        };
        let emptied = match self.suspects.get_mut(msisdn) {
            Some(mut keys) => {
                keys.retain(|k| &**k != key);
                keys.is_empty()
            }
            None => false,
        };
        if emptied
            && self
                .suspects
                .remove_if(msisdn, |_, keys| keys.is_empty())
                .is_some()
        {
            self.suspect_count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Subscribers with a recorded state.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether no subscriber has a recorded state.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    fn confirm(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.epoch).as_millis() as u64;
        self.confirmed_ms.fetch_max(ms + 1, Ordering::AcqRel);
        self.proven.notify_waiters();
    }

    /// Waits until the table is fresh (caught up and proven current), woken by each proof
    /// rather than polling.
    pub async fn until_fresh(&self) {
        loop {
            let proven = self.proven.notified();
            tokio::pin!(proven);
            // Registered before the check, so a proof between the two is not missed.
            proven.as_mut().enable();
            if self.fresh(Instant::now()) {
                return;
            }
            proven.await;
        }
    }

    fn mark_caught_up(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.epoch).as_millis() as u64;
        self.caught_up_ms.store(ms, Ordering::Release);
        self.caught_up.store(true, Ordering::Release);
        self.proven.notify_waiters();
    }

    /// Applies one control-topic message: an event, or a tombstone (no payload) that
    /// removes what its key set, so the table always equals a fresh read of the
    /// compacted topic.
    /// A message that cannot be read is refused, and its subscriber (named by the key)
    /// is routed fail closed until its key holds a readable event again.
    pub fn apply_message(&self, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<(), String> {
        let applied = self.apply(key, payload);
        match (&applied, payload) {
            (Ok(()), _) => self.clear_suspect(key),
            (Err(_), Some(_)) => self.refuse(key),
            // A tombstone removes the key's event, unreadable or not; one naming no known
            // setting removed nothing that routing reads.
            (Err(_), None) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.clear_suspect(key);
            }
        }
        applied
    }

    fn apply(&self, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<(), String> {
        match payload {
            Some(p) => {
                let ev = json::decode_control(p)?;
                // Unreadable events hold back the subscriber their key names, which only
                // works if keys spell the msisdn as payloads do.
                if split_key(key).is_some_and(|(keyed, _)| keyed != ev.msisdn.as_str()) {
                    self.mismatched_keys.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(p) = self
                    .policy
                    .get()
                    .and_then(|p| ev.change.undeclared_purpose(p))
                {
                    self.undeclared(p);
                }
                self.states
                    .upsert(ev.msisdn.as_str(), |s| s.apply(&ev.change, ev.at));
            }
            None => {
                let (msisdn, key) =
                    split_key(key).ok_or("tombstone key is not msisdn/type[/purpose]")?;
                let mut parts = key.splitn(3, '/').skip(1);
                let kind = parts.next().unwrap_or_default();
                let purpose = parts.next().map(Purpose::from_id);
                let mut unknown = false;
                self.states.update(msisdn, |s| match (kind, purpose) {
                    ("consent", Some(Some(p))) => s.consented.set(p, false),
                    ("objection", Some(Some(p))) => s.objected.set(p, false),
                    ("restriction", None) => s.restricted = false,
                    ("contract_ended", None) => s.contract_ended = None,
                    ("erasure", None) => {
                        s.erased_at = None;
                        s.regranted = Default::default();
                    }
                    // Settlements only ever move forward; forgetting one would let late
                    // records of a settled period live again.
                    ("invoice_settled", _) => {}
                    _ => unknown = true,
                });
                if unknown {
                    return Err("tombstone key names no known setting".into());
                }
            }
        }
        self.applied.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    #[cfg(test)]
    /// Caught up and proven current now; returns that instant, for tests to ask about
    /// freshness at a given instant rather than at whenever the clock is read next.
    pub(crate) fn mark_caught_up_for_test(&self) -> Instant {
        let now = Instant::now();
        self.mark_caught_up(now);
        self.confirm(now);
        now
    }
}

/// The follower's client context: end-of-partition is how it knows it is current, not an
/// error worth a log line; the rest is logged, throttled.
#[derive(Default)]
pub struct ControlContext {
    throttle: super::Throttle,
}

impl ClientContext for ControlContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::client_log(&self.throttle, "control", level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            super::client_error(&self.throttle, "control", &error, reason);
        }
    }
}

impl ConsumerContext for ControlContext {}

/// Why the follower stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The consumer could not be created or assigned.
    #[error("control topic {topic}: {source}")]
    Kafka {
        /// The control topic.
        topic: String,
        /// The cause.
        source: KafkaError,
    },
    /// The control topic does not exist.
    #[error("control topic {0} does not exist (create it compacted; see README)")]
    Missing(String),
}

/// What the follower needs.
pub struct FollowerConfig {
    /// librdkafka properties (bootstrap servers, TLS, SASL, ...).
    pub client: ClientConfig,
    /// The control topic.
    pub topic: String,
}

/// Starts the follower thread: assigns every partition of the control topic from the
/// beginning, applies each event, marks the table caught up once every partition reached
/// its end, and from then on proves it fresh every half second (see [`reached`]).
/// Returns once the consumer is assigned; `stop` ends the thread.
pub fn spawn_follower(
    cfg: FollowerConfig,
    store: Arc<ConsentStore>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, FollowError> {
    let kafka = |source| FollowError::Kafka {
        topic: cfg.topic.clone(),
        source,
    };
    let mut client = cfg.client.clone();
    // Never committed: every instance reads the whole topic from the start. The group id
    // only satisfies librdkafka's consumer, it forms no group (assign, not subscribe).
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        // After an outage the table must be proven current again quickly: routing waits
        // for it (see `processing.stale_pause_ms`).
        .set("reconnect.backoff.max.ms", "1000");
    if client.get("group.id").is_none() {
        client.set("group.id", "cdrguard-control-reader");
    }
    let consumer: BaseConsumer<ControlContext> = client
        .create_with_context(ControlContext::default())
        .map_err(kafka)?;
    let md = consumer
        .fetch_metadata(Some(&cfg.topic), Duration::from_secs(10))
        .map_err(kafka)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == cfg.topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(FollowError::Missing(cfg.topic.clone()));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(&cfg.topic, *p, Offset::Beginning)
            .map_err(kafka)?;
    }
    consumer.assign(&tpl).map_err(kafka)?;
    let topic = cfg.topic.clone();
    std::thread::Builder::new()
        .name("cdrguard-control".into())
        .spawn(move || follow(consumer, &topic, &partitions, &store, &stop))
        .map_err(|e| FollowError::Kafka {
            topic: cfg.topic.clone(),
            source: KafkaError::ClientCreation(e.to_string()),
        })
}

fn follow(
    consumer: BaseConsumer<ControlContext>,
    topic: &str,
    partitions: &[i32],
    store: &ConsentStore,
    stop: &AtomicBool,
) {
    // Proving freshness asks the broker for offsets and metadata. On the consumer's own
    // connection such a request can wait behind a fetch that long-polls for up to
    // fetch.wait.max.ms, so it runs on a thread of its own: applying events never waits
    // for a round trip.
    let prover_stop = AtomicBool::new(false);
    // Counts the apply loop's passes: see `prove` for why a proof waits for one.
    let passes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        // Set however the apply loop ends, a panic included: the scope waits for the
        // prover, so the prover must end too for this thread to end (and the run to
        // notice).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _stop_prover = StopOnDrop(&prover_stop);
        let prover = std::thread::Builder::new()
            .name("cdrguard-control-proof".into())
            .spawn_scoped(scope, || {
                prove(
                    &consumer,
                    topic,
                    partitions,
                    store,
                    &passes,
                    [stop, &prover_stop],
                )
            });
        let Ok(prover) = prover else {
            tracing::error!("cannot start the control-topic prover thread");
            return;
        };
        apply_events(&consumer, topic, partitions, store, stop, &passes, &prover);
    });
}

/// Applies every control event as it arrives, and marks the table caught up once every
/// partition reported its end. Returns on `stop`, or when the prover ended on its own
/// (the table could never be proven fresh again: the run must notice).
fn apply_events(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    partitions: &[i32],
    store: &ConsentStore,
    stop: &AtomicBool,
    passes: &AtomicU64,
    prover: &std::thread::ScopedJoinHandle<'_, ()>,
) {
    // Partitions that have not reported their end since they were assigned: the initial
    // read is over once none is left.
    let mut unread: Vec<i32> = partitions.to_vec();
    let throttle = super::Throttle::default();
    let mismatch = super::Throttle::default();
    let mut mismatches_seen = 0;
    while !stop.load(Ordering::Relaxed) {
        passes.fetch_add(1, Ordering::AcqRel);
        if prover.is_finished() {
            tracing::error!("the control-topic prover thread stopped");
            return;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let applied = store.apply_message(m.key(), m.payload());
                store.note_position(m.partition(), m.offset());
                match applied {
                    Ok(()) => {
                        let mismatched = store.mismatched_keys.load(Ordering::Relaxed);
                        if mismatched > mismatches_seen {
                            mismatches_seen = mismatched;
                            if let Some(held) = mismatch.ready() {
                                tracing::warn!(
                                    topic,
                                    partition = m.partition(),
                                    offset = m.offset(),
                                    held_back = held,
                                    "control event keyed under another msisdn than it names; key control events msisdn/type[/purpose]"
                                );
                            }
                        }
                        // Only live events: the initial read replays history, whose age says
                        // nothing about how fast changes take effect.
                        if let Some(ts) = m.timestamp().to_millis().filter(|_| store.caught_up()) {
                            let now_ms = SystemTime::now()
                                .duration_since(UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as i64);
                            let delay =
                                Duration::from_millis(now_ms.saturating_sub(ts).max(0) as u64);
                            store.delays.record(delay);
                            metrics::histogram!(names::CONTROL_APPLY_DELAY)
                                .record(delay.as_secs_f64());
                        }
                    }
                    Err(_reason) => {
                        // The reason may quote the payload (an msisdn): log where, not what.
                        tracing::warn!(
                            topic,
                            partition = m.partition(),
                            offset = m.offset(),
                            fail_closed_subscribers = store.suspects(),
                            "control event refused (malformed); its subscriber is routed fail closed until its key holds a readable event"
                        );
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                unread.retain(|u| *u != p);
                if unread.is_empty() && !store.caught_up() {
                    store.mark_caught_up(Instant::now());
                    tracing::info!(
                        subscribers = store.len(),
                        events = store.applied.load(Ordering::Relaxed),
                        "consent table caught up with the control topic"
                    );
                }
            }
            Some(Err(e)) => {
                if let Some(held) = throttle.ready() {
                    tracing::warn!(topic, error = %e, held_back = held, "control topic consumer error");
                }
            }
        }
    }
}

/// Once the table has caught up, proves it fresh every [`CHECK_EVERY`]: asks the broker
/// for every partition's bounds, notes when it asked, and confirms the table as of that
/// instant once the consumer's position has reached them. Also picks up partitions added
/// to the control topic.
///
/// librdkafka moves the position past a message while handing it out, before the apply
/// loop has applied it. So a proof, once the position has reached the bounds, waits for
/// the apply loop to start a new pass (`passes` moves on): the pass that took the last
/// message has then applied it.
fn prove(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    partitions: &[i32],
    store: &ConsentStore,
    passes: &AtomicU64,
    stops: [&AtomicBool; 2],
) {
    let stopped = || stops.iter().any(|s| s.load(Ordering::Acquire));
    let mut parts: Vec<i32> = partitions.to_vec();
    let mut last_metadata = Instant::now();
    let throttle = super::Throttle::default();
    let pause = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until && !stopped() {
            std::thread::sleep(REACH_EVERY);
        }
    };
    while !stopped() {
        if !store.caught_up() {
            pause(REACH_EVERY);
            continue;
        }
        let started = Instant::now();
        if last_metadata.elapsed() >= METADATA_EVERY {
            follow_new_partitions(consumer, topic, &mut parts);
            last_metadata = Instant::now();
        }
        // A proof has two halves: the broker's bounds as of an instant, then the consumer
        // reaching them. Waiting for the second half (instead of asking for a position
        // already at the end) keeps a busy control topic, whose end moves on during every
        // round trip, from ever looking stale. Past TARGET_MAX_AGE the bounds are asked
        // for again, so a partition truncated or recreated under us cannot wedge it.
        let asked = Instant::now();
        match bounds(consumer, topic, &parts) {
            Ok(b) => {
                let mut applied_after: Option<u64> = None;
                while !stopped() && asked.elapsed() <= TARGET_MAX_AGE {
                    match applied_after {
                        None if reached(consumer, topic, &parts, &b) => {
                            applied_after = Some(passes.load(Ordering::Acquire));
                        }
                        Some(pass) if passes.load(Ordering::Acquire) > pass => {
                            store.confirm(asked);
                            break;
                        }
                        _ => {}
                    }
                    std::thread::sleep(REACH_EVERY);
                }
            }
            Err(e) => {
                if let Some(held) = throttle.ready() {
                    tracing::warn!(topic, error = %e, held_back = held, "cannot prove the consent table current");
                }
            }
        }
        pause(CHECK_EVERY.saturating_sub(started.elapsed()));
    }
}

/// How often the prover proves the table current while the follower applies events.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often the prover compares the consumer's position with the bounds it asked for.
const REACH_EVERY: Duration = Duration::from_millis(10);
/// How long the prover waits for the consumer to reach one set of bounds.
const TARGET_MAX_AGE: Duration = Duration::from_secs(5);
/// How often it looks for partitions added to the control topic.
const METADATA_EVERY: Duration = Duration::from_secs(5);

/// Partitions added to the control topic are read from their beginning; until they have
/// been read to their end the table is not current (see [`reached`]).
fn follow_new_partitions(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    parts: &mut Vec<i32>,
) {
    let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            if !parts.contains(&p.id())
                && tpl
                    .add_partition_offset(topic, p.id(), Offset::Beginning)
                    .is_ok()
            {
                parts.push(p.id());
            }
        }
    }
    if tpl.count() > 0 {
        tracing::info!(
            topic,
            added = tpl.count(),
            "control topic has new partitions; reading them"
        );
        if let Err(e) = consumer.incremental_assign(&tpl) {
            tracing::warn!(topic, error = %e, "cannot read the new control partitions");
        }
    }
}

/// A control partition's first and next offsets, as the broker reported them.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    earliest: i64,
    end: i64,
}

/// Every partition's bounds now, in `parts` order: two requests for all partitions
/// (earliest and latest offsets); under read_committed the latest is the last stable
/// offset. A broker that does not answer gives none, so an outage makes the table stale.
fn bounds(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    parts: &[i32],
) -> Result<Vec<Bounds>, KafkaError> {
    let ask = |at: Offset| -> Result<Vec<i64>, KafkaError> {
        let mut query = TopicPartitionList::new();
        for part in parts {
            // Timestamps -1 and -2 ask for the latest and the earliest offset.
            query.add_partition_offset(topic, *part, at)?;
        }
        let answer = consumer.offsets_for_times(query, Duration::from_secs(2))?;
        parts
            .iter()
            .map(|part| {
                let e = answer
                    .find_partition(topic, *part)
                    .ok_or(KafkaError::OffsetFetch(RDKafkaErrorCode::UnknownPartition))?;
                e.error()?;
                match e.offset() {
                    Offset::Offset(o) => Ok(o),
                    _ => Err(KafkaError::OffsetFetch(RDKafkaErrorCode::NoOffset)),
                }
            })
            .collect()
    };
    let end = ask(Offset::End)?;
    let earliest = ask(Offset::Beginning)?;
    Ok(earliest
        .into_iter()
        .zip(end)
        .map(|(earliest, end)| Bounds { earliest, end })
        .collect())
}

/// Whether every partition has been read up to `bounds` (from [`bounds`], same order).
/// librdkafka's position moves past transaction markers and aborted records as well as
/// delivered ones, so a partition read to its end stands at its last stable offset. A
/// partition nothing was ever read from has no position: it is read to its end if it
/// holds nothing (its earliest offset is its end).
fn reached(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    parts: &[i32],
    bounds: &[Bounds],
) -> bool {
    if bounds.len() != parts.len() {
        return false;
    }
    let Ok(pos) = consumer.position() else {
        return false;
    };
    parts.iter().zip(bounds).all(|(part, b)| {
        match pos.find_partition(topic, *part).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o >= b.end,
            _ => b.earliest >= b.end,
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_compact_table_keeps_every_field_and_tells_msisdns_apart() {
        use crate::vocab::purpose::Purpose;
        let mut full = SubscriberState {
            restricted: true,
            contract_ended: Some(Millis(1_700_000_000_000)),
            erased_at: Some(Millis(-5)),
            settled: Some(Settled {
                through: Millis(1_690_000_000_000),
                at: Millis(1_691_000_000_000),
            }),
            ..SubscriberState::default()
        };
        full.consented.set(Purpose::Marketing, true);
        full.objected.set(Purpose::Analytics, true);
        full.regranted.set(Purpose::Troubleshooting, true);
        assert_eq!(Stored::pack(&full).unpack(), full);
        assert_eq!(
            Stored::default().unpack(),
            SubscriberState::default(),
            "an unknown subscriber's state"
        );
        let t = Table::default();
        // Leading zeros, a '+', too many digits: each its own subscriber.
        let names = [
            "46701234567",
            "046701234567",
            "0046701234567",
            "+46701234567",
            "+046701234567",
            "+999999999999999",
            "999999999999999",
            "1234567890123456",
            "+1234567890123456",
            "0",
            "00",
            "+0",
            "+",
            "++46701234567",
            "46+701234567",
        ];
        // E.164 numbers with their '+' (as the generator writes them) are packed, not
        // kept as text.
        assert!(packed_msisdn("+46701234567").is_some());
        assert!(packed_msisdn("+999999999999999").is_some());
        for text in ["+", "++46701234567", "46+701234567", "+1234567890123456"] {
            assert_eq!(packed_msisdn(text), None, "{text}");
        }
        for (i, m) in names.iter().enumerate() {
            t.upsert(m, |s| s.contract_ended = Some(Millis(i as i64)));
        }
        assert_eq!(t.len(), names.len());
        for (i, m) in names.iter().enumerate() {
            assert_eq!(
                t.get(m).unwrap().contract_ended,
                Some(Millis(i as i64)),
                "{m}"
            );
        }
        assert_eq!(t.get("4670123456"), None);
        // An update changes only a subscriber the table has.
        t.update("46700000000", |s| s.restricted = true);
        assert_eq!(t.get("46700000000"), None);
        t.update("046701234567", |s| s.restricted = true);
        assert!(t.get("046701234567").unwrap().restricted);
        assert!(!t.get("46701234567").unwrap().restricted);
    }

    use super::*;

    #[test]
    fn events_and_tombstones_build_the_table() {
        let s = ConsentStore::new(Duration::from_secs(10));
        s.apply_message(
            Some(b"+46701234567/consent/marketing"),
            Some(br#"{"type":"consent","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"marketing","granted":true}"#),
        )
        .unwrap();
        let now = s.mark_caught_up_for_test();
        assert!(s.fresh(now));
        assert!(
            s.view("+46701234567", true)
                .consented
                .contains(Purpose::Marketing)
        );
        s.apply_message(Some(b"+46701234567/consent/marketing"), None)
            .unwrap();
        assert!(
            !s.view("+46701234567", true)
                .consented
                .contains(Purpose::Marketing)
        );
        assert!(s.apply_message(Some(b"+46701234567/colour"), None).is_err());
        assert!(s.apply_message(None, Some(b"{not json")).is_err());
    }

    /// Regression: a consent or objection for a purpose the policy does not declare was
    /// applied without a trace.
    #[test]
    fn events_for_undeclared_purposes_are_counted() {
        let s = ConsentStore::new(Duration::from_secs(10));
        let event = |purpose: &str| {
            format!(
                r#"{{"type":"consent","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"{purpose}","granted":true}}"#
            )
        };
        let care = event("customer_care");
        let objection = br#"{"type":"objection","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"customer_care"}"#;
        // Before the run names its policy nothing is counted.
        s.apply_message(None, Some(care.as_bytes())).unwrap();
        let counted = |s: &ConsentStore| {
            s.undeclared
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        };
        assert_eq!(counted(&s), [0; Purpose::COUNT]);
        let excedo =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "x").unwrap();
        s.heed(Arc::new(excedo));
        s.apply_message(None, Some(care.as_bytes())).unwrap();
        s.apply_message(None, Some(objection)).unwrap();
        s.apply_message(None, Some(event("marketing").as_bytes()))
            .unwrap();
        let mut want = [0; Purpose::COUNT];
        want[Purpose::CustomerCare as usize] = 2;
        assert_eq!(counted(&s), want);
        // They are still applied, so the table equals a fresh read of the topic.
        assert_eq!(s.applied.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_stale_table_fails_closed() {
        let s = ConsentStore::new(Duration::from_secs(10));
        s.apply_message(
            None,
            Some(br#"{"type":"consent","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"analytics","granted":true}"#),
        )
        .unwrap();
        // Not caught up yet: nothing may rely on consent.
        assert!(!s.fresh(Instant::now()));
        let v = s.view("+46701234567", false);
        assert!(!v.consented.contains(Purpose::Analytics));
        assert!(v.restricted);
        assert!(Purpose::ALL.iter().all(|p| v.objected.contains(*p)));
        let now = s.mark_caught_up_for_test();
        assert!(!s.fresh(now + Duration::from_secs(11)));
        // What can only stop copies survives the fail-closed view.
        s.apply_message(
            None,
            Some(br#"{"type":"erasure","msisdn":"+46701234567","at":"2026-02-01T00:00:00.000Z"}"#),
        )
        .unwrap();
        assert!(s.view("+46701234567", false).erased_at.is_some());
        s.apply_message(Some(b"+46701234567/erasure"), None)
            .unwrap();
        assert!(s.view("+46701234567", true).erased_at.is_none());
    }

    #[test]
    fn an_unreadable_event_routes_its_subscriber_fail_closed_until_its_key_is_readable() {
        let s = ConsentStore::new(Duration::from_secs(10));
        let (a, b) = ("+46701234567", "+46709876543");
        for m in [a, b] {
            s.apply_message(
                Some(format!("{m}/consent/analytics").as_bytes()),
                Some(format!(r#"{{"type":"consent","msisdn":"{m}","at":"2026-01-01T00:00:00.000Z","purpose":"analytics","granted":true}}"#).as_bytes()),
            )
            .unwrap();
        }
        s.mark_caught_up_for_test();
        // What may have been a withdrawal cannot be read: A loses what rests on consent,
        // B does not.
        let key = format!("{a}/consent/analytics");
        assert!(
            s.apply_message(Some(key.as_bytes()), Some(b"{\"type\":\"consent\""))
                .is_err()
        );
        assert_eq!(s.refused.load(Ordering::Relaxed), 1);
        assert_eq!(s.suspects(), 1);
        let va = s.view(a, true);
        assert!(!va.consented.contains(Purpose::Analytics));
        assert!(va.restricted);
        assert!(s.view(b, true).consented.contains(Purpose::Analytics));
        // An unreadable message under another key of A keeps A suspect after the first
        // key is readable again.
        let other = format!("{a}/objection/marketing");
        assert!(
            s.apply_message(Some(other.as_bytes()), Some(b"[]"))
                .is_err()
        );
        s.apply_message(
            Some(key.as_bytes()),
            Some(format!(r#"{{"type":"consent","msisdn":"{a}","at":"2026-01-02T00:00:00.000Z","purpose":"analytics","granted":true}}"#).as_bytes()),
        )
        .unwrap();
        assert!(!s.view(a, true).consented.contains(Purpose::Analytics));
        // A tombstone removes the other unreadable event: A is routed by its state again.
        s.apply_message(Some(other.as_bytes()), None).unwrap();
        assert_eq!(s.suspects(), 0);
        assert!(s.view(a, true).consented.contains(Purpose::Analytics));
        // A readable event keyed under another msisdn is counted: such keys would keep an
        // unreadable event from holding back the subscriber it names.
        assert_eq!(s.mismatched_keys.load(Ordering::Relaxed), 0);
        s.apply_message(
            Some(format!("{b}/consent/analytics").as_bytes()),
            Some(format!(r#"{{"type":"consent","msisdn":"{a}","at":"2026-01-03T00:00:00.000Z","purpose":"analytics","granted":true}}"#).as_bytes()),
        )
        .unwrap();
        assert_eq!(s.mismatched_keys.load(Ordering::Relaxed), 1);
        // Without a key naming a subscriber, nobody can be held back; it is only counted.
        assert!(s.apply_message(None, Some(b"nonsense")).is_err());
        assert_eq!(s.suspects(), 0);
        assert_eq!(s.refused.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn only_a_proof_makes_the_table_fresh_and_staleness_counts_from_catch_up() {
        let s = ConsentStore::new(Duration::from_secs(3));
        let t0 = Instant::now();
        // Instants are kept to the millisecond.
        let about = |got: Duration, want: Duration| {
            assert!(
                got.abs_diff(want) < Duration::from_millis(2),
                "{got:?}, expected about {want:?}"
            )
        };
        // Read to the end, but not yet proven current: not fresh, and not stale for long
        // (an initial read is no outage).
        s.mark_caught_up(t0);
        assert!(!s.fresh(t0));
        about(s.stale_for(t0), Duration::ZERO);
        about(
            s.stale_for(t0 + Duration::from_secs(1)),
            Duration::from_secs(1),
        );
        // Proven as of t0: fresh for the staleness bound, then stale from its end.
        s.confirm(t0);
        assert!(s.fresh(t0 + Duration::from_millis(2_990)));
        assert!(!s.fresh(t0 + Duration::from_secs(4)));
        about(s.stale_for(t0 + Duration::from_secs(2)), Duration::ZERO);
        about(
            s.stale_for(t0 + Duration::from_secs(5)),
            Duration::from_secs(2),
        );
        // A proof never moves back.
        s.confirm(t0 - Duration::from_secs(1));
        assert!(s.fresh(t0 + Duration::from_millis(2_990)));
    }
}
