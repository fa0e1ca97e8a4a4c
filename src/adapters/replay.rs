//! File replay: records and control events from files through the same core, every route
//! to a JSON-lines file, expiries due at `now`, bad input to the dead letter.
//!
//! The loop itself ([`replay_bytes`]) works on bytes and a [`Sink`], so behaviour cases
//! run through exactly the code `cdrguard replay` and the demo run.

use std::path::{Path, PathBuf};

use super::engine::Engine;
use super::files::Outputs;
use crate::codec::{DeadLetter, DecodeError, Format, binary, json};
use crate::core::control::ControlEvent;
use crate::core::process::Decision;
use crate::core::record::Record;
use crate::core::retention::Expiry;
use crate::core::time::Millis;

/// Where a replay's results go: files for `cdrguard replay`, memory for behaviour cases.
pub trait Sink {
    /// A processed record and everything `process` decided for it (its copies and the
    /// outcome for every purpose).
    fn decision(&mut self, r: &Record<'_>, d: &Decision<'_>) -> std::io::Result<()>;
    /// An expiry due at the replay's `now`.
    fn expiry(&mut self, e: &Expiry) -> std::io::Result<()>;
    /// A refused record or control event.
    fn dead_letter(&mut self, d: &DeadLetter) -> std::io::Result<()>;
}

impl Sink for Outputs {
    fn decision(&mut self, r: &Record<'_>, d: &Decision<'_>) -> std::io::Result<()> {
        self.advance_to(r.start_time)?;
        for c in &d.copies {
            self.copy(c, &r.msisdn)?;
        }
        Ok(())
    }
    fn expiry(&mut self, e: &Expiry) -> std::io::Result<()> {
        Outputs::expiry(self, e)
    }
    fn dead_letter(&mut self, d: &DeadLetter) -> std::io::Result<()> {
        Outputs::dead_letter(self, d)
    }
}

/// One input held in memory, with the name its dead letters' positions use.
#[derive(Clone, Copy, Debug)]
pub struct Bytes<'b> {
    /// The contents.
    pub bytes: &'b [u8],
    /// The name in positions (`name:line`, `name@offset`), usually the file's path.
    pub name: &'b str,
}

/// What to replay.
#[derive(Clone, Debug)]
pub struct ReplayInput {
    /// Records: JSON lines, or length-prefixed binary.
    pub records: PathBuf,
    /// Their format.
    pub format: Format,
    /// Control events (JSON lines), if any.
    pub control: Option<PathBuf>,
    /// Expiries due at this instant are written.
    pub now: Millis,
    /// Show a progress bar.
    pub progress: bool,
}

/// Why a replay stopped (bad records never stop it; they go to the dead letter).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// An input could not be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An output could not be written.
    #[error("cannot write output: {0}")]
    Write(#[from] std::io::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, ReplayError> {
    std::fs::read(path).map_err(|source| ReplayError::Read {
        file: path.display().to_string(),
        source,
    })
}

/// A slice of the input and where it was.
struct Item<'b> {
    bytes: &'b [u8],
    position: String,
}

/// Where a frame of an input file starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// 1-based line (JSON lines).
    Line(usize),
    /// Byte offset of its length prefix (binary).
    Offset(usize),
}

/// The frames of an input file: its non-blank lines (JSON; a trailing `\r` removed), or
/// its length-prefixed frames (binary: a little-endian u32 length, then the record). A
/// truncated trailing frame is a frame of its own, so it reaches the dead letter.
pub fn frames(buf: &[u8], format: Format) -> Vec<(Place, &[u8])> {
    let mut out = Vec::new();
    match format {
        Format::Json => {
            for (i, line) in buf.split(|b| *b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.iter().all(u8::is_ascii_whitespace) {
                    out.push((Place::Line(i + 1), line));
                }
            }
        }
        Format::Binary => {
            let mut off = 0usize;
            while off < buf.len() {
                let Some(len) = buf.get(off..off + 4) else {
                    out.push((Place::Offset(off), &buf[off..]));
                    break;
                };
                let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
                let end = (off + 4).saturating_add(len).min(buf.len());
                out.push((Place::Offset(off), &buf[off + 4..end]));
                off = end;
            }
        }
    }
    out
}

/// [`frames`] with their positions as dead letters name them (`name:line`,
/// `name@offset`).
fn split<'b>(buf: &'b [u8], format: Format, name: &str) -> Vec<Item<'b>> {
    frames(buf, format)
        .into_iter()
        .map(|(place, bytes)| Item {
            bytes,
            position: match place {
                Place::Line(l) => format!("{name}:{l}"),
                Place::Offset(o) => format!("{name}@{o}"),
            },
        })
        .collect()
}

