//! Instruments of the end-to-end benchmark (`benches/e2e/run.sh`), each a small Kafka
//! client the Python driver starts beside a contender:
//!
//! - `offsets`: the group's committed offsets on the input topic, summed over its
//!   partitions, once a period (a JSON line each): the sustained rate comes from them.
//! - `probe`: a `read_committed` consumer of one output topic from its start; for every
//!   copy, the time from the copy's Kafka timestamp (CreateTime: when the contender
//!   handed it to its producer) to the moment it became visible here. At full speed
//!   the input waits in a backlog, so this is what the commit cycle adds under load.
//!   It also counts record ids seen twice (there must be none on a route with at most
//!   one copy per record).
//! - `live`: a paced producer feeding records at a fixed rate, each stamped with the
//!   instant it is sent, and a `read_committed` probe of one output topic that finds
//!   each copy's record by its `record_id`: record-to-committed latency.
//! - `delete`: deletes topics (every run's output, so the broker's disk stays small).
//!
//! Each prints one JSON line of results on stdout (`offsets`: one per period) and stops
//! at SIGTERM or SIGINT, or (`live`) once its records are sent and their copies seen.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdrguard::adapters::frames::{Frame, FrameReader};
use cdrguard::codec::{Format, json};
use clap::{Parser, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[derive(Parser)]
#[command(about = "Instruments of the end-to-end benchmark")]
struct Args {
    /// bootstrap.servers
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the group's committed offsets on a topic (summed) every period.
    Offsets {
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
    },
    /// Copy CreateTime to visible, for every copy of one output topic.
    Probe {
        #[arg(long)]
        topic: String,
    },
    /// Send records at a fixed rate and time each one to its copy on an output topic.
    Live {
        /// Input topic.
        #[arg(long)]
        input: String,
        /// JSON lines, as `cdrguard generate` writes them.
        #[arg(long)]
        records: PathBuf,
        /// Records per second.
        #[arg(long)]
        rate: f64,
        /// The output topic whose copies carry each record's record_id.
        #[arg(long)]
        probe_topic: String,
        /// After the last send, how long without a new copy ends the wait.
        #[arg(long, default_value_t = 3000)]
        quiet_ms: u64,
        /// Records sent first, unpaced and untimed; the paced ones start once a copy of
        /// them is visible (the contender is up and routing).
        #[arg(long, default_value_t = 200)]
        warmup: u64,
    },
    /// Delete topics.
    Delete {
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
    },
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let result = match &args.cmd {
        Cmd::Offsets {
            group,
            topic,
            every_ms,
        } => offsets(&args.brokers, group, topic, *every_ms),
        Cmd::Probe { topic } => probe(&args.brokers, topic),
        Cmd::Live {
            input,
            records,
            rate,
            probe_topic,
            quiet_ms,
            warmup,
        } => live(
            &args.brokers,
            input,
            records,
            *rate,
            probe_topic,
            *quiet_ms,
            *warmup,
        ),
        Cmd::Delete { topics } => delete(&args.brokers, topics),
    };
    if let Err(e) = result {
        eprintln!("e2e_meter: {e}");
        std::process::exit(1);
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Every partition of `topic`, at `offset`.
fn partitions(
    c: &BaseConsumer,
    topic: &str,
    offset: Offset,
) -> Result<TopicPartitionList, Failure> {
    // A topic created a moment ago may not be in the broker's metadata yet (seen on a
    // loaded machine): ask again for a while before calling it missing.
    let asking = Instant::now();
    loop {
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(30))?;
        if let Some(t) = md.topics().first().filter(|t| !t.partitions().is_empty()) {
            let mut tpl = TopicPartitionList::new();
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), offset)?;
            }
            return Ok(tpl);
        }
        if asking.elapsed() > Duration::from_secs(15) {
            return Err(format!("topic {topic} not found").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn offsets(brokers: &str, group: &str, topic: &str, every_ms: u64) -> Result<(), Failure> {
    // read_uncommitted: the last offsets committed, without waiting for pending ones.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let tpl = partitions(&c, topic, Offset::Invalid)?;
    let every = Duration::from_millis(every_ms);
    let mut next = Instant::now();
    let out = std::io::stdout();
    while !STOP.load(Ordering::Relaxed) {
        let t = now_ms();
        if let Ok(committed) = c.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            let sum: i64 = committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .sum();
            let mut o = out.lock();
            writeln!(o, "{{\"t_ms\":{t},\"committed\":{sum}}}")?;
            o.flush()?;
        }
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(())
}

/// A read_committed consumer of every partition of `topic` from its start.
fn committed_reader(brokers: &str, topic: &str) -> Result<BaseConsumer, Failure> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("e2e-probe-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.queue.backoff.ms", "5")
        .create()?;
    let tpl = partitions(&c, topic, Offset::Beginning)?;
    c.assign(&tpl)?;
    Ok(c)
}

/// The value of the first `"record_id":"..."` in a JSON payload.
fn record_id(payload: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"record_id\":\"";
    let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = payload[at..].iter().position(|&b| b == b'"')?;
    Some(&payload[at..at + len])
}

/// Latencies in ms and what they summarise to.
#[derive(Default)]
struct Latencies {
    ms: Vec<i64>,
}

impl Latencies {
    fn summary(&mut self) -> String {
        self.ms.sort_unstable();
        let q = |f: f64| -> i64 {
            if self.ms.is_empty() {
                return -1;
            }
            let i = ((f * self.ms.len() as f64).ceil() as usize).clamp(1, self.ms.len()) - 1;
            self.ms[i]
        };
        format!(
            "\"count\":{},\"p50_ms\":{},\"p99_ms\":{},\"p999_ms\":{},\"max_ms\":{}",
            self.ms.len(),
            q(0.5),
            q(0.99),
            q(0.999),
            self.ms.last().copied().unwrap_or(-1)
        )
    }
}

fn probe(brokers: &str, topic: &str) -> Result<(), Failure> {
    let c = committed_reader(brokers, topic)?;
    let mut lat = Latencies::default();
    let mut ids: HashSet<Vec<u8>> = HashSet::new();
    let mut duplicates = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        let Some(polled) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = polled?;
        let seen = now_ms();
        if let Some(ts) = m.timestamp().to_millis() {
            lat.ms.push(seen - ts);
        }
        if let Some(id) = m.payload().and_then(record_id)
            && !ids.insert(id.to_vec())
        {
            duplicates += 1;
        }
    }
    println!(
        "{{{},\"distinct_ids\":{},\"duplicate_ids\":{duplicates}}}",
        lat.summary(),
        ids.len()
    );
    Ok(())
}

fn live(
    brokers: &str,
    input: &str,
    records: &PathBuf,
    rate: f64,
    probe_topic: &str,
    quiet_ms: u64,
    warmup: u64,
) -> Result<(), Failure> {
    let sent: Arc<Mutex<HashMap<Vec<u8>, i64>>> = Arc::default();
    let done_sending = Arc::new(AtomicBool::new(false));
    let seen_any = Arc::new(AtomicBool::new(false));
    let reader = committed_reader(brokers, probe_topic)?;
    let probe = {
        let sent = Arc::clone(&sent);
        let done = Arc::clone(&done_sending);
        let seen = Arc::clone(&seen_any);
        std::thread::spawn(move || probe_live(reader, sent, done, seen, quiet_ms))
    };
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()?;
    let file = std::fs::File::open(records)?;
    let mut frames = FrameReader::new(std::io::BufReader::new(file), Format::Json);
    let mut started = Instant::now();
    let mut n = 0u64;
    let mut warm = 0u64;
    while let Some(frame) = frames.next_frame()? {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let Frame::Whole(_, line) = frame else {
            continue;
        };
        let Ok(r) = json::decode_record(line) else {
            continue;
        };
        if warm < warmup {
            send(
                &producer,
                BaseRecord::to(input).payload(line).key(r.msisdn.as_bytes()),
            )?;
            warm += 1;
            if warm == warmup {
                producer.flush(Duration::from_secs(60))?;
                let waiting = Instant::now();
                while !seen_any.load(Ordering::Acquire) {
                    if STOP.load(Ordering::Relaxed) || waiting.elapsed() > Duration::from_secs(300)
                    {
                        return Err("no copy of the warm-up records within 300 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                started = Instant::now();
                // For the driver: the timed part begins (it takes the contender's
                // metrics from here). The final summary line comes last.
                println!("{{\"event\":\"paced\"}}");
                std::io::Write::flush(&mut std::io::stdout())?;
            }
            continue;
        }
        // Paced: the n-th record leaves n / rate seconds after the first.
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let ts = now_ms();
        sent.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.record_id.as_bytes().to_vec(), ts);
        send(
            &producer,
            BaseRecord::to(input)
                .payload(line)
                .key(r.msisdn.as_bytes())
                .timestamp(ts),
        )?;
        n += 1;
    }
    let send_s = started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(60))?;
    done_sending.store(true, Ordering::Release);
    let (mut lat, unmatched) = probe.join().map_err(|_| "the probe thread panicked")??;
    println!(
        "{{{},\"sent\":{n},\"send_rate\":{:.1},\"copies_not_matched\":{unmatched}}}",
        lat.summary(),
        n as f64 / send_s.max(1e-9)
    );
    Ok(())
}

/// Sends one message, waiting while the local queue is full.
fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    mut rec: BaseRecord<'_, [u8], [u8]>,
) -> Result<(), Failure> {
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// The live probe: latency from each record's send instant to its copy, until the
/// sender is done and no copy came for `quiet_ms`.
fn probe_live(
    c: BaseConsumer,
    sent: Arc<Mutex<HashMap<Vec<u8>, i64>>>,
    done: Arc<AtomicBool>,
    seen_any: Arc<AtomicBool>,
    quiet_ms: u64,
) -> Result<(Latencies, u64), Failure> {
    let mut lat = Latencies::default();
    let mut unmatched = 0u64;
    let mut last_copy = Instant::now();
    let quiet = Duration::from_millis(quiet_ms);
    loop {
        if STOP.load(Ordering::Relaxed)
            || (done.load(Ordering::Acquire) && last_copy.elapsed() > quiet)
        {
            return Ok((lat, unmatched));
        }
        let Some(polled) = c.poll(Duration::from_millis(50)) else {
            continue;
        };
        let m = polled?;
        let seen = now_ms();
        last_copy = Instant::now();
        seen_any.store(true, Ordering::Release);
        let at = m
            .payload()
            .and_then(record_id)
            .and_then(|id| sent.lock().unwrap_or_else(|p| p.into_inner()).remove(id));
        match at {
            Some(ts) => lat.ms.push(seen - ts),
            None => unmatched += 1,
        }
    }
}

fn delete(brokers: &str, topics: &[String]) -> Result<(), Failure> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(admin.delete_topics(&names, &opts))?;
    let mut deleted = 0;
    for r in results {
        match r {
            Ok(_) => deleted += 1,
            Err((t, RDKafkaErrorCode::UnknownTopicOrPartition)) => eprintln!("{t}: not found"),
            Err((t, e)) => return Err(format!("deleting {t}: {e}").into()),
        }
    }
    println!("{{\"deleted\":{deleted}}}");
    Ok(())
}
