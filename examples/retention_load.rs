//! Load for the retention benchmark (`benches/retention.sh`), against a real broker.
//!
//! `fill` writes a schedule topic as `cdrguard run` would have written it for a million
//! subscribers: their windows come from the core's schedule (`Schedule::track` over each
//! subscriber's copies, the subject named as each route's copies name it under the key
//! file) and are encoded by the run's own entry encoding, each subscriber's entries in
//! one partition. It prints how many windows it wrote and when the first million of them
//! fall due (`--due`, default a million), so the benchmark can start a run's clock there.
//!
//! `rights` measures control event to expiry committed: it sends erasure events one at a
//! time and waits, as a `read_committed` consumer of the retention topic, for the first
//! expiry naming that subscriber; it prints the latencies' quantiles.
//!
//! ```sh
//! cargo run --release --example retention_load -- fill --brokers 127.0.0.1:9092 \
//!     --topic bench.schedule --partitions 4 --subscribers 1000000 --keys keys.toml
//! cargo run --release --example retention_load -- rights --brokers 127.0.0.1:9092 \
//!     --control bench.control --retention bench.retention --subscribers 1000000 \
//!     --keys keys.toml --events 200 --at 2026-10-01T00:00:00.000Z
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cdrguard::adapters::kafka::retention::entries;
use cdrguard::adapters::keyfile;
use cdrguard::codec::json;
use cdrguard::core::pseudonym::Keyring;
use cdrguard::core::retention::schedule::{Persist, Schedule};
use cdrguard::core::retention::{Anchors, ScheduleEntry};
use cdrguard::core::treat::subscriber_ref;
use cdrguard::policy::{Policy, load_file, parse_policy, shipped};
use cdrguard::vocab::purpose::Purpose;
use cdrguard::vocab::time::{DAY_MS, HOUR_MS, Millis};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Subscribers whose windows are built, encoded and sent at a time.
const CHUNK: u64 = 20_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        eprintln!("usage: retention_load fill|rights --brokers ... (see the file's header)");
        std::process::exit(2);
    };
    let opts = Opts::parse(&args[1..]);
    let result = match mode.as_str() {
        "fill" => fill(&opts),
        "rights" => rights(&opts),
        other => Err(format!("unknown mode {other}")),
    };
    if let Err(e) = result {
        eprintln!("retention_load: {e}");
        std::process::exit(1);
    }
}

/// `--name value` pairs.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let mut m = HashMap::new();
        for pair in args.chunks(2) {
            if let [k, v] = pair {
                m.insert(k.trim_start_matches("--").to_string(), v.clone());
            }
        }
        Opts(m)
    }

    fn get(&self, k: &str) -> Result<&str, String> {
        self.0
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| format!("--{k} is required"))
    }

    fn or<'a>(&'a self, k: &str, default: &'a str) -> &'a str {
        self.0.get(k).map_or(default, String::as_str)
    }

    fn number(&self, k: &str, default: u64) -> Result<u64, String> {
        self.or(k, &default.to_string())
            .parse()
            .map_err(|_| format!("--{k} must be a number"))
    }
}

fn policy(o: &Opts) -> Result<Policy, String> {
    let p = o.or("policy", "excedo");
    match shipped(p) {
        Some(text) => parse_policy(text, p).map_err(|e| e.to_string()),
        None => load_file(&PathBuf::from(p)).map_err(|e| e.to_string()),
    }
}

fn keys(o: &Opts) -> Result<Keyring, String> {
    keyfile::load(&PathBuf::from(o.get("keys")?)).map_err(|e| e.to_string())
}

fn msisdn(i: u64) -> String {
    format!("+4670{i:07}")
}

/// The copies of subscriber `i`: (route, record time). Ten windows each under the shipped
/// policies' rules: three invoice hours waiting for settlement, three fraud days, two
/// analytics days, a marketing day, a troubleshooting contract window. Subscribers' first
/// days spread over `spread` days from `start`.
fn copies(i: u64, start: Millis, spread: u64) -> Vec<(Purpose, Millis)> {
    let day0 = start.0 + (i % spread) as i64 * DAY_MS;
    let hour = (i % 24) as i64 * HOUR_MS;
    let mut out = Vec::with_capacity(10);
    for h in 0..3 {
        out.push((
            Purpose::Billing,
            Millis(day0 + hour + h * 5 * HOUR_MS % DAY_MS),
        ));
    }
    for d in 0..3 {
        out.push((Purpose::Fraud, Millis(day0 + d * DAY_MS + hour)));
    }
    for d in 0..2 {
        out.push((Purpose::Analytics, Millis(day0 + d * DAY_MS + hour)));
    }
    out.push((Purpose::Marketing, Millis(day0 + hour)));
    out.push((Purpose::Troubleshooting, Millis(day0 + hour)));
    out
}

fn producer(brokers: &str, compression: &str) -> Result<BaseProducer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "50")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        // `none` by default, as `run`'s producer writes them unless configured otherwise.
        .set("compression.type", compression)
        .set("queue.buffering.max.messages", "500000")
        .create()
        .map_err(|e| e.to_string())
}

/// Sends one message, waiting while the producer's queue is full.
fn send(
    p: &BaseProducer,
    topic: &str,
    partition: i32,
    key: &str,
    value: Option<&[u8]>,
) -> Result<(), String> {
    let mut rec = BaseRecord::<str, [u8]>::to(topic)
        .key(key)
        .partition(partition);
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                p.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e.to_string()),
        }
    }
}

