//! Runs one stage of the bench's pipeline over its fixture, for instruction-level
//! profiling. Wall-clock benches are noisy on shared machines; callgrind's instruction
//! counts are repeatable, so optimisation decisions are made with them:
//!
//! ```sh
//! cargo build --release --example profile
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='profile::run' \
//!     target/release/examples/profile binary
//! callgrind_annotate --inclusive=yes callgrind.out.<pid>
//! ```
//!
//! Stages: `json`, `binary` (decode -> process -> encode every copy), `process` (process
//! only, records decoded beforehand) and `json_decode`. Only `run` is collected, so
//! building the fixture is not counted: divide the total by the record count printed.

#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;

use cdrguard::codec::{binary, json};
use cdrguard::core::control::SubscriberState;
use cdrguard::core::process::process;
use cdrguard::core::record::Record;
use cdrguard::core::time::Millis;

/// One pass of a stage over every record; never inlined so callgrind can toggle on it.
#[inline(never)]
fn run(stage: &str, f: &common::Fixture, decoded: &[Record<'_>], out: &mut Vec<u8>) {
    let none = SubscriberState::default();
    let now = Millis(0);
    let state = |msisdn: &str| f.states.get(msisdn).unwrap_or(&none);
    match stage {
        "json" => {
            for line in &f.json_lines {
                let r = json::decode_record(line).unwrap();
                let d = process(&r, &f.policy, state(&r.msisdn), &f.keys, now);
                out.clear();
                for c in &d.copies {
                    json::encode_copy(c, out);
                }
                black_box(&out);
            }
        }
        "binary" => {
            for frame in &f.bin_frames {
                let r = binary::decode_record(frame).unwrap();
                let d = process(&r, &f.policy, state(&r.msisdn), &f.keys, now);
                out.clear();
                for c in &d.copies {
                    binary::encode_copy(c, out);
                }
                black_box(&out);
            }
        }
        "process" => {
            for r in decoded {
                black_box(process(r, &f.policy, state(&r.msisdn), &f.keys, now));
            }
        }
        "json_decode" => {
            for line in &f.json_lines {
                black_box(json::decode_record(line).unwrap());
            }
        }
        other => panic!("unknown stage {other:?}: json, binary, process or json_decode"),
    }
}

fn main() {
    let stage = std::env::args().nth(1).unwrap_or_else(|| "binary".into());
    let f = common::fixture();
    let decoded: Vec<Record<'_>> = f
        .bin_frames
        .iter()
        .map(|fr| binary::decode_record(fr).unwrap())
        .collect();
    let mut out = Vec::with_capacity(1 << 16);
    run(&stage, &f, &decoded, &mut out);
    println!("{stage}: {} records", f.json_lines.len());
}
