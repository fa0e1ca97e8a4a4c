//! `cdrguard run` configuration: a TOML file plus `CDRGUARD_…` environment overrides,
//! validated in one pass that reports every problem with where it came from.
//!
//! The file is flattened into dotted keys with their line, the environment is laid over
//! it, then each known key is taken and checked; whatever is left is an unknown key. That
//! way a typo never silently falls back to a default, and one run lists every mistake.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use crate::adapters::keyfile::{self, KeyFileError};
use crate::adapters::telemetry::{self, LogFormat, TelemetryConfig};
use crate::checked::{self, LineIndex, Problem, Refused};
use crate::codec::Format;
use crate::core::bounds::TimeLimits;
use crate::core::pseudonym::Keyring;
use crate::policy::{Policy, PolicyError};
use crate::vocab::purpose::Purpose;
use crate::vocab::time::Millis;

/// The environment prefix; `__` separates key levels (`CDRGUARD_KAFKA__GROUP_ID`).
pub const ENV_PREFIX: &str = "CDRGUARD_";

/// Where a setting came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A line of the config file.
    Line(usize),
    /// The config file as a whole: it cannot be read, or its syntax error has no place.
    File,
    /// An environment variable.
    Env(String),
    /// The built-in default.
    Default,
    /// A policy file: a route's topic the configuration does not name.
    Policy {
        /// The policy file.
        file: String,
        /// 1-based line of the key.
        line: usize,
        /// Its dotted key in the policy, e.g. `purposes.analytics.topic`.
        key: String,
    },
}

impl Origin {
    /// The file (or `env VAR`) and line a setting of config `file` came from; no line
    /// for a default or the whole file.
    fn at(&self, file: &str) -> (String, Option<usize>) {
        match self {
            Origin::Line(l) => (file.to_string(), Some(*l)),
            Origin::File | Origin::Default => (file.to_string(), None),
            Origin::Env(v) => (format!("env {v}"), None),
            Origin::Policy { file, line, .. } => (file.clone(), Some(*line)),
        }
    }

    /// Where a setting of config `file` came from, as `file:line`, `env VAR`, or `file`
    /// alone when there is no line to name.
    fn place(&self, file: &str) -> String {
        let (file, line) = self.at(file);
        checked::place(&file, line)
    }

    /// Where a setting came from, in a sentence about another one.
    fn describe(&self, file: &str) -> String {
        match self {
            Origin::Default => "by default".to_string(),
            Origin::Policy { key, .. } => format!("the policy's, {}: {key}", self.place(file)),
            o => o.place(file),
        }
    }

    /// Whether someone chose this setting for this deployment (the file or the
    /// environment), rather than it following from a default or the policy.
    fn chosen(&self) -> bool {
        matches!(self, Origin::Line(_) | Origin::Env(_))
    }
}

/// One problem with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where the offending setting is.
    pub origin: Origin,
    /// Its dotted key, e.g. `kafka.group_id`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigProblem {
    /// Where it is listed: file lines in order, then the environment, then what the file
    /// lacks, then policy lines.
    fn order(&self) -> (u8, usize) {
        match self.origin {
            Origin::File => (0, 0),
            Origin::Line(l) => (0, l),
            Origin::Env(_) => (1, 0),
            Origin::Default => (2, 0),
            Origin::Policy { line, .. } => (3, line),
        }
    }

    /// The problem as every checked file shows one, placed in config `file`.
    fn shown(&self, file: &str) -> Problem {
        let (file, line) = self.origin.at(file);
        Problem {
            file,
            line,
            key: self.key.clone(),
            message: self.message.clone(),
        }
    }
}

/// A refused configuration: every problem found.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file as named by the caller.
    pub file: String,
    /// All problems, file lines first.
    pub problems: Vec<ConfigProblem>,
    /// The configuration as far as it could be read (each refused key empty or at its
    /// default), when the file was read and parsed: enough for `run --check` to check the
    /// policy and key file it names, and its topics against the policy's, in the same run.
    pub partial: Option<Box<RunConfig>>,
}

impl fmt::Display for ConfigError {
    // Shown as every refused file is; the problems keep their origins for ordering and
    // for the topic checks, so they are placed only here.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Refused {
            kind: "config",
            file: self.file.clone(),
            problems: self.problems.iter().map(|p| p.shown(&self.file)).collect(),
        }
        .fmt(f)
    }
}

/// The run's clock as configured: the wall clock unless a start is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSetting {
    /// The instant the clock shows when the run starts; `None`: the wall clock.
    pub start: Option<Millis>,
    /// How many times faster than real time it runs (with a start only).
    pub speed: u32,
}

/// The delivery guarantee of `run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarantee {
    /// Copies, schedule entries and input offsets in one Kafka transaction.
    ExactlyOnce,
    /// No transactions: an input offset is stored only after every copy it produced was
    /// acknowledged; a crash can repeat copies, never lose them.
    AtLeastOnce,
}

/// The validated configuration of `cdrguard run`.
#[derive(Clone)]
pub struct RunConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group of all cdrguard instances on the input topic.
    pub group_id: String,
    /// Transactional id of this instance: unique per running instance, stable across its
    /// restarts (so a restart fences and aborts its predecessor's open transaction).
    pub transactional_id: String,
    /// Exactly once or at least once.
    pub guarantee: Guarantee,
    /// librdkafka properties for every client (TLS, SASL, ...).
    pub properties: BTreeMap<String, String>,
    /// Extra properties for the consumers only.
    pub consumer_properties: BTreeMap<String, String>,
    /// Extra properties for the producer only.
    pub producer_properties: BTreeMap<String, String>,
    /// Records in.
    pub input_topic: String,
    /// Subscriber control events (compacted).
    pub control_topic: String,
    /// Refused records, with reason and origin headers.
    pub dead_letter_topic: String,
    /// Retention windows opened or extended by routed copies.
    pub schedule_topic: String,
    /// Retention-expiry events for downstream stores (DESIGN.md).
    pub retention_topic: String,
    /// Topic of each route: as configured, else (after [`RunConfig::with_policy`]) the
    /// topic the policy declares for it.
    pub routes: [Option<String>; Purpose::COUNT],
    /// Policy file.
    pub policy: PathBuf,
    /// Pseudonym key file.
    pub key_file: PathBuf,
    /// Encoding of input records.
    pub input_format: Format,
    /// Encoding of copies.
    pub output_format: Format,
    /// How often the open transaction is committed.
    pub commit_interval: Duration,
    /// Records after which a commit is started early.
    pub commit_max_records: usize,
    /// The consent table counts as stale (fail closed) when it has not been confirmed at
    /// the end of the control topic for this long.
    pub control_max_staleness: Duration,
    /// While the table is stale, routing pauses this long (records wait in Kafka, nothing
    /// is lost) before it routes fail closed.
    pub stale_pause: Duration,
    /// Per-partition prefetch limit (librdkafka `queued.max.messages.kbytes`).
    pub queued_max_kbytes: u32,
    /// How long a stop (SIGTERM, SIGINT) may take to commit or abort and leave the group
    /// before the process exits anyway (with status 1).
    pub shutdown_timeout: Duration,
    /// The record times accepted around the wall clock (the same rule as replay's).
    pub time_limits: TimeLimits,
    /// Expiries fired in one transaction at most, so a million windows due at once never
    /// hold the copies' commits back.
    pub fire_batch: usize,
    /// The run's clock: the wall clock, or (rehearsals and tests) one that starts at a
    /// given instant and runs faster.
    pub clock: ClockSetting,
    /// Where metrics and health endpoints are served, and how logs are written.
    pub telemetry: TelemetryConfig,
    /// The config file as named by the caller, for errors found after loading.
    file: String,
    /// Where each topic key that was set came from (`topics.input`,
    /// `topics.routes.billing`, ...); a key not here took its default.
    topic_origins: BTreeMap<String, Origin>,
}

