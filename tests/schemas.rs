//! What cdrguard really writes, checked on real replay output of generated traffic:
//! generated input validates against the input schemas and every line a replay writes
//! (copies for every route of every shipped policy, expiries, dead letters) against the
//! output ones; every route holds only the identifiers its purpose may see; and
//! anonymised copies cannot be joined back to a subscriber.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use cdrguard::adapters::demo::write_traffic;
use cdrguard::adapters::engine::Engine;
use cdrguard::adapters::files::Outputs;
use cdrguard::adapters::generate::GenConfig;
use cdrguard::adapters::replay::{ReplayInput, ReplayLimits, replay};
use cdrguard::codec::Format;
use cdrguard::core::pseudonym::{Keyring, MasterKey};
use cdrguard::core::treat::{duration_class, volume_class};
use cdrguard::policy::{Policy, SHIPPED, parse_policy, shipped};
use cdrguard::vocab::purpose::Purpose;
use cdrguard::vocab::time::Millis;
use serde_json::Value;

fn validator(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(name);
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

fn check_lines(v: &jsonschema::Validator, file: &Path) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let doc: Value = serde_json::from_str(line).unwrap();
        let errors: Vec<String> = v
            .iter_errors(&doc)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{}:{}: {errors:?}\n{line}",
            file.display(),
            i + 1
        );
        n += 1;
    }
    n
}

fn read_json_lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn keys() -> Keyring {
    Keyring::new(&[MasterKey::new("schema", &[9u8; 32]).unwrap()]).unwrap()
}

/// Generated traffic in `dir`: records and control events, malformed ones among them.
fn traffic(dir: &Path, cfg: &GenConfig) -> (PathBuf, PathBuf) {
    let records = dir.join("records.jsonl");
    let control = dir.join("control.jsonl");
    write_traffic(cfg, &records, &control, Format::Json).unwrap();
    (records, control)
}

/// Replays the traffic through `policy` into `out`.
fn run(policy: &Policy, keys: &Keyring, records: &Path, control: &Path, out: &Path) {
    let mut engine = Engine::new(policy, keys);
    let mut outputs = Outputs::create(out, policy, false).unwrap();
    let input = ReplayInput {
        records: records.to_path_buf(),
        format: Format::Json,
        control: Some(control.to_path_buf()),
        now: Millis::parse("2027-06-01T00:00:00.000Z").unwrap(),
        progress: false,
        limits: ReplayLimits::default(),
    };
    replay(&input, &mut engine, &mut outputs).unwrap();
    outputs.finish().unwrap();
}

#[test]
fn inputs_and_every_output_match_the_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = GenConfig {
        records: 4_000,
        subscribers: 300,
        malformed_rate: 0.01,
        ..GenConfig::default()
    };
    let (records, control) = traffic(dir.path(), &cfg);

    let (record_v, control_v) = (
        validator("record.schema.json"),
        validator("control.schema.json"),
    );
    let good_lines = |file: &Path, ok: &dyn Fn(&[u8]) -> bool| -> (Vec<String>, usize) {
        let text = std::fs::read_to_string(file).unwrap();
        let all = text.lines().count();
        let good: Vec<String> = text
            .lines()
            .filter(|l| ok(l.as_bytes()))
            .map(str::to_string)
            .collect();
        let bad = all - good.len();
        (good, bad)
    };
    let (good_records, bad_records) = good_lines(&records, &|l| {
        cdrguard::codec::json::decode_record(l).is_ok()
    });
    assert!(good_records.len() > 3_800 && bad_records > 20);
    for l in &good_records {
        let doc: Value = serde_json::from_str(l).unwrap();
        assert!(record_v.is_valid(&doc), "record fails its schema: {l}");
    }
    // What the decoder accepts, the schema accepts; the malformed lines the generator
    // writes among them are refused by both.
    let (good_controls, bad_controls) = good_lines(&control, &|l| {
        cdrguard::codec::json::decode_control(l).is_ok()
    });
    assert!(
        bad_controls > 0,
        "the generator writes malformed control lines"
    );
    for l in &good_controls {
        let doc: Value = serde_json::from_str(l).unwrap();
        assert!(
            control_v.is_valid(&doc),
            "control event fails its schema: {l}"
        );
    }

    let (copy_v, ret_v, dead_v) = (
        validator("copy.schema.json"),
        validator("retention.schema.json"),
        validator("dead-letter.schema.json"),
    );
    let keys = keys();
    for (name, text) in SHIPPED {
        let policy = parse_policy(text, name).unwrap();
        let out: PathBuf = dir.path().join(name);
        run(&policy, &keys, &records, &control, &out);
        for rule in policy.declared() {
            let n = check_lines(&copy_v, &out.join(format!("{}.jsonl", rule.purpose.id())));
            assert!(n > 0, "{name}: no {} copies to check", rule.purpose.id());
        }
        assert!(
            check_lines(&ret_v, &out.join("retention.jsonl")) > 0,
            "{name}: no expiries"
        );
        // Bad records and bad control events alike reach the dead letter.
        assert_eq!(
            check_lines(&dead_v, &out.join("dead-letter.jsonl")),
            bad_records + bad_controls,
            "{name}: dead letters"
        );
    }
}

