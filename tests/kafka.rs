//! cdrguard against a real Apache Kafka broker (started by the harness in tests/util, or
//! named by CDRGUARD_TEST_BROKERS). Every test uses its own uniquely named topics.
//!
//! A run is checked only once it is over: its group has committed the end of the input,
//! it has been stopped, and the offsets stayed at the end. Output topics are then read
//! with read_committed until every partition reports its end, so a late duplicate cannot
//! slip past a quiet period.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cdrguard::adapters::kafka::config::RunConfig;
use cdrguard::adapters::kafka::consent;
use cdrguard::core::control::{Change, ControlEvent};
use cdrguard::vocab::purpose::Purpose;
use cdrguard::vocab::time::Millis;
use rdkafka::message::Message;
use util::*;

/// Every route of two policies, end to end: each expected copy arrives exactly once with
/// its tags as headers, and malformed records reach the dead-letter topic with headers
/// that point at the original record.
#[test]
fn routes_every_purpose_of_two_policies_exactly_once() {
    let b = broker();
    for policy_name in ["excedo", "alleato"] {
        let s = Scenario::new(
            &b.bootstrap,
            Setup {
                name: &format!("e2e-{policy_name}"),
                policy: policy_name,
                partitions: 3,
                records: 3_000,
                subscribers: 300,
                seed: 11,
                tweaks: Tweaks::default(),
                binary: false,
            },
        );
        let (cfg, policy) = (&s.cfg, &s.policy);
        for r in policy.declared() {
            assert!(
                !s.want[r.purpose as usize].is_empty(),
                "{policy_name}: the traffic must exercise route {}",
                r.purpose.id()
            );
        }

        let done = s.finish([InProcess::start(cfg).into()]);
        let routes = s.assert_exactly_once(&done);
        s.assert_dead_letters(&done);
        // Tags as headers, equal to the envelope, on every copy of every route.
        for (purpose, msgs) in &routes {
            for m in msgs {
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                let env = &v["envelope"];
                assert_eq!(header(m, "purpose"), Some(purpose.id()));
                assert_eq!(header(m, "legal_basis"), env["legal_basis"].as_str());
                assert_eq!(header(m, "gdpr_article"), env["gdpr_article"].as_str());
                assert_eq!(header(m, "consent"), env["consent"].as_str());
                assert_eq!(header(m, "policy"), Some(policy.tag.as_str()));
                assert_eq!(header(m, "retention"), env["retention"]["rule"].as_str());
            }
        }
        // Schedule entries: in the input's partitions, valid, never a raw identifier for
        // a route whose copies hide it.
        let windows = read_to_end(&b.bootstrap, &cfg.schedule_topic);
        assert!(!windows.is_empty());
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("schemas/retention-window.schema.json")).unwrap(),
        )
        .unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        for w in &windows {
            assert!(
                w.partition() < 3,
                "schedule entries stay in the input's partitions"
            );
            let key = w.key().unwrap_or_default();
            assert!(
                cdrguard::adapters::kafka::retention::entries::decode(key, w.payload()).is_ok(),
                "every schedule message reads back"
            );
            // Tombstones (fired windows), remembered settlements, control markers and
            // held crowds of anonymised copies (read back above) aside, every entry is a
            // window.
            let Some(payload) = w.payload() else {
                continue;
            };
            if key.starts_with(b"settled/")
                || key.starts_with(b"control-applied/")
                || key.starts_with(b"crowd/")
            {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{errors:?}: {v}");
            if v["route"] == "analytics" || v["route"] == "marketing" {
                let s = v["subscriber"].as_str().unwrap_or("");
                assert!(!s.starts_with('+'), "raw msisdn in a {} window", v["route"]);
            }
        }
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

/// Records dated where no route could use them go to the dead letter in Kafka mode as in
/// replay: the year 1, 1900 and 1970 (older than the 10-year floor of a route waiting on
/// an invoice settlement) and 9999 (beyond the clock's day of tolerance). The plausible
/// records beside them are routed.
#[test]
fn implausible_record_times_go_to_the_dead_letter() {
    let b = broker();
    let dir = scratch("times");
    let prefix = unique("times");
    let (_, cfg) = run_config(&dir, &b.bootstrap, &prefix, "excedo", Tweaks::default());
    let (policy, _) = load(&cfg);
    create_topics(&cfg, &policy, 1, 1);
    let s = "+46709990002";
    let mut records = records_of(s, "plausible", 3);
    let odd = [
        "0001-01-01T00:00:00.000Z",
        "1900-06-01T00:00:00.000Z",
        "1970-01-01T00:00:00.000Z",
        "9999-12-31T23:59:59.999Z",
    ];
    for (i, t) in odd.iter().enumerate() {
        let (k, v) = records_of(s, &format!("odd-{i}"), 1).remove(0);
        let mut r: serde_json::Value = serde_json::from_slice(&v).unwrap();
        r["start_time"] = (*t).into();
        records.push((k, serde_json::to_vec(&r).unwrap()));
    }
    let run = InProcess::start(&cfg);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    produce(&b.bootstrap, &cfg.input_topic, &records);
    offsets.wait_at_end(&b.bootstrap, "the records");
    finish(&b.bootstrap, &cfg, [run.into()]);
    let mut reasons: Vec<String> = read_to_end(&b.bootstrap, &cfg.dead_letter_topic)
        .iter()
        .map(|d| header(d, "dlq.reason").unwrap_or_default().to_string())
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    let (past, future): (Vec<&String>, Vec<&String>) = reasons
        .iter()
        .partition(|r| r.contains("3650 days before the clock"));
    assert_eq!(past.len(), 3, "{reasons:?}");
    assert!(
        future[0].contains("more than 1 day after the clock"),
        "{reasons:?}"
    );
    let billing = cfg.routes[Purpose::Billing as usize].as_deref().unwrap();
    assert_eq!(
        read_to_end(&b.bootstrap, billing).len(),
        3,
        "the plausible records are billed"
    );
}

/// Binary input (the bincode-compatible layout of schemas/binary.md, one record per
/// message): routed exactly like JSON, and what is not a binary record reaches the dead
/// letter.
#[test]
fn binary_input_is_routed_exactly_once() {
    let s = Scenario::new(
        &broker().bootstrap,
        Setup {
            name: "binary",
            policy: "partnersec",
            partitions: 2,
            records: 2_000,
            subscribers: 200,
            seed: 61,
            tweaks: Tweaks {
                processing: r#"input_format = "binary""#,
                ..Tweaks::default()
            },
            binary: true,
        },
    );
    assert!(
        s.traffic.malformed > 0,
        "the traffic must hold refused lines"
    );
    let done = s.finish([InProcess::start(&s.cfg).into()]);
    s.assert_exactly_once(&done);
    s.assert_dead_letters(&done);
}

/// A consent withdrawal and an objection arriving in the middle of a stream change
/// routing from the next record on; and the delay from a control event's timestamp to
/// its effect on routing, measured over a burst of events on a control topic of three
/// partitions (printed, not asserted: it depends on the machine).
#[test]
fn consent_withdrawal_and_objection_mid_stream() {
    let b = broker();
    let dir = scratch("midstream");
    let prefix = unique("midstream");
    let (_, cfg) = run_config(&dir, &b.bootstrap, &prefix, "excedo", Tweaks::default());
    let (policy, _) = load(&cfg);
    // Events of one key stay in one partition, in order; other keys interleave.
    create_topics(&cfg, &policy, 2, 3);
    let (policy, keys) = load(&cfg);
    let s = "+46709990001";
    let grants = [consent(s, "analytics", true), consent(s, "marketing", true)];
    let change = [consent(s, "analytics", false), objection(s, "marketing")];
    let n = 40;
    let (before, after) = (records_of(s, "before", n), records_of(s, "after", n));
    // What the core makes of each half, in the state each is routed with.
    let granted = state_after(&grants);
    let mut want = copies_of(&before, &policy, &keys, &granted);
    add(
        &mut want,
        copies_of(
            &after,
            &policy,
            &keys,
            &state_after(&[grants.clone(), change.clone()].concat()),
        ),
    );
    let count = |p: Purpose| want[p as usize].values().sum::<usize>();
    assert_eq!(count(Purpose::Billing), 2 * n, "billing keeps every record");
    assert_eq!(
        count(Purpose::Analytics),
        n,
        "analytics stops at the withdrawal"
    );
    assert_eq!(
        count(Purpose::Marketing),
        n,
        "marketing stops at the objection"
    );

    produce(&b.bootstrap, &cfg.control_topic, &grants);
    let run = InProcess::start(&cfg);
    let applied = || run.handles.store.applied.load(Ordering::Relaxed);
    wait_for("the grants", Duration::from_secs(60), || applied() == 2);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);

    produce(&b.bootstrap, &cfg.input_topic, &before);
    offsets.wait_at_end(&b.bootstrap, "the records before the change");
    produce(&b.bootstrap, &cfg.control_topic, &change);
    wait_for(
        "the withdrawal and objection",
        Duration::from_secs(60),
        || applied() == 4,
    );
    produce(&b.bootstrap, &cfg.input_topic, &after);
    offsets.wait_at_end(&b.bootstrap, "the records after the change");

    // The delay from a control event's timestamp to the consent table (the routing
    // state every next record reads): a burst of 300 events, 10 ms apart.
    let burst_start = applied();
    let feeder = Feeder::new(&b.bootstrap);
    for i in 0..300 {
        let m = format!("+4670888{:04}", i);
        feeder.send(&cfg.control_topic, &[consent(&m, "marketing", i % 2 == 0)]);
        std::thread::sleep(Duration::from_millis(10));
    }
    feeder.flush();
    wait_for("the burst", Duration::from_secs(60), || {
        applied() == burst_start + 300
    });
    let d = &run.handles.store.delays;
    println!(
        "control-event delay to routing over {} events on 3 partitions: p50 <= {} ms, p99 <= {} ms, max {} ms",
        d.count(),
        d.quantile_upper_ms(0.5).unwrap(),
        d.quantile_upper_ms(0.99).unwrap(),
        d.max_ms()
    );
    // The README quotes the figure above as a benchmark; the product's promise is a
    // second, and a delay beyond it is a fault, however loaded the machine.
    assert!(
        d.quantile_upper_ms(0.99).unwrap() <= 1_000,
        "control-event delay p99 {} ms is over the promised 1 s",
        d.quantile_upper_ms(0.99).unwrap()
    );

    let done = finish(&b.bootstrap, &cfg, [run.into()]);
    assert_exactly_once(&b.bootstrap, &cfg, &policy, &want, &done);
}

