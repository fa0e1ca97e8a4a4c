//! The no-op relay of the end-to-end benchmark (`benches/e2e/run.sh`): the fastest
//! correct exactly-once Kafka relay we could write, so that `cdrguard run` is measured
//! against the practical limit of the machine, not against a naive loop.
//!
//! It reads the input topic of a cdrguard configuration (same brokers, client settings,
//! group, `commit_interval_ms` and `commit_max_records`, through cdrguard's own
//! `consumer_config` and `producer_config`), and writes each record's bytes and key,
//! unchanged, as many times to each output topic as `--route TOPIC=RATE` says (RATE
//! messages per input record, fractions spread evenly), so it writes as many messages
//! of about the same size as cdrguard does. Offsets go with each transaction
//! (`send_offsets_to_transaction` with the consumer's group metadata: EOS v2).
//!
//! Two transactional producers take turns: while one commits (flush, offsets, EndTxn),
//! the other already carries the next interval's copies, so consuming and producing
//! never stop for a commit's round trips. What keeps that exactly once:
//!
//! - each transaction's offsets are the next offsets of exactly the records whose copies
//!   that producer sent in it, per partition;
//! - commits are serialised (one committer thread; a lane is handed over only after the
//!   other lane's commit ended), so committed offsets only move forward;
//! - a lane starts sending only after the lane before it has flushed (every copy
//!   acknowledged), so copies stay in input order within each output partition;
//! - a failed commit aborts both open transactions (the committer refuses any commit
//!   queued behind a failed one: its records follow the failed one's) and rewinds the
//!   consumer to the group's committed offsets; a fatal error ends the process
//!   (status 1);
//! - a revocation commits both lanes before the partitions go; lost partitions abort
//!   (another member may own them already; the broker fences our offsets by generation).
//!
//! Delivery reports are asked for failures only (`delivery.report.only.error`): under
//! transactions a failed copy fails the commit anyway, so a success report would only
//! cost work. Every other client setting is cdrguard's.
//!
//! ```sh
//! cargo run --release --example relay -- --config bench.toml \
//!     --route bench.billing=0.995 --route bench.schedule=2.4 --route bench.fraud=0.995
//! ```
//!
//! Runs until SIGTERM or SIGINT, then commits what it holds and prints one JSON line of
//! counters on stdout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdrguard::adapters::kafka::config::{self, RunConfig};
use cdrguard::adapters::kafka::{consumer_config, producer_config};
use clap::Parser;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

#[derive(Parser)]
#[command(about = "Exactly-once no-op relay: the end-to-end benchmark's yardstick")]
struct Args {
    /// cdrguard configuration: brokers, client properties, group, input topic, commit
    /// interval and size; `transactional_id` with -a and -b appended names the two
    /// producers.
    #[arg(long)]
    config: PathBuf,
    /// An output topic and how many messages per input record go to it (repeatable).
    #[arg(long = "route", value_parser = parse_route, required = true)]
    routes: Vec<(String, f64)>,
    /// Ask for every delivery report, not only failures.
    #[arg(long)]
    all_reports: bool,
    /// Give every message, except those to the configuration's schedule topic, the nine
    /// headers a cdrguard copy carries (DESIGN.md's names, values of a billing copy's
    /// length): what the headers alone cost, apart from cdrguard's work.
    #[arg(long)]
    copy_headers: bool,
}

/// A billing copy's headers as cdrguard writes them (values of typical length).
const COPY_HEADERS: [(&str, &str); 9] = [
    ("record_id", "e2e-0000000000000000123456"),
    ("purpose", "billing"),
    ("legal_basis", "contract"),
    ("gdpr_article", "6(1)(b)"),
    ("policy", "excedo@2026-01-01"),
    ("consent", "not_required"),
    ("treatments", "imei=drop,cell_id=generalise"),
    ("key_id", ""),
    ("retention", "excedo.billing"),
];

fn parse_route(s: &str) -> Result<(String, f64), String> {
    let (topic, rate) = s.split_once('=').ok_or("expected TOPIC=RATE")?;
    let rate: f64 = rate.parse().map_err(|e| format!("rate {rate}: {e}"))?;
    if topic.is_empty() || !(0.0..=1000.0).contains(&rate) {
        return Err(format!("bad route {s}"));
    }
    Ok((topic.to_string(), rate))
}

