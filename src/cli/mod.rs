//! The command line: parses arguments, loads policy, keys and files, runs an adapter.
//! The only place `anyhow` is used.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::adapters::cases::PolicyRef;
use crate::adapters::engine::Engine;
use crate::adapters::files::Outputs;
use crate::adapters::generate::GenConfig;
use crate::adapters::telemetry::{self, LogFormat};
use crate::adapters::{cases, demo, keyfile, replay, report};
use crate::codec::Format;
use crate::core::bounds::TimeLimits;
use crate::core::pseudonym::{Keyring, MasterKey};
use crate::policy::{self, Policy};
use crate::vocab::purpose::Purpose;
use crate::vocab::time::Millis;

/// Writes to stdout, returning the error instead of panicking, so that a closed pipe
/// (`cdrguard policy explain x | head`) ends the command quietly.
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout().lock(), $($arg)*)
    };
}

macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

/// cdrguard: tags telecom usage records with purpose and legal basis under an operator's
/// privacy policy, strips or pseudonymises what each purpose may not see, routes the
/// copies, and tells downstream stores when to delete them.
#[derive(Parser)]
#[command(name = "cdrguard", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline in process, no broker: generate traffic, apply a shipped
    /// policy, write every route to ./out/ and print a summary.
    ///
    /// Example: cdrguard demo --policy alleato --records 50000
    Demo(DemoArgs),
    /// Process record and control-event files with the same core as Kafka mode.
    ///
    /// Example: cdrguard replay --policy policies/excedo.toml --input cdrs.jsonl
    ///   --control events.jsonl --now 2027-01-01T00:00:00.000Z --out out/ --keys keys.toml
    Replay(ReplayArgs),
    /// Validate, explain or test policy files.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Write realistic synthetic records and control events.
    ///
    /// Both files are written beside their targets and renamed into place together once
    /// both are complete: a failed or interrupted run leaves the targets as they were.
    ///
    /// Example: cdrguard generate --records 100000 --subscribers 5000 --seed 7
    ///   --out-records cdrs.jsonl --out-control events.jsonl
    Generate(GenerateArgs),
    /// Make a pseudonym key file, export one purpose's token keys from it, or reverse
    /// marketing tokens.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Run against Kafka: route every record of the input topic, exactly once.
    ///
    /// Example: cdrguard run --config deploy/cdrguard.toml
    ///
    /// Settings can be overridden from the environment, e.g.
    /// CDRGUARD_KAFKA__BROKERS=kafka:9092 or CDRGUARD_KAFKA__PROPERTIES__SASL_PASSWORD=...
    Run(RunArgs),
    /// Create the topics a `run` configuration needs (existing ones are left alone), or
    /// list them with their settings.
    ///
    /// Example: cdrguard topics --config deploy/cdrguard.toml --partitions 12 --replication 3
    Topics(TopicsArgs),
    /// Feed record and control-event files (as `generate` writes them) into a `run`
    /// configuration's input and control topics, keyed as cdrguard expects: control
    /// events first, then records. For trying a deployment out and for load tests.
    ///
    /// Example: cdrguard produce --config cdrguard.toml --control events.jsonl
    ///   --records cdrs.jsonl
    Produce(ProduceArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["records", "control"])))]
