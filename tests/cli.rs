//! The `cdrguard` binary as a user meets it: what it prints on stderr and how it exits.
//! No broker: `run` is only started where it fails or logs before it needs one.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary, with no `CDRGUARD_` variable, `RUST_LOG` or `NO_COLOR` of the caller's: a
/// test's setup is exactly what it sets.
fn cdrguard(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdrguard"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CDRGUARD_") || k == "RUST_LOG" || k == "NO_COLOR" {
            cmd.env_remove(&*k);
        }
    }
    cmd.args(args);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file readable by its owner only, as key files must be.
fn write_private(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// A shipped policy file of the repository.
fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(format!("{name}.toml"))
}

/// Regression: with RUST_BACKTRACE=1 a mistyped file name printed a stack trace after the
/// message (anyhow's report of an error returned from `main`).
#[test]
fn a_user_error_prints_one_error_line_and_no_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().unwrap();
    for (args, first) in [
        (
            vec!["run", "--config", missing, "--check"],
            format!("error: config {missing} refused: 1 problem(s)\n  {missing}: cannot read: "),
        ),
        (
            vec!["keys", "reverse", "--keys", missing, "t"],
            format!("error: key file {missing} refused: 1 problem(s)\n  {missing}: cannot read: "),
        ),
        (
            vec![
                "replay", "--policy", "excedo", "--input", missing, "--out", missing,
            ],
            "error: ".to_string(),
        ),
    ] {
        for backtrace in ["1", "full"] {
            let o = run(cdrguard(&args).env("RUST_BACKTRACE", backtrace));
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.starts_with(&first), "{args:?}: {err}");
            assert!(!err.to_lowercase().contains("backtrace"), "{args:?}: {err}");
            assert!(!err.contains("Caused by"), "{args:?}: {err}");
            assert_eq!(
                err.matches("error: ").count(),
                1,
                "one error, printed once: {err}"
            );
        }
    }
}

/// Regression: `run --check` listed the policy's problems only once the configuration was
/// fixed, and the key file's only after that; `run` itself failed the same way.
#[test]
fn run_lists_the_problems_of_config_policy_and_key_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let policy = std::fs::read_to_string(shipped("excedo"))
        .unwrap()
        .replace("[purposes.fraud]\n", "[purposes.fraud]\ncolour = \"red\"\n");
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    write_private(
        &dir.path().join("keys.toml"),
        &format!(
            "[[keys]]\nid = \"k1\"\nsecret_hex = \"{}\"\n",
            "00".repeat(32)
        ),
    );
    let config = dir.path().join("cdrguard.toml");
    std::fs::write(
        &config,
        "[kafka]\nbrokers = \"127.0.0.1:1\"\ntransactional_id = \"t\"\ngrup_id = \"typo\"\n\
         [processing]\npolicy = \"policy.toml\"\nkey_file = \"keys.toml\"\n",
    )
    .unwrap();
    let c = config.display().to_string();
    let d = dir.path().display().to_string();
    for check in [true, false] {
        let mut args = vec!["run", "--config", &c];
        if check {
            args.push("--check");
        }
        let o = run(&mut cdrguard(&args));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        for want in [
            format!("error: config {c} refused: 1 problem(s)\n  {c}:4: kafka.grup_id: unknown key"),
            format!("\npolicy {d}/policy.toml refused: 1 problem(s)\n"),
            "purposes.fraud.colour: unknown key".to_string(),
            format!("\nkey file {d}/keys.toml refused: 1 problem(s)\n"),
            format!("\n  {d}/keys.toml:3: keys[0].secret_hex: the secret of key \"k1\""),
        ] {
            assert!(
                err.contains(&want),
                "--check {check}: missing {want:?} in:\n{err}"
            );
        }
        assert!(!err.contains("starting"), "{err}");
    }
}