/// Fail closed: once the consent table can no longer be confirmed current, a subscriber
/// who granted consent is routed as if every consent were withdrawn: billing and fraud
/// only, and those records are counted as `fail_closed`. On one broker, a control topic
/// whose partition has no leader cannot be arranged; deleting the topic is what makes it
/// unreadable here.
#[test]
fn an_unreadable_control_topic_fails_closed() {
    let b = broker();
    let dir = scratch("failclosed");
    let prefix = unique("failclosed");
    let (_, cfg) = run_config(
        &dir,
        &b.bootstrap,
        &prefix,
        "excedo",
        // Staleness short, yet well above the follower's confirmation cadence (a check
        // every 0.5 s); routing pauses 2 s on a stale table before it fails closed.
        Tweaks {
            processing: "control_max_staleness_ms = 5000\nstale_pause_ms = 2000",
            ..Tweaks::default()
        },
    );
    let (policy, keys) = load(&cfg);
    create_topics(&cfg, &policy, 2, 1);
    let s = "+46709990002";
    let grants = [consent(s, "analytics", true), consent(s, "marketing", true)];
    let n = 40;
    let (fresh, stale) = (records_of(s, "fresh", n), records_of(s, "stale", n));
    let granted = state_after(&grants);
    let mut want = copies_of(&fresh, &policy, &keys, &granted);
    add(
        &mut want,
        copies_of(&stale, &policy, &keys, &consent::fail_closed(granted)),
    );
    let count = |p: Purpose| want[p as usize].values().sum::<usize>();
    assert_eq!(count(Purpose::Billing), 2 * n, "billing keeps every record");
    assert_eq!(count(Purpose::Fraud), 2 * n, "fraud keeps every record");
    assert_eq!(count(Purpose::Analytics), n, "analytics only while current");
    assert_eq!(count(Purpose::Marketing), n, "marketing only while current");

    produce(&b.bootstrap, &cfg.control_topic, &grants);
    let run = InProcess::start(&cfg);
    let stats = run.handles.stats.clone();
    let store = run.handles.store.clone();
    wait_for("the grants", Duration::from_secs(60), || {
        store.applied.load(Ordering::Relaxed) == 2
    });
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);

    produce(&b.bootstrap, &cfg.input_topic, &fresh);
    offsets.wait_at_end(&b.bootstrap, "the records while the table is current");
    assert_eq!(
        stats.fail_closed.load(Ordering::Relaxed),
        0,
        "a current table routes normally"
    );

    delete_topic(&b.bootstrap, &cfg.control_topic);
    wait_for(
        "the consent table to count as stale",
        Duration::from_secs(60),
        || !store.fresh(Instant::now()),
    );
    produce(&b.bootstrap, &cfg.input_topic, &stale);
    offsets.wait_at_end(&b.bootstrap, "the records while the table is stale");
    let fail_closed = stats.fail_closed.load(Ordering::Relaxed);

    let done = finish(&b.bootstrap, &cfg, [run.into()]);
    // Counted when committed (right after the commit the offsets show): every record
    // routed while stale.
    assert!(
        fail_closed >= n as u64,
        "{fail_closed} records counted as fail_closed, {n} routed while stale"
    );
    assert_exactly_once(&b.bootstrap, &cfg, &policy, &want, &done);
}

/// The consent table is proven current, so records are routed with it, when the
/// control topic holds what a transactional control producer leaves behind: commit
/// markers, an aborted withdrawal (never applied) and a partition with nothing in it. An
/// unreadable event holds back only the subscriber its key names.
#[test]
fn freshness_is_proven_past_markers_aborts_and_empty_partitions() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let b = broker();
    let dir = scratch("markers");
    let prefix = unique("markers");
    // No pause on a stale table: a record routed before the table is proven current is
    // routed fail closed at once, and counted. The staleness bound is generous, so a slow
    // proof on a loaded machine does not count as an outage.
    let (_, cfg) = run_config(
        &dir,
        &b.bootstrap,
        &prefix,
        "excedo",
        Tweaks {
            processing: "control_max_staleness_ms = 10000\nstale_pause_ms = 0",
            ..Tweaks::default()
        },
    );
    let (policy, keys) = load(&cfg);
    create_topics(&cfg, &policy, 1, 3);
    let (a, bb, c) = ("+46709990011", "+46709990012", "+46709990013");

    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &b.bootstrap)
        .set("transactional.id", unique("control-writer"))
        .create()
        .unwrap();
    let t = Duration::from_secs(30);
    p.init_transactions(t).unwrap();
    let send = |partition: i32, (k, v): &(Option<Vec<u8>>, Vec<u8>)| {
        let rec = BaseRecord::to(&cfg.control_topic)
            .partition(partition)
            .key(k.as_deref().unwrap())
            .payload(v.as_slice());
        p.send(rec).map_err(|(e, _)| e).unwrap();
    };
    // Partition 0: grants of A, B and C, committed.
    let grants: Vec<_> = [a, bb, c]
        .iter()
        .flat_map(|m| [consent(m, "analytics", true), consent(m, "marketing", true)])
        .collect();
    p.begin_transaction().unwrap();
    for g in &grants {
        send(0, g);
    }
    p.commit_transaction(t).unwrap();
    // Partition 1: an unreadable event under a key of C's (what may have been an
    // objection), committed, then B's withdrawal, aborted: the partition ends in an abort
    // marker.
    p.begin_transaction().unwrap();
    send(
        1,
        &(
            Some(format!("{c}/objection/analytics").into_bytes()),
            b"{\"type\":".to_vec(),
        ),
    );
    p.commit_transaction(t).unwrap();
    p.begin_transaction().unwrap();
    send(1, &consent(bb, "analytics", false));
    p.flush(t).unwrap();
    p.abort_transaction(t).unwrap();
    // Partition 2 stays empty.

    // The records are there before the run starts: none may be routed before the first
    // proof that the table is current.
    let granted = state_after(&grants);
    let (ra, rb, rc) = (
        records_of(a, "a", 20),
        records_of(bb, "b", 20),
        records_of(c, "c", 20),
    );
    for r in [&ra, &rb, &rc] {
        produce(&b.bootstrap, &cfg.input_topic, r);
    }
    let run = InProcess::start(&cfg);
    let store = run.handles.store.clone();
    wait_for(
        "the consent table to be proven current",
        Duration::from_secs(60),
        || store.fresh(Instant::now()),
    );
    assert_eq!(
        store.applied.load(Ordering::Relaxed),
        6,
        "the aborted withdrawal is never applied"
    );
    assert_eq!(store.refused.load(Ordering::Relaxed), 1);

    let mut want = copies_of(&ra, &policy, &keys, &granted);
    add(&mut want, copies_of(&rb, &policy, &keys, &granted));
    add(
        &mut want,
        copies_of(&rc, &policy, &keys, &consent::fail_closed(granted)),
    );
    assert_eq!(
        want[Purpose::Marketing as usize].values().sum::<usize>(),
        40,
        "A and B get marketing copies, C none"
    );
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    offsets.wait_at_end(&b.bootstrap, "every record");
    assert_eq!(
        run.handles.stats.fail_closed.load(Ordering::Relaxed),
        0,
        "the table was current throughout"
    );
    let done = finish(&b.bootstrap, &cfg, [run.into()]);
    assert_exactly_once(&b.bootstrap, &cfg, &policy, &want, &done);
}

/// `kill -9` of the processor in the middle of a 100,000-record run, then a restart
/// under the same transactional id (which fences the dead instance and aborts its open
/// transaction at once): every expected copy is present exactly once, none missing. The
/// group uses the default, eager, rebalance protocol.
#[test]
fn kill_9_mid_run_then_restart_loses_and_repeats_nothing() {
    let s = Scenario::new(
        &broker().bootstrap,
        Setup {
            name: "kill9",
            policy: "excedo",
            partitions: 4,
            records: 100_000,
            subscribers: 5_000,
            seed: 21,
            tweaks: Tweaks::default(),
            binary: false,
        },
    );
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(1.0 / 3.0);
    let protocol = group_protocol(&s.bootstrap, &s.cfg.group_id);
    assert!(
        matches!(protocol.as_str(), "range" | "roundrobin"),
        "the default protocol is eager, got {protocol}"
    );
    p.kill9();
    note(&log, "---- killed with SIGKILL; restarting ----");
    let p = Processor::start(&s.path, &log, &[]);
    let done = s.finish([p.into()]);
    s.assert_exactly_once(&done);
    s.assert_dead_letters(&done);
}