/// One topic cdrguard reads or writes: its name, the key that sets it and where that came
/// from.
struct TopicUse<'a> {
    topic: &'a str,
    key: String,
    origin: Origin,
}

impl fmt::Debug for RunConfig {
    // Properties may hold SASL passwords or key material: show their names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("transactional_id", &self.transactional_id)
            .field("guarantee", &self.guarantee)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .field("input_topic", &self.input_topic)
            .field("control_topic", &self.control_topic)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl RunConfig {
    /// Fills the routes the configuration does not name with the topics the policy
    /// declares, and refuses the result unless every topic is distinct: a route's topic
    /// shared with another route or a service topic would hand one purpose's copies (raw
    /// identifiers, say) to another purpose's consumers, or feed cdrguard its own output.
    pub fn with_policy(mut self, policy: &Policy) -> Result<RunConfig, ConfigError> {
        let mut filled = Vec::new();
        for r in policy.declared() {
            let slot = &mut self.routes[r.purpose as usize];
            if slot.is_none() {
                *slot = Some(r.topic.clone());
                let key = route_key(r.purpose);
                self.topic_origins.insert(
                    key.clone(),
                    Origin::Policy {
                        file: policy.file.clone(),
                        line: r.topic_at.line,
                        key: r.topic_at.path.clone(),
                    },
                );
                filled.push(key);
            }
        }
        // The configuration's own topics were checked against each other when it was
        // loaded; what the policy filled in is checked against everything.
        let problems = clashes(&self.topic_uses(), &self.file, |u| filled.contains(&u.key));
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError {
                file: self.file.clone(),
                problems,
                partial: None,
            })
        }
    }

    /// Every topic cdrguard reads or writes, with the key that sets it. They must all be
    /// distinct (see [`clashes`]); a topic added to the configuration is one more line
    /// here.
    fn topic_uses(&self) -> Vec<TopicUse<'_>> {
        let mut v = vec![
            (self.input_topic.as_str(), "topics.input".to_string()),
            (self.control_topic.as_str(), "topics.control".to_string()),
            (
                self.dead_letter_topic.as_str(),
                "topics.dead_letter".to_string(),
            ),
            (
                self.schedule_topic.as_str(),
                "topics.retention_schedule".to_string(),
            ),
            (
                self.retention_topic.as_str(),
                "topics.retention".to_string(),
            ),
        ];
        for p in Purpose::ALL {
            if let Some(t) = &self.routes[p as usize] {
                v.push((t.as_str(), route_key(p)));
            }
        }
        v.into_iter()
            .map(|(topic, key)| TopicUse {
                topic,
                origin: self
                    .topic_origins
                    .get(&key)
                    .cloned()
                    .unwrap_or(Origin::Default),
                key,
            })
            .collect()
    }
}

/// The key of a route's topic.
fn route_key(p: Purpose) -> String {
    format!("topics.routes.{}", p.id())
}

/// One problem per topic used twice where at least one of the two uses is `checked`. It
/// is reported where someone chose the topic (the file or the environment) rather than
/// where it followed from a default or the policy, else at the later use, and it names
/// where the other use came from. Config `file` names lines of the configuration.
fn clashes(
    uses: &[TopicUse<'_>],
    file: &str,
    checked: impl Fn(&TopicUse<'_>) -> bool,
) -> Vec<ConfigProblem> {
    let mut out = Vec::new();
    for (i, later) in uses.iter().enumerate() {
        // An empty name was refused already (and left empty); it clashes with nothing.
        if later.topic.is_empty() {
            continue;
        }
        for earlier in &uses[..i] {
            if earlier.topic != later.topic || !(checked(earlier) || checked(later)) {
                continue;
            }
            let (at, other) = if earlier.origin.chosen() && !later.origin.chosen() {
                (earlier, later)
            } else {
                (later, earlier)
            };
            let (key, route) = match &at.origin {
                // At a policy line the policy's key is what is there; the message says
                // which route it is the topic of.
                Origin::Policy { key, .. } => {
                    (key.clone(), format!(" (the policy's topic for {})", at.key))
                }
                _ => (at.key.clone(), String::new()),
            };
            out.push(ConfigProblem {
                origin: at.origin.clone(),
                key,
                message: format!(
                    "topic {:?}{route} is also used by {} ({}): every topic cdrguard reads or writes must be its own",
                    at.topic,
                    other.key,
                    other.origin.describe(file)
                ),
            });
        }
    }
    out
}

/// The producer's transaction timeout unless a property sets another: short, because a
/// crashed instance's open transaction blocks read_committed readers until it expires.
pub const DEFAULT_TXN_TIMEOUT_MS: i64 = 10_000;

/// librdkafka properties cdrguard sets itself because its guarantees depend on them.
const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "transactional.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
];

#[derive(Clone, Debug)]
enum Leaf {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(f64),
    Other(&'static str),
}

impl Leaf {
    fn describe(&self) -> &'static str {
        match self {
            Leaf::Str(_) => "a string",
            Leaf::Int(_) => "an integer",
            Leaf::Bool(_) => "a boolean",
            Leaf::Float(_) => "a float",
            Leaf::Other(d) => d,
        }
    }
    fn as_property(&self) -> Option<String> {
        match self {
            Leaf::Str(s) => Some(s.clone()),
            Leaf::Int(i) => Some(i.to_string()),
            Leaf::Bool(b) => Some(b.to_string()),
            Leaf::Float(f) => Some(f.to_string()),
            Leaf::Other(_) => None,
        }
    }
}

struct Settings {
    leaves: BTreeMap<String, (Leaf, Origin)>,
    /// Where each key read so far was set, for checks across keys.
    taken: BTreeMap<String, Origin>,
    problems: Vec<ConfigProblem>,
}

fn flatten(t: &DeTable<'_>, prefix: &str, lines: &LineIndex, out: &mut Settings) {
    for (k, v) in t.iter() {
        // A dotted name (a librdkafka property) is one key, quoted as TOML writes it.
        let name = k.get_ref();
        let name = if name.contains('.') {
            format!("\"{name}\"")
        } else {
            name.to_string()
        };
        let key = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        let line = lines.line(k.span().start);
        let leaf = match v.get_ref() {
            DeValue::Table(t) => {
                flatten(t, &key, lines, out);
                continue;
            }
            DeValue::String(s) => Leaf::Str(s.to_string()),
            DeValue::Integer(i) => match i.to_string().parse() {
                Ok(n) => Leaf::Int(n),
                Err(_) => Leaf::Other("an integer out of range"),
            },
            DeValue::Float(f) => match f.to_string().parse() {
                Ok(n) => Leaf::Float(n),
                Err(_) => Leaf::Other("a float"),
            },
            DeValue::Boolean(b) => Leaf::Bool(*b),
            DeValue::Datetime(_) => Leaf::Other("a date"),
            DeValue::Array(_) => Leaf::Other("an array"),
        };
        out.leaves.insert(key, (leaf, Origin::Line(line)));
    }
}

/// Turns `CDRGUARD_KAFKA__GROUP_ID` into `kafka.group_id`. Under a `…properties` table
/// single underscores become dots, since librdkafka names use dots and shells do not
/// allow them in variable names: `CDRGUARD_KAFKA__PROPERTIES__SASL_PASSWORD` sets
/// `kafka.properties."sasl.password"`.
fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if parts.len() < 2 || parts.iter().any(String::is_empty) {
        return None;
    }
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 && parts[i - 1].ends_with("properties") && p.contains('_') {
            out.push(format!("\"{}\"", p.replace('_', ".")));
        } else {
            out.push(p.clone());
        }
    }
    Some(out.join("."))
}

