//! Harness for the Kafka tests: a real Apache Kafka broker (started once per test run by
//! `deploy/kafka/broker.sh`, or named by `CDRGUARD_TEST_BROKERS`), uniquely named topics
//! per test, producing, reading back with read_committed, and the copies a run must
//! produce, computed with the same core in process.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cdrguard::adapters::generate::{GenConfig, Line, generate};
use cdrguard::adapters::kafka::config::{self, RunConfig};
use cdrguard::adapters::kafka::topics;
use cdrguard::core::control::{ControlEvent, SubscriberState};
use cdrguard::core::process::process;
use cdrguard::core::pseudonym::Keyring;
use cdrguard::core::purpose::Purpose;
use cdrguard::core::time::{DAY_MS, Millis};
use cdrguard::policy::Policy;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A broker the tests can reach.
pub struct Broker {
    /// bootstrap.servers.
    pub bootstrap: String,
    /// The folder it runs from, when this harness started it.
    pub dir: Option<PathBuf>,
}

impl Broker {
    /// Starts a broker of its own in `dir` (on `port`, or a free one), stopped when this
    /// test process exits.
    pub fn start(dir: &Path, port: Option<u16>) -> Broker {
        let mut cmd = Command::new("bash");
        cmd.arg(root().join("deploy/kafka/broker.sh"))
            .arg("start")
            .arg(dir);
        if let Some(p) = port {
            cmd.arg(p.to_string());
        }
        let out = cmd
            .arg("--watch")
            .arg(std::process::id().to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("running deploy/kafka/broker.sh");
        assert!(out.status.success(), "the broker did not start");
        let bootstrap = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Broker {
            bootstrap,
            dir: Some(dir.to_path_buf()),
        }
    }

    /// Stops a broker this harness started (gracefully).
    pub fn stop(&self) {
        let dir = self.dir.as_ref().expect("a broker of our own");
        let ok = Command::new("bash")
            .arg(root().join("deploy/kafka/broker.sh"))
            .arg("stop")
            .arg(dir)
            .status()
            .expect("running broker.sh stop");
        assert!(ok.success());
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.bootstrap.rsplit(':').next().unwrap().parse().unwrap()
    }
}

/// The broker shared by every test of this run.
pub fn broker() -> &'static Broker {
    static B: OnceLock<Broker> = OnceLock::new();
    B.get_or_init(|| match std::env::var("CDRGUARD_TEST_BROKERS") {
        Ok(b) if !b.is_empty() => Broker {
            bootstrap: b,
            dir: None,
        },
        _ => {
            let dir =
                std::env::temp_dir().join(format!("cdrguard-test-broker-{}", std::process::id()));
            Broker::start(&dir, None)
        }
    })
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fixed test key, written to `dir/keys.toml`.
pub fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("keys.toml");
    std::fs::write(
        &p,
        "[[keys]]\nid = \"test1\"\nsecret_hex = \"8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Writes a run configuration whose topics all start with `prefix` and loads it.
pub fn run_config(
    dir: &Path,
    bootstrap: &str,
    prefix: &str,
    policy: &str,
    extra: &str,
) -> (PathBuf, RunConfig) {
    let keys = key_file(dir);
    let policy = root().join("policies").join(format!("{policy}.toml"));
    let mut routes = String::new();
    for p in Purpose::ALL {
        routes.push_str(&format!("{} = \"{prefix}.{}\"\n", p.id(), p.id()));
    }
    let text = format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "{prefix}.group"
transactional_id = "{prefix}.txn-a"

[kafka.consumer_properties]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500

[topics]
input = "{prefix}.raw"
control = "{prefix}.control"
dead_letter = "{prefix}.dead"
retention_schedule = "{prefix}.schedule"

[topics.routes]
{routes}
[processing]
policy = "{}"
key_file = "{}"
commit_interval_ms = 100
{extra}
"#,
        policy.display(),
        keys.display()
    );
    let path = dir.join("cdrguard.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = config::load(&path, Vec::<(String, String)>::new()).expect("test config is valid");
    (path, cfg)
}

/// Creates every topic of `cfg` with `partitions` partitions (control: 1, so events keep
/// the order they were produced in).
pub fn create_topics(cfg: &RunConfig, policy: &Policy, partitions: i32) {
    let mut specs = topics::specs(cfg, policy, partitions);
    for s in &mut specs {
        if s.name == cfg.control_topic {
            s.partitions = 1;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(topics::create(
        &cdrguard::adapters::kafka::common(cfg),
        &specs,
        1,
    ))
    .expect("creating test topics");
}

/// A producer for test input.
pub struct Feeder(ThreadedProducer<rdkafka::producer::DefaultProducerContext>);

impl Feeder {
    /// A producer on `bootstrap`.
    pub fn new(bootstrap: &str) -> Feeder {
        Feeder(
            ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .set("linger.ms", "5")
                .set("queue.buffering.max.messages", "1000000")
                .create()
                .unwrap(),
        )
    }

    /// Queues messages (waiting out a full queue).
    pub fn send(&self, topic: &str, msgs: &[(Option<Vec<u8>>, Vec<u8>)]) {
        for (k, v) in msgs {
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(v.as_slice());
            if let Some(k) = k {
                rec = rec.key(k.as_slice());
            }
            loop {
                match self.0.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
    }

    /// Waits until everything queued is acknowledged.
    pub fn flush(&self) {
        self.0
            .flush(Duration::from_secs(60))
            .expect("produce flush");
    }
}

/// Produces messages and waits until all are acknowledged.
pub fn produce(bootstrap: &str, topic: &str, msgs: &[(Option<Vec<u8>>, Vec<u8>)]) {
    let f = Feeder::new(bootstrap);
    f.send(topic, msgs);
    f.flush();
}

/// Control events as the control topic carries them: keyed by what they set.
pub fn control_messages(events: &[ControlEvent]) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    events
        .iter()
        .map(|e| {
            (
                Some(e.key().into_bytes()),
                serde_json::to_vec(&e.to_raw()).unwrap(),
            )
        })
        .collect()
}

/// Reads `topic` from the beginning with read_committed until `expect` messages arrived
/// and then `settle` more passed without any (to catch duplicates), or `timeout`.
pub fn read_all(
    bootstrap: &str,
    topic: &str,
    expect: usize,
    settle: Duration,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut last = Instant::now();
    while start.elapsed() < timeout {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(m.detach());
                last = Instant::now();
            }
            Some(Err(e)) => eprintln!("reader: {e}"),
            None => {
                if out.len() >= expect && last.elapsed() >= settle {
                    break;
                }
            }
        }
    }
    out
}

/// A header's value as text.
pub fn header<'m>(m: &'m OwnedMessage, key: &str) -> Option<&'m str> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| std::str::from_utf8(v).unwrap())
}

/// Traffic for a Kafka test: recent (so event-time retention has not run out), with
/// malformed lines, and the control events that precede it.
pub struct Traffic {
    /// Input messages, keyed by msisdn where the line is a record.
    pub messages: Vec<(Option<Vec<u8>>, Vec<u8>)>,
    /// Control events (all produced before the records).
    pub controls: Vec<ControlEvent>,
    /// The valid records (by index into `messages`), as JSON.
    pub records: Vec<Vec<u8>>,
    /// Malformed lines.
    pub malformed: usize,
}

/// Generates `n` records over the last day.
pub fn traffic(n: u64, subscribers: u32, seed: u64) -> Traffic {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let cfg = GenConfig {
        records: n,
        subscribers,
        seed,
        start: Millis(now - DAY_MS),
        days: 1,
        malformed_rate: 0.01,
        ..GenConfig::default()
    };
    let s = generate(&cfg);
    let mut messages = Vec::new();
    let mut records = Vec::new();
    let mut malformed = 0;
    for l in &s.lines {
        match l {
            Line::Record(r) => {
                let v = serde_json::to_vec(r).unwrap();
                records.push(v.clone());
                messages.push((Some(r.msisdn.as_bytes().to_vec()), v));
            }
            Line::Malformed(m) => {
                malformed += 1;
                messages.push((None, m.as_bytes().to_vec()));
            }
        }
    }
    // The controls all apply before the first record: the run reads the control topic to
    // its end before routing, so every record sees the final state.
    Traffic {
        messages,
        controls: s.controls,
        records,
        malformed,
    }
}

/// Per route, how many copies each envelope record id must have (anonymised copies,
/// which carry none, count under the empty id).
pub type Expected = [BTreeMap<String, usize>; Purpose::COUNT];

/// The copies a run must make of `t`, computed with the same core.
pub fn expected(t: &Traffic, policy: &Policy, keys: &Keyring) -> Expected {
    let mut states: BTreeMap<String, SubscriberState> = BTreeMap::new();
    for e in &t.controls {
        states
            .entry(e.msisdn.clone())
            .or_default()
            .apply(&e.change, e.at);
    }
    let now = Millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    let none = SubscriberState::default();
    let mut out: Expected = Default::default();
    for bytes in &t.records {
        let r = cdrguard::codec::json::decode_record(bytes).unwrap();
        let st = states.get(r.msisdn.as_ref()).unwrap_or(&none);
        for c in process(&r, policy, st, keys, now).copies {
            let id = c
                .envelope
                .record_id
                .as_ref()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default();
            *out[c.envelope.purpose as usize].entry(id).or_default() += 1;
        }
    }
    out
}

/// The record ids of copies read from a route topic, counted.
pub fn got(msgs: &[OwnedMessage]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for msg in msgs {
        let v: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        let id = v["envelope"]["record_id"]
            .as_str()
            .unwrap_or("")
            .to_string();
        *m.entry(id).or_default() += 1;
    }
    m
}

/// Checks every route of `policy` holds exactly the expected copies, once each.
pub fn assert_exactly_once(bootstrap: &str, cfg: &RunConfig, policy: &Policy, want: &Expected) {
    for r in policy.declared() {
        let p = r.purpose;
        let topic = cfg.routes[p as usize].as_deref().unwrap();
        let n: usize = want[p as usize].values().sum();
        let msgs = read_all(
            bootstrap,
            topic,
            n,
            Duration::from_secs(2),
            Duration::from_secs(120),
        );
        let got = got(&msgs);
        let missing = want[p as usize]
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(*v))
            .count();
        let extra = got
            .iter()
            .filter(|(k, v)| want[p as usize].get(*k) != Some(*v))
            .count();
        assert!(
            missing == 0 && extra == 0 && msgs.len() == n,
            "route {}: {} copies read, {n} expected; {missing} ids missing or repeated, {extra} unexpected",
            p.id(),
            msgs.len()
        );
    }
}