/// `kill -9` at a moment when the instance's open transaction holds input offsets, then
/// a restart under another transactional id. Nothing fences the dead instance: its
/// transaction stays open until the broker aborts it on timeout, and the new instance's
/// read_committed offset fetch must wait for that instead of starting from offsets the
/// transaction may still commit or drop. Every expected copy exactly once.
#[test]
fn restart_under_another_transactional_id_after_kill_9_keeps_exactly_once() {
    let s = Scenario::new(
        &broker().bootstrap,
        Setup {
            name: "kill9-newid",
            policy: "hektor-mobil",
            partitions: 3,
            // Enough that A is still mid-run after the tries it may take to catch it.
            records: 100_000,
            subscribers: 2_000,
            seed: 61,
            // Offsets go to the transaction before the copies' acknowledgements are
            // awaited; a long linger makes that wait, and so the window this test must
            // hit, a good part of every commit cycle instead of a few milliseconds.
            tweaks: Tweaks {
                producer_properties: r#""linger.ms" = 100"#,
                ..Tweaks::default()
            },
            binary: false,
        },
    );
    let log = s.dir.join("cdrguard.log");
    let a = Processor::start(&s.path, &log, &[]);
    s.wait_progress(0.1);

    // Freeze A until it is caught between sending offsets to its transaction and
    // asking to commit it. A transaction already committing completes without its
    // producer within moments; one that is merely open keeps its offsets unknown for as
    // long as A is frozen, which `pending` takes two seconds to see.
    let offsets = s.offsets();
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(
            s.progress() < s.total() * 9 / 10,
            "A was never caught with offsets in an open transaction ({tries} tries); nothing was tested"
        );
        a.pause();
        if offsets.pending() {
            break;
        }
        a.resume();
        // Land on a different phase of the commit cycle next time.
        std::thread::sleep(Duration::from_millis(10 + (tries * 17) % 60));
    }
    a.kill9();
    note(
        &log,
        &format!(
            "---- killed with SIGKILL, offsets pending (try {tries}); restarting as txn-b ----"
        ),
    );
    let txn_b = format!("{}.txn-b", s.cfg.group_id);
    let b = Processor::start(
        &s.path,
        &log,
        &[("CDRGUARD_KAFKA__TRANSACTIONAL_ID", txn_b.as_str())],
    );
    let done = s.finish([b.into()]);
    s.assert_exactly_once(&done);
    s.assert_dead_letters(&done);
    if let Some(broker_log) = broker().log() {
        // A's open transaction was either of its two producers' (its id, or `.2`).
        let rollback = |id: &str| {
            format!(
                "Completed rollback of ongoing transaction for transactionalId {id} due to timeout"
            )
        };
        let second =
            cdrguard::adapters::kafka::sink::lane_transactional_id(&s.cfg.transactional_id, 1);
        assert!(
            broker_log.contains(&rollback(&s.cfg.transactional_id))
                || broker_log.contains(&rollback(&second)),
            "the broker never timed out A's transaction: the path was not exercised"
        );
    }
}

/// Two instances in one group, one joining and one leaving mid-run (SIGTERM), with the
/// cooperative (incremental) rebalance protocol: every expected copy exactly once.
#[test]
fn instances_joining_and_leaving_mid_run_keep_exactly_once() {
    join_and_leave(
        "scale",
        Some("cooperative-sticky"),
        "cooperative-sticky",
        Leave::Term,
    );
}

/// The same with the default, eager, protocol: B's arrival revokes every partition of A
/// while A has uncommitted work, so A must commit on revocation; A then leaves on
/// SIGINT (Ctrl-C), which is as clean a stop as SIGTERM.
#[test]
fn instances_joining_and_leaving_under_the_eager_protocol_keep_exactly_once() {
    join_and_leave("scale-eager", None, "range", Leave::Int);
}

enum Leave {
    Term,
    Int,
}