struct ProduceArgs {
    /// Configuration file, as for `run` (brokers, TLS/SASL properties, topics).
    #[arg(long)]
    config: PathBuf,
    /// Records to send to the input topic, keyed by msisdn (unreadable ones are sent as
    /// they are, without a key, so the dead-letter path can be tried too).
    #[arg(long)]
    records: Option<PathBuf>,
    /// Encoding of the records file: JSON lines, or length-prefixed binary.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// Control events (JSON lines) to send to the control topic, keyed by what they set
    /// (unreadable lines are skipped: the compacted topic takes no message without a key).
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(Args)]
struct TopicsArgs {
    /// Configuration file, as for `run`.
    #[arg(long)]
    config: PathBuf,
    /// Partitions of the input, route, control and schedule topics.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Replication factor.
    #[arg(long, default_value_t = 3)]
    replication: i32,
    /// Only print what would be created.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML); every key is documented in deploy/cdrguard.toml.
    #[arg(long)]
    config: PathBuf,
    /// Validate the configuration, policy and key file, print the result and exit.
    #[arg(long)]
    check: bool,
    /// Log format (default: the configuration's telemetry.log_format, else text).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Args)]
struct DemoArgs {
    /// A policy file, or a shipped policy (hektor-mobil, excedo, alleato, partnersec,
    /// select-telecom) when no such file exists.
    #[arg(long, default_value = "excedo")]
    policy: String,
    /// Output directory.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Records to generate.
    #[arg(long, default_value_t = 20_000)]
    records: u64,
    /// Subscribers to generate (default: 1,000, or --records if fewer), at most
    /// --records: each is built (with its consent events and invoices) before the records
    /// are drawn, so more would cost memory and time and add no traffic. More are
    /// refused.
    #[arg(long)]
    subscribers: Option<u32>,
    /// Seed for the generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The instant the demo runs at (default: now). Traffic covers the two years before.
    #[arg(long)]
    now: Option<String>,
    /// Replace --out even if it holds files cdrguard did not write.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ReplayArgs {
    /// Policy file (or a shipped policy's name when no such file exists).
    #[arg(long)]
    policy: String,
    /// Records: JSON lines, or length-prefixed binary with --input-format binary.
    #[arg(long)]
    input: PathBuf,
    /// Format of --input.
    #[arg(long, value_enum, default_value = "json")]
    input_format: Format,
    /// Control events, JSON lines.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Expiries due at this instant are written (default: now).
    #[arg(long)]
    now: Option<String>,
    /// Output directory: one file per route, retention.jsonl, dead-letter.jsonl. It is
    /// written beside and replaces the folder whole when the replay succeeds; a folder
    /// cdrguard did not write is refused unless --force.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out even if it holds files cdrguard did not write.
    #[arg(long)]
    force: bool,
    /// Records (and control events) are put in time order within this much (e.g. 90s,
    /// 1h); one arriving later than that behind the latest seen goes to the dead letter.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    max_reorder: i64,
    /// At most this many records (and, apart, control events) wait for reordering; past
    /// it the earliest is processed early. Bounds the reorder buffer's memory (about 500
    /// bytes a JSON record).
    #[arg(long, default_value_t = 100_000)]
    reorder_capacity: usize,
    /// Records later than --now by more than this go to the dead letter.
    #[arg(long, default_value = "1d", value_parser = parse_duration)]
    max_future: i64,
    /// Records older than this before --now go to the dead letter where a route waits on a
    /// settlement or contract end (a year counts 365 days); on other routes a record is
    /// refused when every route's retention has run out for it.
    #[arg(long, default_value = "10y", value_parser = parse_duration)]
    anchored_floor: i64,
    /// Pseudonym key file (or set CDRGUARD_KEY_FILE); make one with `cdrguard keys
    /// generate`. Required unless --ephemeral-keys is given.
    #[arg(long, env = "CDRGUARD_KEY_FILE")]
    keys: Option<PathBuf>,
    /// Use a throwaway key for this run instead of a key file: pseudonyms and tokens differ
    /// from run to run and no token can be reversed afterwards.
    #[arg(long, conflicts_with = "keys")]
    ephemeral_keys: bool,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate policy files; every problem is listed with file and line.
    ///
    /// Example: cdrguard policy check policies/*.toml
    Check {
        /// Policy files (or shipped policies' names where no such file exists).
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Print the GDPR Art. 30 record of processing derived from a policy.
    ///
    /// Example: cdrguard policy explain policies/alleato.toml --format json
    Explain {
        /// Policy file (or a shipped policy's name when no such file exists).
        file: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "markdown")]
        format: ExplainFormat,
    },
    /// Run behaviour cases: records and control events in, expected copies and expiries.
    /// Each case file names its policy: `policy_file` (relative to the case file, read from
    /// disk) or `shipped_policy` (compiled in).
    ///
    /// Example: cdrguard policy test tests/behaviour
    Test {
        /// Case files or directories of them.
        #[arg(default_value = "tests/behaviour")]
        paths: Vec<PathBuf>,
    },
}