/// The raw identifiers of the input, per field.
struct Raw {
    msisdn: HashSet<String>,
    other: HashSet<String>,
}

fn raw_identifiers(records: &Path) -> Raw {
    let mut raw = Raw {
        msisdn: HashSet::new(),
        other: HashSet::new(),
    };
    for line in std::fs::read_to_string(records).unwrap().lines() {
        let Ok(r) = cdrguard::codec::json::decode_record(line.as_bytes()) else {
            continue;
        };
        raw.msisdn.insert(r.msisdn.to_string());
        raw.other.insert(r.imsi.to_string());
        raw.other.extend(r.imei.as_deref().map(str::to_string));
        raw.other
            .extend(r.other_party.as_deref().map(str::to_string));
        raw.other.extend(r.ue_ip.as_deref().map(str::to_string));
    }
    raw
}

fn is_pseudonym(v: &Value, purpose: Purpose) -> bool {
    let Some(s) = v.as_str() else { return false };
    let Some((key, hex)) = s.split_once(':') else {
        return false;
    };
    key == format!("schema.{}", purpose.id())
        && hex.len() == 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Each route holds only the identifiers its purpose may see, on real replay output of
/// every shipped policy (not only on hand-made records, as the property tests do).
#[test]
fn every_route_holds_only_the_identifiers_its_purpose_may_see() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = GenConfig {
        records: 4_000,
        subscribers: 300,
        ..GenConfig::default()
    };
    let (records, control) = traffic(dir.path(), &cfg);
    let raw = raw_identifiers(&records);
    let keys = keys();
    for (name, text) in SHIPPED {
        let policy = parse_policy(text, name).unwrap();
        let out = dir.path().join(name);
        run(&policy, &keys, &records, &control, &out);
        for rule in policy.declared() {
            let p = rule.purpose;
            let copies = read_json_lines(&out.join(format!("{}.jsonl", p.id())));
            for c in &copies {
                let r = &c["record"];
                let e = &c["envelope"];
                let tag = format!("{name} {}: {c}", p.id());
                let field = |f: &str| r.get(f).filter(|v| !v.is_null());
                // No copy outside billing, fraud and troubleshooting holds a raw identifier.
                let clear_ok = matches!(
                    p,
                    Purpose::Billing | Purpose::Fraud | Purpose::Troubleshooting
                );
                for f in ["msisdn", "imsi", "imei", "other_party", "ue_ip"] {
                    if let Some(v) = field(f).and_then(Value::as_str)
                        && !clear_ok
                    {
                        assert!(
                            !raw.msisdn.contains(v) && !raw.other.contains(v),
                            "raw {f} in {tag}"
                        );
                    }
                }
                match p {
                    Purpose::Analytics if e["consent"] == "absent" => {
                        // Anonymised: nothing links it to a record or a key.
                        assert!(e["record_id"].is_null() && e["key_id"].is_null(), "{tag}");
                        assert_eq!(e["legal_basis"], "anonymous", "{tag}");
                        for f in [
                            "msisdn",
                            "imsi",
                            "imei",
                            "other_party",
                            "ue_ip",
                            "record_id",
                        ] {
                            assert!(field(f).is_none(), "{f} in {tag}");
                        }
                    }
                    Purpose::Analytics => {
                        assert_eq!(e["consent"], "granted", "{tag}");
                        assert!(is_pseudonym(&r["msisdn"], p), "{tag}");
                        for f in ["imsi", "other_party", "ue_ip"] {
                            assert!(field(f).is_none(), "{f} in {tag}");
                        }
                        // A device model (TAC) at most.
                        if let Some(imei) = field("imei") {
                            assert_eq!(imei.as_str().map(str::len), Some(8), "{tag}");
                        }
                        for f in ["charging_id", "local_seq_no"] {
                            assert!(field(f).is_none(), "{f} in {tag}");
                        }
                        if let Some(id) = field("record_id") {
                            assert!(is_pseudonym(id, p), "{tag}");
                        }
                    }
                    Purpose::Marketing => {
                        assert_eq!(e["consent"], "granted", "{tag}");
                        let token = r["msisdn"].as_str().unwrap_or_default();
                        let back = keys.reverse(token).unwrap();
                        assert!(raw.msisdn.contains(&back) && token != back, "{tag}");
                        for f in ["imsi", "imei", "other_party", "ue_ip", "record_id"] {
                            assert!(field(f).is_none(), "{f} in {tag}");
                        }
                    }
                    _ => {
                        assert_eq!(e["consent"], "not_required", "{tag}");
                        let m = r["msisdn"].as_str().unwrap_or_default();
                        assert!(raw.msisdn.contains(m), "{tag}");
                    }
                }
            }
            if matches!(p, Purpose::Analytics | Purpose::Marketing) {
                assert!(!copies.is_empty(), "{name}: no {} copies", p.id());
            }
        }
    }
}