fn join_and_leave(name: &str, strategy: Option<&str>, protocol: &str, leave: Leave) {
    let strategy_line = strategy.map(|s| format!(r#""partition.assignment.strategy" = "{s}""#));
    let s = Scenario::new(
        &broker().bootstrap,
        Setup {
            name,
            policy: "alleato",
            partitions: 6,
            // Enough that the run is still going after B's rebalance.
            records: 200_000,
            subscribers: 3_000,
            seed: 31,
            tweaks: Tweaks {
                consumer_properties: strategy_line.as_deref().unwrap_or(""),
                ..Tweaks::default()
            },
            binary: false,
        },
    );
    let a = Processor::start(&s.path, &s.dir.join("a.log"), &[]);
    s.wait_progress(0.2);
    let txn_b = format!("{}.txn-b", s.cfg.group_id);
    let b = Processor::start(
        &s.path,
        &s.dir.join("b.log"),
        &[("CDRGUARD_KAFKA__TRANSACTIONAL_ID", txn_b.as_str())],
    );
    // B's log names the partitions it was given (an empty list does not count).
    let took_part = || {
        log_lines(&s.dir.join("b.log"))
            .iter()
            .any(|l| l.contains("partitions assigned parts=[") && !l.contains("parts=[]"))
    };
    wait_for("B to get partitions", Duration::from_secs(120), took_part);
    assert_eq!(group_protocol(&s.bootstrap, &s.cfg.group_id), protocol);
    let log_a = s.dir.join("a.log");
    if strategy.is_none() {
        // Under the eager protocol A gave up every partition when B came: each
        // revocation committed A's open work first (it held some: the run is mid-way).
        assert!(
            log_lines(&log_a)
                .iter()
                .any(|l| l.contains("partitions revoked") && !l.contains("parts=[]")),
            "A never had partitions revoked (log: {})",
            log_a.display()
        );
    }
    s.wait_progress(0.5);
    let status = match leave {
        Leave::Term => a.terminate(),
        Leave::Int => a.interrupt(),
    };
    assert!(
        status.success(),
        "A leaves cleanly with status 0, got {status} (log: {})",
        log_a.display()
    );
    let done = s.finish([b.into()]);
    s.assert_exactly_once(&done);
    s.assert_dead_letters(&done);
}

/// The broker stops in the middle of a run, for longer than the consent table may go
/// unconfirmed, and comes back: nothing is lost or repeated.
#[test]
fn broker_restart_mid_run_loses_nothing() {
    let own = Broker::start(&scratch("restart-broker"), None);
    let s = Scenario::new(
        &own.bootstrap,
        Setup {
            name: "restart",
            policy: "partnersec",
            partitions: 3,
            records: 60_000,
            subscribers: 3_000,
            seed: 41,
            tweaks: Tweaks::default(),
            binary: false,
        },
    );
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(0.2);
    own.stop();
    note(&log, "---- broker stopped ----");
    // The outage outlasts control_max_staleness (default 10 s), as a whole cluster's
    // outage of a few seconds more would: the consent table goes stale on the way. Its
    // length sets the scene; it decides nothing.
    std::thread::sleep(s.cfg.control_max_staleness + Duration::from_secs(2));
    let again = Broker::start(own.dir.as_ref().unwrap(), None);
    assert_eq!(
        again.bootstrap, own.bootstrap,
        "the broker comes back on its port"
    );
    note(&log, "---- broker started again ----");
    let done = s.finish([p.into()]);
    s.assert_exactly_once(&done);
    s.assert_dead_letters(&done);
    again.stop();
}

/// SIGTERM while the broker is down: the last commit cannot be made and its transaction
/// cannot be ended, yet nothing is lost, so the stop is a clean one (status 0) and ends
/// within `shutdown_timeout_ms`. When the broker is back, a new instance under the same
/// transactional id aborts the left-over transaction and every copy arrives exactly once.
#[test]
fn sigterm_during_a_broker_outage_exits_cleanly_and_loses_nothing() {
    let own = Broker::start(&scratch("outage-stop-broker"), None);
    let s = Scenario::new(
        &own.bootstrap,
        Setup {
            name: "outage-stop",
            policy: "hektor-mobil",
            partitions: 2,
            records: 30_000,
            subscribers: 2_000,
            seed: 71,
            tweaks: Tweaks::default(),
            binary: false,
        },
    );
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(0.2);
    own.stop();
    note(&log, "---- broker stopped; SIGTERM ----");
    let started = Instant::now();
    let status = p.terminate();
    let took = started.elapsed();
    assert!(
        status.success(),
        "a stop that loses nothing exits 0, got {status} (log: {})",
        log.display()
    );
    let limit = Duration::from_secs(25);
    assert!(
        took < limit,
        "the stop took {took:?}, past shutdown_timeout_ms ({limit:?})"
    );
    assert!(
        log_lines(&log)
            .iter()
            .any(|l| l.contains("the last commit failed")),
        "the last commit was expected to fail with the broker down (log: {})",
        log.display()
    );
    let again = Broker::start(own.dir.as_ref().unwrap(), None);
    note(&log, "---- broker started again; restarting ----");
    let p = Processor::start(&s.path, &log, &[]);
    let done = s.finish([p.into()]);
    s.assert_exactly_once(&done);
    s.assert_dead_letters(&done);
    again.stop();
}

/// At-least-once mode (no transactions): after a `kill -9` and a restart every expected
/// copy is present; repeats are allowed, losses and strangers are not.
#[test]
fn at_least_once_mode_loses_nothing_across_a_kill() {
    let s = Scenario::new(
        &broker().bootstrap,
        Setup {
            name: "alo",
            policy: "hektor-mobil",
            partitions: 3,
            records: 40_000,
            subscribers: 2_000,
            seed: 51,
            tweaks: Tweaks {
                kafka: r#"guarantee = "at_least_once""#,
                ..Tweaks::default()
            },
            binary: false,
        },
    );
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(1.0 / 3.0);
    p.kill9();
    note(&log, "---- killed with SIGKILL; restarting ----");
    let p = Processor::start(&s.path, &log, &[]);
    let done = s.finish([p.into()]);
    let repeats = s.assert_at_least_once(&done);
    println!("at least once: {repeats} copies repeated after the kill");
}

/// `run --check` validates a configuration, its policy and key file without a broker; a
/// bad configuration is refused with every problem and where it is.
#[test]
fn run_check_validates_and_lists_every_problem() {
    let dir = scratch("check");
    let (path, _) = run_config(
        &dir,
        "127.0.0.1:1",
        &unique("check"),
        "excedo",
        Tweaks::default(),
    );
    let out = cdrguard_command(&[])
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
    let out = cdrguard_command(&[("CDRGUARD_PROCESSING__QUEUED_MAX_KBYTES", "0")])
        .args(["run", "--config"])
        .arg(&bad)
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

/// `cdrguard produce` feeds files into a configuration's topics keyed as `run` expects:
/// control events by what they set, records by msisdn; an unreadable record is sent as it
/// is (for the dead letter), an unreadable control line is skipped (a compacted topic
/// takes no message without a key).
#[test]
fn produce_feeds_the_topics_keyed_as_run_expects() {
    let b = broker();
    let dir = scratch("produce");
    let (path, cfg) = run_config(
        &dir,
        &b.bootstrap,
        &unique("produce"),
        "excedo",
        Tweaks::default(),
    );
    let (policy, _) = load(&cfg);
    create_topics(&cfg, &policy, 2, 2);
    let m = "+46709990021";
    let mut records: Vec<u8> = Vec::new();
    for (_, v) in records_of(m, "p", 3) {
        records.extend_from_slice(&v);
        records.push(b'\n');
    }
    records.extend_from_slice(b"{\"record_id\": 7}\n");
    let controls = [consent(m, "analytics", true), objection(m, "marketing")];
    let mut control: Vec<u8> = Vec::new();
    for (_, v) in &controls {
        control.extend_from_slice(v);
        control.push(b'\n');
    }
    control.extend_from_slice(b"{\"type\":\"consent\"\n");
    std::fs::write(dir.join("records.jsonl"), &records).unwrap();
    std::fs::write(dir.join("control.jsonl"), &control).unwrap();

    let out = cdrguard_command(&[])
        .args(["produce", "--config"])
        .arg(&path)
        .arg("--records")
        .arg(dir.join("records.jsonl"))
        .arg("--control")
        .arg(dir.join("control.jsonl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sent 2 control events") && stdout.contains("1 unreadable lines skipped"),
        "{stdout}"
    );
    assert!(
        stdout.contains("and 4 records") && stdout.contains("(1 unreadable, sent without a key)"),
        "{stdout}"
    );

    let keys = |msgs: &[rdkafka::message::OwnedMessage]| -> Vec<Option<String>> {
        let mut k: Vec<Option<String>> = msgs
            .iter()
            .map(|m| m.key().map(|k| String::from_utf8_lossy(k).into_owned()))
            .collect();
        k.sort();
        k
    };
    let sent_control = read_to_end(&b.bootstrap, &cfg.control_topic);
    assert_eq!(
        keys(&sent_control),
        [
            Some(format!("{m}/consent/analytics")),
            Some(format!("{m}/objection/marketing"))
        ]
    );
    let sent_records = read_to_end(&b.bootstrap, &cfg.input_topic);
    assert_eq!(
        keys(&sent_records),
        [None, Some(m.into()), Some(m.into()), Some(m.into())]
    );
    // Every message as it was in the file.
    let unkeyed = sent_records.iter().find(|r| r.key().is_none()).unwrap();
    assert_eq!(unkeyed.payload(), Some(&b"{\"record_id\": 7}"[..]));
}

/// Regression: processors inherited the test's environment, so the harness's own
/// `CDRGUARD_TEST_BROKERS` (and any `CDRGUARD_` override in the developer's shell)
/// reached `cdrguard run`, which reads its configuration from `CDRGUARD_` variables.
#[test]
fn processors_see_only_the_cdrguard_variables_a_test_sets() {
    let dir = scratch("env");
    let (path, _) = run_config(
        &dir,
        "127.0.0.1:1",
        &unique("env"),
        "excedo",
        Tweaks::default(),
    );
    let inherited: Vec<(OsString, OsString)> = [
        ("CDRGUARD_TEST_BROKERS", "127.0.0.1:9"),
        ("CDRGUARD_KAFKA__GROUP_ID", "leaked"),
        ("CDRGUARD_PROCESSING__COMMIT_INTERVAL_MS", "fast"),
        ("PATH", "/usr/bin:/bin"),
    ]
    .iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    // The child starts with the variables (as if inherited), then the harness clears them.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdrguard"));
    cmd.envs(inherited.iter().filter(|(k, _)| k != "PATH").cloned());
    scrub_env(
        &mut cmd,
        inherited.clone(),
        &[("CDRGUARD_KAFKA__TRANSACTIONAL_ID", "set-by-test")],
    );
    let envs: Vec<(String, Option<String>)> = cmd
        .get_envs()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.map(|v| v.to_string_lossy().into_owned()),
            )
        })
        .collect();
    for k in [
        "CDRGUARD_TEST_BROKERS",
        "CDRGUARD_KAFKA__GROUP_ID",
        "CDRGUARD_PROCESSING__COMMIT_INTERVAL_MS",
    ] {
        assert!(
            envs.contains(&(k.to_string(), None)),
            "{k} must be removed: {envs:?}"
        );
    }
    assert!(envs.contains(&(
        "CDRGUARD_KAFKA__TRANSACTIONAL_ID".to_string(),
        Some("set-by-test".to_string())
    )));
    assert!(
        !envs.iter().any(|(k, _)| k == "PATH"),
        "other variables are left alone"
    );
    // The binary agrees: a leaked `fast` commit interval would fail the check.
    let out = cmd
        .args(["run", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- The retention service -------------------------------------------------------------

/// A record of `msisdn` at `at`, built from a generated template.
fn record_at(msisdn: &str, id: &str, at: Millis) -> (Option<Vec<u8>>, Vec<u8>) {
    let (k, v) = records_of(msisdn, id, 1).remove(0);
    let mut r: serde_json::Value = serde_json::from_slice(&v).unwrap();
    r["record_id"] = id.into();
    r["start_time"] = at.to_string().into();
    (k, serde_json::to_vec(&r).unwrap())
}

fn t(s: &str) -> Millis {
    Millis::parse(s).unwrap()
}

/// The retention topic's events, read committed: `(route, subscriber, window_start,
/// reason)` with the deadline, and how often each came.
fn expiries(
    bootstrap: &str,
    cfg: &RunConfig,
) -> BTreeMap<(String, String, String, String), (String, usize)> {
    let mut out: BTreeMap<(String, String, String, String), (String, usize)> = BTreeMap::new();
    for m in read_to_end(bootstrap, &cfg.retention_topic) {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(v["type"], "retention_expired", "{v}");
        let k = (
            v["route"].as_str().unwrap().to_string(),
            v["subscriber"].as_str().unwrap_or("").to_string(),
            v["window_start"].as_str().unwrap().to_string(),
            v["reason"].as_str().unwrap().to_string(),
        );
        let e = out
            .entry(k)
            .or_insert((v["deadline"].as_str().unwrap().to_string(), 0));
        e.1 += 1;
    }
    out
}

/// An Excedo run whose `[retention]` settings are `retention` (its clock), its topics
/// made with `partitions` input partitions: the setup of the retention tests.
fn excedo_run(
    dir: &std::path::Path,
    bootstrap: &str,
    prefix: &str,
    retention: &str,
    partitions: i32,
) -> (
    std::path::PathBuf,
    RunConfig,
    cdrguard::policy::Policy,
    cdrguard::core::pseudonym::Keyring,
) {
    let (path, cfg) = run_config(
        dir,
        bootstrap,
        prefix,
        "excedo",
        Tweaks {
            retention,
            ..Tweaks::default()
        },
    );
    let (policy, keys) = load(&cfg);
    create_topics(&cfg, &policy, partitions, 1);
    (path, cfg, policy, keys)
}

/// Every expiry came exactly once.
fn assert_each_once(got: &BTreeMap<(String, String, String, String), (String, usize)>) {
    let twice: Vec<_> = got.iter().filter(|(_, (_, n))| *n != 1).collect();
    assert!(twice.is_empty(), "expiries not exactly once: {twice:?}");
}

/// Windows fire at their deadline (the run's clock starts ten simulated minutes before it
/// and runs 20 times faster), never before, each exactly once, although the instance is
/// killed with SIGKILL while firing them one per transaction and another takes over; the
/// schedule topic, read as compaction leaves it, then holds no fired window.
#[test]
fn expiries_fire_at_their_deadline_once_each_across_a_kill_9() {
    let b = broker();
    let dir = scratch("expire");
    let prefix = unique("expire");
    let day = t("2026-03-02T00:00:00.000Z");
    let policy =
        cdrguard::policy::parse_policy(cdrguard::policy::shipped("excedo").unwrap(), "excedo")
            .unwrap();
    let fraud = &policy.rule(Purpose::Fraud).unwrap().retention;
    let deadline = cdrguard::core::retention::event_time_deadline(fraud, day);
    let clock_start = Millis(deadline.0 - 10 * 60_000);
    let retention = format!("clock_start = \"{clock_start}\"\nclock_speed = 20\nfire_batch = 1");
    let (path, cfg, _, _) = excedo_run(&dir, &b.bootstrap, &prefix, &retention, 3);
    let subscribers: Vec<String> = (0..40).map(|i| format!("+4670777{i:04}")).collect();
    let mut records = Vec::new();
    for (i, s) in subscribers.iter().enumerate() {
        for j in 0..2 {
            let at = Millis(day.0 + 36_000_000 + (i * 2 + j) as i64 * 60_000);
            records.push(record_at(s, &format!("expire-{i}-{j}"), at));
        }
    }
    let started = Instant::now();
    let a = Processor::start(&path, &dir.join("a.log"), &[]);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    produce(&b.bootstrap, &cfg.input_topic, &records);
    offsets.wait_at_end(&b.bootstrap, "the records");
    // Ten simulated minutes are 30 real seconds: if the records were in by then, nothing
    // may have fired yet.
    let real = started.elapsed();
    if real < Duration::from_secs(25) {
        assert!(
            expiries(&b.bootstrap, &cfg).is_empty(),
            "an expiry before its deadline ({real:?} after the start)"
        );
    } else {
        println!("the records took {real:?} to route: the check before the deadline is skipped");
    }
    // Kill it while it fires, one window per transaction.
    wait_for("the first expiries", Duration::from_secs(120), || {
        expiries(&b.bootstrap, &cfg).len() >= 5
    });
    a.kill9();
    let fired_before = expiries(&b.bootstrap, &cfg).len();
    let b2 = Processor::start(&path, &dir.join("b.log"), &[]);
    wait_for(
        "every fraud window expired",
        Duration::from_secs(120),
        || expiries(&b.bootstrap, &cfg).len() >= subscribers.len(),
    );
    assert_eq!(b2.terminate().code(), Some(0));
    let got = expiries(&b.bootstrap, &cfg);
    assert_each_once(&got);
    assert!(
        fired_before < subscribers.len(),
        "the kill came while firing"
    );
    let want: BTreeSet<(String, String, String, String)> = subscribers
        .iter()
        .map(|s| {
            (
                "fraud".to_string(),
                s.clone(),
                day.to_string(),
                fraud.rule_id.clone(),
            )
        })
        .collect();
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), want);
    for (d, _) in got.values() {
        assert_eq!(d, &deadline.to_string());
    }
    // As compaction leaves the schedule topic (the latest message per key): no fired
    // window is left, and the waiting billing and troubleshooting windows are.
    let mut latest: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    for m in read_to_end(&b.bootstrap, &cfg.schedule_topic) {
        latest.insert(m.key().unwrap().to_vec(), m.payload().map(<[u8]>::to_vec));
    }
    let live: Vec<String> = latest
        .iter()
        .filter(|(k, v)| v.is_some() && !k.starts_with(b"control-applied/"))
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(live.iter().all(|k| !k.starts_with("fraud/")), "{live:?}");
    assert_eq!(
        live.iter()
            .filter(|k| k.starts_with("troubleshooting/"))
            .count(),
        subscribers.len(),
        "one waiting contract window per subscriber"
    );
}

/// Rights reach downstream stores at once, exactly once, and only on the routes they end:
/// an erasure expires the analytics, marketing and troubleshooting windows (billing and
/// fraud are held by legal obligation, Art. 17(3)); a withdrawal expires analytics only.
/// Killed with SIGKILL after the rights fired and started again, the instance applies no
/// right twice (the control offsets it applied are kept with its windows).
#[test]
fn rights_expire_the_routes_they_end_once_even_across_a_kill_9() {
    let b = broker();
    let dir = scratch("rights");
    let prefix = unique("rights");
    let day = t("2026-03-02T00:00:00.000Z");
    let clock_start = t("2026-03-07T00:00:00.000Z");
    let retention = format!("clock_start = \"{clock_start}\"");
    let (path, cfg, policy, keys) = excedo_run(&dir, &b.bootstrap, &prefix, &retention, 2);
    let (erased, withdrawn) = ("+46707770001", "+46707770002");
    let ev = |msisdn: &str, at: Millis, change: Change| ControlEvent {
        msisdn: msisdn.into(),
        at,
        change,
    };
    let grant = |p| Change::Consent {
        purpose: p,
        granted: true,
    };
    let before = Millis(day.0 - 86_400_000);
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &control_messages(&[
            ev(erased, before, grant(Purpose::Analytics)),
            ev(erased, before, grant(Purpose::Marketing)),
            ev(withdrawn, before, grant(Purpose::Analytics)),
            ev(withdrawn, before, grant(Purpose::Marketing)),
        ]),
    );
    let a = Processor::start(&path, &dir.join("a.log"), &[]);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    let records: Vec<_> = [erased, withdrawn]
        .iter()
        .flat_map(|s| {
            (0..3).map(move |i| {
                record_at(
                    s,
                    &format!("rights-{s}-{i}"),
                    Millis(day.0 + 43_200_000 + i * 60_000),
                )
            })
        })
        .collect();
    produce(&b.bootstrap, &cfg.input_topic, &records);
    offsets.wait_at_end(&b.bootstrap, "the records");
    let at = Millis(clock_start.0 - 3_600_000);
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &control_messages(&[
            ev(erased, at, Change::Erasure),
            ev(
                withdrawn,
                at,
                Change::Consent {
                    purpose: Purpose::Analytics,
                    granted: false,
                },
            ),
        ]),
    );
    wait_for("the rights' expiries", Duration::from_secs(60), || {
        expiries(&b.bootstrap, &cfg).len() >= 4
    });
    a.kill9();
    let again = Processor::start(&path, &dir.join("b.log"), &[]);
    // Long enough for a second application to show: the timers read back and the
    // control events read again from the start.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(again.terminate().code(), Some(0));
    let got = expiries(&b.bootstrap, &cfg);
    assert_each_once(&got);
    let rule = |p: Purpose| policy.rule(p).unwrap();
    let subject = |p: Purpose, m: &str| {
        cdrguard::core::treat::subscriber_ref(rule(p), &keys, m)
            .unwrap()
            .as_str()
            .to_string()
    };
    let mut want = BTreeSet::new();
    for p in [
        Purpose::Analytics,
        Purpose::Marketing,
        Purpose::Troubleshooting,
    ] {
        want.insert((
            p.id().to_string(),
            subject(p, erased),
            "erasure".to_string(),
        ));
    }
    want.insert((
        "analytics".to_string(),
        subject(Purpose::Analytics, withdrawn),
        "consent_withdrawn".to_string(),
    ));
    let seen: BTreeSet<(String, String, String)> = got
        .keys()
        .map(|(r, s, _, reason)| (r.clone(), s.clone(), reason.clone()))
        .collect();
    assert_eq!(seen, want);
    for ((_, _, start, _), (deadline, _)) in &got {
        assert_eq!(start, &day.to_string(), "the day's window");
        assert_eq!(deadline, &at.to_string(), "due at the right's instant");
    }
}