/// Formats of `policy explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExplainFormat {
    /// The record of processing as Markdown.
    #[value(alias = "md")]
    Markdown,
    /// The same record as JSON, for tooling.
    Json,
}

#[derive(Args)]
struct GenerateArgs {
    /// Where to write records.
    #[arg(long, default_value = "cdrs.jsonl")]
    out_records: PathBuf,
    /// Where to write control events.
    #[arg(long, default_value = "control.jsonl")]
    out_control: PathBuf,
    /// Record encoding.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// Records (malformed included).
    #[arg(long, default_value_t = 20_000)]
    records: u64,
    /// Subscribers, at most --records: each is built (with its consent events and
    /// invoices) before the records are drawn, so more would cost memory and time and add
    /// no traffic. More are refused.
    #[arg(long, default_value_t = 1_000)]
    subscribers: u32,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// First instant of traffic.
    #[arg(long, default_value = "2026-01-01T00:00:00.000Z")]
    start: String,
    /// Days of traffic.
    #[arg(long, default_value_t = 31)]
    days: u32,
    /// Share of subscribers consenting to analytics.
    #[arg(long, default_value_t = 0.4)]
    analytics_consent: f64,
    /// Share consenting to marketing.
    #[arg(long, default_value_t = 0.25)]
    marketing_consent: f64,
    /// Share objecting to marketing.
    #[arg(long, default_value_t = 0.02)]
    objection_rate: f64,
    /// Share of malformed records (and of malformed control lines).
    #[arg(long, default_value_t = 0.005)]
    malformed_rate: f64,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Write a new key file with a random 256-bit secret (mode 600).
    ///
    /// Example: cdrguard keys generate --out keys.toml --id k2026a
    Generate {
        /// Where to write; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// Key id stamped on pseudonyms and tokens.
        #[arg(long, default_value = "k1")]
        id: String,
    },
    /// Write a key file holding only one purpose's token keys (mode 600), for whoever
    /// reverses that purpose's tokens: it reverses them and derives nothing else (no
    /// pseudonyms, no other purpose's tokens). The secrets are never printed.
    ///
    /// Example: cdrguard keys export --keys keys.toml --purpose marketing --out marketing-keys.toml
    Export {
        /// The master key file; every key in it is exported, so tokens written before a
        /// rotation reverse too.
        #[arg(long, env = "CDRGUARD_KEY_FILE")]
        keys: PathBuf,
        /// The purpose whose token keys to export.
        #[arg(long, value_parser = parse_purpose)]
        purpose: Purpose,
        /// Where to write; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Reverse marketing tokens (for the marketing system's key holder).
    ///
    /// Example: cdrguard keys reverse --keys marketing-keys.toml 'k1.marketing~+46...'
    Reverse {
        /// A master key file, or a token key file written by `keys export`.
        #[arg(long, env = "CDRGUARD_KEY_FILE")]
        keys: PathBuf,
        /// Tokens.
        #[arg(required = true)]
        tokens: Vec<String>,
    },
}

/// Runs the command line. A closed stdout (the output piped into `head`) ends it quietly.
/// An error is printed as `error: ` and its chain of causes, exit status 1: returning it
/// from `main` would print a stack trace with `RUST_BACKTRACE` set, which tells a user
/// nothing about a file they mistyped (a panic still prints one).
pub fn main() -> std::process::ExitCode {
    match run_cli(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes, joined by `: `. A list of problems keeps its lines; a cause
/// whose text the message already ends with (`#[error("...: {0}")]` over a `#[source]`)
/// is not repeated.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim_end();
        if out.is_empty() {
            out.push_str(text);
        } else if !out.ends_with(text) {
            out.push_str(": ");
            out.push_str(text);
        }
    }
    out
}

/// Whether an error is stdout going away under us.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs one parsed command line: each subcommand is a function of its own arguments.
fn run_cli(cli: Cli) -> Result<()> {
    // Progress bars only for a terminal: in a file or a pipe they are noise.
    let progress = std::io::stderr().is_terminal();
    match cli.command {
        Command::Demo(a) => demo_cmd(a, progress),
        Command::Replay(a) => replay_cmd(a, progress),
        Command::Policy(PolicyCmd::Check { files }) => policy_check(&files),
        Command::Policy(PolicyCmd::Explain { file, format }) => policy_explain(&file, format),
        Command::Policy(PolicyCmd::Test { paths }) => policy_test(&paths),
        Command::Generate(a) => generate_cmd(a, progress),
        Command::Keys(KeysCmd::Generate { out, id }) => keys_generate(&out, &id),
        Command::Keys(KeysCmd::Export { keys, purpose, out }) => keys_export(&keys, purpose, &out),
        Command::Keys(KeysCmd::Reverse { keys, tokens }) => keys_reverse(&keys, &tokens),
        Command::Run(a) => run(a),
        Command::Topics(a) => topics(a),
        Command::Produce(a) => produce(a, progress),
    }
}

/// `demo`: generates traffic, replays it under a throwaway key and prints the summary.
fn demo_cmd(a: DemoArgs, progress: bool) -> Result<()> {
    let policy = load_policy(&a.policy)?;
    let now = parse_now(a.now.as_deref())?;
    let keys = ephemeral_keys();
    let cfg = GenConfig {
        records: a.records,
        subscribers: a
            .subscribers
            .unwrap_or_else(|| u32::try_from(a.records.min(1_000)).unwrap_or(1_000)),
        seed: a.seed,
        ..GenConfig::default()
    };
    cfg.validate()?;
    let summary = demo::run(&policy, &keys, &a.out, a.force, cfg, now, progress)?;
    out!("{summary}")?;
    outln!(
        "wrote every route to {}/ (input in {}/input/); pseudonym key: a throwaway key for this run",
        a.out.display(),
        a.out.display()
    )?;
    Ok(())
}

/// `replay`: processes record and control files into an output folder and prints the
/// summary.
fn replay_cmd(a: ReplayArgs, progress: bool) -> Result<()> {
    let policy = load_policy(&a.policy)?;
    let now = parse_now(a.now.as_deref())?;
    let keys = replay_keys(a.keys.as_deref(), a.ephemeral_keys)?;
    let mut engine = Engine::new(&policy, &keys);
    let mut outputs = Outputs::create(&a.out, &policy, a.force)?;
    let input = replay::ReplayInput {
        records: a.input,
        format: a.input_format,
        control: a.control,
        now,
        progress,
        limits: replay::ReplayLimits {
            max_reorder_ms: a.max_reorder,
            reorder_capacity: a.reorder_capacity,
            times: Some(TimeLimits {
                max_future_ms: a.max_future,
                anchored_floor_ms: a.anchored_floor,
            }),
        },
    };
    let counts = replay::replay(&input, &mut engine, &mut outputs)?;
    let withheld = outputs.finish()?;
    out!(
        "{}",
        report::summary(
            &policy,
            &engine.stats,
            engine.open_windows(),
            counts.control_dead_letters,
            withheld
        )
    )?;
    outln!("wrote {}/", a.out.display())?;
    Ok(())
}

/// `policy check`: loads every policy named, so one run lists every refused file.
fn policy_check(files: &[String]) -> Result<()> {
    let mut failed = 0;
    for f in files {
        match load_policy(f) {
            Ok(p) => {
                let n = p.declared().count();
                outln!(
                    "{}: ok ({}, {n} {})",
                    p.file,
                    p.tag,
                    if n == 1 { "purpose" } else { "purposes" }
                )?;
            }
            Err(e) => {
                failed += 1;
                eprintln!("{}", error_text(&e));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} policy file(s) refused", files.len());
    }
    Ok(())
}

/// `policy explain`: prints a policy's record of processing.
fn policy_explain(file: &str, format: ExplainFormat) -> Result<()> {
    let p = load_policy(file)?;
    match format {
        ExplainFormat::Markdown => out!("{}", policy::explain::markdown(&p))?,
        ExplainFormat::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&policy::explain::json(&p))?
        )?,
    }
    Ok(())
}

