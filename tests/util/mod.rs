//! Harness for the Kafka tests: a real Apache Kafka broker (started once per test run by
//! `deploy/kafka/broker.sh`, or named by `CDRGUARD_TEST_BROKERS`), uniquely named topics
//! per test, producing, and the copies a run must produce, computed with the same core in
//! process.
//!
//! Checks never depend on a quiet period: a run is finished by waiting until its group
//! has committed the end of the input, stopping it, and confirming the offsets stayed
//! there; only then is each output topic read, with read_committed, until every
//! partition reports its end.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
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
use cdrguard::policy::Policy;
use cdrguard::vocab::purpose::Purpose;
use cdrguard::vocab::time::{DAY_MS, Millis};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// How long a run may take to get through its input.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a read to the end of a topic, or an open transaction's end, may take. A
/// killed producer's transaction is aborted by the broker after `transaction.timeout.ms`
/// (10 s) plus up to one abort check (10 s).
const END_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// Starts a broker of its own in `dir` (on `port`, or a free one), stopped and its
    /// data deleted when this test process exits.
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
            // Each run's topics are gigabytes nobody reads again.
            .arg("--discard")
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

    /// The broker's log (of its current start), when this harness started it.
    pub fn log(&self) -> Option<String> {
        let dir = self.dir.as_ref()?;
        std::fs::read_to_string(dir.join("broker.log")).ok()
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

/// A fixed test key (drawn at random once: cdrguard refuses a patterned secret), written
/// to `dir/keys.toml` with mode 600 from the start (cdrguard refuses a key file others may
/// read).
pub fn key_file(dir: &Path) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("keys.toml");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .and_then(|mut f| {
            f.write_all(
                b"[[keys]]\nid = \"test1\"\nsecret_hex = \"fdcb03b6aaeee403a0d9dc3208039a68631dcb3f10911c314aeb4d272ff3908a\"\n",
            )
        })
        .unwrap();
    // `mode` applies only when the file is created; a second call finds it made.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Lines a test adds to its configuration, each into its own table.
#[derive(Clone, Copy, Default)]
pub struct Tweaks<'a> {
    /// More `[kafka]` keys (`guarantee = "at_least_once"`).
    pub kafka: &'a str,
    /// More `[kafka.consumer_properties]`.
    pub consumer_properties: &'a str,
    /// `[kafka.producer_properties]`.
    pub producer_properties: &'a str,
    /// More `[processing]` keys.
    pub processing: &'a str,
    /// `[retention]` keys (its clock, its firing budget).
    pub retention: &'a str,
    /// `[telemetry]` keys; without a `listen` of their own the listener takes a free
    /// loopback port, so runs side by side never compete for the default one.
    pub telemetry: &'a str,
}

/// Writes a run configuration whose topics all start with `prefix` and loads it.
pub fn run_config(
    dir: &Path,
    bootstrap: &str,
    prefix: &str,
    policy: &str,
    tweaks: Tweaks<'_>,
) -> (PathBuf, RunConfig) {
    let keys = key_file(dir);
    let policy = root().join("policies").join(format!("{policy}.toml"));
    let mut routes = String::new();
    for p in Purpose::ALL {
        routes.push_str(&format!("{} = \"{prefix}.{}\"\n", p.id(), p.id()));
    }
    let Tweaks {
        kafka,
        consumer_properties,
        producer_properties,
        processing,
        retention,
        telemetry,
    } = tweaks;
    let telemetry = if telemetry.contains("listen") {
        telemetry.to_string()
    } else {
        format!("listen = \"127.0.0.1:0\"\n{telemetry}")
    };
    let text = format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "{prefix}.group"
transactional_id = "{prefix}.txn-a"
{kafka}

[kafka.consumer_properties]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
{consumer_properties}

[kafka.producer_properties]
{producer_properties}

[topics]
input = "{prefix}.raw"
control = "{prefix}.control"
dead_letter = "{prefix}.dead"
retention_schedule = "{prefix}.schedule"
retention = "{prefix}.retention"

[topics.routes]
{routes}
[processing]
policy = "{}"
key_file = "{}"
commit_interval_ms = 100
{processing}

[retention]
{retention}

[telemetry]
{telemetry}
"#,
        policy.display(),
        keys.display()
    );
    let path = dir.join("cdrguard.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = config::load(&path, Vec::<(String, String)>::new()).expect("test config is valid");
    (path, cfg)
}