fn original(bytes: &[u8], format: Format) -> String {
    match (format, std::str::from_utf8(bytes)) {
        (Format::Json, Ok(s)) => s.to_string(),
        _ => hex::encode(bytes),
    }
}

/// What a replay counted that the engine's statistics do not hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayCounts {
    /// Control lines refused and sent to the dead letter (record dead letters are in the
    /// engine's `Stats::dead_letters`).
    pub control_dead_letters: u64,
}

/// Reads and sorts control events; bad ones go to the dead letter with their line, and
/// are counted in `counts`.
pub fn read_controls(
    path: &Path,
    out: &mut impl Sink,
    counts: &mut ReplayCounts,
) -> Result<Vec<ControlEvent>, ReplayError> {
    let buf = read(path)?;
    let name = path.display().to_string();
    parse_controls(
        Bytes {
            bytes: &buf,
            name: &name,
        },
        out,
        counts,
    )
}

/// Parses and sorts control events (JSON lines); bad ones go to the dead letter and are
/// counted in `counts`.
pub fn parse_controls(
    input: Bytes<'_>,
    out: &mut impl Sink,
    counts: &mut ReplayCounts,
) -> Result<Vec<ControlEvent>, ReplayError> {
    let mut events = Vec::new();
    for item in split(input.bytes, Format::Json, input.name) {
        match json::decode_control(item.bytes) {
            Ok(e) => events.push(e),
            Err(reason) => {
                counts.control_dead_letters += 1;
                out.dead_letter(&DeadLetter {
                    reason,
                    position: item.position,
                    original: original(item.bytes, Format::Json),
                })?
            }
        }
    }
    // Stable: events with the same instant keep their file order.
    events.sort_by_key(|e| e.at);
    Ok(events)
}

/// Replays the files through `engine`, writing to `out`. Each record is processed at its
/// own start time (the stream as it happened), with every control event up to that
/// instant applied first; then the remaining control events; then expiries due at `now`.
pub fn replay(
    input: &ReplayInput,
    engine: &mut Engine<'_>,
    out: &mut Outputs,
) -> Result<ReplayCounts, ReplayError> {
    let control = match &input.control {
        Some(p) => Some((read(p)?, p.display().to_string())),
        None => None,
    };
    let buf = read(&input.records)?;
    let name = input.records.display().to_string();
    replay_bytes(
        Bytes {
            bytes: &buf,
            name: &name,
        },
        input.format,
        control.as_ref().map(|(bytes, name)| Bytes { bytes, name }),
        input.now,
        input.progress,
        engine,
        out,
    )
}

/// [`replay`] on inputs already in memory, into any [`Sink`].
pub fn replay_bytes(
    records: Bytes<'_>,
    format: Format,
    control: Option<Bytes<'_>>,
    now: Millis,
    progress: bool,
    engine: &mut Engine<'_>,
    out: &mut impl Sink,
) -> Result<ReplayCounts, ReplayError> {
    let mut counts = ReplayCounts::default();
    let controls = match control {
        Some(c) => parse_controls(c, out, &mut counts)?,
        None => Vec::new(),
    };
    let items = split(records.bytes, format, records.name);

    let mut decoded: Vec<(usize, Record<'_>)> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let r: Result<Record<'_>, DecodeError> = match format {
            Format::Json => json::decode_record(item.bytes),
            Format::Binary => binary::decode_record(item.bytes),
        };
        match r {
            Ok(r) => decoded.push((i, r)),
            Err(e) => {
                engine.stats.dead_letters += 1;
                out.dead_letter(&DeadLetter {
                    reason: e.to_string(),
                    position: item.position.clone(),
                    original: original(item.bytes, format),
                })?;
            }
        }
    }
    // Stable by start time, then by position, so equal instants keep file order.
    decoded.sort_by_key(|(i, r)| (r.start_time, *i));

    let bar = if progress {
        indicatif::ProgressBar::new(decoded.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut next = 0;
    let mut d = Decision::default();
    for (n, (_, r)) in decoded.iter().enumerate() {
        while let Some(c) = controls.get(next).filter(|c| c.at <= r.start_time) {
            engine.control(c);
            next += 1;
        }
        engine.record(r, r.start_time, &mut d);
        out.decision(r, &d)?;
        if n % 4096 == 0 {
            bar.set_position(n as u64);
        }
    }
    bar.finish_and_clear();
    for c in &controls[next..] {
        engine.control(c);
    }
    for e in engine.due(now) {
        out.expiry(&e)?;
    }
    Ok(counts)
}