/// Regression: `run`'s logs carried terminal colour codes into files and pipes.
#[test]
fn run_logs_to_a_pipe_without_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    write_private(
        &dir.path().join("keys.toml"),
        "[[keys]]\nid = \"k1\"\nsecret_hex = \"4f0e9c2a7be13d58c6a1f29e07b45d8c3ea6f1127d90b4c5e83a2f6d1c07b9e4\"\n",
    );
    let config = dir.path().join("cdrguard.toml");
    // Nothing listens on port 1: run logs its start, then waits for the broker.
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:1\"\ntransactional_id = \"t\"\n\
             [processing]\npolicy = \"{}\"\nkey_file = \"keys.toml\"\nshutdown_timeout_ms = 1000\n\
             [telemetry]\nlisten = \"127.0.0.1:0\"\n",
            shipped("excedo").display()
        ),
    )
    .unwrap();
    let mut child = cdrguard(&["run", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log.contains("starting") && Instant::now() < deadline {
        if lines.read_line(&mut log).unwrap() == 0 {
            break;
        }
    }
    // SIGTERM: a stop while it waits for the broker ends it within shutdown_timeout_ms.
    // SAFETY: kill takes no pointers; the pid is our own child's, not yet waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    lines.read_to_string(&mut log).unwrap();
    child.wait().unwrap();
    assert!(log.contains("starting"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe: {log:?}");
}

/// A configuration for `run` that needs no broker to be refused or to start, with
/// `telemetry` as its `[telemetry]` table.
fn telemetry_config(dir: &Path, telemetry: &str) -> PathBuf {
    write_private(
        &dir.join("keys.toml"),
        "[[keys]]\nid = \"k1\"\nsecret_hex = \"4f0e9c2a7be13d58c6a1f29e07b45d8c3ea6f1127d90b4c5e83a2f6d1c07b9e4\"\n",
    );
    let config = dir.join("cdrguard.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:1\"\ntransactional_id = \"t\"\n\
             [processing]\npolicy = \"{}\"\nkey_file = \"keys.toml\"\nshutdown_timeout_ms = 1000\n\
             [telemetry]\n{telemetry}",
            shipped("excedo").display()
        ),
    )
    .unwrap();
    config
}

/// A telemetry address that is no IP address and port, or a log format that does not
/// exist, is refused when the configuration loads (with `--check` too), each listed with
/// its file and line; nothing starts.
#[test]
fn run_refuses_a_bad_telemetry_address_at_load_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = telemetry_config(
        dir.path(),
        "listen = \"localhost:http\"\nlog_format = \"yaml\"\n",
    );
    let c = config.display().to_string();
    for check in [true, false] {
        let mut args = vec!["run", "--config", &c];
        if check {
            args.push("--check");
        }
        let o = run(&mut cdrguard(&args));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        for want in [
            format!("{c}:9: telemetry.listen: \"localhost:http\" is not an IP address and port"),
            format!("{c}:10: telemetry.log_format: \"yaml\" is not one of: text, json"),
        ] {
            assert!(
                err.contains(&want),
                "--check {check}: missing {want:?} in:\n{err}"
            );
        }
        assert!(!err.contains("starting"), "{err}");
    }
}

/// An address another process holds stops `run` at start, naming the address, before it
/// reaches for the broker.
#[test]
fn run_stops_at_start_when_the_telemetry_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = telemetry_config(dir.path(), &format!("listen = \"{addr}\"\n"));
    let o = run(&mut cdrguard(&[
        "run",
        "--config",
        config.to_str().unwrap(),
    ]));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("telemetry.listen {addr}: ")),
        "the address is named: {err}"
    );
}

/// The JSON log format writes one JSON object per line, fields as keys: the listener's
/// address is in the `telemetry listening` line, and `/healthz` answers while `run` waits
/// for its broker (not ready yet, and saying why).
#[test]
fn run_logs_json_and_answers_probes_before_the_broker_is_reached() {
    let dir = tempfile::tempdir().unwrap();
    let config = telemetry_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nlog_format = \"json\"\n",
    );
    let mut child = cdrguard(&["run", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while addr.is_none() && Instant::now() < deadline {
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        if v["fields"]["message"] == "telemetry listening" {
            addr = v["fields"]["addr"].as_str().map(str::to_string);
        }
        seen.push(line);
    }
    let addr = addr.unwrap_or_else(|| panic!("no listening line in {seen:?}"));
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    // The run installs its readiness check and first gauges a moment after the listener
    // is up.
    let until = |path: &str, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = get(path);
            if got.contains(want) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let health = get("/healthz");
    let ready = until("/readyz", "consent table");
    let metrics = until("/metrics", "cdrguard_ready ");
    // SAFETY: kill takes no pointers; the pid is our own child's, not yet waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    child.wait().unwrap();
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    assert!(ready.starts_with("HTTP/1.1 503 "), "{ready}");
    assert!(
        ready.ends_with("consent table: still reading the control topic\n"),
        "{ready}"
    );
    assert!(
        metrics.contains("cdrguard_build_info{version="),
        "{metrics}"
    );
    assert!(metrics.contains("cdrguard_ready 0"), "{metrics}");
    for line in rest.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line:?}"
        );
    }
}

/// The UTF-8 byte-order mark some editors write at the start of a file.
const BOM: &str = "\u{feff}";