/// Creates every topic of `cfg` with `partitions` partitions, the control topic with
/// `control_partitions` (events of one key always land in one partition, so their order
/// holds either way).
pub fn create_topics(cfg: &RunConfig, policy: &Policy, partitions: i32, control_partitions: i32) {
    let mut specs = topics::specs(cfg, policy, partitions);
    for s in &mut specs {
        if s.name == cfg.control_topic {
            s.partitions = control_partitions;
        }
    }
    runtime()
        .block_on(topics::create(
            &cdrguard::adapters::kafka::common(cfg),
            &specs,
            1,
        ))
        .expect("creating test topics");
    // Created is not yet known everywhere: a client asking the broker's metadata right
    // after may not see the topic for a moment. Wait until every partition has a leader.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create()
        .unwrap();
    wait_for(
        "the new topics in the metadata",
        Duration::from_secs(60),
        || {
            specs.iter().all(|spec| {
                c.fetch_metadata(Some(&spec.name), Duration::from_secs(5))
                    .ok()
                    .and_then(|md| {
                        md.topics()
                            .iter()
                            .find(|t| t.name() == spec.name && t.error().is_none())
                            .map(|t| {
                                t.partitions().len() == spec.partitions as usize
                                    && t.partitions().iter().all(|p| p.leader() >= 0)
                            })
                    })
                    .unwrap_or(false)
            })
        },
    );
}

/// Deletes `topic` and waits until the broker no longer lists it.
pub fn delete_topic(bootstrap: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = runtime()
        .block_on(admin.delete_topics(&[topic], &AdminOptions::new()))
        .expect("deleting a topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("deleting {t}: {e}"));
    }
    let c = client(bootstrap, &unique("meta"), "read_uncommitted");
    wait_for(&format!("{topic} to be gone"), END_TIMEOUT, || {
        c.fetch_metadata(Some(topic), Duration::from_secs(5))
            .is_ok_and(|md| md.topics().iter().all(|t| t.partitions().is_empty()))
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
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
        self.0.flush(Duration::from_secs(60)).unwrap();
    }
}

/// Produces messages in transactions of at most `per_txn` each, as a transactional
/// upstream writes them: every transaction leaves a commit marker in each partition it
/// wrote to, which takes an offset but is never handed to a consumer.
pub fn produce_transactional(
    bootstrap: &str,
    topic: &str,
    msgs: &[(Option<Vec<u8>>, Vec<u8>)],
    per_txn: usize,
) {
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", unique("feeder"))
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let t = Duration::from_secs(60);
    p.init_transactions(t).unwrap();
    for chunk in msgs.chunks(per_txn.max(1)) {
        p.begin_transaction().unwrap();
        for (k, v) in chunk {
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(v.as_slice());
            if let Some(k) = k {
                rec = rec.key(k.as_slice());
            }
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        p.commit_transaction(t).unwrap();
    }
}

/// Produces messages and waits until the broker has them.
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

/// A consumer for the harness's own reads and queries. It only ever assigns partitions
/// and never commits, so it takes no part in any group, even one whose id it carries.
fn client(bootstrap: &str, group: &str, isolation: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", isolation)
        .create()
        .unwrap()
}

fn partitions(c: &BaseConsumer, topic: &str) -> Vec<i32> {
    // A broker that has just restarted may not answer at once: waited out, up to
    // END_TIMEOUT.
    let deadline = Instant::now() + END_TIMEOUT;
    let md = loop {
        match c.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(md) => break md,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("metadata of {topic}: {e}"),
        }
    };
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    assert!(!parts.is_empty(), "topic {topic} does not exist");
    parts
}

/// End offsets per partition as `c` sees them: with read_uncommitted the high watermark
/// (everything written), with read_committed the last stable offset (the start of the
/// oldest open transaction, or the high watermark when none is open).
/// A broker that has just restarted answers "not leader" (or has no leader yet) until it
/// has taken its partitions back: such answers are waited out, up to [`END_TIMEOUT`];
/// any other error fails at once.
fn ends(c: &BaseConsumer, topic: &str, parts: &[i32]) -> BTreeMap<i32, i64> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    parts
        .iter()
        .map(|p| {
            let deadline = Instant::now() + END_TIMEOUT;
            loop {
                match c.fetch_watermarks(topic, *p, Duration::from_secs(10)) {
                    Ok((_, high)) => return (*p, high),
                    Err(KafkaError::MetadataFetch(
                        Code::NotLeaderForPartition
                        | Code::LeaderNotAvailable
                        | Code::NotCoordinator
                        | Code::BrokerTransportFailure,
                    )) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => panic!("end offset of {topic}/{p}: {e}"),
                }
            }
        })
        .collect()
}