/// The fields an anonymised copy kept, each with its treatment (`None`: kept as it is).
type Kept = Vec<(String, Option<String>)>;

/// Per join key, the subscribers whose clear copies have it.
type Crowds = HashMap<String, HashSet<String>>;

/// The join key of a copy on the fields an anonymised copy kept, each reduced the way the
/// anonymised copy reduced it (its envelope's treatments).
fn join_key(copy: &Value, fields: &Kept) -> Option<String> {
    let r = &copy["record"];
    let mut key = Vec::new();
    for (f, treatment) in fields {
        let v = r.get(f.as_str())?;
        let v = match (f.as_str(), treatment.as_deref()) {
            (_, None) => v.clone(),
            ("duration_s", Some("generalise")) => Value::from(duration_class(v.as_u64()? as u32)),
            ("usage", Some("generalise")) => {
                let (mut ul, mut dl) = (0u64, 0u64);
                for u in v.as_array()? {
                    ul += u["ul_bytes"].as_u64()?;
                    dl += u["dl_bytes"].as_u64()?;
                }
                serde_json::json!([{"rating_group": 0, "ul_bytes": volume_class(ul), "dl_bytes": volume_class(dl)}])
            }
            ("start_time", Some("generalise")) => {
                Value::from(format!("{}:00:00.000Z", &v.as_str()?[..13]))
            }
            ("cell", Some("generalise")) => {
                let mut c = v.clone();
                c.as_object_mut()?.remove("cell_id");
                c
            }
            (f, Some(t)) => panic!("no join for {f} treated {t}"),
        };
        key.push(v);
    }
    Some(serde_json::to_string(&key).unwrap())
}