/// Environment values are typed by the key that reads them: numbers and booleans are
/// parsed when the key asks for one.
fn env_leaf(v: &str) -> Leaf {
    Leaf::Str(v.to_string())
}

impl Settings {
    fn problem(&mut self, origin: Origin, key: &str, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            origin,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn take(&mut self, key: &str) -> Option<(Leaf, Origin)> {
        let leaf = self.leaves.remove(key)?;
        self.taken.insert(key.to_string(), leaf.1.clone());
        Some(leaf)
    }

    fn string(&mut self, key: &str, default: Option<&str>) -> Option<(String, Origin)> {
        match self.take(key) {
            Some((Leaf::Str(s), o)) if !s.trim().is_empty() => Some((s, o)),
            Some((Leaf::Str(_), o)) => {
                self.problem(o, key, "must not be empty");
                None
            }
            Some((l, o)) => {
                self.problem(o, key, format!("must be a string, not {}", l.describe()));
                None
            }
            None => match default {
                Some(d) => Some((d.to_string(), Origin::Default)),
                None => {
                    self.problem(Origin::Default, key, "missing (required)");
                    None
                }
            },
        }
    }

    fn integer(&mut self, key: &str, default: i64, range: (i64, i64)) -> i64 {
        let (n, o) = match self.take(key) {
            Some((Leaf::Int(n), o)) => (n, o),
            Some((Leaf::Str(s), o @ Origin::Env(_))) => match s.trim().parse() {
                Ok(n) => (n, o),
                Err(_) => {
                    self.problem(o, key, "must be an integer");
                    return default;
                }
            },
            Some((l, o)) => {
                self.problem(o, key, format!("must be an integer, not {}", l.describe()));
                return default;
            }
            None => return default,
        };
        if n < range.0 || n > range.1 {
            self.problem(
                o,
                key,
                format!("{n} is out of range {}..={}", range.0, range.1),
            );
            return default;
        }
        n
    }

    fn choice<T: Copy>(&mut self, key: &str, default: T, choices: &[(&str, T)]) -> T {
        let Some((s, o)) = self.string(key, Some("")) else {
            return default;
        };
        if o == Origin::Default {
            return default;
        }
        match choices.iter().find(|(n, _)| *n == s) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                self.problem(o, key, format!("{s:?} is not one of: {}", names.join(", ")));
                default
            }
        }
    }

    /// The librdkafka properties under `table`, each checked. Under exactly once, the
    /// idempotent producer may not be turned off (transactions need it); at least once
    /// leaves it to the operator, since brokers without transactions often lack it too.
    fn properties(&mut self, table: &str, exactly_once: bool) -> BTreeMap<String, String> {
        let prefix = format!("{table}.");
        let keys: Vec<String> = self
            .leaves
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        let mut out = BTreeMap::new();
        for k in keys {
            let Some((leaf, origin)) = self.take(&k) else {
                continue;
            };
            let name = k[prefix.len()..].trim_matches('"').to_string();
            if RESERVED.contains(&name.as_str()) {
                self.problem(
                    origin,
                    &k,
                    "cdrguard sets this property itself (its guarantees depend on it); use the matching cdrguard key",
                );
                continue;
            }
            if exactly_once
                && name == "enable.idempotence"
                && leaf
                    .as_property()
                    .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "true" | "1"))
            {
                self.problem(
                    origin,
                    &k,
                    "exactly_once needs the idempotent producer; remove this or use guarantee = \"at_least_once\"",
                );
                continue;
            }
            match leaf.as_property() {
                // librdkafka checks a property's name and value when it is set; asking it
                // here, one property at a time, lists every bad one in a single run.
                Some(v) => match rdkafka::ClientConfig::new()
                    .set(&name, &v)
                    .create_native_config()
                {
                    Ok(_) => {
                        out.insert(name, v);
                    }
                    Err(e) => {
                        let message = e.to_string();
                        let message = if secret_name(&name) && !v.is_empty() {
                            message.replace(v.as_str(), "***")
                        } else {
                            message
                        };
                        self.problem(origin, &k, message);
                    }
                },
                None => self.problem(
                    origin,
                    &k,
                    format!(
                        "must be a string, number or boolean, not {}",
                        leaf.describe()
                    ),
                ),
            }
        }
        out
    }
}

/// Reads and validates a config file with overrides from `env` (pass
/// `std::env::vars()` in production; tests pass their own).
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RunConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![ConfigProblem {
            origin: Origin::File,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }],
        partial: None,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, &file, base, env)
}

