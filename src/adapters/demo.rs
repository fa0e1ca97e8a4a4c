//! `cdrguard demo`: generates traffic, replays it through a shipped policy with a fresh
//! key, and writes every route to an output directory. No broker needed.

use std::path::Path;

use super::engine::Engine;
use super::files::{Outputs, OutputsError};
use super::generate::{GenConfig, Line, generate_with};
use super::replay::{ReplayError, ReplayInput, ReplayLimits, replay};
use crate::codec::Format;
use crate::core::pseudonym::Keyring;
use crate::core::time::{DAY_MS, Millis};
use crate::policy::Policy;

/// Days of traffic the demo generates: two years, so that rules anchored on a contract
/// end (Excedo troubleshooting: 12 months after it) run out for contracts that ended in
/// the first year, and their expiries show at `now`.
pub const DEMO_DAYS: u32 = 730;

/// What [`write_traffic`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Record lines (or frames), malformed ones included.
    pub records: u64,
    /// Of those, malformed (a truncated last frame in binary output included).
    pub malformed_records: u64,
    /// Control lines, malformed ones included.
    pub controls: u64,
    /// Of those, malformed.
    pub malformed_controls: u64,
}

/// Writes generated traffic: records (JSON lines or length-prefixed binary frames) and
/// control events (JSON lines), malformed ones among them.
pub fn write_traffic(
    cfg: &GenConfig,
    records: &Path,
    control: &Path,
    format: Format,
) -> std::io::Result<u64> {
    write_traffic_with(cfg, records, control, format, false).map(|w| w.records)
}

/// [`write_traffic`] with a progress bar on stderr when `progress` is set (a terminal).
pub fn write_traffic_with(
    cfg: &GenConfig,
    records: &Path,
    control: &Path,
    format: Format,
    progress: bool,
) -> std::io::Result<Written> {
    use std::io::Write;
    cfg.validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(cfg.records);
        b.set_message("generating");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let s = generate_with(cfg, &|n| bar.set_position(n));
    bar.set_message("writing");
    let mut written = Written::default();
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
        written.records += 1;
        written.malformed_records += u64::from(matches!(l, Line::Malformed(_)));
    }
    // A feed cut off mid-frame: the last frame's length promises more than follows.
    if format == Format::Binary
        && cfg.malformed_rate > 0.0
        && let Some(Line::Record(r)) = s.lines.iter().find(|l| matches!(l, Line::Record(_)))
    {
        buf.clear();
        crate::codec::binary::encode_record(r, &mut buf);
        w.write_all(&(buf.len() as u32).to_le_bytes())?;
        w.write_all(&buf[..buf.len() / 2])?;
        written.records += 1;
        written.malformed_records += 1;
    }
    w.flush()?;
    let mut c = std::io::BufWriter::new(std::fs::File::create(control)?);
    let mut bad = s.malformed_controls.iter().peekable();
    for (i, e) in s.controls.iter().enumerate() {
        while let Some((_, m)) = bad.next_if(|(at, _)| *at <= i) {
            writeln!(c, "{m}")?;
            written.malformed_controls += 1;
        }
        serde_json::to_writer(&mut c, &e.to_raw())?;
        c.write_all(b"\n")?;
    }
    for (_, m) in bad {
        writeln!(c, "{m}")?;
        written.malformed_controls += 1;
    }
    c.flush()?;
    written.controls = s.controls.len() as u64 + written.malformed_controls;
    bar.finish_and_clear();
    Ok(written)
}

