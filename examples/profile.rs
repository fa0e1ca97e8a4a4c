//! Runs one stage of the bench's pipeline over its fixture, for profiling. Wall-clock
//! benches are noisy on a shared machine; callgrind's instruction counts are repeatable:
//!
//! ```sh
//! cargo build --release --example profile
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='profile::run' \
//!     target/release/examples/profile binary
//! callgrind_annotate --inclusive=yes callgrind.out.<pid>
//! ```
//!
//! Only `run` is collected, so building the fixture is not counted: divide the total by
//! the record count printed. `profile binary 15` times 15 passes instead and prints the
//! fastest, a quick wall-clock check between two builds (criterion stays the reference).
//!
//! Stages: `json` and `binary` (decode -> process -> encode every copy, as the bench),
//! `json_counted` (`json` plus the Kafka task's metrics counting, into an installed
//! Prometheus recorder, as the bench's `json_counted`), `json_headers` (`json` plus each
//! copy's Kafka header values, as `cdrguard run` makes them),
//! `process` (records decoded beforehand), `json_decode` and `binary_decode`; `ff1` and
//! `ff1_fpe` encrypt one 12-digit number per record with our FF1 and with the `fpe`
//! crate's, as `benches/ff1.rs` times them (the ciphers' key setup, once a pass, is
//! counted too and is negligible over the pass).

#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use aes::Aes256;
use cdrguard::codec::{binary, json};
use cdrguard::core::control::SubscriberState;
use cdrguard::core::ff1::Ff1;
use cdrguard::core::process::{Decision, process_into};
use cdrguard::core::record::Record;
use cdrguard::vocab::time::Millis;
use fpe::ff1::{FF1, FlexibleNumeralString};

/// The key of the `ff1` stages, as in `benches/ff1.rs`.
const FF1_KEY: [u8; 32] = [0x42; 32];
/// The 12-digit number the `ff1` stages encrypt, as in `benches/ff1.rs`.
const FF1_PLAIN: [u8; 12] = [4, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8];

/// One pass of a stage over every record; never inlined so callgrind can toggle on it.
#[inline(never)]
fn run(stage: &str, f: &common::Fixture, decoded: &[Record<'_>], out: &mut Vec<u8>) {
    let none = SubscriberState::default();
    let now = Millis(0);
    let state = |msisdn: &str| f.states.get(msisdn).unwrap_or(&none);
    match stage {
        "json" | "json_headers" => {
            let with_headers = stage == "json_headers";
            let mut scratch = Vec::new();
            let mut treatments = String::new();
            for line in &f.json_lines {
                let decoded = json::decode_record_laid_out(line).unwrap();
                let r = &decoded.record;
                let mut d = Decision::default();
                process_into(r, &f.policy, state(&r.msisdn), &f.keys, now, &mut d);
                out.clear();
                let rj = json::RecordJson::of_input(&decoded, &mut scratch);
                for c in &d.copies {
                    rj.encode_copy(&f.envelopes, c, out);
                    if with_headers {
                        black_box(cdrguard::codec::headers(&f.envelopes, c, &mut treatments));
                    }
                }
                black_box(&out);
            }
        }
        "json_counted" => {
            let mut tally = cdrguard::adapters::telemetry::Tally::default();
            common::json_counted(f, &mut tally, out);
        }
        "binary" => {
            for frame in &f.bin_frames {
                let r = binary::decode_record(frame).unwrap();
                let mut d = Decision::default();
                process_into(&r, &f.policy, state(&r.msisdn), &f.keys, now, &mut d);
                out.clear();
                for c in &d.copies {
                    binary::encode_copy(&f.envelopes, c, out);
                }
                black_box(&out);
            }
        }
        "process" => {
            for r in decoded {
                let mut d = Decision::default();
                process_into(r, &f.policy, state(&r.msisdn), &f.keys, now, &mut d);
                black_box(&d);
            }
        }
        "json_decode" => {
            for line in &f.json_lines {
                black_box(json::decode_record(line).unwrap());
            }
        }
        "binary_decode" => {
            for frame in &f.bin_frames {
                black_box(binary::decode_record(frame).unwrap());
            }
        }
        "ff1" => {
            let ours = Ff1::new(&FF1_KEY);
            for _ in 0..f.bin_frames.len() {
                let mut x = black_box(FF1_PLAIN);
                ours.encrypt(&[], &mut x);
                black_box(x);
            }
        }
        "ff1_fpe" => {
            let theirs = FF1::<Aes256>::new(&FF1_KEY, 10).expect("radix 10");
            for _ in 0..f.bin_frames.len() {
                let ns = FlexibleNumeralString::from(black_box(FF1_PLAIN).map(u16::from).to_vec());
                black_box(theirs.encrypt(&[], &ns).expect("12 digits"));
            }
        }
        other => {
            panic!(
                "unknown stage {other:?}: json, json_counted, json_headers, binary, process, json_decode, binary_decode, ff1 or ff1_fpe"
            )
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let stage = args.next().unwrap_or_else(|| "binary".into());
    let passes: Option<u32> = args.next().map(|p| p.parse().expect("passes: a number"));
    let f = common::fixture();
    if stage == "json_counted" {
        // Where the counts go in `cdrguard run`; its listener's upkeep is not counted.
        metrics::set_global_recorder(cdrguard::adapters::telemetry::recorder())
            .expect("the only recorder");
    }
    let decoded: Vec<Record<'_>> = f
        .bin_frames
        .iter()
        .map(|fr| binary::decode_record(fr).unwrap())
        .collect();
    let mut out = Vec::with_capacity(1 << 16);
    let n = f.bin_frames.len();
    match passes {
        None => {
            run(&stage, &f, &decoded, &mut out);
            println!("{stage}: {n} records");
        }
        Some(passes) => {
            let fastest = (0..passes.max(1))
                .map(|_| {
                    let t = Instant::now();
                    run(&stage, &f, &decoded, &mut out);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            println!(
                "{stage}: {:.0} ns per record, {:.0} records/s (fastest of {passes} passes)",
                fastest / n as f64 * 1e9,
                n as f64 / fastest
            );
        }
    }
}
