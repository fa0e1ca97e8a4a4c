//! cdrguard against a real Apache Kafka broker (started by the harness in tests/util, or
//! named by CDRGUARD_TEST_BROKERS). Every test uses its own uniquely named topics.

mod util;

use std::sync::atomic::Ordering;
use std::time::Duration;

use cdrguard::core::purpose::Purpose;
use rdkafka::message::Message;
use util::*;

/// Every route of two policies, end to end: each expected copy arrives exactly once with
/// its tags as headers, and malformed records reach the dead-letter topic with theirs.
#[test]
fn routes_every_purpose_of_two_policies_exactly_once() {
    let b = broker();
    for policy_name in ["excedo", "alleato"] {
        let s = Scenario::new(
            &b.bootstrap,
            &format!("e2e-{policy_name}"),
            policy_name,
            3,
            3_000,
            300,
            11,
        );
        let (cfg, policy, t) = (&s.cfg, &s.policy, &s.traffic);
        for r in policy.declared() {
            assert!(
                !s.want[r.purpose as usize].is_empty(),
                "{policy_name}: the traffic must exercise route {}",
                r.purpose.id()
            );
        }

        let run = InProcess::start(cfg);
        s.assert_exactly_once();
        let dead = read_all(
            &b.bootstrap,
            &cfg.dead_letter_topic,
            t.malformed,
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        assert_eq!(dead.len(), t.malformed, "{policy_name}: dead letters");
        for d in &dead {
            assert!(header(d, "dlq.reason").is_some_and(|r| !r.is_empty()));
            assert_eq!(header(d, "dlq.topic"), Some(cfg.input_topic.as_str()));
            let p: i32 = header(d, "dlq.partition").unwrap().parse().unwrap();
            let o: i64 = header(d, "dlq.offset").unwrap().parse().unwrap();
            assert!((0..3).contains(&p) && o >= 0);
            // The original bytes, untouched.
            assert!(
                t.messages
                    .iter()
                    .any(|(_, v)| v.as_slice() == d.payload().unwrap())
            );
        }
        // Tags as headers, equal to the envelope, on every route.
        for r in policy.declared() {
            let topic = cfg.routes[r.purpose as usize].as_deref().unwrap();
            let msgs = read_all(
                &b.bootstrap,
                topic,
                1,
                Duration::ZERO,
                Duration::from_secs(30),
            );
            let m = &msgs[0];
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let env = &v["envelope"];
            assert_eq!(header(m, "purpose"), Some(r.purpose.id()));
            assert_eq!(header(m, "legal_basis"), env["legal_basis"].as_str());
            assert_eq!(header(m, "gdpr_article"), env["gdpr_article"].as_str());
            assert_eq!(header(m, "consent"), env["consent"].as_str());
            assert_eq!(header(m, "policy"), Some(policy.tag.as_str()));
            assert_eq!(header(m, "retention"), env["retention"]["rule"].as_str());
        }
        // Schedule entries: one per window, in the input's partitions, never a raw
        // identifier for a route whose copies hide it.
        let windows = read_all(
            &b.bootstrap,
            &cfg.schedule_topic,
            1,
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        assert!(!windows.is_empty());
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("schemas/retention-window.schema.json")).unwrap(),
        )
        .unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        for w in &windows {
            let v: serde_json::Value = serde_json::from_slice(w.payload().unwrap()).unwrap();
            let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{errors:?}: {v}");
            assert!(
                w.partition() < 3,
                "schedule entries stay in the input's partitions"
            );
            if v["route"] == "analytics" || v["route"] == "marketing" {
                let s = v["subscriber"].as_str().unwrap_or("");
                assert!(!s.starts_with('+'), "raw msisdn in a {} window", v["route"]);
            }
        }
        run.stop().expect("clean stop");
    }
}

/// Records of one subscriber built from a generated template, so a test controls exactly
/// whose records arrive when.
fn records_of(msisdn: &str, prefix: &str, n: usize) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let t = traffic(50, 5, 3);
    let template: serde_json::Value = serde_json::from_slice(&t.records[0]).unwrap();
    (0..n)
        .map(|i| {
            let mut r = template.clone();
            r["record_id"] = format!("{prefix}-{i}").into();
            r["msisdn"] = msisdn.into();
            (
                Some(msisdn.as_bytes().to_vec()),
                serde_json::to_vec(&r).unwrap(),
            )
        })
        .collect()
}