/// The allocator cdrguard runs with (mimalloc, also librdkafka's `malloc` through its
/// `override` feature): librdkafka allocates each message and header on the sending
/// thread and frees it on its broker thread, which glibc's malloc does slowly. With the
/// same allocator the relay stays the fastest we can write, and `relay-headers` measures
/// the headers, not glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    match run(&args) {
        Ok(stats) => println!("{stats}"),
        Err(e) => {
            eprintln!("relay: {e}");
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<String, Failure> {
    let cfg = config::load(&args.config, std::env::vars())?;
    let relay = Arc::new(Mutex::new(Relay::new(&cfg, args)?));
    let mut consumer_cfg = consumer_config(&cfg);
    // One consumer, the classic protocol (eager: every revocation is whole).
    consumer_cfg.set("group.protocol", "classic");
    let consumer: BaseConsumer<Rebalancing> = consumer_cfg.create_with_context(Rebalancing {
        relay: Arc::clone(&relay),
    })?;
    consumer.subscribe(&[cfg.input_topic.as_str()])?;
    let poll_max = Duration::from_millis(20);
    while !STOP.load(Ordering::Relaxed) {
        // The rebalance callback runs inside poll and takes the lock: never hold it here.
        let polled = consumer.poll(poll_max);
        let mut r = relay.lock().unwrap_or_else(|p| p.into_inner());
        match polled {
            Some(Ok(m)) => r.relay(&m, &consumer)?,
            Some(Err(e)) => {
                if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
                    return Err(e.into());
                }
                eprintln!("relay: consumer: {e}");
            }
            None => {}
        }
        r.take_events(&consumer)?;
        if r.due() {
            r.hand_over(&consumer)?;
        }
    }
    let mut r = relay.lock().unwrap_or_else(|p| p.into_inner());
    r.commit_all(&consumer)?;
    drop(r);
    consumer.unsubscribe();
    let r = relay.lock().unwrap_or_else(|p| p.into_inner());
    Ok(r.stats_line())
}

/// The consumer's context: a revocation commits what the lanes hold before the
/// partitions go, lost partitions abort it.
struct Rebalancing {
    relay: Arc<Mutex<Relay>>,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut r = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match rebalance {
            Rebalance::Revoke(_) if consumer.assignment_lost() => r.abort_all(),
            Rebalance::Revoke(_) => r.commit_all(consumer),
            Rebalance::Assign(_) => Ok(()),
            Rebalance::Error(e) => {
                eprintln!("relay: rebalance error: {e}");
                Ok(())
            }
        };
        if let Err(e) = outcome {
            // Nothing the callback can return: end the process; the open transactions
            // are aborted by the next start's fencing or by the broker's timeout.
            eprintln!("relay: during a rebalance: {e}");
            std::process::exit(1);
        }
    }
}

/// The producers' context: delivery failures counted (they fail the commit too).
#[derive(Default)]
struct Quiet {
    failed: AtomicU64,
}

impl ClientContext for Quiet {}

impl ProducerContext for Quiet {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type TxProducer = ThreadedProducer<Quiet>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No transaction open; one is begun at the first record.
    Idle,
    /// A transaction is open and takes this interval's copies.
    Filling,
    /// Handed to the committer; `flushed` tells whether every copy is acknowledged.
    Committing { flushed: bool },
}

/// One transactional producer and what its open transaction holds.
struct Lane {
    producer: TxProducer,
    state: State,
    /// Next offset per input partition of the records whose copies this transaction
    /// carries: exactly what its commit may acknowledge.
    offsets: HashMap<i32, i64>,
    records: u64,
}

/// Work for the committer thread.
enum Job {
    Commit {
        lane: usize,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    },
    /// Both lanes were aborted after a failure: commits may go on.
    Reset,
}

enum Event {
    Flushed(usize),
    Done(usize, KafkaResult<()>, Phases),
}

/// How long a commit's steps took.
#[derive(Clone, Copy, Default)]
struct Phases {
    flush: Duration,
    offsets: Duration,
    end: Duration,
}

impl Phases {
    fn add(&mut self, o: &Phases) {
        self.flush += o.flush;
        self.offsets += o.offsets;
        self.end += o.end;
    }

    fn total(&self) -> Duration {
        self.flush + self.offsets + self.end
    }
}

