//! `cdrguard demo`: generates traffic, replays it through a shipped policy with a fresh
//! key, and writes every route to an output directory. No broker needed.

use std::path::Path;

use super::engine::Engine;
use super::files::Outputs;
use super::generate::{GenConfig, Line, generate};
use super::replay::{ReplayError, ReplayInput, replay};
use crate::codec::Format;
use crate::core::pseudonym::Keyring;
use crate::core::time::{DAY_MS, Millis};
use crate::policy::Policy;

/// Days of traffic the demo generates.
pub const DEMO_DAYS: u32 = 365;

/// Writes generated traffic as JSON lines (records) and control events.
pub fn write_traffic(
    cfg: &GenConfig,
    records: &Path,
    control: &Path,
    format: Format,
) -> std::io::Result<u64> {
    use std::io::Write;
    let s = generate(cfg);
    let mut w = std::io::BufWriter::new(std::fs::File::create(records)?);
    let mut buf = Vec::new();
    for l in &s.lines {
        match (l, format) {
            (Line::Record(r), Format::Json) => {
                serde_json::to_writer(&mut w, r)?;
                w.write_all(b"\n")?;
            }
            (Line::Malformed(m), Format::Json) => writeln!(w, "{m}")?,
            (Line::Record(r), Format::Binary) => {
                buf.clear();
                crate::codec::binary::encode_record(r, &mut buf);
                w.write_all(&(buf.len() as u32).to_le_bytes())?;
                w.write_all(&buf)?;
            }
            (Line::Malformed(m), Format::Binary) => {
                // A frame whose payload is not a binary record.
                w.write_all(&(m.len() as u32).to_le_bytes())?;
                w.write_all(m.as_bytes())?;
            }
        }
    }
    w.flush()?;
    let mut c = std::io::BufWriter::new(std::fs::File::create(control)?);
    for e in &s.controls {
        serde_json::to_writer(&mut c, &e.to_raw())?;
        c.write_all(b"\n")?;
    }
    c.flush()?;
    Ok(s.lines.len() as u64)
}

/// Runs the demo: a year of traffic before `now`, replayed, with the expiries due at
/// `now` (a year is long enough for most retention rules to run out somewhere).
pub fn run(
    policy: &Policy,
    keys: &Keyring,
    out: &Path,
    mut cfg: GenConfig,
    now: Millis,
    progress: bool,
) -> Result<String, ReplayError> {
    cfg.days = DEMO_DAYS;
    cfg.start = Millis((now.0 - DEMO_DAYS as i64 * DAY_MS).div_euclid(DAY_MS) * DAY_MS);
    let input_dir = out.join("input");
    std::fs::create_dir_all(&input_dir)?;
    let records = input_dir.join("records.jsonl");
    let control = input_dir.join("control.jsonl");
    write_traffic(&cfg, &records, &control, Format::Json)?;
    let mut engine = Engine::new(policy, keys);
    let mut outputs = Outputs::create(out, policy)?;
    replay(
        &ReplayInput {
            records,
            format: Format::Json,
            control: Some(control),
            now,
            progress,
        },
        &mut engine,
        &mut outputs,
    )?;
    outputs.finish()?;
    Ok(super::report::summary(
        policy,
        &engine.stats,
        engine.open_windows(),
    ))
}