/// A run that starts with empty timers does not replay the control topic's history
/// through them: an erasure followed by a new consent, both before the run, must not end
/// the marketing windows of records routed under that consent (the consent table already
/// holds both and routed the copies; replaying the erasure expired them at once).
#[test]
fn rights_before_the_run_do_not_end_windows_routed_under_a_later_consent() {
    let b = broker();
    let dir = scratch("history");
    let prefix = unique("history");
    let day = t("2026-03-02T00:00:00.000Z");
    let clock_start = t("2026-03-07T00:00:00.000Z");
    let retention = format!("clock_start = \"{clock_start}\"");
    let (path, cfg, _, _) = excedo_run(&dir, &b.bootstrap, &prefix, &retention, 2);
    let m = "+46707770003";
    let ev = |at: Millis, change: Change| ControlEvent {
        msisdn: m.into(),
        at,
        change,
    };
    let erased = Millis(day.0 - 2 * 86_400_000);
    let granted = Millis(day.0 - 86_400_000);
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &control_messages(&[
            ev(erased, Change::Erasure),
            ev(
                granted,
                Change::Consent {
                    purpose: Purpose::Marketing,
                    granted: true,
                },
            ),
        ]),
    );
    let a = Processor::start(&path, &dir.join("a.log"), &[]);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    let records: Vec<_> = (0..3)
        .map(|i| record_at(m, &format!("history-{i}"), Millis(day.0 + i * 60_000)))
        .collect();
    produce(&b.bootstrap, &cfg.input_topic, &records);
    offsets.wait_at_end(&b.bootstrap, "the records");
    // Long enough for the control events to reach the timers many commits over, had
    // they been read from the start.
    std::thread::sleep(Duration::from_secs(8));
    let finished = finish(&b.bootstrap, &cfg, [Run::Process(a)]);
    assert_eq!(
        read_route(&b.bootstrap, &cfg, Purpose::Marketing, &finished).len(),
        3,
        "the new consent routes marketing copies"
    );
    let got = expiries(&b.bootstrap, &cfg);
    assert!(got.is_empty(), "no window was ended: {got:?}");
}