/// The high watermark of every partition of `topic`.
pub fn end_offsets(bootstrap: &str, topic: &str) -> BTreeMap<i32, i64> {
    let c = client(bootstrap, &unique("ends"), "read_uncommitted");
    let parts = partitions(&c, topic);
    ends(&c, topic, &parts)
}

/// Waits until no transaction is open on any partition of `topic` (its last stable
/// offsets equal its high watermarks), so a read_committed reader's end is the real end.
pub fn wait_no_open_transaction(bootstrap: &str, topic: &str) {
    let all = client(bootstrap, &unique("ends"), "read_uncommitted");
    let stable = client(bootstrap, &unique("ends"), "read_committed");
    let parts = partitions(&all, topic);
    wait_for(
        &format!("the open transactions on {topic} to end"),
        END_TIMEOUT,
        || ends(&stable, topic, &parts) == ends(&all, topic, &parts),
    );
}

/// Every committed message of `topic`, read with read_committed from the beginning until
/// every partition reports its end. Call it once nothing writes to the topic any more:
/// it first waits until no transaction is open there, so each end is the last offset.
pub fn read_to_end(bootstrap: &str, topic: &str) -> Vec<OwnedMessage> {
    wait_no_open_transaction(bootstrap, topic);
    let c = client(bootstrap, &unique("reader"), "read_committed");
    let parts = partitions(&c, topic);
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut open: BTreeSet<i32> = parts.into_iter().collect();
    let mut out = Vec::new();
    let start = Instant::now();
    while !open.is_empty() {
        assert!(
            start.elapsed() < END_TIMEOUT,
            "{topic}: partitions {open:?} did not report their end within {END_TIMEOUT:?} ({} messages read)",
            out.len()
        );
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => eprintln!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// The offsets a consumer group has committed, as a restarted instance would fetch them.
pub struct GroupOffsets {
    stable: BaseConsumer,
    any: BaseConsumer,
    topic: String,
    parts: Vec<i32>,
    group: String,
}

impl GroupOffsets {
    /// Watches what `group` has committed on `topic`. The consumers carry the group's id
    /// but never subscribe or commit. With read_committed, librdkafka asks for stable
    /// offsets: while a transaction holds an offset, it retries until its timeout.
    pub fn new(bootstrap: &str, group: &str, topic: &str) -> GroupOffsets {
        let stable = client(bootstrap, group, "read_committed");
        let any = client(bootstrap, group, "read_uncommitted");
        let parts = partitions(&stable, topic);
        GroupOffsets {
            stable,
            any,
            topic: topic.to_string(),
            parts,
            group: group.to_string(),
        }
    }

    fn fetch(&self, c: &BaseConsumer, timeout: Duration) -> Option<BTreeMap<i32, i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in &self.parts {
            tpl.add_partition(&self.topic, *p);
        }
        let got = c.committed_offsets(tpl, timeout).ok()?;
        let mut out = BTreeMap::new();
        for e in got.elements() {
            if e.error().is_err() {
                return None;
            }
            let o = match e.offset() {
                Offset::Offset(o) => o,
                Offset::Invalid => 0,
                other => panic!(
                    "group {}: unexpected committed offset {other:?}",
                    self.group
                ),
            };
            out.insert(e.partition(), o);
        }
        Some(out)
    }

    /// Committed offset per partition (0 where nothing was ever committed), or `None`
    /// while some partition's offset is not known to be stable (an open transaction
    /// holds an offset for it) or the broker did not answer.
    pub fn committed(&self) -> Option<BTreeMap<i32, i64>> {
        self.fetch(&self.stable, Duration::from_secs(5))
    }

    /// Whether an open transaction holds some partition's next offset: the stable
    /// offsets stay unknown for two seconds while the broker answers plain fetches.
    pub fn pending(&self) -> bool {
        self.fetch(&self.stable, Duration::from_secs(2)).is_none()
            && self.fetch(&self.any, Duration::from_secs(5)).is_some()
    }

    /// Waits until the group has committed the end of every partition of its topic.
    pub fn wait_at_end(&self, bootstrap: &str, what: &str) {
        let end = end_offsets(bootstrap, &self.topic);
        let mut last = None;
        let start = Instant::now();
        loop {
            let now = self.committed();
            if now.as_ref() == Some(&end) {
                return;
            }
            if now.is_some() {
                last = now;
            }
            assert!(
                start.elapsed() < RUN_TIMEOUT,
                "{what}: group {} did not commit the end of {} within {RUN_TIMEOUT:?}: committed {last:?}, end {end:?}",
                self.group,
                self.topic
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Checks the group's committed offsets are at the end of its topic now.
    pub fn assert_at_end(&self, bootstrap: &str, what: &str) {
        let end = end_offsets(bootstrap, &self.topic);
        // An offset a transaction still holds makes the answer unknown for a moment
        // (librdkafka retries); a stopped run leaves none behind for long.
        let mut now = self.committed();
        let start = Instant::now();
        while now.is_none() && start.elapsed() < END_TIMEOUT {
            std::thread::sleep(Duration::from_millis(200));
            now = self.committed();
        }
        assert_eq!(
            now.as_ref(),
            Some(&end),
            "{what}: group {} committed offsets of {} (left) are not its end (right)",
            self.group,
            self.topic
        );
    }
}

/// A running `cdrguard run`, in a process of its own or in the test process.
pub enum Run {
    /// `cdrguard run` as a child process, stopped with SIGTERM.
    Process(Processor),
    /// `kafka::run` inside the test process, stopped through its notifier.
    InProcess(InProcess),
}

impl From<Processor> for Run {
    fn from(p: Processor) -> Run {
        Run::Process(p)
    }
}

impl From<InProcess> for Run {
    fn from(p: InProcess) -> Run {
        Run::InProcess(p)
    }
}

impl Run {
    /// Stops it gracefully and checks it ended cleanly.
    pub fn stop(self) {
        match self {
            Run::Process(p) => {
                let log = p.log.clone();
                let status = p.terminate();
                assert!(
                    status.success(),
                    "cdrguard run ended with {status} on SIGTERM (log: {})",
                    log.display()
                );
            }
            Run::InProcess(r) => {
                if let Err(e) = r.stop() {
                    panic!("the in-process run ended with an error: {e}");
                }
            }
        }
    }
}

/// Proof that every run of a test got through the whole input and stopped, so the
/// output topics no longer change and can be read to their end.
pub struct Finished(());

/// Waits until the group of `cfg` has committed the end of the input, stops `runs`, and
/// checks the committed offsets are still at the end afterwards (a stop commits or
/// aborts its open transaction and never moves the offsets back).
pub fn finish(bootstrap: &str, cfg: &RunConfig, runs: impl IntoIterator<Item = Run>) -> Finished {
    let offsets = GroupOffsets::new(bootstrap, &cfg.group_id, &cfg.input_topic);
    offsets.wait_at_end(bootstrap, "before the stop");
    for r in runs {
        r.stop();
    }
    offsets.assert_at_end(bootstrap, "after the stop");
    Finished(())
}

/// [`finish`] for input written by a transactional producer that ended with a commit on
/// every partition: each partition's last offset is then a commit marker, which no
/// consumer is handed, so the group's committed offset stops one short of the end.
pub fn finish_transactional_input(
    bootstrap: &str,
    cfg: &RunConfig,
    runs: impl IntoIterator<Item = Run>,
) -> Finished {
    let offsets = GroupOffsets::new(bootstrap, &cfg.group_id, &cfg.input_topic);
    let want: BTreeMap<i32, i64> = end_offsets(bootstrap, &cfg.input_topic)
        .into_iter()
        .map(|(p, end)| (p, end - 1))
        .collect();
    wait_for(
        "the group to commit the last record of every partition",
        RUN_TIMEOUT,
        || offsets.committed().as_ref() == Some(&want),
    );
    for r in runs {
        r.stop();
    }
    assert_eq!(
        offsets.committed(),
        Some(want),
        "after the stop: committed offsets moved"
    );
    Finished(())
}

/// A route topic of a finished run, read to its end.
pub fn read_route(bootstrap: &str, cfg: &RunConfig, p: Purpose, _: &Finished) -> Vec<OwnedMessage> {
    read_to_end(bootstrap, cfg.routes[p as usize].as_deref().unwrap())
}

/// A header's value as text.
pub fn header<'m>(m: &'m OwnedMessage, key: &str) -> Option<&'m str> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| std::str::from_utf8(v).unwrap())
}

/// A copy's envelope record id ("" for anonymised copies, which carry none).
pub fn record_id(m: &OwnedMessage) -> String {
    let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
    v["envelope"]["record_id"]
        .as_str()
        .unwrap_or("")
        .to_string()
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

impl Traffic {
    /// Re-encodes every record message in the binary layout (one record per message, no
    /// length prefix); malformed lines stay as they are and must be refused.
    pub fn encode_records_as_binary(&mut self) {
        let mut valid = self.records.iter();
        for (_, v) in &mut self.messages {
            if valid.as_slice().first() == Some(v) {
                let r = cdrguard::codec::json::decode_record(valid.next().unwrap()).unwrap();
                let mut b = Vec::new();
                cdrguard::codec::binary::encode_record(&r, &mut b);
                *v = b;
            }
        }
        assert!(valid.next().is_none(), "every record was re-encoded");
    }
}

/// Generates `n` records over the last day.
pub fn traffic(n: u64, subscribers: u32, seed: u64) -> Traffic {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // The last day, but never reaching into a month whose crowds of anonymised copies
    // could be released while the test runs (a day after that month's end): from the
    // first of a month the records start at its midnight, at most a day ahead.
    let month_start = {
        use chrono::{Datelike, TimeZone};
        let d = chrono::Utc.timestamp_millis_opt(now).unwrap();
        chrono::Utc
            .with_ymd_and_hms(d.year(), d.month(), 1, 0, 0, 0)
            .unwrap()
            .timestamp_millis()
    };
    let cfg = GenConfig {
        records: n,
        subscribers,
        seed,
        start: Millis((now - DAY_MS).max(month_start)),
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

/// Each subscriber's state after the control events of `t`.
fn consent_states(t: &Traffic) -> BTreeMap<String, SubscriberState> {
    let mut states: BTreeMap<String, SubscriberState> = BTreeMap::new();
    for e in &t.controls {
        states
            .entry(e.msisdn.clone())
            .or_default()
            .apply(&e.change, e.at);
    }
    states
}

/// The wall clock, as the processor's clock reads it.
fn wall_clock() -> Millis {
    Millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    )
}

/// The copies a run must make of `t`, computed with the same core.
pub fn expected(t: &Traffic, policy: &Policy, keys: &Keyring) -> Expected {
    let states = consent_states(t);
    let none = SubscriberState::default();
    count_copies(
        t.records.iter().map(Vec::as_slice),
        policy,
        keys,
        |msisdn| states.get(msisdn).unwrap_or(&none),
    )
}

/// Per route, the envelope record id a copy carries under keyring `b`, mapped to the id
/// the same copy carries under `a` (ids are pseudonymised on some routes): a run whose
/// keys rotate mid-stream is checked against [`expected`] under `a` once its ids are
/// translated.
pub fn ids_across_keys(
    t: &Traffic,
    policy: &Policy,
    a: &Keyring,
    b: &Keyring,
) -> Vec<BTreeMap<String, String>> {
    let mut out = vec![BTreeMap::new(); Purpose::COUNT];
    for_each_copy_pair(t, policy, a, b, |p, _, ia, ib| {
        out[p as usize].insert(ib, ia);
    });
    out
}

/// Per route, the record a copy made under `keys` came from: its envelope record id
/// (pseudonymised on some routes) mapped to the record's own id.
pub fn records_of_copies(
    t: &Traffic,
    policy: &Policy,
    keys: &Keyring,
) -> Vec<BTreeMap<String, String>> {
    let mut out = vec![BTreeMap::new(); Purpose::COUNT];
    for_each_copy_pair(t, policy, keys, keys, |p, record, id, _| {
        out[p as usize].insert(id, record.to_string());
    });
    out
}

/// Calls `f(route, record id, copy id under a, copy id under b)` for every copy the
/// records of `t` get.
fn for_each_copy_pair(
    t: &Traffic,
    policy: &Policy,
    a: &Keyring,
    b: &Keyring,
    mut f: impl FnMut(Purpose, &str, String, String),
) {
    let states = consent_states(t);
    let none = SubscriberState::default();
    let now = wall_clock();
    let id = |c: &cdrguard::core::process::Copy<'_>| {
        c.envelope
            .record_id
            .as_ref()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default()
    };
    for bytes in &t.records {
        let r = cdrguard::codec::json::decode_record(bytes).unwrap();
        let state = states.get(r.msisdn.as_ref()).unwrap_or(&none);
        let under_a = process(&r, policy, state, a, now);
        let under_b = process(&r, policy, state, b, now);
        for (ca, cb) in under_a.copies.iter().zip(&under_b.copies) {
            assert_eq!(ca.envelope.purpose, cb.envelope.purpose);
            f(ca.envelope.purpose, r.record_id.as_ref(), id(ca), id(cb));
        }
    }
}

/// The copies `process` makes of `records` for a subscriber in `state`, per route.
pub fn copies_of(
    records: &[(Option<Vec<u8>>, Vec<u8>)],
    policy: &Policy,
    keys: &Keyring,
    state: &SubscriberState,
) -> Expected {
    count_copies(
        records.iter().map(|(_, v)| v.as_slice()),
        policy,
        keys,
        |_| state,
    )
}

/// Runs `process` over JSON records, each with the state `state_of` gives its msisdn, and
/// counts the copies per route and envelope record id.
fn count_copies<'s>(
    records: impl Iterator<Item = &'s [u8]>,
    policy: &Policy,
    keys: &Keyring,
    state_of: impl Fn(&str) -> &'s SubscriberState,
) -> Expected {
    // `now` only decides whether a record's retention ran out before it arrived; the
    // generated traffic is recent, so the processor's clock moments later agrees.
    let now = wall_clock();
    let mut out: Expected = Default::default();
    for bytes in records {
        let r = cdrguard::codec::json::decode_record(bytes).unwrap();
        for c in process(&r, policy, state_of(r.msisdn.as_ref()), keys, now).copies {
            // Anonymised copies wait for their month's crowd (released a day after the
            // month closes, which `traffic` keeps out of a test's reach); the crowd test
            // checks their release.
            if c.is_anonymised() {
                continue;
            }
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
        *m.entry(record_id(msg)).or_default() += 1;
    }
    m
}

/// Adds `more` to `want`.
pub fn add(want: &mut Expected, more: Expected) {
    for (w, m) in want.iter_mut().zip(more) {
        for (id, n) in m {
            *w.entry(id).or_default() += n;
        }
    }
}

/// A subscriber's state after control events (as the control topic carries them).
pub fn state_after(events: &[(Option<Vec<u8>>, Vec<u8>)]) -> SubscriberState {
    let mut st = SubscriberState::default();
    for (_, v) in events {
        let e = cdrguard::codec::json::decode_control(v).unwrap();
        st.apply(&e.change, e.at);
    }
    st
}

/// Checks every route of `policy` holds exactly the copies of `want`, once each; returns
/// what each route holds.
pub fn assert_exactly_once(
    bootstrap: &str,
    cfg: &RunConfig,
    policy: &Policy,
    want: &Expected,
    done: &Finished,
) -> Vec<(Purpose, Vec<OwnedMessage>)> {
    let mut out = Vec::new();
    for r in policy.declared() {
        let p = r.purpose;
        let msgs = read_route(bootstrap, cfg, p, done);
        let want = &want[p as usize];
        let n: usize = want.values().sum();
        let got = got(&msgs);
        let missing: Vec<&String> = want
            .iter()
            .filter(|(k, v)| got.get(*k).is_none_or(|g| g < *v))
            .map(|(k, _)| k)
            .collect();
        let repeated: Vec<&String> = want
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g > *v))
            .map(|(k, _)| k)
            .collect();
        let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && repeated.is_empty() && extra.is_empty() && msgs.len() == n,
            "route {}: {} copies read, {n} expected; {} ids missing (e.g. {}), {} repeated (e.g. {}), {} unexpected (e.g. {})",
            p.id(),
            msgs.len(),
            missing.len(),
            some(missing.iter().copied()),
            repeated.len(),
            some(repeated.iter().copied()),
            extra.len(),
            some(extra.iter().copied()),
        );
        out.push((p, msgs));
    }
    out
}

