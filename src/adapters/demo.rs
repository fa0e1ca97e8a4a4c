//! `cdrguard demo`: generates traffic, replays it through a shipped policy with a fresh
//! key, and writes every route to an output directory. No broker needed.

use std::path::Path;

use super::engine::Engine;
use super::files::{Outputs, OutputsError};
use super::generate::{GenConfig, GenError, Line, Synthetic, generate_with};
use super::outdir::{OutDirError, StagedFiles};
use super::replay::{ReplayError, ReplayInput, ReplayLimits, replay};
use crate::codec::Format;
use crate::core::pseudonym::Keyring;
use crate::policy::Policy;
use crate::vocab::time::{DAY_MS, Millis};

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

/// Why generated traffic was not written. Neither target was changed.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// The settings make no sense; nothing was generated.
    #[error(transparent)]
    Settings(#[from] GenError),
    /// The files could not be put in place.
    #[error(transparent)]
    Place(#[from] OutDirError),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file being written.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Writes generated traffic: records (JSON lines or length-prefixed binary frames) and
/// control events (JSON lines), malformed ones among them.
pub fn write_traffic(
    cfg: &GenConfig,
    records: &Path,
    control: &Path,
    format: Format,
) -> Result<u64, TrafficError> {
    write_traffic_with(cfg, records, control, format, false).map(|w| w.records)
}

/// [`write_traffic`] with a progress bar on stderr when `progress` is set (a terminal).
/// The two files are a pair (the control events are those of the records' subscribers),
/// so they are written beside their targets and renamed into place together only when
/// both are complete: a failed or killed run leaves both targets as they were.
pub fn write_traffic_with(
    cfg: &GenConfig,
    records: &Path,
    control: &Path,
    format: Format,
    progress: bool,
) -> Result<Written, TrafficError> {
    cfg.validate()?;
    let staged = StagedFiles::new(&[records, control])?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(cfg.records);
        b.set_message("generating");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let s = generate_with(cfg, &|n| bar.set_position(n));
    bar.set_message("writing");
    // Named by the target, which is what the user gave.
    let failed = |path: &Path| {
        let path = path.display().to_string();
        move |source| TrafficError::Write { path, source }
    };
    let mut written = write_records(cfg, &s, format, staged.file(0)).map_err(failed(records))?;
    write_controls(&s, staged.file(1), &mut written).map_err(failed(control))?;
    staged.commit()?;
    bar.finish_and_clear();
    Ok(written)
}

/// Writes the record lines (or frames) to `out`.
fn write_records(
    cfg: &GenConfig,
    s: &Synthetic,
    format: Format,
    out: &std::fs::File,
) -> std::io::Result<Written> {
    use std::io::Write;
    let mut written = Written::default();
    let mut w = std::io::BufWriter::new(out);
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
    Ok(written)
}

/// Writes the control lines to `out`, malformed ones where they were generated.
fn write_controls(
    s: &Synthetic,
    out: &std::fs::File,
    written: &mut Written,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut c = std::io::BufWriter::new(out);
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
    Ok(())
}

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
    Traffic(#[from] TrafficError),
}

/// Runs the demo: [`DEMO_DAYS`] of traffic before `now`, replayed, with the expiries due
/// at `now` (long enough for every rule of up to 12 months, anchored on an event or a
/// contract end, to run out somewhere).
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
    std::fs::create_dir_all(&input_dir).map_err(|source| TrafficError::Write {
        path: input_dir.display().to_string(),
        source,
    })?;
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

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Regression: the records file was written in place, then the control file; a
    /// control file that could not be written left new records beside old (or no)
    /// control events. Now both targets stay as they were, and nothing is left beside
    /// them.
    #[test]
    fn a_failed_write_leaves_both_targets_as_they_were_and_nothing_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("cdrs.jsonl");
        let cfg = GenConfig {
            records: 200,
            subscribers: 20,
            ..GenConfig::default()
        };
        // The control file's folder does not exist: found before anything is generated.
        let nowhere = dir.path().join("missing").join("control.jsonl");
        let e = write_traffic_with(&cfg, &records, &nowhere, Format::Json, false).unwrap_err();
        assert!(
            !records.exists(),
            "records written without their control events"
        );
        assert_eq!(names(dir.path()), Vec::<String>::new());
        assert!(matches!(e, TrafficError::Place(_)), "{e}");

        // The control target is a folder: both files are written, and the second rename
        // fails after the first put the records in place. That one is undone.
        std::fs::write(&records, "earlier records\n").unwrap();
        let folder = dir.path().join("control.jsonl");
        std::fs::create_dir(&folder).unwrap();
        let e = write_traffic_with(&cfg, &records, &folder, Format::Json, false).unwrap_err();
        assert!(e.to_string().contains("control.jsonl"), "{e}");
        assert!(
            std::fs::read_to_string(&records).unwrap() == "earlier records\n",
            "the records target was replaced although its control events were not written"
        );
        assert_eq!(names(dir.path()), ["cdrs.jsonl", "control.jsonl"]);
        assert_eq!(names(&folder), Vec::<String>::new());

        // Without an earlier file, the records target is not created.
        std::fs::remove_file(&records).unwrap();
        write_traffic_with(&cfg, &records, &folder, Format::Json, false).unwrap_err();
        assert_eq!(names(dir.path()), ["control.jsonl"]);

        // One file for both is refused before anything is written.
        let e = write_traffic_with(&cfg, &records, &records, Format::Json, false).unwrap_err();
        assert!(e.to_string().contains("given for two outputs"), "{e}");
        assert_eq!(names(dir.path()), ["control.jsonl"]);

        // A run that succeeds replaces both, and leaves nothing else.
        std::fs::remove_dir(&folder).unwrap();
        std::fs::write(&records, "earlier records\n").unwrap();
        std::fs::write(&folder, "earlier control events\n").unwrap();
        let w = write_traffic_with(&cfg, &records, &folder, Format::Json, false).unwrap();
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count() as u64;
        assert_eq!((lines(&records), lines(&folder)), (w.records, w.controls));
        assert_eq!(names(dir.path()), ["cdrs.jsonl", "control.jsonl"]);
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