/// An invoice settlement starts the clock of the billing windows it covers: nothing of
/// billing fires before it, and the settled period's one window fires at the settlement
/// plus the rule's six months.
#[test]
fn an_invoice_settlement_starts_the_billing_clock() {
    let b = broker();
    let dir = scratch("settle");
    let prefix = unique("settle");
    let day = t("2026-03-02T00:00:00.000Z");
    let settled_at = t("2026-04-03T00:00:00.000Z");
    let policy =
        cdrguard::policy::parse_policy(cdrguard::policy::shipped("excedo").unwrap(), "excedo")
            .unwrap();
    let billing = &policy.rule(Purpose::Billing).unwrap().retention;
    let deadline = billing.period.after(settled_at);
    // Records are routed 40 simulated minutes before the deadline; the clock runs 60
    // times faster, so the window fires about 40 real seconds after the start.
    let clock_start = Millis(deadline.0 - 40 * 60_000);
    let retention = format!("clock_start = \"{clock_start}\"\nclock_speed = 60");
    let (path, cfg, _, _) = excedo_run(&dir, &b.bootstrap, &prefix, &retention, 2);
    let s = "+46707770009";
    let a = Processor::start(&path, &dir.join("a.log"), &[]);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    let records: Vec<_> = (0..4)
        .map(|i| record_at(s, &format!("settle-{i}"), Millis(day.0 + i * 3_600_000)))
        .collect();
    produce(&b.bootstrap, &cfg.input_topic, &records);
    offsets.wait_at_end(&b.bootstrap, "the records");
    assert!(
        expiries(&b.bootstrap, &cfg)
            .keys()
            .all(|(route, ..)| route != "billing"),
        "billing waits for its settlement"
    );
    // A second subscriber with no record yet is settled 30 simulated minutes later: no
    // partition's timers hold a window of theirs, so none remembers the settlement.
    let late = "+46707770010";
    let late_settled_at = Millis(settled_at.0 + 30 * 60_000);
    let late_deadline = billing.period.after(late_settled_at);
    let settle = |who: &str, at| ControlEvent {
        msisdn: who.into(),
        at,
        change: Change::InvoiceSettled {
            period_start: t("2026-03-01T00:00:00.000Z"),
            period_end: t("2026-04-01T00:00:00.000Z"),
        },
    };
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &control_messages(&[settle(s, settled_at), settle(late, late_settled_at)]),
    );
    wait_for(
        "the settled window's expiry",
        Duration::from_secs(120),
        || {
            expiries(&b.bootstrap, &cfg)
                .keys()
                .any(|(route, ..)| route == "billing")
        },
    );
    // Its record of the settled period arrives after the settlement took effect: its
    // window must get the settled deadline from the consent table, not wait for ever.
    let late_hour = Millis(day.0 + 10 * 3_600_000);
    produce(
        &b.bootstrap,
        &cfg.input_topic,
        &[record_at(late, "settle-late", late_hour)],
    );
    wait_for("the late record's expiry", Duration::from_secs(120), || {
        expiries(&b.bootstrap, &cfg)
            .keys()
            .any(|(route, subject, ..)| route == "billing" && subject == late)
    });
    assert_eq!(a.terminate().code(), Some(0));
    let got = expiries(&b.bootstrap, &cfg);
    assert_each_once(&got);
    let mut billing: Vec<_> = got
        .iter()
        .filter(|((r, ..), _)| r == "billing")
        .map(|((_, subject, start, reason), (d, _))| {
            (subject.clone(), start.clone(), reason.clone(), d.clone())
        })
        .collect();
    billing.sort();
    let row = |who: &str, start: Millis, d: Millis| {
        (
            who.to_string(),
            start.to_string(),
            "excedo.billing".to_string(),
            d.to_string(),
        )
    };
    // The period's hours are one window each.
    assert_eq!(
        billing,
        [row(s, day, deadline), row(late, late_hour, late_deadline)]
    );
}

/// Timers move with their partitions: a second instance joins while the first owns every
/// partition, reads the partitions it is given back from the schedule topic, and fires
/// their windows; the first fires the rest. Each window expires exactly once.
#[test]
fn a_rebalance_hands_timers_to_the_new_owner_each_fired_once() {
    let b = broker();
    let dir = scratch("handover");
    let prefix = unique("handover");
    let day = t("2026-03-02T00:00:00.000Z");
    let policy =
        cdrguard::policy::parse_policy(cdrguard::policy::shipped("excedo").unwrap(), "excedo")
            .unwrap();
    let fraud = &policy.rule(Purpose::Fraud).unwrap().retention;
    let deadline = cdrguard::core::retention::event_time_deadline(fraud, day);
    // Forty simulated minutes before the deadline, running 40 times faster: a minute of
    // real time to route the records and hand partitions over first.
    let clock_start = Millis(deadline.0 - 40 * 60_000);
    let retention = format!("clock_start = \"{clock_start}\"\nclock_speed = 40");
    let (path, cfg, _, _) = excedo_run(&dir, &b.bootstrap, &prefix, &retention, 4);
    let subscribers: Vec<String> = (0..60).map(|i| format!("+4670778{i:04}")).collect();
    let records: Vec<_> = subscribers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            record_at(
                s,
                &format!("handover-{i}"),
                Millis(day.0 + 40_000_000 + i as i64),
            )
        })
        .collect();
    let a = Processor::start(&path, &dir.join("a.log"), &[]);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    produce(&b.bootstrap, &cfg.input_topic, &records);
    offsets.wait_at_end(&b.bootstrap, "the records");
    let txn_b = format!("{prefix}.txn-b");
    let second = Processor::start(
        &path,
        &dir.join("b.log"),
        &[("CDRGUARD_KAFKA__TRANSACTIONAL_ID", &txn_b)],
    );
    let b_log = dir.join("b.log");
    wait_for(
        "the second instance's timers read back",
        Duration::from_secs(90),
        || {
            log_lines(&b_log)
                .iter()
                .any(|l| l.contains("retention timers read back"))
        },
    );
    wait_for("every window expired", Duration::from_secs(120), || {
        expiries(&b.bootstrap, &cfg).len() >= subscribers.len()
    });
    assert_eq!(second.terminate().code(), Some(0));
    assert_eq!(a.terminate().code(), Some(0));
    let got = expiries(&b.bootstrap, &cfg);
    assert_each_once(&got);
    assert_eq!(got.len(), subscribers.len());
}

/// A schedule entry that cannot be read is never dropped: one whose key still names its
/// window expires that window at once (deleting early is safe, late is not), and every
/// unreadable one is logged by partition and offset, never by content.
#[test]
fn an_unreadable_schedule_entry_expires_its_window_at_once_and_is_logged_without_content() {
    let b = broker();
    let dir = scratch("unreadable");
    let prefix = unique("unreadable");
    let (path, cfg) = run_config(&dir, &b.bootstrap, &prefix, "excedo", Tweaks::default());
    let (policy, _) = load(&cfg);
    create_topics(&cfg, &policy, 1, 1);
    let msisdn = "+46707779999";
    // Day 20514 is 2026-03-02.
    produce(
        &b.bootstrap,
        &cfg.schedule_topic,
        &[
            (
                Some(format!("fraud/{msisdn}/20514").into_bytes()),
                b"{not json".to_vec(),
            ),
            (
                Some(b"garbage key".to_vec()),
                format!("{{\"x\":\"{msisdn}\"}}").into_bytes(),
            ),
        ],
    );
    let log = dir.join("a.log");
    let a = Processor::start(&path, &log, &[]);
    wait_for(
        "the unreadable window's expiry",
        Duration::from_secs(90),
        || !expiries(&b.bootstrap, &cfg).is_empty(),
    );
    assert_eq!(a.terminate().code(), Some(0));
    let got = expiries(&b.bootstrap, &cfg);
    assert_each_once(&got);
    let keys: Vec<_> = got.keys().collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(
        (keys[0].0.as_str(), keys[0].1.as_str(), keys[0].2.as_str()),
        ("fraud", msisdn, "2026-03-02T00:00:00.000Z")
    );
    let lines = log_lines(&log);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("schedule entries unreadable") && l.contains("count=2")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains("7779999")),
        "a log line names the subscriber"
    );
}

/// Without the retention topic the run stops at start and says which topic is missing.
#[test]
fn a_missing_retention_topic_stops_the_run_at_start() {
    let b = broker();
    let dir = scratch("noretention");
    let prefix = unique("noretention");
    let (path, cfg) = run_config(&dir, &b.bootstrap, &prefix, "excedo", Tweaks::default());
    let (policy, _) = load(&cfg);
    create_topics(&cfg, &policy, 1, 1);
    delete_topic(&b.bootstrap, &cfg.retention_topic);
    let log = dir.join("a.log");
    let mut a = Processor::start(&path, &log, &[]);
    wait_for("the run to stop", Duration::from_secs(60), || !a.running());
    let status = a.wait();
    assert_ne!(status.code(), Some(0));
    let lines = log_lines(&log);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("missing") && l.contains(&cfg.retention_topic)),
        "{lines:#?}"
    );
}

/// A call of `msisdn` at `at` lasting `duration_s`, written out in full.
fn call(msisdn: &str, id: &str, at: Millis, duration_s: u32) -> (Option<Vec<u8>>, Vec<u8>) {
    let r = format!(
        r#"{{"record_id":"{id}","kind":"moc","msisdn":"{msisdn}","imsi":"240011234567890","other_party":"+46709876543","start_time":"{at}","duration_s":{duration_s},"close_cause":"normal","serving_plmn":"24001","rat":"lte","recording_entity":"msc-1","local_seq_no":1}}"#
    );
    (Some(msisdn.as_bytes().to_vec()), r.into_bytes())
}