/// Record and control files saved with a byte-order mark: their first lines are read, not
/// sent to the dead letter.
#[test]
fn replay_reads_files_that_start_with_a_byte_order_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (records, control) = (
        dir.path().join("cdrs.jsonl"),
        dir.path().join("events.jsonl"),
    );
    let o = run(&mut cdrguard(&[
        "generate",
        "--records",
        "20",
        "--subscribers",
        "5",
        "--malformed-rate",
        "0",
        "--out-records",
        records.to_str().unwrap(),
        "--out-control",
        control.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [&records, &control] {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(!text.is_empty());
        std::fs::write(f, format!("{BOM}{text}")).unwrap();
    }
    let out = dir.path().join("out");
    let o = run(&mut cdrguard(&[
        "replay",
        "--policy",
        "excedo",
        "--input",
        records.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
        "--now",
        "2026-03-01T00:00:00.000Z",
        "--out",
        out.to_str().unwrap(),
        "--ephemeral-keys",
    ]));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        summary.contains(": 20 records, ") && summary.contains(" 0 dead letters "),
        "{summary}"
    );
}

/// Configuration, policy and key files saved with a byte-order mark load as they are.
#[test]
fn toml_files_that_start_with_a_byte_order_mark_load() {
    let dir = tempfile::tempdir().unwrap();
    let policy = std::fs::read_to_string(shipped("excedo")).unwrap();
    std::fs::write(dir.path().join("policy.toml"), format!("{BOM}{policy}")).unwrap();
    write_private(
        &dir.path().join("keys.toml"),
        &format!(
            "{BOM}[[keys]]\nid = \"k1\"\nsecret_hex = \"4f0e9c2a7be13d58c6a1f29e07b45d8c3ea6f1127d90b4c5e83a2f6d1c07b9e4\"\n"
        ),
    );
    let config = dir.path().join("cdrguard.toml");
    std::fs::write(
        &config,
        format!(
            "{BOM}[kafka]\nbrokers = \"127.0.0.1:1\"\ntransactional_id = \"t\"\n\
             [processing]\npolicy = \"policy.toml\"\nkey_file = \"keys.toml\"\n"
        ),
    )
    .unwrap();
    let o = run(&mut cdrguard(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--check",
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let policy = dir.path().join("policy.toml");
    let o = run(&mut cdrguard(&[
        "policy",
        "check",
        policy.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Regression: `generate --records 10 --subscribers 100000000` took 7.8 GB in 25 s
/// before writing 10 records. More subscribers than records are refused at once, with
/// both settings named, and nothing is written; as many as records are fine.
#[test]
fn generate_refuses_more_subscribers_than_records_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (records, control) = (
        dir.path().join("cdrs.jsonl"),
        dir.path().join("events.jsonl"),
    );
    let generate = |subscribers: &str| {
        run(&mut cdrguard(&[
            "generate",
            "--records",
            "10",
            "--subscribers",
            subscribers,
            "--out-records",
            records.to_str().unwrap(),
            "--out-control",
            control.to_str().unwrap(),
        ]))
    };
    let o = generate("11");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--subscribers is 11, more than --records (10)")
            && err.contains("--subscribers 10 or fewer"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let o = generate("10");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(records.is_file() && control.is_file());
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Regression: a second run into the same folder left the first run's route files there
/// (Excedo's fraud file, with raw identifiers, beside a Select Telecom run that never
/// routes fraud), and a failed replay first truncated the earlier run's files to zero.
#[test]
fn runs_replace_their_output_folder_whole_and_only_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d");
    let out_s = out.to_str().unwrap();
    let now = "2026-12-01T00:00:00.000Z";
    let demo = |policy: &str| {
        let o = run(&mut cdrguard(&[
            "demo",
            "--policy",
            policy,
            "--records",
            "300",
            "--out",
            out_s,
            "--now",
            now,
        ]));
        assert!(o.status.success(), "{}", stderr(&o));
    };
    demo("excedo");
    assert!(out.join("fraud.jsonl").exists());
    demo("select-telecom");
    assert!(
        !out.join("fraud.jsonl").exists(),
        "Excedo's fraud copies survived a Select Telecom run: {:?}",
        names(&out)
    );
    let billing = std::fs::read(out.join("billing.jsonl")).unwrap();
    assert!(!billing.is_empty());

    // A replay that fails (its control file is missing) leaves the folder as it was.
    let keys = dir.path().join("keys.toml");
    let o = run(&mut cdrguard(&[
        "keys",
        "generate",
        "--out",
        keys.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let input = out.join("input/records.jsonl");
    let o = run(&mut cdrguard(&[
        "replay",
        "--policy",
        "excedo",
        "--input",
        input.to_str().unwrap(),
        "--control",
        dir.path().join("missing.jsonl").to_str().unwrap(),
        "--out",
        out_s,
        "--keys",
        keys.to_str().unwrap(),
    ]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.jsonl"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("billing.jsonl")).unwrap(), billing);
    assert_eq!(
        names(dir.path()),
        ["d", "keys.toml"],
        "no half-written folder beside it"
    );

    // A folder cdrguard did not write is refused, unless --force.
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    let into_mine = |force: bool| {
        let mut args = vec![
            "demo",
            "--records",
            "300",
            "--out",
            mine.to_str().unwrap(),
            "--now",
            now,
        ];
        if force {
            args.push("--force");
        }
        run(&mut cdrguard(&args))
    };
    let o = into_mine(false);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert!(mine.join("notes.txt").exists());
    assert!(into_mine(true).status.success());
    assert!(!mine.join("notes.txt").exists());
}