/// Everything the main loop and the rebalance callback share.
struct Relay {
    input: String,
    routes: Vec<(String, f64)>,
    /// Per route: whether its messages carry a copy's headers (`--copy-headers`).
    headed: Vec<bool>,
    /// Fractional messages owed per route (rate accumulators).
    owed: Vec<f64>,
    lanes: [Lane; 2],
    /// The lane taking copies now.
    fill: usize,
    began: Instant,
    interval: Duration,
    max_records: u64,
    jobs: Sender<Job>,
    events: Receiver<Event>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    records: u64,
    messages: u64,
    commits: u64,
    aborts: u64,
    commit_time: Phases,
    /// Time the main loop waited for the committer (a commit slower than an interval,
    /// or a flush before the next lane may send).
    waited: Duration,
}

impl Relay {
    fn new(cfg: &RunConfig, args: &Args) -> Result<Relay, Failure> {
        let make = |suffix: &str| -> Result<TxProducer, Failure> {
            let mut c = producer_config(cfg);
            c.set(
                "transactional.id",
                format!("{}-{suffix}", cfg.transactional_id),
            );
            if !args.all_reports {
                c.set("delivery.report.only.error", "true");
            }
            let p: TxProducer = c.create_with_context(Quiet::default())?;
            p.init_transactions(Timeout::After(Duration::from_secs(60)))?;
            Ok(p)
        };
        let lanes = [Lane::new(make("a")?), Lane::new(make("b")?)];
        let (jobs, job_rx) = channel::<Job>();
        let (event_tx, events) = channel::<Event>();
        let producers = [lanes[0].producer.clone(), lanes[1].producer.clone()];
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || committer(producers, job_rx, event_tx))?;
        Ok(Relay {
            input: cfg.input_topic.clone(),
            owed: vec![0.0; args.routes.len()],
            headed: args
                .routes
                .iter()
                .map(|(t, _)| args.copy_headers && *t != cfg.schedule_topic)
                .collect(),
            routes: args.routes.clone(),
            lanes,
            fill: 0,
            began: Instant::now(),
            interval: cfg.commit_interval,
            max_records: cfg.commit_max_records as u64,
            jobs,
            events,
            stats: Stats::default(),
        })
    }

    /// Sends one record's copies with the filling lane. A failed send (the transaction
    /// is then in an abortable state) aborts and rewinds like a failed commit.
    fn relay(
        &mut self,
        m: &BorrowedMessage<'_>,
        consumer: &BaseConsumer<Rebalancing>,
    ) -> Result<(), Failure> {
        let lane = &mut self.lanes[self.fill];
        if lane.state == State::Idle {
            lane.producer.begin_transaction()?;
            lane.state = State::Filling;
            self.began = Instant::now();
        }
        let payload = m.payload().unwrap_or_default();
        // Compacted topics (cdrguard's schedule topic) refuse messages without a key.
        let key = m.key().unwrap_or_default();
        for (i, (topic, rate)) in self.routes.iter().enumerate() {
            self.owed[i] += rate;
            while self.owed[i] >= 1.0 {
                self.owed[i] -= 1.0;
                let mut rec = BaseRecord::to(topic).payload(payload).key(key);
                if self.headed[i] {
                    let mut h = OwnedHeaders::new_with_capacity(COPY_HEADERS.len());
                    for (k, v) in COPY_HEADERS {
                        h = h.insert(Header {
                            key: k,
                            value: Some(v),
                        });
                    }
                    rec = rec.headers(h);
                }
                if let Err(e) = send(&lane.producer, rec) {
                    eprintln!("relay: send failed: {e}; aborting and rewinding");
                    if matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)) {
                        return Err(e.into());
                    }
                    return self.recover(consumer);
                }
                self.stats.messages += 1;
            }
        }
        lane.offsets.insert(m.partition(), m.offset() + 1);
        lane.records += 1;
        self.stats.records += 1;
        Ok(())
    }

    /// Whether the filling lane's transaction is due to commit.
    fn due(&self) -> bool {
        let lane = &self.lanes[self.fill];
        lane.state == State::Filling
            && (lane.records >= self.max_records || self.began.elapsed() >= self.interval)
    }

    /// Hands the filling lane to the committer and makes the other lane the filling
    /// one, once its own commit has ended and the handed-over lane has flushed.
    fn hand_over(&mut self, consumer: &BaseConsumer<Rebalancing>) -> Result<(), Failure> {
        let cur = self.fill;
        let next = 1 - cur;
        self.submit(cur, consumer)?;
        let waiting = Instant::now();
        while matches!(self.lanes[next].state, State::Committing { .. })
            || self.lanes[cur].state == (State::Committing { flushed: false })
        {
            if !self.wait_event(consumer)? {
                // A commit failed: recovery rewound everything and left both lanes idle.
                break;
            }
        }
        self.stats.waited += waiting.elapsed();
        self.fill = next;
        Ok(())
    }

    fn submit(&mut self, lane: usize, consumer: &BaseConsumer<Rebalancing>) -> Result<(), Failure> {
        let l = &mut self.lanes[lane];
        let mut offsets = TopicPartitionList::new();
        for (&p, &o) in &l.offsets {
            offsets.add_partition_offset(&self.input, p, Offset::Offset(o))?;
        }
        let group = consumer
            .group_metadata()
            .ok_or("the consumer has no group metadata")?;
        l.state = State::Committing { flushed: false };
        self.jobs
            .send(Job::Commit {
                lane,
                offsets,
                group,
            })
            .map_err(|_| "the committer thread is gone")?;
        Ok(())
    }

    /// Handles the committer's events that have arrived, without waiting.
    fn take_events(&mut self, consumer: &BaseConsumer<Rebalancing>) -> Result<(), Failure> {
        while let Ok(ev) = self.events.try_recv() {
            self.on_event(ev, consumer)?;
        }
        Ok(())
    }

    /// Waits for the committer's next event; false when it was a failed commit (the
    /// relay then recovered).
    fn wait_event(&mut self, consumer: &BaseConsumer<Rebalancing>) -> Result<bool, Failure> {
        let ev = self
            .events
            .recv()
            .map_err(|_| "the committer thread is gone")?;
        self.on_event(ev, consumer)
    }

    fn on_event(
        &mut self,
        ev: Event,
        consumer: &BaseConsumer<Rebalancing>,
    ) -> Result<bool, Failure> {
        match ev {
            Event::Flushed(l) => {
                if let State::Committing { .. } = self.lanes[l].state {
                    self.lanes[l].state = State::Committing { flushed: true };
                }
                Ok(true)
            }
            Event::Done(l, Ok(()), took) => {
                let lane = &mut self.lanes[l];
                lane.state = State::Idle;
                lane.offsets.clear();
                lane.records = 0;
                self.stats.commits += 1;
                self.stats.commit_time.add(&took);
                Ok(true)
            }
            Event::Done(l, Err(e), _) => {
                eprintln!("relay: commit of lane {l} failed: {e}; aborting and rewinding");
                if is_fatal(&e) {
                    return Err(e.into());
                }
                self.lanes[l].state = State::Filling; // open, to be aborted
                self.recover(consumer)?;
                Ok(false)
            }
        }
    }

    /// After a failed commit: aborts every open transaction and rewinds the consumer to
    /// the group's committed offsets.
    fn recover(&mut self, consumer: &BaseConsumer<Rebalancing>) -> Result<(), Failure> {
        self.abort_all()?;
        let assigned = consumer.assignment()?;
        let committed = consumer.committed_offsets(assigned, Duration::from_secs(30))?;
        for e in committed.elements() {
            let to = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            consumer.seek(e.topic(), e.partition(), to, Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Waits for a commit under way, then aborts what the lanes hold.
    fn abort_all(&mut self) -> Result<(), Failure> {
        self.drain_committer()?;
        for lane in &mut self.lanes {
            if lane.state != State::Idle {
                lane.producer.abort_transaction(Timeout::Never)?;
                lane.state = State::Idle;
                self.stats.aborts += 1;
            }
            lane.offsets.clear();
            lane.records = 0;
        }
        self.owed.iter_mut().for_each(|o| *o = 0.0);
        self.fill = 0;
        self.jobs
            .send(Job::Reset)
            .map_err(|_| "the committer thread is gone")?;
        Ok(())
    }

    /// Commits what the lanes hold (before a revocation, or at the stop), in order.
    fn commit_all(&mut self, consumer: &BaseConsumer<Rebalancing>) -> Result<(), Failure> {
        let mut failed = !self.drain_committer()?;
        if !failed && self.lanes[self.fill].state == State::Filling {
            self.submit(self.fill, consumer)?;
            failed = !self.drain_committer()?;
        }
        if failed {
            self.abort_all()?;
        }
        self.fill = 0;
        Ok(())
    }

    /// Waits until no lane is committing; false if a commit failed (its lane is then
    /// left open, for the caller to abort).
    fn drain_committer(&mut self) -> Result<bool, Failure> {
        let mut ok = true;
        while self
            .lanes
            .iter()
            .any(|l| matches!(l.state, State::Committing { .. }))
        {
            match self
                .events
                .recv()
                .map_err(|_| "the committer thread is gone")?
            {
                Event::Flushed(_) => {}
                Event::Done(l, Ok(()), took) => {
                    let lane = &mut self.lanes[l];
                    lane.state = State::Idle;
                    lane.offsets.clear();
                    lane.records = 0;
                    self.stats.commits += 1;
                    self.stats.commit_time.add(&took);
                }
                Event::Done(l, Err(e), _) => {
                    if is_fatal(&e) {
                        return Err(e.into());
                    }
                    eprintln!("relay: commit of lane {l} failed: {e}");
                    self.lanes[l].state = State::Filling;
                    ok = false;
                }
            }
        }
        Ok(ok)
    }

    fn stats_line(&self) -> String {
        let s = &self.stats;
        let mean = |d: Duration| d.as_secs_f64() * 1000.0 / s.commits.max(1) as f64;
        let failed: u64 = self
            .lanes
            .iter()
            .map(|l| l.producer.context().failed.load(Ordering::Relaxed))
            .sum();
        format!(
            "{{\"records\":{},\"messages\":{},\"commits\":{},\"aborts\":{},\"commit_ms_mean\":{:.1},\"flush_ms_mean\":{:.1},\"offsets_ms_mean\":{:.1},\"end_ms_mean\":{:.1},\"waited_ms\":{},\"failed_deliveries\":{}}}",
            s.records,
            s.messages,
            s.commits,
            s.aborts,
            mean(s.commit_time.total()),
            mean(s.commit_time.flush),
            mean(s.commit_time.offsets),
            mean(s.commit_time.end),
            s.waited.as_millis(),
            failed
        )
    }
}

impl Lane {
    fn new(producer: TxProducer) -> Lane {
        Lane {
            producer,
            state: State::Idle,
            offsets: HashMap::new(),
            records: 0,
        }
    }
}

/// Sends one message, waiting while the local queue is full.
fn send(p: &TxProducer, mut rec: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}

/// The committer thread: for each commit, flush (then tell the main loop, which may let
/// the other lane send), add the offsets, commit; retriable failures are retried. After
/// a failure, later commits are refused (their records follow the failed ones) until
/// the main loop has aborted both lanes and says so.
fn committer(producers: [TxProducer; 2], jobs: Receiver<Job>, events: Sender<Event>) {
    let mut poisoned = false;
    for job in jobs {
        let (lane, offsets, group) = match job {
            Job::Reset => {
                poisoned = false;
                continue;
            }
            Job::Commit {
                lane,
                offsets,
                group,
            } => (lane, offsets, group),
        };
        let p = &producers[lane];
        let mut phases = Phases::default();
        let mut t = Instant::now();
        let result = if poisoned {
            Err(KafkaError::Canceled)
        } else {
            flush(p)
        };
        phases.flush = lap(&mut t);
        if events.send(Event::Flushed(lane)).is_err() {
            return;
        }
        let result = result.and_then(|()| {
            retry(|| p.send_offsets_to_transaction(&offsets, &group, Timeout::Never))
        });
        phases.offsets = lap(&mut t);
        let result = result.and_then(|()| retry(|| p.commit_transaction(Timeout::Never)));
        phases.end = lap(&mut t);
        poisoned |= result.is_err();
        if events.send(Event::Done(lane, result, phases)).is_err() {
            return;
        }
    }
}

/// Waits until every message sent is acknowledged. Not rdkafka's `flush`: it polls in
/// steps of up to 100 ms that only a delivery report ends early, and with reports for
/// failures only each step lasted the whole 100 ms (96-119 ms per flush measured).
fn flush(p: &TxProducer) -> KafkaResult<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while p.in_flight_count() > 0 {
        if Instant::now() > deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// The time since `t`, and `t` moved to now.
fn lap(t: &mut Instant) -> Duration {
    let d = t.elapsed();
    *t = Instant::now();
    d
}

fn retry(mut call: impl FnMut() -> KafkaResult<()>) -> KafkaResult<()> {
    let mut tries = 0;
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}