/// Anonymised copies (Alleato analytics without consent) are held to a crowd in Kafka
/// mode too: a content five subscribers share is released once, after its month closed,
/// although the instance was killed with SIGKILL while holding it; a content one
/// subscriber alone made is never released.
#[test]
fn anonymised_crowds_of_five_are_released_once_after_their_month_smaller_never() {
    let b = broker();
    let dir = scratch("crowds");
    let prefix = unique("crowds");
    // The month closes a day after its end: 2026-04-02. The clock starts a simulated
    // two minutes before, and runs ten times faster.
    let retention = "clock_start = \"2026-04-01T23:58:00.000Z\"\nclock_speed = 10";
    let (path, cfg) = run_config(
        &dir,
        &b.bootstrap,
        &prefix,
        "alleato",
        Tweaks {
            retention,
            ..Tweaks::default()
        },
    );
    let (policy, _) = load(&cfg);
    // One partition: crowds are counted per partition (a crowd spread over two would be
    // withheld, the safe side).
    create_topics(&cfg, &policy, 1, 1);
    let day = t("2026-03-10T12:00:00.000Z");
    let mut records: Vec<_> = (0..5)
        .map(|i| call(&format!("+4670779{i:04}"), &format!("crowd-{i}"), day, 40))
        .collect();
    records.push(call("+46707799999", "lonely", day, 4_000));
    let a = Processor::start(&path, &dir.join("a.log"), &[]);
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    produce(&b.bootstrap, &cfg.input_topic, &records);
    offsets.wait_at_end(&b.bootstrap, "the records");
    let analytics = cfg.routes[Purpose::Analytics as usize].clone().unwrap();
    let anonymised = |msgs: &[rdkafka::message::OwnedMessage]| {
        msgs.iter()
            .filter(|m| header(m, "consent") == Some("absent"))
            .count()
    };
    assert_eq!(
        anonymised(&read_to_end(&b.bootstrap, &analytics)),
        0,
        "held while the month is open"
    );
    a.kill9();
    let again = Processor::start(&path, &dir.join("b.log"), &[]);
    wait_for("the crowd's release", Duration::from_secs(120), || {
        anonymised(&read_to_end(&b.bootstrap, &analytics)) >= 5
    });
    // Long enough for a second release to show.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(again.terminate().code(), Some(0));
    let msgs = read_to_end(&b.bootstrap, &analytics);
    let released: Vec<&rdkafka::message::OwnedMessage> = msgs
        .iter()
        .filter(|m| header(m, "consent") == Some("absent"))
        .collect();
    assert_eq!(released.len(), 5, "the crowd of five, once");
    let first = released[0].payload().unwrap();
    assert!(released.iter().all(|m| m.payload().unwrap() == first));
    let v: serde_json::Value = serde_json::from_slice(first).unwrap();
    assert_eq!(
        v["record"]["duration_s"],
        cdrguard::core::treat::duration_class(40),
        "the duration class of 40 s"
    );
    assert!(v["record"].get("msisdn").is_none());
}

/// One HTTP GET against the telemetry listener: status code and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (code, body.to_string());
    }
    // Prometheus sends larger answers in chunks: size line, data, CRLF, until size 0.
    let mut rest = body;
    let mut whole = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        whole.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (code, whole)
}

/// The samples of one metric family in Prometheus text: labels (as written) to value.
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, value) = r.split_once('}')?;
                    (labels.to_string(), value)
                }
                None if rest.starts_with(' ') => (String::new(), rest),
                None => return None,
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of a family's samples whose labels contain `with`.
fn sum(text: &str, name: &str, with: &str) -> f64 {
    samples(text, name)
        .iter()
        .filter(|(l, _)| l.contains(with))
        .map(|(_, v)| v)
        .sum()
}

/// A whole generated stream through `cdrguard run` with telemetry on a free port and JSON
/// logs. The input comes from a transactional producer, so every partition ends in a
/// commit marker: lag measured against the high watermark would stay at 1 there.
/// - `/readyz` turns 200 once the consent table is current and partitions are assigned;
///   `/healthz` answers 200.
/// - The committed counters equal what was delivered: records by kind, dead letters,
///   copies per route as read back from the route topics; the lag of every owned
///   partition comes down to 0, one series per partition.
/// - No log line and no scrape of `/metrics` (during and after the run) carries any raw
///   msisdn, imsi, imei, ue_ip or other_party of the input; every log line is JSON.
#[test]
fn telemetry_counts_what_was_delivered_and_leaks_no_identifier_in_logs_or_metrics() {
    let b = broker();
    let dir = scratch("telemetry");
    let (path, cfg) = run_config(
        &dir,
        &b.bootstrap,
        &unique("telemetry"),
        "excedo",
        Tweaks {
            telemetry: "log_format = \"json\"",
            ..Tweaks::default()
        },
    );
    let (policy, keys) = load(&cfg);
    let partitions = 3;
    create_topics(&cfg, &policy, partitions, 1);
    let t = traffic(3_000, 300, 29);
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &control_messages(&t.controls),
    );
    produce_transactional(&b.bootstrap, &cfg.input_topic, &t.messages, 200);
    let want = expected(&t, &policy, &keys);

    let log = dir.join("run.log");
    let run = Processor::start(&path, &log, &[]);
    let mut addr = None;
    wait_for(
        "the telemetry listening line",
        Duration::from_secs(60),
        || {
            addr = log_lines(&log).iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["fields"]["message"] == "telemetry listening")
                    .then(|| v["fields"]["addr"].as_str().map(str::to_string))?
            });
            addr.is_some()
        },
    );
    let addr = addr.unwrap();
    let mut scrapes = Vec::new();
    wait_for("/readyz to answer 200", Duration::from_secs(120), || {
        scrapes.push(http_get(&addr, "/metrics").1);
        http_get(&addr, "/readyz").0 == 200
    });
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    // Counters follow the commits; the lag is sampled every few seconds.
    let mut last = String::new();
    wait_for(
        "every record counted and the lag at 0",
        Duration::from_secs(240),
        || {
            last = http_get(&addr, "/metrics").1;
            let lag = samples(&last, "cdrguard_consumer_lag_records");
            sum(&last, "cdrguard_records_total", "") as usize == t.messages.len()
                && lag.len() == partitions as usize
                && lag.values().all(|v| *v == 0.0)
        },
    );
    scrapes.push(last.clone());
    let done = finish_transactional_input(&b.bootstrap, &cfg, [run.into()]);
    let routes = assert_exactly_once(&b.bootstrap, &cfg, &policy, &want, &done);

    // Counted as delivered.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for r in &t.records {
        let v: serde_json::Value = serde_json::from_slice(r).unwrap();
        *kinds
            .entry(v["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for (kind, n) in &kinds {
        assert_eq!(
            sum(&last, "cdrguard_records_total", &format!("kind=\"{kind}\"")) as usize,
            *n,
            "records of kind {kind}"
        );
    }
    assert_eq!(
        sum(&last, "cdrguard_records_total", "kind=\"unknown\"") as usize,
        t.malformed
    );
    assert_eq!(
        sum(&last, "cdrguard_dead_letters_total", "") as usize,
        t.malformed
    );
    for (p, msgs) in &routes {
        assert_eq!(
            sum(
                &last,
                "cdrguard_copies_total",
                &format!("route=\"{}\"", p.id())
            ) as usize,
            msgs.len(),
            "copies of route {}",
            p.id()
        );
    }
    assert!(sum(&last, "cdrguard_pseudonymised_fields_total", "") > 0.0);
    assert!(
        sum(
            &last,
            "cdrguard_transactions_total",
            "outcome=\"committed\""
        ) > 0.0
    );
    assert_eq!(sum(&last, "cdrguard_assigned_partitions", ""), 3.0);
    assert_eq!(sum(&last, "cdrguard_ready", ""), 1.0);
    assert!(sum(&last, "cdrguard_consent_subscribers", "") > 0.0);
    assert!(sum(&last, "cdrguard_retention_windows_pending", "") > 0.0);
    for family in [
        "cdrguard_records_total",
        "cdrguard_records_aborted_total",
        "cdrguard_copies_total",
        "cdrguard_dead_letters_total",
        "cdrguard_tokenised_fields_total",
        "cdrguard_record_processing_seconds_bucket",
        "cdrguard_record_commit_latency_seconds_bucket",
        "cdrguard_commit_duration_seconds_bucket",
        "cdrguard_commit_phase_seconds_bucket",
        "cdrguard_partition_wakeups_missed_total",
        "cdrguard_transactions_total",
        "cdrguard_rebalances_total",
        "cdrguard_control_events_total",
        "cdrguard_consent_fresh",
        "cdrguard_retention_expiries_total",
        "cdrguard_retention_oldest_overdue_seconds",
        "cdrguard_retention_rebuild_duration_seconds_bucket",
        "cdrguard_crowd_withheld_copies",
    ] {
        assert!(
            !samples(&last, family).is_empty(),
            "family {family} missing from /metrics"
        );
    }

    // Nothing raw, anywhere.
    let mut raw: BTreeSet<String> = BTreeSet::new();
    for r in &t.records {
        let v: serde_json::Value = serde_json::from_slice(r).unwrap();
        for f in ["msisdn", "imsi", "imei", "ue_ip", "other_party"] {
            if let Some(s) = v[f].as_str() {
                raw.insert(s.to_string());
            }
        }
    }
    raw.extend(t.controls.iter().map(|c| c.msisdn.clone()));
    let lines = log_lines(&log);
    assert!(lines.len() > 5, "the run logged");
    for l in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not a JSON line: {l}"
        );
    }
    for id in &raw {
        for l in &lines {
            assert!(!l.contains(id.as_str()), "a log line carries {id}: {l}");
        }
        for s in &scrapes {
            assert!(!s.contains(id.as_str()), "/metrics carries {id}");
        }
    }
}