fn consent(msisdn: &str, purpose: &str, granted: bool) -> (Option<Vec<u8>>, Vec<u8>) {
    let at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
    (
        Some(format!("{msisdn}/consent/{purpose}").into_bytes()),
        format!(r#"{{"type":"consent","msisdn":"{msisdn}","at":"{at}","purpose":"{purpose}","granted":{granted}}}"#)
            .into_bytes(),
    )
}

fn objection(msisdn: &str, purpose: &str) -> (Option<Vec<u8>>, Vec<u8>) {
    let at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
    (
        Some(format!("{msisdn}/objection/{purpose}").into_bytes()),
        format!(r#"{{"type":"objection","msisdn":"{msisdn}","at":"{at}","purpose":"{purpose}"}}"#)
            .into_bytes(),
    )
}

/// A consent withdrawal and an objection arriving in the middle of a stream change
/// routing from the next record on; and the delay from a control event's timestamp to
/// its effect on routing, measured over a burst of events.
#[test]
fn consent_withdrawal_and_objection_mid_stream() {
    let b = broker();
    let dir = scratch("midstream");
    let prefix = unique("midstream");
    let (_, cfg) = run_config(&dir, &b.bootstrap, &prefix, "excedo", "");
    let (policy, _) = load(&cfg);
    create_topics(&cfg, &policy, 2);
    let s = "+46709990001";
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &[consent(s, "analytics", true), consent(s, "marketing", true)],
    );
    let run = InProcess::start(&cfg);
    let applied = || run.handles.store.applied.load(Ordering::Relaxed);
    wait_for("the grants", Duration::from_secs(60), || applied() == 2);

    let n = 40;
    produce(&b.bootstrap, &cfg.input_topic, &records_of(s, "before", n));
    let billing = cfg.routes[Purpose::Billing as usize].clone().unwrap();
    wait_for("the first records", Duration::from_secs(60), || {
        read_all(
            &b.bootstrap,
            &billing,
            n,
            Duration::ZERO,
            Duration::from_secs(5),
        )
        .len()
            >= n
    });
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &[consent(s, "analytics", false), objection(s, "marketing")],
    );
    wait_for(
        "the withdrawal and objection",
        Duration::from_secs(60),
        || applied() == 4,
    );
    produce(&b.bootstrap, &cfg.input_topic, &records_of(s, "after", n));

    let read = |p: Purpose, want: usize| {
        read_all(
            &b.bootstrap,
            cfg.routes[p as usize].as_deref().unwrap(),
            want,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
    };
    let billing = read(Purpose::Billing, 2 * n);
    assert_eq!(billing.len(), 2 * n, "billing keeps every record");
    let ids: Vec<String> = billing
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            v["envelope"]["record_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.iter().filter(|i| i.starts_with("after-")).count(), n);
    // Consent-based routes got the records before the change and none after.
    assert_eq!(
        read(Purpose::Analytics, n).len(),
        n,
        "analytics: only before the withdrawal"
    );
    assert_eq!(
        read(Purpose::Marketing, n).len(),
        n,
        "marketing: only before the objection"
    );

    // The delay from a control event's timestamp to the consent table (the routing
    // state every next record reads): a burst of 300 events, 10 ms apart.
    let before = applied();
    let feeder = Feeder::new(&b.bootstrap);
    for i in 0..300 {
        let m = format!("+4670888{:04}", i);
        feeder.send(&cfg.control_topic, &[consent(&m, "marketing", i % 2 == 0)]);
        std::thread::sleep(Duration::from_millis(10));
    }
    feeder.flush();
    wait_for("the burst", Duration::from_secs(60), || {
        applied() == before + 300
    });
    let d = &run.handles.store.delays;
    println!(
        "control-event delay to routing over {} events: p50 <= {} ms, p99 <= {} ms, max {} ms",
        d.count(),
        d.quantile_upper_ms(0.5).unwrap(),
        d.quantile_upper_ms(0.99).unwrap(),
        d.max_ms()
    );
    run.stop().expect("clean stop");
}

/// `kill -9` of the processor in the middle of a 100,000-record run, then a restart:
/// every expected copy is present exactly once (read_committed), none missing.
#[test]
fn kill_9_mid_run_then_restart_loses_and_repeats_nothing() {
    let s = Scenario::new(
        &broker().bootstrap,
        "kill9",
        "excedo",
        4,
        100_000,
        5_000,
        21,
    );
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(1.0 / 3.0);
    p.kill9();
    note(&log, "---- killed with SIGKILL; restarting ----");
    let p = Processor::start(&s.path, &log, &[]);
    s.assert_exactly_once();
    s.assert_dead_letters();
    assert!(
        p.terminate().success(),
        "clean exit on SIGTERM (log: {})",
        log.display()
    );
}

/// Two instances in one group, one joining and one leaving mid-run: every expected copy
/// exactly once.
#[test]
fn instances_joining_and_leaving_mid_run_keep_exactly_once() {
    let s = Scenario::new(
        &broker().bootstrap,
        "scale",
        "alleato",
        6,
        60_000,
        3_000,
        31,
    );
    let a = Processor::start(&s.path, &s.dir.join("a.log"), &[]);
    s.wait_progress(0.2);
    let txn_b = format!("{}.txn-b", s.cfg.group_id);
    let b = Processor::start(
        &s.path,
        &s.dir.join("b.log"),
        &[("CDRGUARD_KAFKA__TRANSACTIONAL_ID", txn_b.as_str())],
    );
    s.wait_progress(0.5);
    assert!(a.terminate().success(), "A leaves cleanly");
    s.assert_exactly_once();
    s.assert_dead_letters();
    assert!(b.terminate().success());
    let log_b = std::fs::read_to_string(s.dir.join("b.log")).unwrap();
    assert!(
        log_b.contains("partitions assigned"),
        "B took part in the run"
    );
}

/// The broker stops in the middle of a run and comes back: nothing is lost or repeated.
#[test]
fn broker_restart_mid_run_loses_nothing() {
    let own = Broker::start(&scratch("restart-broker"), None);
    let s = Scenario::new(
        &own.bootstrap,
        "restart",
        "partnersec",
        3,
        60_000,
        3_000,
        41,
    );
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(0.2);
    own.stop();
    note(&log, "---- broker stopped ----");
    std::thread::sleep(Duration::from_secs(5));
    let again = Broker::start(own.dir.as_ref().unwrap(), None);
    assert_eq!(
        again.bootstrap, own.bootstrap,
        "the broker comes back on its port"
    );
    note(&log, "---- broker started again ----");
    s.assert_exactly_once();
    s.assert_dead_letters();
    assert!(
        p.terminate().success(),
        "clean exit (log: {})",
        log.display()
    );
    again.stop();
}

/// At-least-once mode (no transactions): after a `kill -9` and a restart every expected
/// copy is present; repeats are allowed, losses are not.
#[test]
fn at_least_once_mode_loses_nothing_across_a_kill() {
    let s = Scenario::new(
        &broker().bootstrap,
        "alo",
        "hektor-mobil",
        3,
        40_000,
        2_000,
        51,
    );
    let text = std::fs::read_to_string(&s.path).unwrap();
    std::fs::write(
        &s.path,
        text.replace("[kafka]\n", "[kafka]\nguarantee = \"at_least_once\"\n"),
    )
    .unwrap();
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(1.0 / 3.0);
    p.kill9();
    let p = Processor::start(&s.path, &log, &[]);
    for r in s.policy.declared() {
        let topic = s.cfg.routes[r.purpose as usize].as_deref().unwrap();
        let w = &s.want[r.purpose as usize];
        let n: usize = w.values().sum();
        // Wait until every expected id is there (repeats make the count larger).
        wait_for(
            &format!("every {} copy", r.purpose.id()),
            Duration::from_secs(180),
            || {
                let got = util::got(&read_all(
                    &s.bootstrap,
                    topic,
                    n,
                    Duration::from_secs(1),
                    Duration::from_secs(30),
                ));
                w.iter().all(|(k, v)| got.get(k).is_some_and(|g| g >= v))
            },
        );
    }
    assert!(
        p.terminate().success(),
        "clean exit (log: {})",
        log.display()
    );
}

/// `run --check` validates a configuration, its policy and key file without a broker; a
/// bad configuration is refused with every problem and where it is.
#[test]
fn run_check_validates_and_lists_every_problem() {
    let dir = scratch("check");
    let (path, _) = run_config(&dir, "127.0.0.1:1", &unique("check"), "excedo", "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdrguard"))
        .args(["run", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (policy excedo@"));

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[kafka]\nbrokers = \"b:9092\"\ngroup = \"typo\"\n\n[processing]\npolicy = \"p.toml\"\ncommit_interval_ms = \"fast\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cdrguard"))
        .args(["run", "--config"])
        .arg(&bad)
        .env("CDRGUARD_PROCESSING__QUEUED_MAX_KBYTES", "0")
        .env_remove("CDRGUARD_KEY_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "bad.toml:3: kafka.group: unknown key",
        "bad.toml:7: processing.commit_interval_ms: must be an integer",
        "env CDRGUARD_PROCESSING__QUEUED_MAX_KBYTES: processing.queued_max_kbytes: 0 is out of range",
        "processing.key_file: missing",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
