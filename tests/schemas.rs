//! The JSON Schemas in schemas/ describe what cdrguard really reads and writes: generated
//! input validates against the input schemas, and every line a replay writes (copies for
//! every route of every shipped policy, expiries, dead letters) against the output ones.

use std::path::{Path, PathBuf};

use cdrguard::adapters::demo::write_traffic;
use cdrguard::adapters::engine::Engine;
use cdrguard::adapters::files::Outputs;
use cdrguard::adapters::generate::GenConfig;
use cdrguard::adapters::replay::{ReplayInput, replay};
use cdrguard::codec::Format;
use cdrguard::core::pseudonym::{Keyring, MasterKey};
use cdrguard::core::time::Millis;
use cdrguard::policy::{SHIPPED, parse_policy};
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

#[test]
fn inputs_and_every_output_match_the_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records.jsonl");
    let control = dir.path().join("control.jsonl");
    let cfg = GenConfig {
        records: 4_000,
        subscribers: 300,
        malformed_rate: 0.01,
        ..GenConfig::default()
    };
    write_traffic(&cfg, &records, &control, Format::Json).unwrap();

    let (record_v, control_v) = (
        validator("record.schema.json"),
        validator("control.schema.json"),
    );
    let good_lines: Vec<String> = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .filter(|l| cdrguard::codec::json::decode_record(l.as_bytes()).is_ok())
        .map(str::to_string)
        .collect();
    assert!(good_lines.len() > 3_800);
    for l in &good_lines {
        let doc: Value = serde_json::from_str(l).unwrap();
        assert!(record_v.is_valid(&doc), "record fails its schema: {l}");
    }
    check_lines(&control_v, &control);

    let (copy_v, ret_v, dead_v) = (
        validator("copy.schema.json"),
        validator("retention.schema.json"),
        validator("dead-letter.schema.json"),
    );
    let keys = Keyring::new(&[MasterKey::new("schema", &[9u8; 32]).unwrap()]).unwrap();
    for (name, text) in SHIPPED {
        let policy = parse_policy(text, name).unwrap();
        let out: PathBuf = dir.path().join(name);
        let mut engine = Engine::new(&policy, &keys);
        let mut outputs = Outputs::create(&out, &policy).unwrap();
        let input = ReplayInput {
            records: records.clone(),
            format: Format::Json,
            control: Some(control.clone()),
            now: Millis::parse("2027-06-01T00:00:00.000Z").unwrap(),
            progress: false,
        };
        replay(&input, &mut engine, &mut outputs).unwrap();
        outputs.finish().unwrap();
        for rule in policy.declared() {
            let n = check_lines(&copy_v, &out.join(format!("{}.jsonl", rule.purpose.id())));
            assert!(n > 0, "{name}: no {} copies to check", rule.purpose.id());
        }
        assert!(
            check_lines(&ret_v, &out.join("retention.jsonl")) > 0,
            "{name}: no expiries"
        );
        assert!(
            check_lines(&dead_v, &out.join("dead-letter.jsonl")) > 20,
            "{name}: too few dead letters"
        );
    }
}