/// Runs the demo: [`DEMO_DAYS`] of traffic before `now`, replayed, with the expiries due
/// at `now` (long enough for every rule of up to 12 months, anchored on an event or a
/// contract end, to run out somewhere).
/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The output folder could not be prepared or written.
    #[error(transparent)]
    Outputs(#[from] OutputsError),
    /// The replay failed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The traffic could not be written.
    #[error("writing the generated traffic: {0}")]
    Traffic(#[from] std::io::Error),
}

/// The demo writes into `out` (which must be missing, empty or an earlier cdrguard
/// output, unless `force`); the generated input goes to `out/input/`.
pub fn run(
    policy: &Policy,
    keys: &Keyring,
    out: &Path,
    force: bool,
    mut cfg: GenConfig,
    now: Millis,
    progress: bool,
) -> Result<String, DemoError> {
    cfg.days = DEMO_DAYS;
    cfg.start = Millis((now.0 - DEMO_DAYS as i64 * DAY_MS).div_euclid(DAY_MS) * DAY_MS);
    let mut outputs = Outputs::create(out, policy, force)?;
    let input_dir = outputs.dir().join("input");
    std::fs::create_dir_all(&input_dir)?;
    let records = input_dir.join("records.jsonl");
    let control = input_dir.join("control.jsonl");
    write_traffic_with(&cfg, &records, &control, Format::Json, progress)?;
    let mut engine = Engine::new(policy, keys);
    let counts = replay(
        &ReplayInput {
            records,
            format: Format::Json,
            control: Some(control),
            now,
            progress,
            limits: ReplayLimits::default(),
        },
        &mut engine,
        &mut outputs,
    )?;
    let withheld = outputs.finish()?;
    Ok(super::report::summary(
        policy,
        &engine.stats,
        engine.open_windows(),
        counts.control_dead_letters,
        withheld,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pseudonym::tests::test_keyring;

    /// Regression: the demo never showed a restricted record or a contract-anchored
    /// expiry. With its defaults, Excedo's troubleshooting route has both.
    #[test]
    fn the_demo_shows_restriction_and_a_contract_anchored_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "x").unwrap();
        let now = Millis::parse("2026-12-01T00:00:00.000Z").unwrap();
        let summary = run(
            &policy,
            &test_keyring(),
            dir.path(),
            false,
            GenConfig::default(),
            now,
            false,
        )
        .unwrap();
        let row: Vec<u64> = summary
            .lines()
            .find(|l| l.starts_with("troubleshooting "))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect();
        // copies anonymised no_consent objected restricted erased expired expiries
        assert!(row[4] > 0, "nothing restricted: {summary}");
        let expiries = std::fs::read_to_string(dir.path().join("retention.jsonl")).unwrap();
        let anchored = expiries
            .lines()
            .filter(|l| l.contains(r#""reason":"excedo.troubleshooting""#))
            .count();
        assert!(anchored > 0, "no contract-anchored expiry: {summary}");
    }

    /// Generated binary traffic ends in a truncated frame, and every malformed line (records
    /// and control events alike) reaches the dead letter and the counts.
    #[test]
    fn malformed_input_of_both_kinds_reaches_the_dead_letter_and_the_counts() {
        let dir = std::env::temp_dir().join(format!("cdrguard-demo-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (records, control) = (dir.join("r.bin"), dir.join("c.jsonl"));
        let cfg = GenConfig {
            records: 2_000,
            subscribers: 100,
            malformed_rate: 0.05,
            ..GenConfig::default()
        };
        let w = write_traffic_with(&cfg, &records, &control, Format::Binary, false).unwrap();
        assert_eq!(
            w.records, 2_001,
            "every record plus the truncated last frame"
        );
        assert!(
            w.malformed_records > 50 && w.malformed_controls > 5,
            "{w:?}"
        );
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "x").unwrap();
        let keys = test_keyring();
        let mut engine = Engine::new(&policy, &keys);
        let out = dir.join("out");
        let mut outputs = Outputs::create(&out, &policy, false).unwrap();
        let counts = replay(
            &ReplayInput {
                records: records.clone(),
                format: Format::Binary,
                control: Some(control),
                now: Millis::parse("2026-06-01T00:00:00.000Z").unwrap(),
                progress: false,
                limits: ReplayLimits::default(),
            },
            &mut engine,
            &mut outputs,
        )
        .unwrap();
        outputs.finish().unwrap();
        assert_eq!(engine.stats.dead_letters, w.malformed_records);
        assert_eq!(counts.control_dead_letters, w.malformed_controls);
        assert_eq!(engine.stats.records, w.records - w.malformed_records);
        let dead = std::fs::read_to_string(out.join("dead-letter.jsonl")).unwrap();
        let last_frame = dead
            .lines()
            .rfind(|l| l.contains("r.bin@"))
            .unwrap()
            .to_string();
        let size = std::fs::metadata(&records).unwrap().len();
        let at: u64 = last_frame
            .split("r.bin@")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!(
            size - at < 200,
            "the last dead letter is the cut-off frame: {last_frame}"
        );
        // Settings out of range are refused before anything is generated.
        let bad = GenConfig {
            malformed_rate: 2.0,
            ..cfg
        };
        let e =
            write_traffic_with(&bad, &records, &dir.join("c2"), Format::Json, false).unwrap_err();
        assert!(e.to_string().contains("--malformed-rate is 2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