/// Validates config text; relative paths in it resolve against `base` (the file's folder).
pub fn parse(
    text: &str,
    file: &str,
    base: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RunConfig, ConfigError> {
    let root = checked::parse(text, file).map_err(|p| ConfigError {
        file: file.to_string(),
        problems: vec![ConfigProblem {
            origin: p.line.map_or(Origin::File, Origin::Line),
            key: p.key,
            message: p.message,
        }],
        partial: None,
    })?;
    let mut s = Settings {
        leaves: BTreeMap::new(),
        taken: BTreeMap::new(),
        problems: Vec::new(),
    };
    flatten(root.get_ref(), "", &LineIndex::new(text), &mut s);
    let mut key_file_fallback = None;
    let mut hostname = None;
    for (var, value) in env {
        if var == "CDRGUARD_KEY_FILE" {
            // The variable `replay` reads too; the config's own key wins over it.
            key_file_fallback = Some((value, Origin::Env(var)));
            continue;
        }
        if var == "HOSTNAME" {
            hostname = Some(value);
            continue;
        }
        // Settings always have a level separator; other CDRGUARD_ variables belong to
        // other tools (the test harness, the broker script) and are not ours to refuse.
        if !var.starts_with(ENV_PREFIX) || !var.contains("__") {
            continue;
        }
        match env_key(&var) {
            Some(k) => {
                s.leaves.insert(k, (env_leaf(&value), Origin::Env(var)));
            }
            None => s.problem(
                Origin::Env(var.clone()),
                "",
                "not a cdrguard setting (use CDRGUARD_SECTION__KEY, e.g. CDRGUARD_KAFKA__GROUP_ID)",
            ),
        }
    }

    let brokers = s.string("kafka.brokers", None);
    let group_id = s.string("kafka.group_id", Some("cdrguard"));
    let guarantee = s.choice(
        "kafka.guarantee",
        Guarantee::ExactlyOnce,
        &[
            ("exactly_once", Guarantee::ExactlyOnce),
            ("at_least_once", Guarantee::AtLeastOnce),
        ],
    );
    let transactional_id = s.string("kafka.transactional_id", Some(""));
    let eos = guarantee == Guarantee::ExactlyOnce;
    let properties = s.properties("kafka.properties", eos);
    let consumer_properties = s.properties("kafka.consumer_properties", eos);
    let producer_properties = s.properties("kafka.producer_properties", eos);

    let input = s.string("topics.input", Some("cdr.raw"));
    let control = s.string("topics.control", Some("subscriber.control"));
    let dead_letter = s.string("topics.dead_letter", Some("cdr.dead-letter"));
    let schedule = s.string("topics.retention_schedule", Some("cdr.retention.schedule"));
    let retention = s.string("topics.retention", Some("cdr.retention"));
    // A route not named here takes the topic its policy declares (see `with_policy`).
    let mut routes: [Option<String>; Purpose::COUNT] = Default::default();
    for p in Purpose::ALL {
        routes[p as usize] = s
            .string(&route_key(p), Some(""))
            .filter(|(_, o)| *o != Origin::Default)
            .map(|(t, _)| t);
    }

    let policy = s.string("processing.policy", None);
    let key_file = match s.string("processing.key_file", Some("")) {
        Some((p, Origin::Default)) => match key_file_fallback {
            Some((v, o)) => Some((v, o)),
            None => {
                s.problem(
                    Origin::Default,
                    "processing.key_file",
                    "missing (required; or set CDRGUARD_KEY_FILE)",
                );
                let _ = p;
                None
            }
        },
        other => other,
    };
    let formats = [("json", Format::Json), ("binary", Format::Binary)];
    let input_format = s.choice("processing.input_format", Format::Json, &formats);
    let output_format = s.choice("processing.output_format", Format::Json, &formats);
    let commit_origin = s
        .leaves
        .get("processing.commit_interval_ms")
        .map_or(Origin::Default, |(_, o)| o.clone());
    let commit_ms = s.integer("processing.commit_interval_ms", 100, (10, 60_000));
    let commit_max = s.integer("processing.commit_max_records", 5_000, (1, 10_000_000));
    // Confirmations come every half second and may take a round trip or two.
    let staleness = s.integer(
        "processing.control_max_staleness_ms",
        3_000,
        (2_000, 3_600_000),
    );
    let stale_pause = s.integer("processing.stale_pause_ms", 120_000, (0, 86_400_000));
    let queued_kb = s.integer("processing.queued_max_kbytes", 8_192, (64, 2_097_151));
    let shutdown_ms = s.integer("processing.shutdown_timeout_ms", 25_000, (1_000, 600_000));
    let limits = TimeLimits::default();
    let max_future_ms = s.integer(
        "processing.max_future_ms",
        limits.max_future_ms,
        (0, 366 * 86_400_000),
    );
    let anchored_floor_days = s.integer(
        "processing.anchored_floor_days",
        limits.anchored_floor_ms / 86_400_000,
        (1, 100 * 366),
    );
    let fire_batch = s.integer("retention.fire_batch", 5_000, (1, 1_000_000));
    let clock_start = match s.string("retention.clock_start", Some("")) {
        Some((t, o)) if o != Origin::Default => match Millis::parse(&t) {
            Ok(m) => Some(m),
            Err(_) => {
                s.problem(o, "retention.clock_start", "must be an RFC 3339 instant");
                None
            }
        },
        _ => None,
    };
    let clock_speed = s.integer("retention.clock_speed", 1, (1, 100_000_000));
    let listen = match s.string("telemetry.listen", Some(telemetry::DEFAULT_LISTEN)) {
        Some((a, o)) => match a.trim().parse::<std::net::SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                s.problem(
                    o,
                    "telemetry.listen",
                    format!(
                        "{a:?} is not an IP address and port (e.g. \"0.0.0.0:9464\", \"127.0.0.1:0\", \"[::]:9464\")"
                    ),
                );
                TelemetryConfig::default().listen
            }
        },
        None => TelemetryConfig::default().listen,
    };
    let log_format = s.choice(
        "telemetry.log_format",
        LogFormat::Text,
        &[("text", LogFormat::Text), ("json", LogFormat::Json)],
    );

    for (k, (_, o)) in std::mem::take(&mut s.leaves) {
        s.problem(o, &k, "unknown key");
    }

    let resolve = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { base.join(p) }
    };
    let transactional_id = match (guarantee, transactional_id) {
        (Guarantee::ExactlyOnce, Some((t, Origin::Default))) if t.is_empty() => {
            // Stable across restarts of the same host, which is what fencing needs; two
            // instances on one host must set their own.
            let host = hostname
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty());
            match host {
                Some(h) => {
                    let group = group_id.as_ref().map_or("cdrguard", |g| g.0.as_str());
                    format!("{group}-{h}")
                }
                None => {
                    s.problem(
                        Origin::Default,
                        "kafka.transactional_id",
                        "missing, and no host name to derive one from: set one unique per instance",
                    );
                    String::new()
                }
            }
        }
        (_, Some((t, _))) => t,
        (_, None) => String::new(),
    };
    // The broker aborts a transaction open longer than transaction.timeout.ms; a commit
    // interval near it would have every transaction fenced before it commits.
    let txn_timeout = producer_properties
        .get("transaction.timeout.ms")
        .or_else(|| properties.get("transaction.timeout.ms"))
        .map_or(Ok(DEFAULT_TXN_TIMEOUT_MS), |v| v.parse::<i64>());
    match txn_timeout {
        Ok(t) if guarantee == Guarantee::ExactlyOnce && commit_ms * 3 > t => s.problem(
            commit_origin.clone(),
            "processing.commit_interval_ms",
            format!(
                "{commit_ms} ms is more than a third of transaction.timeout.ms ({t} ms): transactions would time out before they commit"
            ),
        ),
        Ok(_) => {}
        Err(_) => s.problem(
            Origin::Default,
            "kafka.producer_properties.\"transaction.timeout.ms\"",
            "must be an integer",
        ),
    }

    // Built even when something was refused (a refused key left empty or at its
    // default), so the topics can be checked in the same pass and `run --check` can still
    // check the policy and key file it names.
    let get = |v: Option<(String, Origin)>| v.map(|(s, _)| s).unwrap_or_default();
    let cfg = RunConfig {
        brokers: get(brokers),
        group_id: get(group_id),
        transactional_id,
        guarantee,
        properties,
        consumer_properties,
        producer_properties,
        input_topic: get(input),
        control_topic: get(control),
        dead_letter_topic: get(dead_letter),
        schedule_topic: get(schedule),
        retention_topic: get(retention),
        routes,
        policy: resolve(get(policy)),
        key_file: resolve(get(key_file)),
        input_format,
        output_format,
        commit_interval: Duration::from_millis(commit_ms as u64),
        commit_max_records: commit_max as usize,
        control_max_staleness: Duration::from_millis(staleness as u64),
        stale_pause: Duration::from_millis(stale_pause as u64),
        queued_max_kbytes: queued_kb as u32,
        shutdown_timeout: Duration::from_millis(shutdown_ms as u64),
        time_limits: TimeLimits {
            max_future_ms,
            anchored_floor_ms: anchored_floor_days * 86_400_000,
        },
        fire_batch: fire_batch as usize,
        clock: ClockSetting {
            start: clock_start,
            speed: clock_speed as u32,
        },
        telemetry: TelemetryConfig { listen, log_format },
        file: file.to_string(),
        topic_origins: std::mem::take(&mut s.taken)
            .into_iter()
            .filter(|(k, _)| k.starts_with("topics."))
            .collect(),
    };
    s.problems.extend(clashes(&cfg.topic_uses(), file, |u| {
        u.origin != Origin::Default
    }));
    s.problems.sort_by_key(ConfigProblem::order);
    if !s.problems.is_empty() {
        return Err(ConfigError {
            file: file.to_string(),
            problems: s.problems,
            partial: Some(Box::new(cfg)),
        });
    }
    // librdkafka checks each property's name and value when it is set: do that now, so a
    // typo is refused at load instead of failing every start.
    let mut problems = Vec::new();
    for (client, c) in [
        ("consumer", super::consumer_config(&cfg)),
        ("producer", super::producer_config(&cfg)),
    ] {
        if let Err(e) = c.create_native_config() {
            problems.push(ConfigProblem {
                origin: Origin::Default,
                key: format!("kafka properties ({client})"),
                message: redact(&e.to_string(), &cfg),
            });
        }
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError {
            file: file.to_string(),
            problems,
            partial: Some(Box::new(cfg)),
        })
    }
}

