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

use crate::codec::json;
use crate::core::control::SubscriberState;
use crate::core::purpose::Purpose;

/// Upper bounds (ms) of the delay histogram's buckets; the last bucket is open.
const DELAY_BOUNDS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 60000,
];

/// Delays from a control event's Kafka timestamp to its effect on routing.
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
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(
                    DELAY_BOUNDS_MS
                        .get(i)
                        .copied()
                        .unwrap_or_else(|| self.max_ms.load(Ordering::Relaxed)),
                );
            }
        }
        Some(self.max_ms.load(Ordering::Relaxed))
    }

    /// The largest delay seen (ms).
    pub fn max_ms(&self) -> u64 {
        self.max_ms.load(Ordering::Relaxed)
    }
}

/// Subscriber states by msisdn, plus whether they can be trusted right now.
#[derive(Debug)]
pub struct ConsentStore {
    states: DashMap<Box<str>, SubscriberState>,
    /// Set once every control partition was read to its end at start.
    caught_up: AtomicBool,
    /// When the follower last saw every partition at its end (ms since `epoch`).
    confirmed_ms: AtomicU64,
    epoch: Instant,
    max_staleness: Duration,
    /// Control events applied.
    pub applied: AtomicU64,
    /// Control events refused (malformed); each is logged with its position.
    pub refused: AtomicU64,
    /// Commit-to-effect delays.
    pub delays: DelayHistogram,
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

impl ConsentStore {
    /// An empty table that counts as stale until the follower has caught up.
    pub fn new(max_staleness: Duration) -> ConsentStore {
        ConsentStore {
            states: DashMap::new(),
            caught_up: AtomicBool::new(false),
            confirmed_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            max_staleness,
            applied: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            delays: DelayHistogram::default(),
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
        if !self.caught_up() {
            return false;
        }
        let confirmed =
            self.epoch + Duration::from_millis(self.confirmed_ms.load(Ordering::Acquire));
        now.saturating_duration_since(confirmed) <= self.max_staleness
    }

    /// How long the table has been stale at `now` (zero while it is fresh).
    pub fn stale_for(&self, now: Instant) -> Duration {
        let confirmed =
            self.epoch + Duration::from_millis(self.confirmed_ms.load(Ordering::Acquire));
        now.saturating_duration_since(confirmed + self.max_staleness)
    }

    /// The state to route a subscriber's record with.
    pub fn view(&self, msisdn: &str, fresh: bool) -> SubscriberState {
        let known = self.states.get(msisdn).map(|s| *s).unwrap_or_default();
        if fresh { known } else { fail_closed(known) }
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
        self.confirmed_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Applies one control-topic message: an event, or a tombstone (no payload) that
    /// removes what its key set, so the table always equals a fresh read of the
    /// compacted topic.
    pub fn apply_message(&self, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<(), String> {
        match payload {
            Some(p) => {
                let ev = json::decode_control(p)?;
                self.states
                    .entry(ev.msisdn.as_str().into())
                    .or_default()
                    .apply(&ev.change, ev.at);
            }
            None => {
                let key = key
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .ok_or("tombstone without a UTF-8 key")?;
                let mut parts = key.splitn(3, '/');
                let (Some(msisdn), Some(kind)) = (parts.next(), parts.next()) else {
                    return Err("tombstone key is not msisdn/type[/purpose]".into());
                };
                let purpose = parts.next().map(Purpose::from_id);
                if let Some(mut s) = self.states.get_mut(msisdn) {
                    match (kind, purpose) {
                        ("consent", Some(Some(p))) => s.consented.set(p, false),
                        ("objection", Some(Some(p))) => s.objected.set(p, false),
                        ("restriction", None) => s.restricted = false,
                        ("contract_ended", None) => s.contract_ended = None,
                        ("erasure", None) => {
                            s.erased_at = None;
                            s.regranted = Default::default();
                        }
                        // Settlements only ever move forward; forgetting one would let
                        // late records of a settled period live again.
                        ("invoice_settled", _) => {}
                        _ => return Err("tombstone key names no known setting".into()),
                    }
                }
            }
        }
        self.applied.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn mark_caught_up_for_test(&self) {
        self.caught_up.store(true, Ordering::Release);
        self.confirm(Instant::now());
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
/// its end, and keeps confirming freshness at every end reached after that. Returns once
/// the consumer is assigned; `stop` ends the thread.
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

/// What the follower knows about one control partition.
struct PartitionEnd {
    id: i32,
    /// The high watermark librdkafka had cached when it last reported this partition's
    /// end, until the next message arrives. The end is reported past transaction
    /// markers, which the consumed position alone would not show.
    end_high: Option<i64>,
}

fn follow(
    consumer: BaseConsumer<ControlContext>,
    topic: &str,
    partitions: &[i32],
    store: &ConsentStore,
    stop: &AtomicBool,
) {
    let mut parts: Vec<PartitionEnd> = partitions
        .iter()
        .map(|&id| PartitionEnd { id, end_high: None })
        .collect();
    let mut last_check = Instant::now();
    let mut last_metadata = Instant::now();
    let throttle = super::Throttle::default();
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                if let Some(pe) = parts.iter_mut().find(|pe| pe.id == m.partition()) {
                    pe.end_high = None;
                }
                match store.apply_message(m.key(), m.payload()) {
                    Ok(()) => {
                        // Only live events: the initial read replays history, whose age
                        // says nothing about how fast changes take effect.
                        if let Some(ts) = m.timestamp().to_millis().filter(|_| store.caught_up()) {
                            let now_ms = SystemTime::now()
                                .duration_since(UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as i64);
                            let delay =
                                Duration::from_millis(now_ms.saturating_sub(ts).max(0) as u64);
                            store.delays.record(delay);
                            metrics::histogram!("cdrguard_control_apply_delay_seconds")
                                .record(delay.as_secs_f64());
                        }
                    }
                    Err(_reason) => {
                        store.refused.fetch_add(1, Ordering::Relaxed);
                        // The reason may quote the payload (an msisdn): log where, not what.
                        tracing::warn!(
                            topic,
                            partition = m.partition(),
                            offset = m.offset(),
                            "control event refused (malformed); it stays on the topic at this position"
                        );
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                let high = cached_high(&consumer, topic, p);
                if let Some(pe) = parts.iter_mut().find(|pe| pe.id == p) {
                    pe.end_high = Some(high.unwrap_or(0));
                }
                if parts.iter().all(|pe| pe.end_high.is_some()) && !store.caught_up() {
                    store.confirm(Instant::now());
                    store.caught_up.store(true, Ordering::Release);
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
        if last_metadata.elapsed() >= METADATA_EVERY {
            follow_new_partitions(&consumer, topic, &mut parts);
            last_metadata = Instant::now();
        }
        if store.caught_up() && last_check.elapsed() >= CHECK_EVERY {
            let started = Instant::now();
            if is_current(&consumer, topic, &parts) {
                store.confirm(started);
            }
            last_check = Instant::now();
        }
    }
}

/// How often the follower proves the table current while following live.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often it looks for partitions added to the control topic.
const METADATA_EVERY: Duration = Duration::from_secs(5);

/// The high watermark librdkafka cached from its last fetch of a partition (no request).
fn cached_high(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the topic is a
    // NUL-terminated string that outlives the call; librdkafka only writes the two
    // out-parameters, which are valid i64s on this stack frame.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Partitions added to the control topic are read from their beginning; until they have
/// been read to their end the table is not current (see [`is_current`]).
fn follow_new_partitions(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    parts: &mut Vec<PartitionEnd>,
) {
    let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            if !parts.iter().any(|pe| pe.id == p.id())
                && tpl
                    .add_partition_offset(topic, p.id(), Offset::Beginning)
                    .is_ok()
            {
                parts.push(PartitionEnd {
                    id: p.id(),
                    end_high: None,
                });
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

/// Whether every partition is consumed to its end, proven by asking the broker for the
/// latest offsets (one request for all partitions; under read_committed the broker
/// answers with the last stable offset). A partition counts when its position, or the
/// high watermark cached when it last reached its end, is at least that. A broker that
/// does not answer proves nothing, so an outage makes the table stale.
fn is_current(
    consumer: &BaseConsumer<ControlContext>,
    topic: &str,
    parts: &[PartitionEnd],
) -> bool {
    let Ok(pos) = consumer.position() else {
        return false;
    };
    let mut query = TopicPartitionList::new();
    for pe in parts {
        // A timestamp of -1 asks for the latest offset.
        if query
            .add_partition_offset(topic, pe.id, Offset::End)
            .is_err()
        {
            return false;
        }
    }
    let Ok(latest) = consumer.offsets_for_times(query, Duration::from_secs(2)) else {
        return false;
    };
    parts.iter().all(|pe| {
        let Some(Offset::Offset(end)) = latest
            .find_partition(topic, pe.id)
            .filter(|e| e.error().is_ok())
            .map(|e| e.offset())
        else {
            return false;
        };
        let consumed = match pos.find_partition(topic, pe.id).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        };
        consumed.max(pe.end_high.unwrap_or(-1)) >= end
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_tombstones_build_the_table() {
        let s = ConsentStore::new(Duration::from_secs(10));
        s.apply_message(
            Some(b"+46701234567/consent/marketing"),
            Some(br#"{"type":"consent","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"marketing","granted":true}"#),
        )
        .unwrap();
        s.mark_caught_up_for_test();
        let now = Instant::now();
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
        s.mark_caught_up_for_test();
        assert!(!s.fresh(Instant::now() + Duration::from_secs(11)));
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
    fn delay_quantiles_bound_the_values() {
        let h = DelayHistogram::default();
        assert_eq!(h.quantile_upper_ms(0.99), None);
        for ms in [3, 4, 4, 8, 40, 40, 40, 40, 40, 900] {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.quantile_upper_ms(0.5), Some(50));
        assert_eq!(h.quantile_upper_ms(0.99), Some(1000));
        assert_eq!(h.max_ms(), 900);
    }
}