/// `policy test`: runs the behaviour cases and fails if any did.
fn policy_test(paths: &[PathBuf]) -> Result<()> {
    let report = cases::run_paths(paths, &load_policy_ref)?;
    out!("{}", report.render())?;
    if report.failed() > 0 {
        bail!("{} behaviour case(s) failed", report.failed());
    }
    Ok(())
}

/// `generate`: writes synthetic records and control events.
fn generate_cmd(a: GenerateArgs, progress: bool) -> Result<()> {
    let cfg = GenConfig {
        subscribers: a.subscribers,
        records: a.records,
        seed: a.seed,
        start: Millis::parse(&a.start).context("--start")?,
        days: a.days,
        analytics_consent: a.analytics_consent,
        marketing_consent: a.marketing_consent,
        objection_rate: a.objection_rate,
        malformed_rate: a.malformed_rate,
        ..GenConfig::default()
    };
    cfg.validate()?;
    let w = demo::write_traffic_with(&cfg, &a.out_records, &a.out_control, a.format, progress)?;
    outln!(
        "wrote {} records ({} malformed) to {} and {} control events ({} malformed) to {}",
        w.records,
        w.malformed_records,
        a.out_records.display(),
        w.controls,
        w.malformed_controls,
        a.out_control.display()
    )?;
    Ok(())
}