fn fill(o: &Opts) -> Result<(), String> {
    let policy = policy(o)?;
    let keys = keys(o)?;
    let topic = o.get("topic")?;
    let partitions = o.number("partitions", 4)? as i32;
    let subscribers = o.number("subscribers", 1_000_000)?;
    let spread = o.number("spread-days", 365)?.max(1);
    let start = Millis::parse(o.or("start", "2026-01-01T00:00:00.000Z"))
        .map_err(|_| "--start must be an instant".to_string())?;
    let producer = producer(o.get("brokers")?, o.or("compression", "none"))?;
    let t0 = Instant::now();
    let (mut windows, mut messages) = (0u64, 0u64);
    // Windows by deadline, to tell when the first million fall due.
    let mut by_deadline: BTreeMap<Millis, u64> = BTreeMap::new();
    let mut from = 0;
    while from < subscribers {
        let to = (from + CHUNK).min(subscribers);
        let mut schedules: Vec<Schedule> = (0..partitions)
            .map(|_| Schedule::new(&policy).with_journal())
            .collect();
        for i in from..to {
            let m = msisdn(i);
            let s = &mut schedules[(i % partitions as u64) as usize];
            for (purpose, t) in copies(i, start, spread) {
                let Some(rule) = policy.rule(purpose) else {
                    continue;
                };
                let subject = subscriber_ref(rule, &keys, &m);
                s.track(
                    &ScheduleEntry {
                        purpose,
                        subscriber: subject.as_ref().map(|t| t.as_str()),
                        record_time: t,
                        rule: &rule.retention,
                    },
                    Anchors::default(),
                );
            }
        }
        for (p, s) in schedules.iter_mut().enumerate() {
            for change in s.drain_changes() {
                if let Persist::Window(_, Some(st)) = &change {
                    windows += 1;
                    if let Some(d) = st.deadline {
                        *by_deadline.entry(d).or_default() += 1;
                    }
                }
                let (key, value) = entries::encode(&change, &policy);
                send(&producer, topic, p as i32, &key, value.as_deref())?;
                messages += 1;
            }
        }
        producer.poll(Duration::ZERO);
        from = to;
    }
    producer
        .flush(Duration::from_secs(300))
        .map_err(|e| e.to_string())?;
    // When the first `--due` windows fall due, and the deadline after that.
    let wanted = o.number("due", 1_000_000)?;
    let mut due = 0u64;
    let mut first_million = None;
    let mut next = None;
    for (d, n) in &by_deadline {
        if first_million.is_some() {
            next = Some((*d, *n));
            break;
        }
        due += n;
        if due >= wanted {
            first_million = Some(*d);
        }
    }
    println!(
        "windows={windows} messages={messages} took_s={:.1}",
        t0.elapsed().as_secs_f64()
    );
    if let Some(d) = first_million {
        println!("due_at={d} due_then={due}");
    }
    if let Some((d, n)) = next {
        println!("next_deadline={d} due_at_next={n}");
    }
    Ok(())
}

/// A pseudo-random sequence, so runs pick the same subscribers.
fn pick(k: u64, subscribers: u64) -> u64 {
    k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % subscribers
}

fn rights(o: &Opts) -> Result<(), String> {
    let policy = policy(o)?;
    let keys = keys(o)?;
    let brokers = o.get("brokers")?;
    let control = o.get("control")?;
    let retention = o.get("retention")?;
    let subscribers = o.number("subscribers", 1_000_000)?;
    let events = o.number("events", 200)?;
    let at = o.get("at")?;
    let producer = producer(brokers, "none")?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "retention-load")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(|e| e.to_string())?;
    let md = consumer
        .fetch_metadata(Some(retention), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(retention, p.id(), Offset::End)
                .map_err(|e| e.to_string())?;
        }
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    // Let the assignment settle at the end before the first event.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        consumer.poll(Duration::from_millis(50));
    }
    let mut latencies = Vec::new();
    let mut missed = 0;
    for k in 0..events {
        let m = msisdn(pick(k + 1, subscribers));
        let names: Vec<String> = policy
            .declared()
            .filter_map(|r| subscriber_ref(r, &keys, &m).map(|t| t.as_str().to_string()))
            .collect();
        let line = format!(r#"{{"type":"erasure","msisdn":"{m}","at":"{at}"}}"#);
        let ev = json::decode_control(line.as_bytes()).map_err(|e| e.to_string())?;
        let sent = Instant::now();
        send(&producer, control, -1, &ev.key(), Some(line.as_bytes()))?;
        producer
            .flush(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let deadline = sent + Duration::from_secs(30);
        let mut seen = None;
        while seen.is_none() && Instant::now() < deadline {
            if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(5)) {
                let v: serde_json::Value =
                    serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap_or_default();
                let named = v["subscriber"]
                    .as_str()
                    .is_some_and(|s| names.iter().any(|n| n == s));
                if named && v["reason"] == "erasure" {
                    seen = Some(sent.elapsed());
                }
            }
        }
        match seen {
            Some(d) => latencies.push(d),
            None => missed += 1,
        }
    }
    latencies.sort();
    let q = |f: f64| {
        latencies
            .get(((latencies.len() as f64 * f).ceil() as usize).saturating_sub(1))
            .map_or(0, |d| d.as_millis())
    };
    println!(
        "events={events} seen={} missed={missed} p50_ms={} p90_ms={} p99_ms={} max_ms={}",
        latencies.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        latencies.last().map_or(0, |d| d.as_millis())
    );
    Ok(())
}
