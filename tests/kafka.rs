//! cdrguard against a real Apache Kafka broker (started by the harness in tests/util, or
//! named by CDRGUARD_TEST_BROKERS). Every test uses its own uniquely named topics.

mod util;

use std::time::Duration;

use rdkafka::message::Message;
use util::*;

/// Every route of two policies, end to end: each expected copy arrives exactly once with
/// its tags as headers, and malformed records reach the dead-letter topic with theirs.
#[test]
fn routes_every_purpose_of_two_policies_exactly_once() {
    let b = broker();
    for policy_name in ["excedo", "alleato"] {
        let dir = scratch(&format!("e2e-{policy_name}"));
        let prefix = unique(&format!("e2e-{policy_name}"));
        let (_, cfg) = run_config(&dir, &b.bootstrap, &prefix, policy_name, "");
        let (policy, keys) = load(&cfg);
        create_topics(&cfg, &policy, 3);
        let t = traffic(3_000, 300, 11);
        produce(
            &b.bootstrap,
            &cfg.control_topic,
            &control_messages(&t.controls),
        );
        produce(&b.bootstrap, &cfg.input_topic, &t.messages);
        let want = expected(&t, &policy, &keys);
        for r in policy.declared() {
            assert!(
                !want[r.purpose as usize].is_empty(),
                "{policy_name}: the traffic must exercise route {}",
                r.purpose.id()
            );
        }

        let run = InProcess::start(&cfg);
        assert_exactly_once(&b.bootstrap, &cfg, &policy, &want);
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
        for w in &windows {
            let v: serde_json::Value = serde_json::from_slice(w.payload().unwrap()).unwrap();
            assert_eq!(v["type"], "retention_window");
            if v["route"] == "analytics" || v["route"] == "marketing" {
                let s = v["subscriber"].as_str().unwrap_or("");
                assert!(!s.starts_with('+'), "raw msisdn in a {} window", v["route"]);
            }
        }
        run.stop().expect("clean stop");
    }
}