/// `keys generate`: writes a new key file, after checking the id as a key would.
fn keys_generate(out: &Path, id: &str) -> Result<()> {
    MasterKey::new(id, &[0; 32]).map_err(anyhow::Error::from)?;
    keyfile::write_new(out, id).with_context(|| format!("writing {}", out.display()))?;
    outln!("wrote key {id} to {} (mode 600)", out.display())?;
    Ok(())
}

/// `keys export`: writes one purpose's token keys to their own file.
fn keys_export(keys: &Path, purpose: Purpose, out: &Path) -> Result<()> {
    let ids = keyfile::export(keys, purpose, out)?;
    outln!(
        "wrote the {} token keys {} to {} (mode 600)",
        purpose.id(),
        ids.join(", "),
        out.display()
    )?;
    Ok(())
}

/// `keys reverse`: prints the number behind each token, one a line.
fn keys_reverse(keys: &Path, tokens: &[String]) -> Result<()> {
    let ring = keyfile::load_any(keys)?;
    for t in tokens {
        outln!("{}", ring.reverse(t)?)?;
    }
    Ok(())
}

/// `produce`: feeds files into a configuration's control and input topics.
fn produce(a: ProduceArgs, progress: bool) -> Result<()> {
    use crate::adapters::kafka::{config, produce};
    let cfg = config::load(&a.config, std::env::vars())?;
    let bar = if progress {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let p = produce::produce_files(
        &cfg,
        a.control.as_deref(),
        a.records.as_deref(),
        a.format,
        &|n| bar.set_message(format!("{n} messages sent")),
    )?;
    bar.finish_and_clear();
    outln!(
        "sent {} control events to {} ({} unreadable lines skipped) and {} records to {} ({} unreadable, sent without a key)",
        p.control,
        cfg.control_topic,
        p.control_skipped,
        p.records + p.records_unkeyed,
        cfg.input_topic,
        p.records_unkeyed
    )?;
    Ok(())
}

/// The keys a replay uses: the key file, or a throwaway key only when asked for by name.
/// Pseudonyms under a throwaway key match nothing written before or after, and its tokens
/// can never be reversed, so it is never chosen silently.
fn replay_keys(file: Option<&Path>, ephemeral: bool) -> Result<Keyring> {
    match (file, ephemeral) {
        (Some(p), _) => Ok(keyfile::load(p)?),
        (None, true) => {
            eprintln!(
                "note: --ephemeral-keys: a throwaway key for this run; pseudonyms differ from run to run and tokens cannot be reversed later"
            );
            Ok(ephemeral_keys())
        }
        (None, false) => bail!(
            "replay needs pseudonym keys: give --keys FILE (or set CDRGUARD_KEY_FILE; make one with `cdrguard keys generate --out FILE`), or --ephemeral-keys for a throwaway key whose pseudonyms differ from run to run"
        ),
    }
}

/// `topics`: lists the topics a configuration needs and creates those missing.
fn topics(a: TopicsArgs) -> Result<()> {
    use crate::adapters::kafka::{self, config, topics};

    let cfg = config::load(&a.config, std::env::vars())?;
    let policy = policy::load_file(&cfg.policy)?;
    let cfg = cfg.with_policy(&policy)?;
    let specs = topics::specs(&cfg, &policy, a.partitions);
    for t in &specs {
        let settings: Vec<String> = t.configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        outln!(
            "{:<28} {:<26} partitions={} {}",
            t.name,
            t.role,
            t.partitions,
            settings.join(" ")
        )?;
    }
    if a.dry_run {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let created = rt.block_on(topics::create(&kafka::common(&cfg), &specs, a.replication))?;
    outln!("created {} topic(s); the rest existed", created.len())?;
    Ok(())
}

/// `run`: checks the configuration, policy and key file, then routes from Kafka until
/// stopped by a signal.
fn run(a: RunArgs) -> Result<()> {
    use std::sync::Arc;

    use crate::adapters::kafka::{self, RunHandles, config};

    // Configuration, policy and key file are checked together, so one run (with --check
    // or without) lists every problem of all three.
    let config::Loaded {
        config: cfg,
        policy,
        keys,
    } = config::load_all(&a.config, std::env::vars())?;
    let (policy, keys) = (Arc::new(policy), Arc::new(keys));
    if a.check {
        outln!(
            "{}: ok (policy {}, {} routes, guarantee {:?}, input {})",
            a.config.display(),
            policy.tag,
            policy.declared().count(),
            cfg.guarantee,
            cfg.input_topic
        )?;
        return Ok(());
    }
    // Colour codes only for a terminal: in a file or a log collector's pipe they are noise.
    telemetry::init_logs(
        a.log_format.unwrap_or(cfg.telemetry.log_format),
        std::io::stderr().is_terminal(),
    );
    tracing::info!(
        policy = %policy.tag,
        guarantee = ?cfg.guarantee,
        input = %cfg.input_topic,
        group = %cfg.group_id,
        "starting"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cdrguard-worker")
        .build()?;
    let handles = RunHandles::new(&cfg);
    let stats = handles.stats.clone();
    let shutdown_timeout = cfg.shutdown_timeout;
    // Before the broker is reached: liveness and the reason for not being ready answer
    // from the start.
    telemetry::start(cfg.telemetry.listen, handles.status.clone())?;
    rt.block_on(async {
        let stop = Arc::new(tokio::sync::Notify::new());
        watch_signals(stop.clone(), shutdown_timeout)?;
        kafka::run(cfg, policy, keys, stop, handles).await?;
        anyhow::Ok(())
    })?;
    tracing::info!(stats = %stats.line(), "stopped");
    Ok(())
}

/// Turns SIGTERM and SIGINT into a stop: the first asks `stop` for an orderly one with
/// `shutdown_timeout` to finish it, a second ends the process at once. Called inside the
/// runtime, which the watching task runs on.
fn watch_signals(
    stop: std::sync::Arc<tokio::sync::Notify>,
    shutdown_timeout: std::time::Duration,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            signals += 1;
            if signals > 1 {
                // The operator insists: nothing is lost (the open transaction is
                // aborted by the broker or the next instance), only time.
                tracing::warn!(signal = name, "second signal: exiting at once");
                exit_now(130);
            }
            tracing::info!(signal = name, ?shutdown_timeout, "stopping");
            stop.notify_one();
            // A stop must end before the supervisor's own grace period does; past
            // the deadline the process exits with what it could not finish left
            // to the broker (an open transaction is aborted on its timeout).
            std::thread::spawn(move || {
                std::thread::sleep(shutdown_timeout);
                tracing::error!(
                    ?shutdown_timeout,
                    "the stop did not finish in time; exiting with its transaction left to the broker's timeout"
                );
                exit_now(1);
            });
        }
    });
    Ok(())
}