/// For every anonymised copy: how many distinct subscribers' copies in `clear` (billing or
/// fraud, which name the subscriber in the clear) match it on everything it kept.
fn crowd_sizes(anonymised: &[Value], clear: &[Value]) -> Vec<usize> {
    let mut index: HashMap<Kept, Crowds> = HashMap::new();
    anonymised
        .iter()
        .map(|a| {
            let fields = kept(a);
            let crowds = index.entry(fields.clone()).or_insert_with(|| {
                let mut m = Crowds::new();
                for c in clear {
                    if let Some(k) = join_key(c, &fields) {
                        let who = c["record"]["msisdn"].as_str().unwrap().to_string();
                        m.entry(k).or_default().insert(who);
                    }
                }
                m
            });
            let mine = join_key(a, &fields).unwrap();
            crowds.get(&mine).map_or(0, HashSet::len)
        })
        .collect()
}

/// Milliseconds since the epoch of an RFC 3339 time in a copy.
fn millis(v: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The fields an anonymised copy kept, with their treatments.
fn kept(a: &Value) -> Kept {
    let treatments = a["envelope"]["treatments"].as_object().unwrap();
    a["record"]
        .as_object()
        .unwrap()
        .keys()
        .map(|f| {
            (
                f.clone(),
                treatments
                    .get(f)
                    .and_then(Value::as_str)
                    .map(str::to_string),
            )
        })
        .collect()
}

/// For every anonymised copy in a route file (in file order): how many distinct
/// subscribers have a clear copy that matches it on what it kept and whose time lies
/// within the months of the nearest copies before and after it that carry a time (the
/// ordering attack: an anonymised copy written among timed copies has their time, to the
/// month at best once they are held back per month).
fn bracketed_crowd_sizes(route: &[Value], clear: &[Value]) -> Vec<usize> {
    use chrono::{Datelike, TimeZone};
    let month_start = |t: i64, later: i32| {
        let d = chrono::Utc.timestamp_millis_opt(t).unwrap();
        let m = d.year() * 12 + d.month0() as i32 + later;
        chrono::Utc
            .with_ymd_and_hms(m.div_euclid(12), m.rem_euclid(12) as u32 + 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp_millis()
    };
    let times: Vec<Option<i64>> = route
        .iter()
        .map(|c| millis(&c["record"]["start_time"]))
        .collect();
    // Per set of kept fields: the clear copies as (time, join key, subscriber), by time.
    let mut index: HashMap<Kept, Vec<(i64, String, String)>> = HashMap::new();
    let mut out = Vec::new();
    for (i, a) in route.iter().enumerate() {
        if a["envelope"]["legal_basis"] != "anonymous" {
            continue;
        }
        let fields = kept(a);
        let joined = index.entry(fields.clone()).or_insert_with(|| {
            let mut v: Vec<(i64, String, String)> = clear
                .iter()
                .filter_map(|c| {
                    Some((
                        millis(&c["record"]["start_time"])?,
                        join_key(c, &fields)?,
                        c["record"]["msisdn"].as_str()?.to_string(),
                    ))
                })
                .collect();
            v.sort();
            v
        });
        let from = times[..i]
            .iter()
            .rev()
            .flatten()
            .next()
            .map(|t| month_start(*t, 0));
        let to = times[i + 1..]
            .iter()
            .flatten()
            .next()
            .map(|t| month_start(*t, 1));
        let lo = from.map_or(0, |f| joined.partition_point(|(t, _, _)| *t < f));
        let hi = to.map_or(joined.len(), |e| joined.partition_point(|(t, _, _)| *t < e));
        let mine = join_key(a, &fields).unwrap();
        let who: HashSet<&str> = joined[lo..hi.max(lo)]
            .iter()
            .filter(|(_, k, _)| *k == mine)
            .map(|(_, _, m)| m.as_str())
            .collect();
        out.push(who.len());
    }
    out
}

/// Regression: Alleato's "anonymised" analytics copies kept exact volumes, durations,
/// serving network and recording entity, so joining them with billing copies on `usage`
/// matched every data copy to one msisdn (13065 of 13065). Now no anonymised copy of a
/// month of generated traffic can be narrowed below 5 subscribers by joining it with the
/// billing or the fraud copies (k-anonymity, k = 5) on everything it kept.
///
/// Per-record generalisation cannot promise this for any traffic: k depends on volume.
/// The check runs on 30,000 records of 1,000 subscribers (smallest crowd: 8); 20,000 leave
/// a rare combination (a short session with a large upload) with 3 subscribers.
#[test]
fn alleato_anonymised_copies_cannot_be_joined_back_to_a_subscriber() {
    const K: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let cfg = GenConfig {
        records: 30_000,
        subscribers: 1_000,
        ..GenConfig::default()
    };
    let (records, control) = traffic(dir.path(), &cfg);
    let policy = parse_policy(shipped("alleato").unwrap(), "alleato").unwrap();
    let out = dir.path().join("alleato");
    run(&policy, &keys(), &records, &control, &out);
    let anonymised: Vec<Value> = read_json_lines(&out.join("analytics.jsonl"))
        .into_iter()
        .filter(|c| c["envelope"]["legal_basis"] == "anonymous")
        .collect();
    assert!(anonymised.len() > 10_000, "{}", anonymised.len());
    let kept: BTreeSet<String> = anonymised
        .iter()
        .flat_map(|a| a["record"].as_object().unwrap().keys().cloned())
        .collect();
    assert!(
        kept.contains("duration_s") && kept.contains("usage"),
        "the anonymised copy stays useful: {kept:?}"
    );
    for route in ["billing", "fraud"] {
        let clear = read_json_lines(&out.join(format!("{route}.jsonl")));
        let sizes = crowd_sizes(&anonymised, &clear);
        let small = sizes.iter().filter(|n| **n < K).count();
        assert_eq!(
            small,
            0,
            "{small} of {} anonymised copies join to fewer than {K} subscribers' {route} copies (smallest crowd {:?})",
            sizes.len(),
            sizes.iter().min()
        );
    }

    // Their place in analytics.jsonl tells no more than their month. Written in record
    // order, each would sit among copies that carry the hour, which would give its time
    // away: joined with that hour's billing copies, 56% of them matched one subscriber.
    // Held back per month and sorted, each run of them is in content order...
    let analytics = read_json_lines(&out.join("analytics.jsonl"));
    let text = std::fs::read_to_string(out.join("analytics.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut run_start = None;
    for (i, c) in analytics.iter().chain([&Value::Null]).enumerate() {
        let anon = c["envelope"]["legal_basis"] == "anonymous";
        match (anon, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                assert!(
                    lines[s..i].is_sorted(),
                    "anonymised copies at lines {}..{} are in record order",
                    s + 1,
                    i
                );
                run_start = None;
            }
            _ => {}
        }
    }
    // ... and joined with the billing copies of the months around it, each still matches
    // 5 subscribers or more (content shared by fewer that month is withheld).
    let billing = read_json_lines(&out.join("billing.jsonl"));
    let sizes = bracketed_crowd_sizes(&analytics, &billing);
    assert_eq!(sizes.len(), anonymised.len());
    let small = sizes.iter().filter(|n| **n < K).count();
    assert_eq!(
        small,
        0,
        "{small} of {} anonymised copies join to fewer than {K} subscribers once their neighbours give their month",
        sizes.len()
    );

    // The check has teeth: copies keeping what the old anonymised map kept (exact volumes,
    // durations, serving network, recording entity) are singled out at once.
    let fraud = read_json_lines(&out.join("fraud.jsonl"));
    let old_map: Vec<Value> = fraud
        .iter()
        .filter(|c| c["record"]["kind"] == "data")
        .take(2_000)
        .map(|c| {
            let r = &c["record"];
            serde_json::json!({
                "record": {
                    "kind": r["kind"], "duration_s": r["duration_s"], "usage": r["usage"],
                    "serving_plmn": r["serving_plmn"], "recording_entity": r["recording_entity"],
                },
                "envelope": {"treatments": {}},
            })
        })
        .collect();
    let billing = read_json_lines(&out.join("billing.jsonl"));
    let sizes = crowd_sizes(&old_map, &billing);
    assert!(
        sizes.iter().filter(|n| **n == 1).count() > 1_900,
        "exact values single records out"
    );
}
