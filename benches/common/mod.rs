//! The record mix the bench and the profiling example share: the generator's traffic with
//! the Excedo policy and consent as it stands at the start (about 3.6 copies per record).

use std::collections::HashMap;

use std::hint::black_box;
use std::time::{Duration, Instant};

use cdrguard::adapters::generate::{GenConfig, Line, generate};
use cdrguard::adapters::telemetry::{Committed, Tally};
use cdrguard::codec::Envelopes;
use cdrguard::codec::binary;
use cdrguard::codec::{Format, json};
use cdrguard::core::control::{Change, SubscriberState};
use cdrguard::core::process::{Decision, process_into};
use cdrguard::core::pseudonym::{Keyring, MasterKey};
use cdrguard::policy::{Policy, parse_policy, shipped};
use cdrguard::vocab::time::Millis;

/// Inputs of every pipeline measured.
pub struct Fixture {
    /// One JSON record per entry.
    pub json_lines: Vec<Vec<u8>>,
    /// The same records, binary, one frame payload per entry.
    pub bin_frames: Vec<Vec<u8>>,
    /// Consent per msisdn.
    pub states: HashMap<String, SubscriberState>,
    /// The Excedo policy.
    pub policy: Policy,
    /// Its envelopes, encoded once.
    pub envelopes: Envelopes,
    /// A bench-only key from a fixed seed: the bench measures speed, not secrecy.
    pub keys: Keyring,
}

/// Generates the fixture (20,000 records over 2,000 subscribers, none malformed).
pub fn fixture() -> Fixture {
    let cfg = GenConfig {
        records: 20_000,
        subscribers: 2_000,
        malformed_rate: 0.0,
        ..GenConfig::default()
    };
    let s = generate(&cfg);
    let mut json_lines = Vec::new();
    let mut bin_frames = Vec::new();
    for l in &s.lines {
        if let Line::Record(r) = l {
            json_lines.push(serde_json::to_vec(r).unwrap());
            let mut b = Vec::new();
            binary::encode_record(r, &mut b);
            bin_frames.push(b);
        }
    }
    // Consent as it stands at the start of the traffic (grants only).
    let mut states: HashMap<String, SubscriberState> = HashMap::new();
    for e in s
        .controls
        .iter()
        .filter(|e| matches!(e.change, Change::Consent { granted: true, .. }))
    {
        states
            .entry(e.msisdn.clone())
            .or_default()
            .apply(&e.change, e.at);
    }
    let policy = parse_policy(shipped("excedo").unwrap(), "excedo").unwrap();
    Fixture {
        json_lines,
        bin_frames,
        states,
        envelopes: Envelopes::new(&policy),
        policy,
        keys: Keyring::new(&[MasterKey::new("bench", &[0x5a; 32]).unwrap()]).unwrap(),
    }
}

/// One pass of the JSON pipeline (decode, process, encode every copy) with what the Kafka
/// task adds per record for its metrics: the partition's tally per record and copy, one
/// processing-time observation per batch of 512 records, and the counters exported at a
/// commit every 5,000 records (the default `commit_max_records`) into whatever metrics
/// recorder is installed.
#[allow(dead_code)]
pub fn json_counted(f: &Fixture, tally: &mut Tally, out: &mut Vec<u8>) {
    let none = SubscriberState::default();
    let now = Millis(0);
    let mut batch = (Instant::now(), 0u32);
    let mut scratch = Vec::new();
    for (i, line) in f.json_lines.iter().enumerate() {
        let decoded = json::decode_record_laid_out(line).unwrap();
        let r = &decoded.record;
        let st = f.states.get(r.msisdn.as_ref()).unwrap_or(&none);
        let mut d = Decision::default();
        process_into(r, &f.policy, st, &f.keys, now, &mut d);
        out.clear();
        let rj = json::RecordJson::of_input(&decoded, &mut scratch);
        for c in &d.copies {
            rj.encode_copy(&f.envelopes, c, out);
            tally.copy(c);
        }
        tally.record(r.kind, false);
        black_box(&out);
        batch.1 += 1;
        if batch.1 == 512 {
            tally.batch(batch.0, batch.1, batch.0.elapsed());
            batch = (Instant::now(), 0);
        }
        if i % 5_000 == 4_999 {
            Committed {
                tally,
                format: Format::Json,
                at: Instant::now(),
                took: Duration::from_millis(1),
            }
            .emit();
            tally.clear();
        }
    }
    tally.batch(batch.0, batch.1, batch.0.elapsed());
}