/// The policy and keys a run configuration names.
pub fn load(cfg: &RunConfig) -> (Policy, Keyring) {
    (
        cdrguard::policy::load_file(&cfg.policy).unwrap(),
        cdrguard::adapters::keyfile::load(&cfg.key_file).unwrap(),
    )
}

/// A `cdrguard run` process.
pub struct Processor {
    child: Child,
    /// Its log.
    pub log: PathBuf,
}

impl Processor {
    /// Starts `cdrguard run --config config`, logging to `log`.
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Processor {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdrguard"));
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Processor {
            child: cmd.spawn().expect("starting cdrguard run"),
            log: log.to_path_buf(),
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "cdrguard did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts messages on a topic (read_uncommitted: what has been written so far, for
/// deciding when to interrupt a run).
pub fn count_uncommitted(bootstrap: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut n = 0;
    for t in md.topics() {
        for p in t.partitions() {
            let (lo, hi) = c
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            n += hi - lo;
        }
    }
    n
}

/// Waits until `f` holds, or panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Appends a line to a test log (for post-mortems).
pub fn note(log: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let _ = writeln!(f, "{line}");
}

/// `cdrguard run` inside the test process, so the test can watch its consent table.
pub struct InProcess {
    rt: tokio::runtime::Runtime,
    stop: std::sync::Arc<tokio::sync::Notify>,
    /// Its consent table and counters.
    pub handles: cdrguard::adapters::kafka::RunHandles,
    join: Option<tokio::task::JoinHandle<Result<(), cdrguard::adapters::kafka::RunError>>>,
}

impl InProcess {
    /// Starts a run of `cfg`.
    pub fn start(cfg: &RunConfig) -> InProcess {
        use std::sync::Arc;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (policy, keys) = load(cfg);
        let stop = Arc::new(tokio::sync::Notify::new());
        let handles = cdrguard::adapters::kafka::RunHandles::new(cfg);
        let join = rt.spawn(cdrguard::adapters::kafka::run(
            cfg.clone(),
            Arc::new(policy),
            Arc::new(keys),
            stop.clone(),
            handles.clone(),
        ));
        InProcess {
            rt,
            stop,
            handles,
            join: Some(join),
        }
    }

    /// Stops it gracefully and returns how the run ended.
    pub fn stop(mut self) -> Result<(), cdrguard::adapters::kafka::RunError> {
        self.stop.notify_one();
        let j = self.join.take().unwrap();
        self.rt.block_on(j).expect("run task panicked")
    }
}

/// A run's worth of setup: a configuration with its own topics, traffic on the input
/// and control topics, and the copies the run must make.
pub struct Scenario {
    /// Scratch folder (config, key file, logs).
    pub dir: PathBuf,
    /// The configuration file.
    pub path: PathBuf,
    /// The configuration.
    pub cfg: RunConfig,
    /// Its policy.
    pub policy: Policy,
    /// The traffic produced.
    pub traffic: Traffic,
    /// The copies expected.
    pub want: Expected,
    /// bootstrap.servers.
    pub bootstrap: String,
}

impl Scenario {
    /// Creates topics (`partitions` each), produces `records` records of `subscribers`
    /// subscribers (control events first) and computes the expected copies.
    pub fn new(
        bootstrap: &str,
        name: &str,
        policy: &str,
        partitions: i32,
        records: u64,
        subscribers: u32,
        seed: u64,
    ) -> Scenario {
        let dir = scratch(name);
        let (path, cfg) = run_config(&dir, bootstrap, &unique(name), policy, "");
        let (policy, keys) = load(&cfg);
        create_topics(&cfg, &policy, partitions);
        let traffic = traffic(records, subscribers, seed);
        produce(
            bootstrap,
            &cfg.control_topic,
            &control_messages(&traffic.controls),
        );
        produce(bootstrap, &cfg.input_topic, &traffic.messages);
        let want = expected(&traffic, &policy, &keys);
        Scenario {
            dir,
            path,
            cfg,
            policy,
            traffic,
            want,
            bootstrap: bootstrap.to_string(),
        }
    }

    /// Billing copies expected (one per valid record).
    pub fn total(&self) -> usize {
        self.want[Purpose::Billing as usize].values().sum()
    }

    /// Billing copies written so far, committed or not.
    pub fn progress(&self) -> usize {
        let billing = self.cfg.routes[Purpose::Billing as usize]
            .as_deref()
            .unwrap();
        count_uncommitted(&self.bootstrap, billing) as usize
    }

    /// Waits until more than `share` of the billing copies have been written, and checks
    /// the run has not already finished (else the interruption would test nothing).
    pub fn wait_progress(&self, share: f64) {
        let total = self.total();
        wait_for(
            &format!("{share} of the run"),
            Duration::from_secs(300),
            || self.progress() as f64 > total as f64 * share,
        );
        assert!(
            self.progress() < total,
            "the run finished before the interruption; nothing was tested"
        );
    }

    /// Checks every route holds exactly the expected copies, once each.
    pub fn assert_exactly_once(&self) {
        assert_exactly_once(&self.bootstrap, &self.cfg, &self.policy, &self.want);
    }

    /// Checks the dead-letter topic holds each malformed record exactly once.
    pub fn assert_dead_letters(&self) {
        let dead = read_all(
            &self.bootstrap,
            &self.cfg.dead_letter_topic,
            self.traffic.malformed,
            Duration::from_secs(2),
            Duration::from_secs(60),
        );
        assert_eq!(
            dead.len(),
            self.traffic.malformed,
            "dead letters exactly once"
        );
    }
}