/// Ends the process at once with `code`, from any thread. `std::process::exit` would run
/// the C library's exit handlers (OpenSSL's among them) while librdkafka's threads still
/// use them, which can crash the exit itself; nothing buffered is lost, since logs go to
/// stderr unbuffered.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and never returns; it only ends the process.
    unsafe { libc::_exit(code) }
}

/// Loads a policy file, or a shipped policy by name when no file of that name exists: a
/// file on disk always wins, so an edited policy is never shadowed by its compiled-in copy.
pub fn load_policy(name: &str) -> Result<Policy> {
    let path = Path::new(name);
    if path.is_file() {
        return Ok(policy::load_file(path)?);
    }
    match policy::shipped(name) {
        Some(text) => Ok(policy::parse_policy(
            text,
            &format!("policies/{name}.toml (shipped)"),
        )?),
        None => Ok(policy::load_file(path)?),
    }
}

/// Loads the policy a behaviour-case file names: its file from disk, or a shipped one.
pub fn load_policy_ref(which: PolicyRef<'_>) -> Result<Policy> {
    match which {
        PolicyRef::File(path) => Ok(policy::load_file(path)?),
        PolicyRef::Shipped(name) => match policy::shipped(name) {
            Some(text) => Ok(policy::parse_policy(
                text,
                &format!("policies/{name}.toml (shipped)"),
            )?),
            None => bail!(
                "no shipped policy {name:?}; shipped are {}",
                policy::SHIPPED.map(|(n, _)| n).join(", ")
            ),
        },
    }
}