/// What `run` needs, each part loaded and checked against the others.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration, its routes filled in from the policy.
    pub config: RunConfig,
    /// The policy it names.
    pub policy: Policy,
    /// The keys of the key file it names.
    pub keys: Keyring,
}

/// Why `run` cannot start: every problem of the configuration, of the policy it names and
/// of its key file, found in one pass.
#[derive(Debug, thiserror::Error)]
pub struct SetupError {
    /// The configuration's problems, the clashes of its topics with the policy's included.
    pub config: Option<ConfigError>,
    /// The policy's.
    pub policy: Option<PolicyError>,
    /// The key file's.
    pub keys: Option<KeyFileError>,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.config {
            write!(f, "{e}")?;
        }
        if let Some(e) = &self.policy {
            write!(f, "{e}")?;
        }
        if let Some(e) = &self.keys {
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Loads a configuration with the policy and key file it names. Those are loaded even
/// when the configuration has other problems (from what could be read of it), so that
/// one run lists every problem rather than one file's at a time; only a file whose own
/// key was refused is not looked for.
pub fn load_all(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, Box<SetupError>> {
    let (cfg, mut config_error) = match load(path, env) {
        Ok(c) => (Some(c), None),
        Err(mut e) => (e.partial.take().map(|c| *c), Some(e)),
    };
    let refused = |key: &str| {
        config_error
            .as_ref()
            .is_some_and(|e| e.problems.iter().any(|p| p.key == key))
    };
    let policy = cfg
        .as_ref()
        .filter(|_| !refused("processing.policy"))
        .map(|c| crate::policy::load_file(&c.policy));
    let keys = cfg
        .as_ref()
        .filter(|_| !refused("processing.key_file"))
        .map(|c| keyfile::load(&c.key_file));
    let cfg = match (cfg, &policy) {
        (Some(c), Some(Ok(p))) => match c.with_policy(p) {
            Ok(c) => Some(c),
            Err(e) => {
                match &mut config_error {
                    Some(c) => {
                        c.problems.extend(e.problems);
                        c.problems.sort_by_key(ConfigProblem::order);
                    }
                    None => config_error = Some(e),
                }
                None
            }
        },
        (c, _) => c,
    };
    match (config_error, cfg, policy, keys) {
        (None, Some(config), Some(Ok(policy)), Some(Ok(keys))) => Ok(Loaded {
            config,
            policy,
            keys,
        }),
        (config, _, policy, keys) => Err(Box::new(SetupError {
            config,
            policy: policy.and_then(Result::err),
            keys: keys.and_then(Result::err),
        })),
    }
}

/// Whether a librdkafka property may hold a secret (passwords, keys, tokens, OAuth
/// client secrets inside `sasl.oauthbearer.config`, JAAS lines).
fn secret_name(name: &str) -> bool {
    ["password", "secret", "key", "token", "jaas", "oauthbearer"]
        .iter()
        .any(|w| name.contains(w))
}

/// librdkafka's messages may quote a value; a secret's value never reaches the output.
fn redact(message: &str, cfg: &RunConfig) -> String {
    let mut out = message.to_string();
    for (k, v) in cfg
        .properties
        .iter()
        .chain(&cfg.consumer_properties)
        .chain(&cfg.producer_properties)
    {
        if secret_name(k) && !v.is_empty() {
            out = out.replace(v.as_str(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    const GOOD: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
transactional_id = "g-1"

[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.password" = "hunter2"

[topics.routes]
marketing = "mkt"

[processing]
policy = "policies/excedo.toml"
key_file = "/etc/cdrguard/keys.toml"
commit_interval_ms = 250
"#;

    /// The documented example sets every key to its default, so it loads, and the
    /// time limits it shows are the ones replay uses too.
    #[test]
    fn the_documented_example_loads_with_replays_time_limits() {
        let c = parse(
            include_str!("../../../deploy/cdrguard.toml"),
            "deploy/cdrguard.toml",
            Path::new("deploy"),
            env(&[("HOSTNAME", "h")]),
        )
        .unwrap();
        assert_eq!(c.time_limits, TimeLimits::default());
        let e = parse(
            &format!("{GOOD}max_future_ms = -1\nanchored_floor_days = 0\n"),
            "c.toml",
            Path::new("/srv"),
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("processing.max_future_ms") && e.contains("processing.anchored_floor_days"),
            "{e}"
        );
    }

    #[test]
    fn a_good_file_loads_with_defaults_and_env_overrides() {
        let c = parse(
            GOOD,
            "c.toml",
            Path::new("/srv"),
            env(&[
                ("CDRGUARD_KAFKA__GROUP_ID", "g2"),
                ("CDRGUARD_PROCESSING__COMMIT_MAX_RECORDS", "500"),
                ("CDRGUARD_KAFKA__PROPERTIES__SASL_USERNAME", "svc"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.group_id, "g2");
        assert_eq!(c.commit_interval, Duration::from_millis(250));
        assert_eq!(c.commit_max_records, 500);
        assert_eq!(
            c.routes[Purpose::Marketing as usize].as_deref(),
            Some("mkt")
        );
        // Unnamed routes wait for the policy's topics.
        assert_eq!(c.routes[Purpose::Billing as usize], None);
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo.toml")
                .unwrap();
        let c = c.with_policy(&policy).unwrap();
        assert_eq!(
            c.routes[Purpose::Billing as usize].as_deref(),
            Some("cdr.billing")
        );
        assert_eq!(
            c.routes[Purpose::Marketing as usize].as_deref(),
            Some("mkt")
        );
        // customer_care is not declared by Excedo: it stays unrouted.
        assert_eq!(c.routes[Purpose::CustomerCare as usize], None);
        assert_eq!(c.input_topic, "cdr.raw");
        assert_eq!(c.policy, Path::new("/srv/policies/excedo.toml"));
        assert_eq!(c.properties["sasl.username"], "svc");
        assert_eq!(c.properties["security.protocol"], "SASL_SSL");
        // Debug never shows property values (they may be passwords).
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn every_problem_is_listed_with_where_it_is() {
        let text = r#"
[kafka]
brokers = "b:9092"
guarantee = "maybe_once"
grup_id = "typo"

[kafka.properties]
"enable.auto.commit" = true

[topics]
input = "cdr.raw"
dead_letter = "cdr.raw"

[processing]
policy = "p.toml"
key_file = "k.toml"
commit_interval_ms = 5
"#;
        let e = parse(
            text,
            "c.toml",
            Path::new("."),
            env(&[("CDRGUARD_PROCESSING__QUEUED_MAX_KBYTES", "lots")]),
        )
        .unwrap_err();
        let shown = e.to_string();
        for want in [
            "c.toml:4: kafka.guarantee: \"maybe_once\" is not one of",
            "c.toml:5: kafka.grup_id: unknown key",
            "c.toml:8: kafka.properties.\"enable.auto.commit\": cdrguard sets this property",
            "c.toml:12: topics.dead_letter: topic \"cdr.raw\" is also used by topics.input",
            "c.toml:17: processing.commit_interval_ms: 5 is out of range",
            "env CDRGUARD_PROCESSING__QUEUED_MAX_KBYTES: processing.queued_max_kbytes: must be an integer",
        ] {
            assert!(shown.contains(want), "missing {want:?} in:\n{shown}");
        }
        assert_eq!(e.problems.len(), 6, "{shown}");
    }

    fn excedo() -> Policy {
        crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo.toml")
            .unwrap()
    }

    /// Minimal config text with `routes` under `[topics.routes]`.
    fn with_routes(routes: &str) -> String {
        format!(
            "[kafka]\nbrokers = \"b:9092\"\ntransactional_id = \"t\"\n[topics.routes]\n{routes}\n[processing]\npolicy = \"p\"\nkey_file = \"k\"\n"
        )
    }

    /// Where Excedo's topic for a purpose is set, as a problem would name it.
    fn excedo_place(p: Purpose) -> String {
        let policy = excedo();
        let at = &policy.rule(p).unwrap().topic_at;
        format!("excedo.toml:{}: {}", at.line, at.path)
    }

    /// Regression: `billing = "cdr.analytics"` (or `"cdr.fraud"`) passed `run --check`
    /// and `topics --dry-run` listed the topic for both routes: billing copies (raw
    /// msisdn and imsi) would land where analytics consumers read.
    #[test]
    fn a_route_on_another_routes_policy_topic_is_refused_from_the_file() {
        for (taken, purpose) in [
            ("cdr.analytics", Purpose::Analytics),
            ("cdr.fraud", Purpose::Fraud),
        ] {
            let text = with_routes(&format!("billing = \"{taken}\""));
            let c = parse(&text, "c.toml", Path::new("."), env(&[])).unwrap();
            let e = c.with_policy(&excedo()).unwrap_err();
            let shown = e.to_string();
            let want = format!(
                "  c.toml:5: topics.routes.billing: topic \"{taken}\" is also used by topics.routes.{} (the policy's, {}): every topic",
                purpose.id(),
                excedo_place(purpose)
            );
            assert!(shown.contains(&want), "missing {want:?} in:\n{shown}");
            assert_eq!(e.problems.len(), 1, "{shown}");
        }
    }

    #[test]
    fn a_route_on_another_routes_policy_topic_is_refused_from_the_environment() {
        let c = parse(
            &with_routes(""),
            "c.toml",
            Path::new("."),
            env(&[("CDRGUARD_TOPICS__ROUTES__BILLING", "cdr.analytics")]),
        )
        .unwrap();
        let e = c.with_policy(&excedo()).unwrap_err();
        let shown = e.to_string();
        let want = format!(
            "  env CDRGUARD_TOPICS__ROUTES__BILLING: topics.routes.billing: topic \"cdr.analytics\" is also used by topics.routes.analytics (the policy's, {}): every topic",
            excedo_place(Purpose::Analytics)
        );
        assert!(shown.contains(&want), "missing {want:?} in:\n{shown}");
    }

    /// A policy's topic that is also a service topic nobody set is reported at the
    /// policy's line; one the file set is reported at the file's line.
    #[test]
    fn a_policy_topic_on_a_service_topic_is_refused_where_it_was_set() {
        let text = crate::policy::shipped("excedo").unwrap().replace(
            "[purposes.analytics]\n",
            "[purposes.analytics]\ntopic = \"cdr.raw\"\n",
        );
        let policy = crate::policy::parse_policy(&text, "e.toml").unwrap();
        let at = &policy.rule(Purpose::Analytics).unwrap().topic_at;
        assert_eq!(at.path, "purposes.analytics.topic");
        let c = parse(&with_routes(""), "c.toml", Path::new("."), env(&[])).unwrap();
        let e = c.clone().with_policy(&policy).unwrap_err();
        let want = format!(
            "  e.toml:{}: purposes.analytics.topic: topic \"cdr.raw\" (the policy's topic for topics.routes.analytics) is also used by topics.input (by default): every topic",
            at.line
        );
        assert!(e.to_string().contains(&want), "missing {want:?} in:\n{e}");
        // The file moves the input elsewhere and names the route's old topic instead.
        let text = with_routes("").replace(
            "[topics.routes]",
            "[topics]\ninput = \"cdr.in\"\ncontrol = \"cdr.billing\"\n[topics.routes]",
        );
        let c = parse(&text, "c.toml", Path::new("."), env(&[])).unwrap();
        let e = c.with_policy(&excedo()).unwrap_err();
        let want = format!(
            "  c.toml:6: topics.control: topic \"cdr.billing\" is also used by topics.routes.billing (the policy's, {}): every topic",
            excedo_place(Purpose::Billing)
        );
        assert!(e.to_string().contains(&want), "missing {want:?} in:\n{e}");
        // A configuration whose topics are all distinct passes, twice (run calls it again).
        let c = parse(
            &with_routes("billing = \"ops.billing\""),
            "c.toml",
            Path::new("."),
            env(&[]),
        )
        .unwrap();
        let c = c.with_policy(&excedo()).unwrap();
        assert!(c.with_policy(&excedo()).is_ok());
    }

    #[test]
    fn problems_without_a_line_or_key_print_no_empty_parts() {
        let e = load(Path::new("/nonexistent/c.toml"), env(&[])).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("\n  /nonexistent/c.toml: cannot read:"),
            "{shown}"
        );
        let e = parse("[kafka\n", "c.toml", Path::new("."), env(&[])).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("\n  c.toml:1: not valid TOML"), "{shown}");
        let e = parse("", "c.toml", Path::new("."), env(&[])).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("\n  c.toml: kafka.brokers: missing"),
            "{shown}"
        );
        for s in [shown.as_str(), &e.to_string()] {
            assert!(
                !s.contains(": :") && !s.contains(":0:") && !s.contains("(default)"),
                "{s}"
            );
        }
    }

    /// Regression: `run --check` showed the policy's problems only once the
    /// configuration was fixed, and the key file's only after that.
    #[test]
    fn load_all_lists_the_problems_of_config_policy_and_key_file_together() {
        let dir = tempfile::tempdir().unwrap();
        let policy = crate::policy::shipped("excedo").unwrap().replace(
            "[purposes.analytics]\n",
            "[purposes.analytics]\ncolour = \"red\"\n",
        );
        std::fs::write(dir.path().join("p"), policy).unwrap();
        std::fs::write(dir.path().join("k"), "[[keys]]\nid = \"k1\"\n").unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            with_routes("billing = \"cdr.analytics\"")
                .replace("[processing]", "[processing]\ncommit_interval_ms = 1"),
        )
        .unwrap();
        let e = load_all(&config, env(&[])).unwrap_err();
        let shown = e.to_string();
        let c = config.display();
        let d = dir.path().display();
        for want in [
            format!("\n  {c}:7: processing.commit_interval_ms: 1 is out of range"),
            format!("policy {d}/p refused: 1 problem(s)\n"),
            format!("\n  {d}/p:130: purposes.analytics.colour: unknown key"),
            format!("key file {d}/k refused: 2 problem(s)\n"),
            format!("\n  {d}/k: readable or writable by group or others"),
            format!("\n  {d}/k:1: not a key file"),
        ] {
            assert!(shown.contains(&want), "missing {want:?} in:\n{shown}");
        }
        // With a good policy, the topics of the broken configuration are checked against
        // it in the same pass.
        std::fs::write(
            dir.path().join("p"),
            crate::policy::shipped("excedo").unwrap(),
        )
        .unwrap();
        let e = load_all(&config, env(&[])).unwrap_err();
        let shown = e.to_string();
        for want in [
            format!(
                "config {c} refused: 2 problem(s)\n  {c}:5: topics.routes.billing: topic \"cdr.analytics\" is also used"
            ),
            format!("\n  {c}:7: processing.commit_interval_ms: 1 is out of range"),
        ] {
            assert!(shown.contains(&want), "missing {want:?} in:\n{shown}");
        }
        assert!(e.policy.is_none(), "{shown}");
        // A key the configuration refused is not followed.
        std::fs::write(
            &config,
            "[kafka]\nbrokers = 'b'\n[processing]\npolicy = 7\n",
        )
        .unwrap();
        let e = load_all(&config, env(&[])).unwrap_err();
        assert!(e.policy.is_none() && e.keys.is_none(), "{e}");
    }

    #[test]
    fn required_keys_are_reported_and_key_file_falls_back_to_its_variable() {
        let e = parse("[kafka]\n", "c.toml", Path::new("."), env(&[])).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("kafka.brokers: missing"), "{shown}");
        assert!(shown.contains("processing.policy: missing"), "{shown}");
        assert!(shown.contains("processing.key_file: missing"), "{shown}");
        let c = parse(
            "[kafka]\nbrokers='b'\n[processing]\npolicy='p'\n",
            "c.toml",
            Path::new("/x"),
            env(&[("CDRGUARD_KEY_FILE", "/k/keys.toml")]),
        )
        .unwrap();
        assert_eq!(c.key_file, Path::new("/k/keys.toml"));
        assert!(!c.transactional_id.is_empty());
    }

    #[test]
    fn commit_interval_must_fit_the_transaction_timeout_and_properties_must_exist() {
        let text = GOOD.replace("commit_interval_ms = 250", "commit_interval_ms = 5000");
        let e = parse(&text, "c.toml", Path::new("."), env(&[])).unwrap_err();
        assert!(
            e.to_string()
                .contains("c.toml:17: processing.commit_interval_ms: 5000 ms is more than a third of transaction.timeout.ms (10000 ms)"),
            "{e}"
        );
        let ok = text.replace(
            "[kafka.properties]",
            "[kafka.producer_properties]\n\"transaction.timeout.ms\" = 60000\n\n[kafka.properties]",
        );
        assert!(parse(&ok, "c.toml", Path::new("."), env(&[])).is_ok());
        let typo = GOOD.replace("\"security.protocol\"", "\"security.protocl\"");
        let e = parse(&typo, "c.toml", Path::new("."), env(&[])).unwrap_err();
        assert!(e.to_string().contains("security.protocl"), "{e}");
        // Variables of other tools (no level separator) are none of our business.
        assert!(
            parse(
                GOOD,
                "c.toml",
                Path::new("."),
                env(&[("CDRGUARD_TEST_BROKERS", "x:1")])
            )
            .is_ok()
        );
    }

    #[test]
    fn every_bad_property_is_listed_with_its_line_and_no_secret() {
        let text = GOOD.replace(
            "\"sasl.password\" = \"hunter2\"",
            "\"sasl.password\" = \"hunter2\"\n\"socket.timeout.msx\" = 100\n\"fetch.wait.max.ms\" = \"soon\"",
        );
        let e = parse(
            &text,
            "c.toml",
            Path::new("."),
            env(&[("CDRGUARD_KAFKA__PROPERTIES__MESSAGE_MAX_BYTES", "-5")]),
        )
        .unwrap_err();
        let shown = e.to_string();
        for want in [
            "c.toml:10: kafka.properties.\"socket.timeout.msx\":",
            "c.toml:11: kafka.properties.\"fetch.wait.max.ms\":",
            "env CDRGUARD_KAFKA__PROPERTIES__MESSAGE_MAX_BYTES: kafka.properties.\"message.max.bytes\":",
        ] {
            assert!(shown.contains(want), "missing {want:?} in:\n{shown}");
        }
        assert_eq!(e.problems.len(), 3, "{shown}");
        assert!(!shown.contains("hunter2"));
        // A value of a property that may hold a secret is masked even where librdkafka
        // quotes it (an OAuth property that takes a boolean, given a secret by mistake).
        let bad_secret = GOOD.replace(
            "\"sasl.password\" = \"hunter2\"",
            "\"enable.sasl.oauthbearer.unsecure.jwt\" = \"clientSecret=hunter2\"",
        );
        let e = parse(&bad_secret, "c.toml", Path::new("."), env(&[])).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("enable.sasl.oauthbearer.unsecure.jwt"),
            "{shown}"
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn exactly_once_keeps_the_idempotent_producer_at_least_once_may_drop_it() {
        let off = GOOD.replace(
            "[kafka.properties]",
            "[kafka.producer_properties]\n\"enable.idempotence\" = false\n\n[kafka.properties]",
        );
        let e = parse(&off, "c.toml", Path::new("."), env(&[])).unwrap_err();
        assert!(
            e.to_string().contains(
                "c.toml:8: kafka.producer_properties.\"enable.idempotence\": exactly_once needs"
            ),
            "{e}"
        );
        // librdkafka's other spellings of true are accepted.
        let one = off.replace(
            "\"enable.idempotence\" = false",
            "\"enable.idempotence\" = \"1\"",
        );
        assert!(parse(&one, "c.toml", Path::new("."), env(&[])).is_ok());
        let alo = off.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nguarantee = \"at_least_once\"",
        );
        let c = parse(&alo, "c.toml", Path::new("."), env(&[])).unwrap();
        assert_eq!(
            super::super::producer_config(&c).get("enable.idempotence"),
            Some("false")
        );
        let c = parse(GOOD, "c.toml", Path::new("."), env(&[])).unwrap();
        let p = super::super::producer_config(&c);
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("transactional.id"), Some("g-1"));
    }

    #[test]
    fn env_names_map_to_keys() {
        assert_eq!(
            env_key("CDRGUARD_KAFKA__GROUP_ID").as_deref(),
            Some("kafka.group_id")
        );
        assert_eq!(
            env_key("CDRGUARD_KAFKA__PROPERTIES__SSL_CA_LOCATION").as_deref(),
            Some("kafka.properties.\"ssl.ca.location\"")
        );
        assert_eq!(env_key("CDRGUARD_KEY_FILE"), None);
    }

    #[test]
    fn telemetry_defaults_file_keys_and_environment() {
        let c = parse(GOOD, "c.toml", Path::new("."), env(&[])).unwrap();
        assert_eq!(c.telemetry, TelemetryConfig::default());
        assert_eq!(c.telemetry.listen.to_string(), "0.0.0.0:9464");
        let text =
            format!("{GOOD}\n[telemetry]\nlisten = \"127.0.0.1:0\"\nlog_format = \"json\"\n");
        let c = parse(&text, "c.toml", Path::new("."), env(&[])).unwrap();
        assert_eq!(c.telemetry.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.telemetry.log_format, LogFormat::Json);
        let c = parse(
            &text,
            "c.toml",
            Path::new("."),
            env(&[("CDRGUARD_TELEMETRY__LISTEN", "[::1]:9999")]),
        )
        .unwrap();
        assert_eq!(c.telemetry.listen.to_string(), "[::1]:9999");
    }

    #[test]
    fn a_bad_telemetry_address_or_log_format_is_refused_at_load_with_its_line() {
        let text =
            format!("{GOOD}\n[telemetry]\nlisten = \"metrics.local:9464\"\nlog_format = \"xml\"\n");
        let line = |key: &str| text.lines().position(|l| l.starts_with(key)).unwrap() + 1;
        let e = parse(&text, "c.toml", Path::new("."), env(&[])).unwrap_err();
        let shown = e.to_string();
        for want in [
            format!(
                "c.toml:{}: telemetry.listen: \"metrics.local:9464\" is not an IP address and port",
                line("listen")
            ),
            format!(
                "c.toml:{}: telemetry.log_format: \"xml\" is not one of: text, json",
                line("log_format")
            ),
        ] {
            assert!(shown.contains(&want), "missing {want:?} in:\n{shown}");
        }
        let e = parse(
            GOOD,
            "c.toml",
            Path::new("."),
            env(&[("CDRGUARD_TELEMETRY__LISTEN", "9464")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("env CDRGUARD_TELEMETRY__LISTEN: telemetry.listen: \"9464\" is not an IP address and port"),
            "{e}"
        );
    }
}