/// A few examples of ids for a failure message.
fn some<'a>(ids: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = ids.take(5).map(String::as_str).collect();
    format!("{v:?}")
}

/// The policy and keys a run configuration names.
pub fn load(cfg: &RunConfig) -> (Policy, Keyring) {
    (
        cdrguard::policy::load_file(&cfg.policy).unwrap(),
        cdrguard::adapters::keyfile::load(&cfg.key_file).unwrap(),
    )
}

/// Clears every `CDRGUARD_` variable of `inherited` from `cmd`'s environment (the
/// harness's own `CDRGUARD_TEST_BROKERS`, a developer's overrides, `CDRGUARD_KEY_FILE`)
/// and sets `set`: a test's configuration is exactly its file plus what it sets.
pub fn scrub_env(
    cmd: &mut Command,
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    set: &[(&str, &str)],
) {
    for (k, _) in inherited {
        if k.to_string_lossy().starts_with("CDRGUARD_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in set {
        cmd.env(k, v);
    }
}

/// The `cdrguard` binary with `set` as its only `CDRGUARD_` variables.
pub fn cdrguard_command(set: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdrguard"));
    scrub_env(&mut cmd, std::env::vars_os(), set);
    cmd
}

/// A `cdrguard run` process.
pub struct Processor {
    child: Child,
    /// Its log.
    pub log: PathBuf,
}

impl Processor {
    /// Starts `cdrguard run --config config`, logging to `log`, with `env` as its only
    /// `CDRGUARD_` variables.
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Processor {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = cdrguard_command(env);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f);
        Processor {
            child: cmd.spawn().expect("starting cdrguard run"),
            log: log.to_path_buf(),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// SIGHUP: read the key file again.
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    /// Freezes it (SIGSTOP): a moment of its life held still.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for it to exit.
    pub fn terminate(self) -> std::process::ExitStatus {
        self.stop_with("TERM")
    }

    /// SIGINT (Ctrl-C), then waits for it to exit.
    pub fn interrupt(self) -> std::process::ExitStatus {
        self.stop_with("INT")
    }

    fn stop_with(mut self, sig: &str) -> std::process::ExitStatus {
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "cdrguard did not stop on SIG{sig} (log: {})",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for it to exit on its own.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts messages written to a topic, committed or not (high watermarks, transaction
/// markers included: a gauge of progress for deciding when to interrupt a run).
pub fn count_uncommitted(bootstrap: &str, topic: &str) -> i64 {
    let c = client(bootstrap, &unique("count"), "read_uncommitted");
    let parts = partitions(&c, topic);
    parts
        .iter()
        .map(|p| {
            let (lo, hi) = c
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .unwrap();
            hi - lo
        })
        .sum()
}

/// The assignment protocol a consumer group settled on ("range" and "roundrobin" are
/// eager, "cooperative-sticky" incremental), once it has members and a protocol.
pub fn group_protocol(bootstrap: &str, group: &str) -> String {
    let c = client(bootstrap, &unique("groups"), "read_uncommitted");
    let mut protocol = String::new();
    wait_for(
        &format!("group {group} to settle"),
        Duration::from_secs(60),
        || {
            let Ok(list) = c.fetch_group_list(Some(group), Duration::from_secs(5)) else {
                return false;
            };
            match list.groups().iter().find(|g| g.name() == group) {
                Some(g) if g.state() == "Stable" && !g.protocol().is_empty() => {
                    protocol = g.protocol().to_string();
                    true
                }
                _ => false,
            }
        },
    );
    protocol
}

/// Waits until `f` holds, or panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A processor's log lines, without the terminal colours tracing writes even to files.
pub fn log_lines(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut out = String::with_capacity(l.len());
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    // CSI: ESC '[' parameters, then a final letter.
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect()
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

/// What a [`Scenario`] sets up.
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    /// Prefix of its topic and folder names.
    pub name: &'a str,
    /// Shipped policy name.
    pub policy: &'a str,
    /// Partitions of the input and output topics.
    pub partitions: i32,
    /// Records generated.
    pub records: u64,
    /// Subscribers they belong to.
    pub subscribers: u32,
    /// Generator seed.
    pub seed: u64,
    /// Additions to the configuration.
    pub tweaks: Tweaks<'a>,
    /// Records go in as binary frames (`input_format = "binary"` must be in the tweaks).
    pub binary: bool,
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
    /// Creates topics, produces the records (control events first, on one control
    /// partition) and computes the expected copies.
    pub fn new(bootstrap: &str, setup: Setup<'_>) -> Scenario {
        let dir = scratch(setup.name);
        let (path, cfg) = run_config(
            &dir,
            bootstrap,
            &unique(setup.name),
            setup.policy,
            setup.tweaks,
        );
        let (policy, keys) = load(&cfg);
        create_topics(&cfg, &policy, setup.partitions, 1);
        let mut traffic = traffic(setup.records, setup.subscribers, setup.seed);
        if setup.binary {
            traffic.encode_records_as_binary();
        }
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
        wait_for(&format!("{share} of the run"), RUN_TIMEOUT, || {
            self.progress() as f64 > total as f64 * share
        });
        assert!(
            self.progress() < total,
            "the run finished before the interruption; nothing was tested"
        );
    }

    /// The group's committed input offsets.
    pub fn offsets(&self) -> GroupOffsets {
        GroupOffsets::new(&self.bootstrap, &self.cfg.group_id, &self.cfg.input_topic)
    }

    /// Waits until the group has committed the end of the input, stops `runs`, and checks
    /// the offsets stayed at the end.
    pub fn finish(&self, runs: impl IntoIterator<Item = Run>) -> Finished {
        finish(&self.bootstrap, &self.cfg, runs)
    }

    /// Checks every route of the policy holds exactly the expected copies, once each;
    /// returns what each route holds.
    pub fn assert_exactly_once(&self, done: &Finished) -> Vec<(Purpose, Vec<OwnedMessage>)> {
        assert_exactly_once(&self.bootstrap, &self.cfg, &self.policy, &self.want, done)
    }

    /// As [`Scenario::assert_exactly_once`], with the ids of copies made under other keys
    /// translated first (see [`ids_across_keys`]): a record copied under both keys counts
    /// twice.
    pub fn assert_exactly_once_across_keys(
        &self,
        done: &Finished,
        translate: &[BTreeMap<String, String>],
    ) -> Vec<(Purpose, Vec<OwnedMessage>)> {
        let mut out = Vec::new();
        for r in self.policy.declared() {
            let p = r.purpose;
            let msgs = read_route(&self.bootstrap, &self.cfg, p, done);
            let mut got: BTreeMap<String, usize> = BTreeMap::new();
            for m in &msgs {
                let id = record_id(m);
                let id = translate[p as usize].get(&id).cloned().unwrap_or(id);
                *got.entry(id).or_default() += 1;
            }
            assert!(
                got == self.want[p as usize],
                "route {}: {} copies read, {} expected; {} ids differ in count",
                p.id(),
                msgs.len(),
                self.want[p as usize].values().sum::<usize>(),
                got.iter()
                    .filter(|(k, v)| self.want[p as usize].get(*k) != Some(v))
                    .count()
                    + self.want[p as usize]
                        .keys()
                        .filter(|k| !got.contains_key(*k))
                        .count(),
            );
            out.push((p, msgs));
        }
        out
    }

    /// Checks every route holds every expected copy at least as often as expected and
    /// nothing else (repeats allowed, losses not); returns how many copies were repeats.
    pub fn assert_at_least_once(&self, done: &Finished) -> usize {
        let mut repeats = 0;
        for r in self.policy.declared() {
            let p = r.purpose;
            let msgs = read_route(&self.bootstrap, &self.cfg, p, done);
            let want = &self.want[p as usize];
            let got = got(&msgs);
            let missing: Vec<&String> = want
                .iter()
                .filter(|(k, v)| got.get(*k).is_none_or(|g| g < *v))
                .map(|(k, _)| k)
                .collect();
            let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "route {}: {} ids missing (e.g. {}), {} unexpected (e.g. {})",
                p.id(),
                missing.len(),
                some(missing.iter().copied()),
                extra.len(),
                some(extra.iter().copied()),
            );
            repeats += msgs.len() - want.values().sum::<usize>();
        }
        repeats
    }

    /// Checks the dead-letter topic holds each malformed record exactly once: its
    /// `dlq.topic`, `dlq.partition` and `dlq.offset` headers point at a malformed input
    /// message, whose bytes and key the dead letter carries unchanged, and whose reason
    /// is given. Returns the dead letters.
    pub fn assert_dead_letters(&self, _: &Finished) -> Vec<OwnedMessage> {
        let dead = read_to_end(&self.bootstrap, &self.cfg.dead_letter_topic);
        let input: BTreeMap<(i32, i64), OwnedMessage> =
            read_to_end(&self.bootstrap, &self.cfg.input_topic)
                .into_iter()
                .map(|m| ((m.partition(), m.offset()), m))
                .collect();
        let malformed: BTreeSet<&[u8]> = self
            .traffic
            .messages
            .iter()
            .filter(|(k, _)| k.is_none())
            .map(|(_, v)| v.as_slice())
            .collect();
        let mut seen = BTreeSet::new();
        for d in &dead {
            assert!(
                header(d, "dlq.reason").is_some_and(|r| !r.is_empty()),
                "a dead letter without a reason"
            );
            assert_eq!(header(d, "dlq.topic"), Some(self.cfg.input_topic.as_str()));
            let p: i32 = header(d, "dlq.partition").unwrap().parse().unwrap();
            let o: i64 = header(d, "dlq.offset").unwrap().parse().unwrap();
            let original = input
                .get(&(p, o))
                .unwrap_or_else(|| panic!("dead letter points at {p}/{o}, not an input record"));
            assert_eq!(
                d.payload(),
                original.payload(),
                "dead letter of {p}/{o}: the original bytes, untouched"
            );
            assert_eq!(d.key(), original.key(), "dead letter of {p}/{o}: its key");
            assert!(
                malformed.contains(original.payload().unwrap_or(&[])),
                "{p}/{o} is a valid record, yet dead-lettered"
            );
            assert!(seen.insert((p, o)), "{p}/{o} dead-lettered twice");
        }
        assert_eq!(
            dead.len(),
            self.traffic.malformed,
            "every malformed record dead-lettered exactly once"
        );
        dead
    }
}