/// A duration from the command line: a whole number and a unit, `ms`, `s`, `m`, `h`, `d`
/// or `y` (365 days), e.g. `90s`, `1h`, `10y`. In milliseconds.
fn parse_duration(s: &str) -> std::result::Result<i64, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; write e.g. 90s, 1h, 1d or 10y"))?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "y" => 365 * 86_400_000,
        _ => return Err(format!("unit {unit:?} is not one of ms, s, m, h, d, y")),
    };
    n.checked_mul(ms)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// A purpose id from the command line.
fn parse_purpose(s: &str) -> std::result::Result<Purpose, String> {
    Purpose::from_id(s).ok_or_else(|| {
        format!(
            "not a purpose; purposes are {}",
            Purpose::ALL.map(|p| p.id()).join(", ")
        )
    })
}

fn parse_now(s: Option<&str>) -> Result<Millis> {
    match s {
        Some(s) => Millis::parse(s).context("--now"),
        // The CLI is the one place that reads the clock.
        None => Ok(Millis(chrono::Utc::now().timestamp_millis())),
    }
}

/// A random key that lives for one run: the demo never needs a key file, and no key is
/// ever written into the code.
fn ephemeral_keys() -> Keyring {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = MasterKey::new("ephemeral", &secret).expect("a 32-byte secret and a valid id");
    Keyring::new(&[key]).expect("one key")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cdrguard").chain(args.iter().copied()))
    }

    /// Regression: without --keys, replay warned and went on with a throwaway key.
    #[test]
    fn replay_refuses_to_pick_a_throwaway_key_by_itself() {
        let e = replay_keys(None, false).unwrap_err().to_string();
        assert!(
            e.contains("--keys") && e.contains("--ephemeral-keys"),
            "{e}"
        );
        assert!(replay_keys(None, true).is_ok());
        let both = [
            "replay",
            "--policy",
            "excedo",
            "--input",
            "i",
            "--out",
            "o",
            "--keys",
            "k",
            "--ephemeral-keys",
        ];
        assert!(
            parse(&both).is_err(),
            "a key file and a throwaway key conflict"
        );
    }

    /// `keys export` writes a token key file that `keys reverse` reads, while replay
    /// refuses it: it cannot pseudonymise.
    #[test]
    fn an_exported_key_file_is_refused_where_the_master_keys_are_needed() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, out) = (dir.path().join("keys.toml"), dir.path().join("mk.toml"));
        let path = |p: &Path| p.to_str().unwrap().to_string();
        run_cli(parse(&["keys", "generate", "--out", &path(&keys)]).unwrap()).unwrap();
        let export = [
            "keys",
            "export",
            "--keys",
            &path(&keys),
            "--purpose",
            "marketing",
            "--out",
            &path(&out),
        ];
        run_cli(parse(&export).unwrap()).unwrap();
        let token = keyfile::load(&keys)
            .unwrap()
            .tokenise(Purpose::Marketing, "+46701234567")
            .unwrap();
        assert_eq!(
            keyfile::load_any(&out).unwrap().reverse(&token).unwrap(),
            "+46701234567"
        );
        run_cli(parse(&["keys", "reverse", "--keys", &path(&out), &token]).unwrap()).unwrap();
        let e = replay_keys(Some(&out), false).unwrap_err().to_string();
        assert!(
            e.contains("holds only the token keys k1.marketing") && e.contains("master key file"),
            "{e}"
        );
        let mut bad = export;
        bad[5] = "telepathy";
        assert!(parse(&bad).is_err(), "an unknown purpose");
    }

    #[test]
    fn explain_formats_are_a_closed_set() {
        for (arg, want) in [
            ("markdown", ExplainFormat::Markdown),
            ("md", ExplainFormat::Markdown),
            ("json", ExplainFormat::Json),
        ] {
            match parse(&["policy", "explain", "excedo", "--format", arg])
                .unwrap()
                .command
            {
                Command::Policy(PolicyCmd::Explain { format, .. }) => assert_eq!(format, want),
                _ => panic!("not explain"),
            }
        }
        let Err(e) = parse(&["policy", "explain", "excedo", "--format", "xml"]) else {
            panic!("xml accepted");
        };
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn a_closed_stdout_is_recognised_through_the_error_chain() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the summary");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("policy refused")));
    }

    /// Regression: `policy check excedo` looked for a file named `excedo` only, while
    /// `policy explain excedo` took the shipped policy.
    #[test]
    fn policy_check_takes_shipped_names_and_lists_every_refused_file() {
        run_cli(parse(&["policy", "check", "excedo", "alleato"]).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[policy]\n").unwrap();
        let bad = bad.to_str().unwrap();
        let e = run_cli(parse(&["policy", "check", bad, "excedo", "no-such-policy"]).unwrap())
            .unwrap_err();
        assert_eq!(error_text(&e), "2 of 3 policy file(s) refused");
    }

    /// Regression: `topics --dry-run` listed `cdr.analytics` for both billing and
    /// analytics when the configuration put billing on the policy's analytics topic.
    #[test]
    fn topics_refuses_a_configuration_whose_routes_share_a_topic() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/excedo.toml");
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"b:9092\"\ntransactional_id = \"t\"\n[topics.routes]\nbilling = \"cdr.analytics\"\n[processing]\npolicy = \"{}\"\nkey_file = \"k\"\n",
                policy.display()
            ),
        )
        .unwrap();
        let args = ["topics", "--config", config.to_str().unwrap(), "--dry-run"];
        let e = error_text(&run_cli(parse(&args).unwrap()).unwrap_err());
        assert!(
            e.contains(":5: topics.routes.billing: topic \"cdr.analytics\" is also used by topics.routes.analytics"),
            "{e}"
        );
    }

    #[test]
    fn an_error_prints_with_its_causes_once_each() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::from(io).context("writing out/billing.jsonl");
        assert_eq!(error_text(&e), "writing out/billing.jsonl: disk on fire");
        // A message that already ends with its cause does not repeat it.
        #[derive(Debug, thiserror::Error)]
        #[error("admin client: {0}")]
        struct Wrapper(#[source] std::io::Error);
        let e = anyhow::Error::from(Wrapper(std::io::Error::other("refused")));
        assert_eq!(error_text(&e), "admin client: refused");
        // A list of problems keeps its lines, without a blank one at the end.
        let e = crate::policy::load_file(Path::new("/nonexistent/p.toml")).unwrap_err();
        let text = error_text(&anyhow::Error::from(e));
        assert!(
            text.starts_with("policy /nonexistent/p.toml refused: 1 problem(s)\n  /nonexistent/p.toml: cannot read")
                && !text.ends_with('\n'),
            "{text:?}"
        );
    }

    #[test]
    fn shipped_names_load_when_no_file_has_that_name() {
        let p = load_policy("alleato").unwrap();
        assert_eq!(p.id, "alleato");
        assert!(p.file.ends_with("(shipped)"), "{}", p.file);
        assert!(load_policy("no-such-policy").is_err());
        assert!(load_policy_ref(PolicyRef::Shipped("no-such-policy")).is_err());
    }
}
