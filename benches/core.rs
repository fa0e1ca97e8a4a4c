//! Throughput of the pure core on one thread: decode -> consent lookup -> process ->
//! encode every copy, for JSON and binary, over the generator's record mix with the
//! Excedo policy (billing, fraud and troubleshooting always; analytics and marketing for
//! consenting subscribers: about 3.6 copies per record). Decisions are made with
//! `process_into`, the hot-loop form of `process` that does not copy the decision out.
//!
//! `json_counted` is `json` plus what the Kafka task adds per record for its metrics:
//! the partition's tally per record and copy, one processing-time observation per batch
//! of 512, and the counters exported at a commit every 5,000 records (the default
//! `commit_max_records`), into a real Prometheus recorder. The two together give the
//! cost of counting, which must stay under 2% of `json`.
//!
//! Run: cargo bench --bench core

mod common;

use std::hint::black_box;

use cdrguard::adapters::telemetry::Tally;
use cdrguard::codec::{binary, json};
use cdrguard::core::control::SubscriberState;
use cdrguard::core::process::{Decision, process_into};
use cdrguard::vocab::time::Millis;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let f = common::fixture();
    let (policy, keys) = (&f.policy, &f.keys);
    let now = Millis(0);
    let none = SubscriberState::default();

    let mut copies = 0usize;
    for line in &f.json_lines {
        let r = json::decode_record(line).unwrap();
        let st = f.states.get(r.msisdn.as_ref()).unwrap_or(&none);
        let mut d = Decision::default();
        process_into(&r, policy, st, keys, now, &mut d);
        copies += d.copies.len();
    }
    eprintln!(
        "fixture: {} records, {:.2} copies per record",
        f.json_lines.len(),
        copies as f64 / f.json_lines.len() as f64
    );

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(f.json_lines.len() as u64));
    g.sample_size(20);
    let mut out = Vec::with_capacity(1 << 16);
    let mut scratch = Vec::new();
    g.bench_function("json", |b| {
        b.iter(|| {
            for line in &f.json_lines {
                let decoded = json::decode_record_laid_out(line).unwrap();
                let r = &decoded.record;
                let st = f.states.get(r.msisdn.as_ref()).unwrap_or(&none);
                let mut d = Decision::default();
                process_into(r, policy, st, keys, now, &mut d);
                out.clear();
                let rj = json::RecordJson::of_input(&decoded, &mut scratch);
                for c in &d.copies {
                    rj.encode_copy(&f.envelopes, c, &mut out);
                }
                black_box(&out);
            }
        })
    });
    let recorder = cdrguard::adapters::telemetry::recorder();
    let handle = recorder.handle();
    let mut tally = Tally::default();
    g.bench_function("json_counted", |b| {
        metrics::with_local_recorder(&recorder, || {
            b.iter_custom(|iters| {
                let mut took = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let start = std::time::Instant::now();
                    common::json_counted(&f, &mut tally, &mut out);
                    took += start.elapsed();
                    // Samples are folded into buckets on the listener's thread, not
                    // the partition task's: outside the timing.
                    handle.run_upkeep();
                }
                took
            })
        });
    });
    g.bench_function("binary", |b| {
        b.iter(|| {
            for frame in &f.bin_frames {
                let r = binary::decode_record(frame).unwrap();
                let st = f.states.get(r.msisdn.as_ref()).unwrap_or(&none);
                let mut d = Decision::default();
                process_into(&r, policy, st, keys, now, &mut d);
                out.clear();
                for c in &d.copies {
                    binary::encode_copy(&f.envelopes, c, &mut out);
                }
                black_box(&out);
            }
        })
    });
    g.bench_function("process_only", |b| {
        let recs: Vec<_> = f
            .bin_frames
            .iter()
            .map(|fr| binary::decode_record(fr).unwrap())
            .collect();
        b.iter(|| {
            for r in &recs {
                let st = f.states.get(r.msisdn.as_ref()).unwrap_or(&none);
                let mut d = Decision::default();
                process_into(r, policy, st, keys, now, &mut d);
                black_box(&d);
            }
        })
    });
    g.bench_function("json_decode_only", |b| {
        b.iter(|| {
            for line in &f.json_lines {
                black_box(json::decode_record(line).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