/// Percent-encodes a query parameter.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of the test's own, stopped when dropped.
struct PrometheusServer {
    child: std::process::Child,
    addr: String,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    /// An instant query's result series (panics when Prometheus refuses the query).
    fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let (code, body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(q)),
        );
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {q}: {code} {e}: {body}"));
        assert_eq!(v["status"], "success", "query {q}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// An alert expression with every comparison against a number made `bool`: instead of
/// keeping only the series past the threshold, it keeps them all (as 0 or 1), so a
/// healthy run still shows whether the expression finds its metrics.
fn unthresholded(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['>', '<', '=', '!']) {
        let (before, at) = rest.split_at(i);
        out.push_str(before);
        let op_len = if at.starts_with(">=")
            || at.starts_with("<=")
            || at.starts_with("==")
            || at.starts_with("!=")
        {
            2
        } else if at.starts_with('=') || at.starts_with('!') {
            // A label matcher (`=`, `!=` handled above, `=~`, `!~`).
            out.push_str(&at[..1]);
            rest = &at[1..];
            continue;
        } else {
            1
        };
        let (op, after) = at.split_at(op_len);
        out.push_str(op);
        if after.trim_start().starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(" bool");
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[test]
fn alert_expressions_keep_their_series_when_unthresholded() {
    assert_eq!(
        unthresholded(r#"rate(x{a="b",c!="d"}[5m]) > 0 and y{e=~"f"} == 0"#),
        r#"rate(x{a="b",c!="d"}[5m]) > bool 0 and y{e=~"f"} == bool 0"#
    );
}

/// Prometheus (Debian's `prometheus` package; `.ci/run` installs it) scrapes a live
/// `cdrguard run` against the broker, loading the shipped alert rules. Then every panel
/// query of the shipped Grafana dashboard, and every alert expression (its thresholds
/// made `bool`, see [`unthresholded`]), must return at least one series: none refers to
/// a metric or label the process does not export. The rules must load and evaluate
/// without error. The run sees malformed records, live control events and an erasure
/// (so expiries fire), so every histogram has samples.
#[test]
fn prometheus_evaluates_every_alert_and_panel_against_a_live_run() {
    let prometheus = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Prometheus is not installed: apt-get install prometheus (.ci/run does)");
    let b = broker();
    let dir = scratch("prometheus");
    let (path, cfg) = run_config(
        &dir,
        &b.bootstrap,
        &unique("prometheus"),
        "excedo",
        Tweaks::default(),
    );
    let (policy, _) = load(&cfg);
    create_topics(&cfg, &policy, 2, 1);
    let t = traffic(2_000, 200, 31);
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &control_messages(&t.controls),
    );
    produce(&b.bootstrap, &cfg.input_topic, &t.messages);

    let log = dir.join("run.log");
    let run = Processor::start(&path, &log, &[]);
    let mut target = None;
    wait_for(
        "the telemetry listening line",
        Duration::from_secs(60),
        || {
            target = log_lines(&log).iter().find_map(|l| {
                let rest = l.split_once("telemetry listening")?.1;
                let addr = rest.split_once("addr=")?.1.split_whitespace().next()?;
                Some(addr.to_string())
            });
            target.is_some()
        },
    );
    let target = target.unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rules = root().join("deploy/prometheus/rules/cdrguard.yml");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: cdrguard\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let prom_log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let server = PrometheusServer {
        child: std::process::Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(prom_log.try_clone().unwrap())
            .stderr(prom_log)
            .spawn()
            .unwrap(),
        addr: format!("127.0.0.1:{port}"),
    };
    wait_for("Prometheus to be ready", Duration::from_secs(60), || {
        std::net::TcpStream::connect(&server.addr).is_ok()
            && http_get(&server.addr, "/-/ready").0 == 200
    });

    // The stream routed; then live control events: an erasure of a subscriber with
    // copies (its windows expire at once) and a grant, so the apply delay, the expiry
    // and its lateness are measured too.
    wait_for("cdrguard to be ready", Duration::from_secs(120), || {
        http_get(&target, "/readyz").0 == 200
    });
    let offsets = GroupOffsets::new(&b.bootstrap, &cfg.group_id, &cfg.input_topic);
    offsets.wait_at_end(&b.bootstrap, "the stream");
    let first: serde_json::Value = serde_json::from_slice(&t.records[0]).unwrap();
    let msisdn = first["msisdn"].as_str().unwrap().to_string();
    let now = Millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    produce(
        &b.bootstrap,
        &cfg.control_topic,
        &control_messages(&[
            ControlEvent {
                msisdn: msisdn.clone(),
                at: now,
                change: Change::Erasure,
            },
            ControlEvent {
                msisdn: "+46700000009".into(),
                at: now,
                change: Change::Consent {
                    purpose: Purpose::Marketing,
                    granted: true,
                },
            },
        ]),
    );
    wait_for("the erasure's expiries", Duration::from_secs(60), || {
        sum(
            &http_get(&target, "/metrics").1,
            "cdrguard_retention_expiries_total",
            "reason=\"erasure\"",
        ) > 0.0
    });
    // Enough scrapes after the expiries for every rate window.
    std::thread::sleep(Duration::from_secs(3));
    wait_for("30 s of scrapes", Duration::from_secs(90), || {
        server
            .query("count_over_time(cdrguard_build_info[30s])")
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .is_some_and(|n| n >= 25.0)
    });

    let mut queries: Vec<(String, String)> = Vec::new();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/cdrguard.json")).unwrap(),
    )
    .unwrap();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "30s")
                .replace("$instance", ".*");
            queries.push((format!("panel {:?}", p["title"]), expr));
        }
    }
    let loaded: serde_json::Value =
        serde_json::from_str(&http_get(&server.addr, "/api/v1/rules").1).unwrap();
    let mut alerts = 0;
    for g in loaded["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
            alerts += 1;
            queries.push((
                format!("alert {}", r["name"]),
                unthresholded(r["query"].as_str().unwrap()),
            ));
        }
    }
    assert_eq!(alerts, 6, "every alert of the rules file loaded");
    assert!(queries.len() > 30, "{} queries", queries.len());
    assert!(
        server.query("cdrguard_no_such_metric").is_empty(),
        "a query of nothing finds nothing"
    );
    let empty: Vec<String> = queries
        .iter()
        .filter(|(_, q)| server.query(q).is_empty())
        .map(|(what, q)| format!("{what}: {q}"))
        .collect();
    drop(server);
    finish(&b.bootstrap, &cfg, [run.into()]);
    assert!(
        empty.is_empty(),
        "queries without a series:\n{}",
        empty.join("\n")
    );
}

/// Key rotation without a restart: mid-run the key file gains a new active key (k2, the
/// old one kept below it) by a rename over it, as a mounted Secret changes, and SIGHUP
/// asks for it. Copies made before the switch name subscribers under the old key, copies
/// after it under the new one, with one switch per input partition in offset order;
/// every expected copy arrives exactly once. A broken file sent after it is refused and
/// the new keys stay.
#[test]
fn keys_rotate_at_a_transaction_boundary_without_a_restart() {
    let s = Scenario::new(
        &broker().bootstrap,
        Setup {
            name: "rotate",
            policy: "excedo",
            partitions: 3,
            records: 60_000,
            subscribers: 1_500,
            seed: 71,
            tweaks: Tweaks::default(),
            binary: false,
        },
    );
    let log = s.dir.join("cdrguard.log");
    let p = Processor::start(&s.path, &log, &[]);
    s.wait_progress(0.3);
    let keys = s.cfg.key_file.clone();
    let old = std::fs::read_to_string(&keys).unwrap();
    // A fresh random key, as `cdrguard keys generate` makes it, above the old one.
    let fresh = cdrguard::adapters::keyfile::generate("test2");
    let secret = fresh
        .split("secret_hex = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let rotated = format!("{fresh}\n{old}");
    let replace = |text: &str| {
        use std::os::unix::fs::PermissionsExt;
        let tmp = s.dir.join("keys.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, &keys).unwrap();
    };
    // Held still while the file changes, so the switch lands mid-stream.
    p.pause();
    replace(&rotated);
    p.resume();
    p.hangup();
    wait_for(
        "the switch to the new keys",
        Duration::from_secs(60),
        || {
            log_lines(&log)
                .iter()
                .any(|l| l.contains("new keys in use from this transaction on"))
        },
    );
    replace("[[keys]]\nid = \"test3\"\nsecret_hex = \"not hex\"\n");
    p.hangup();
    wait_for("the broken file refused", Duration::from_secs(60), || {
        log_lines(&log)
            .iter()
            .any(|l| l.contains("key file refused; the keys in use are kept"))
    });
    let done = s.finish([p.into()]);
    let before = cdrguard::adapters::keyfile::parse(&old, "keys").unwrap();
    let after = cdrguard::adapters::keyfile::parse(&rotated, "keys").unwrap();
    let translate = ids_across_keys(&s.traffic, &s.policy, &before, &after);
    let routes = s.assert_exactly_once_across_keys(&done, &translate);
    assert!(
        log_lines(&log)
            .iter()
            .all(|l| !l.contains(&secret[..16]) && !l.contains("fdcb03b6")),
        "no key material in the log"
    );

    // Where each record sat in the input.
    let mut at: std::collections::HashMap<String, (i32, i64)> = Default::default();
    for m in read_to_end(&s.bootstrap, &s.cfg.input_topic) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or(&[]))
            && let Some(id) = v["record_id"].as_str()
        {
            at.insert(id.to_string(), (m.partition(), m.offset()));
        }
    }
    let mut records = records_of_copies(&s.traffic, &s.policy, &before);
    for (route, more) in records
        .iter_mut()
        .zip(records_of_copies(&s.traffic, &s.policy, &after))
    {
        route.extend(more);
    }
    let mut seen = std::collections::BTreeSet::new();
    for (purpose, msgs) in &routes {
        // Per input partition, the key of each copy in offset order.
        let mut by_partition: std::collections::BTreeMap<i32, Vec<(i64, String)>> =
            Default::default();
        for m in msgs {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let Some(key) = v["envelope"]["key_id"].as_str() else {
                continue;
            };
            let master = key.split('.').next().unwrap().to_string();
            let id = v["envelope"]["record_id"].as_str().unwrap_or_default();
            let record = records[*purpose as usize]
                .get(id)
                .map_or(id, String::as_str);
            let &(partition, offset) = at.get(record).expect("every copy's record is in the input");
            by_partition
                .entry(partition)
                .or_default()
                .push((offset, master));
        }
        for (partition, mut keys) in by_partition {
            keys.sort();
            let switched = keys
                .iter()
                .position(|(_, k)| k == "test2")
                .unwrap_or(keys.len());
            assert!(
                keys[..switched].iter().all(|(_, k)| k == "test1")
                    && keys[switched..].iter().all(|(_, k)| k == "test2"),
                "route {}, input partition {partition}: one switch from test1 to test2 in offset order",
                purpose.id()
            );
            seen.extend(keys.into_iter().map(|(_, k)| k));
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["test1", "test2"],
        "copies under both keys"
    );
}
