//! File replay: records and control events from files through the same core, every route
//! to a JSON-lines file, expiries due at `now`, bad input to the dead letter.
//!
//! It streams: records and control events are read one at a time, put in time order by
//! bounded reorder buffers, and merged by time, so memory follows the settings and the
//! number of subscribers and open windows, never the size of the input. The loop itself
//! works on readers and a [`Sink`], so behaviour cases run through exactly the code
//! `cdrguard replay` and the demo run.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::engine::Engine;
use super::files::Outputs;
use super::frames::{Frame, FrameReader, Place};
use super::reorder::Reorder;
use crate::codec::{DeadLetter, DecodeError, Format, binary, json};
use crate::core::bounds::{TimeBounds, TimeLimits};
use crate::core::control::ControlEvent;
use crate::core::process::Decision;
use crate::core::record::Record;
use crate::core::retention::Expiry;
use crate::vocab::time::{HOUR_MS, Millis};

/// Where a replay's results go: files for `cdrguard replay`, memory for behaviour cases.
pub trait Sink {
    /// A processed record and everything `process` decided for it (its copies and the
    /// outcome for every purpose).
    fn decision(&mut self, r: &Record<'_>, d: &Decision<'_>) -> std::io::Result<()>;
    /// [`Sink::decision`] for a record decoded with where its JSON fields sit, which a
    /// sink writing JSON copies can take them from.
    fn decision_laid_out(
        &mut self,
        r: &json::Decoded<'_>,
        d: &Decision<'_>,
    ) -> std::io::Result<()> {
        self.decision(&r.record, d)
    }
    /// An expiry due at the replay's `now`.
    fn expiry(&mut self, e: &Expiry) -> std::io::Result<()>;
    /// A refused record or control event.
    fn dead_letter(&mut self, d: &DeadLetter) -> std::io::Result<()>;
}

impl Sink for Outputs {
    fn decision(&mut self, r: &Record<'_>, d: &Decision<'_>) -> std::io::Result<()> {
        self.advance_to(r.start_time)?;
        for c in &d.copies {
            self.copy(c, None, &r.msisdn)?;
        }
        Ok(())
    }
    fn decision_laid_out(
        &mut self,
        r: &json::Decoded<'_>,
        d: &Decision<'_>,
    ) -> std::io::Result<()> {
        self.advance_to(r.record.start_time)?;
        self.copies(r, &d.copies)
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

/// How replay bounds its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayLimits {
    /// A record (or control event) more than this behind the latest one seen is refused:
    /// it can no longer be put in time order.
    pub max_reorder_ms: i64,
    /// Records (and, apart, control events) held at most for reordering; past it the
    /// earliest is processed early. This bounds the buffer's memory.
    pub reorder_capacity: usize,
    /// The record times accepted around the clock (`now`); `None` accepts every time.
    pub times: Option<TimeLimits>,
}

impl Default for ReplayLimits {
    fn default() -> Self {
        ReplayLimits {
            max_reorder_ms: HOUR_MS,
            reorder_capacity: 100_000,
            times: Some(TimeLimits::default()),
        }
    }
}

impl ReplayLimits {
    /// Inputs in any order (behaviour cases, whose inputs are small and in memory).
    pub fn any_order() -> ReplayLimits {
        ReplayLimits {
            max_reorder_ms: i64::MAX,
            reorder_capacity: usize::MAX,
            ..ReplayLimits::default()
        }
    }
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
    /// Expiries due at this instant are written; it is also the clock record times are
    /// checked against.
    pub now: Millis,
    /// Show a progress bar.
    pub progress: bool,
    /// Reorder buffers and accepted times.
    pub limits: ReplayLimits,
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

fn open(path: &Path) -> Result<(BufReader<File>, u64), ReplayError> {
    let err = |source| ReplayError::Read {
        file: path.display().to_string(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    Ok((BufReader::with_capacity(256 * 1024, f), len))
}

fn original(bytes: &[u8], format: Format) -> String {
    match (format, std::str::from_utf8(bytes)) {
        (Format::Json, Ok(s)) => s.to_string(),
        (Format::Json, Err(_)) => String::from_utf8_lossy(bytes).into_owned(),
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

/// Replays the files through `engine`, writing to `out`. Each record is processed at its
/// own start time (the stream as it happened), with every control event up to that
/// instant applied first; then the remaining control events; then expiries due at `now`.
/// Both files are opened before anything is written, so a missing one writes nothing.
pub fn replay(
    input: &ReplayInput,
    engine: &mut Engine<'_>,
    out: &mut Outputs,
) -> Result<ReplayCounts, ReplayError> {
    let (control, control_name) = match &input.control {
        Some(p) => (Some(open(p)?.0), p.display().to_string()),
        None => (None, String::new()),
    };
    let (records, len) = open(&input.records)?;
    let name = input.records.display().to_string();
    let bar = if input.progress {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let counts = run(
        (records, &name),
        input.format,
        control.map(|r| (control_name.as_str(), r)),
        input.now,
        &input.limits,
        &|n| bar.set_position(n),
        engine,
        out,
    )?;
    bar.finish_and_clear();
    Ok(counts)
}

/// [`replay`] on inputs already in memory, into any [`Sink`].
pub fn replay_bytes(
    records: Bytes<'_>,
    format: Format,
    control: Option<Bytes<'_>>,
    now: Millis,
    limits: &ReplayLimits,
    engine: &mut Engine<'_>,
    out: &mut impl Sink,
) -> Result<ReplayCounts, ReplayError> {
    run(
        (records.bytes, records.name),
        format,
        control.map(|c| (c.name, c.bytes)),
        now,
        limits,
        &|_| {},
        engine,
        out,
    )
}

/// A record waiting in the reorder buffer: where it was and its bytes, decoded when it
/// leaves (decoding borrows from the bytes, so a decoded record cannot wait).
type Waiting = (Place, Vec<u8>);

/// Control events, read ahead only as far as the records need them.
struct Controls<'n, R> {
    frames: Option<FrameReader<R>>,
    name: &'n str,
    buffer: Reorder<ControlEvent>,
    /// The latest record time events were applied up to: an event at or before it that
    /// arrives now comes too late to apply before the records it precedes.
    applied_through: Option<Millis>,
    capacity: usize,
}

impl<R: BufRead> Controls<'_, R> {
    /// Reads one line; false at the end of the file.
    fn read_one(
        &mut self,
        out: &mut impl Sink,
        counts: &mut ReplayCounts,
    ) -> Result<bool, ReplayError> {
        let Some(frames) = self.frames.as_mut() else {
            return Ok(false);
        };
        let read = frames.next_frame().map_err(|source| ReplayError::Read {
            file: self.name.to_string(),
            source,
        })?;
        let (place, bytes) = match read {
            None => {
                self.frames = None;
                return Ok(false);
            }
            Some(Frame::TooLarge { place, len, head }) => {
                (place, Err((crate::codec::too_large(len), head)))
            }
            Some(Frame::Whole(place, bytes)) => (place, Ok(bytes)),
        };
        let (reason, bytes) = match bytes {
            Err(refused) => refused,
            Ok(bytes) => {
                let reason = match json::decode_control(bytes) {
                    Err(reason) => reason,
                    Ok(ev) if self.applied_through.is_some_and(|t| ev.at <= t) => format!(
                        "control event arrived after records later than it were processed (the control reorder buffer, {} events, was full)",
                        self.capacity
                    ),
                    Ok(ev) => match self.buffer.push(ev.at, ev) {
                        Ok(()) => return Ok(true),
                        Err((late, _)) => format!("control event {late}"),
                    },
                };
                (reason, bytes)
            }
        };
        counts.control_dead_letters += 1;
        out.dead_letter(&DeadLetter {
            reason,
            position: place.describe(self.name),
            original: original(bytes, Format::Json),
        })?;
        Ok(true)
    }

    /// Applies every event at or before `t` (reading on until no earlier one can come).
    fn apply_through(
        &mut self,
        t: Millis,
        engine: &mut Engine<'_>,
        out: &mut impl Sink,
        counts: &mut ReplayCounts,
    ) -> Result<(), ReplayError> {
        while !self.buffer.settled_through(t) && self.buffer.len() < self.capacity {
            if !self.read_one(out, counts)? {
                break;
            }
        }
        while self.buffer.peek_time().is_some_and(|at| at <= t) {
            if let Some((_, ev)) = self.buffer.pop() {
                engine.control(&ev);
            }
        }
        self.applied_through = Some(self.applied_through.map_or(t, |a| a.max(t)));
        Ok(())
    }

    /// Reads and applies the rest, in time order.
    fn finish(
        &mut self,
        engine: &mut Engine<'_>,
        out: &mut impl Sink,
        counts: &mut ReplayCounts,
    ) -> Result<(), ReplayError> {
        loop {
            while let Some((_, ev)) = self.buffer.pop_ready() {
                engine.control(&ev);
            }
            if !self.read_one(out, counts)? {
                break;
            }
        }
        while let Some((_, ev)) = self.buffer.pop() {
            engine.control(&ev);
        }
        Ok(())
    }
}

/// The replay loop over any readers. `progress` is told the record bytes read now and
/// then.
#[allow(clippy::too_many_arguments)]
fn run<R: BufRead, C: BufRead>(
    (records, name): (R, &str),
    format: Format,
    control: Option<(&str, C)>,
    now: Millis,
    limits: &ReplayLimits,
    progress: &dyn Fn(u64),
    engine: &mut Engine<'_>,
    out: &mut impl Sink,
) -> Result<ReplayCounts, ReplayError> {
    let mut counts = ReplayCounts::default();
    let bounds = limits
        .times
        .map(|l| TimeBounds::new(engine.policy(), now, l));
    let (control_name, control_reader) = match control {
        Some((n, r)) => (n, Some(FrameReader::new(r, Format::Json))),
        None => ("", None),
    };
    let mut controls = Controls {
        frames: control_reader,
        name: control_name,
        buffer: Reorder::new(limits.max_reorder_ms, limits.reorder_capacity),
        applied_through: None,
        capacity: limits.reorder_capacity,
    };
    let mut frames = FrameReader::new(records, format);
    let mut waiting: Reorder<Waiting> =
        Reorder::new(limits.max_reorder_ms, limits.reorder_capacity);
    // Buffers of records that left, reused for the next ones.
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut step = Step {
        format,
        name,
        now,
        clock: None,
    };
    let mut n = 0u64;
    loop {
        let frame = frames.next_frame().map_err(|source| ReplayError::Read {
            file: name.to_string(),
            source,
        })?;
        let refused = match frame {
            None => break,
            Some(Frame::TooLarge { place, len, head }) => {
                Err((place, crate::codec::too_large(len), head.to_vec()))
            }
            Some(Frame::Whole(place, bytes)) => {
                let at = match format {
                    Format::Json => json::start_time_hint(bytes).ok_or(()),
                    Format::Binary => Err(()),
                };
                let at = match at {
                    Ok(t) => Ok(t),
                    Err(()) => decode(bytes, format).map(|r| r.record.start_time),
                };
                match at {
                    Err(e) => Err((place, e.to_string(), bytes.to_vec())),
                    Ok(at) => match bounds.as_ref().map_or(Ok(()), |b| b.check(at)) {
                        Err(e) => Err((place, e.to_string(), bytes.to_vec())),
                        Ok(()) => Ok((place, at)),
                    },
                }
            }
        };
        let refused = match refused {
            Err(r) => Some(r),
            Ok((place, at)) => {
                let buf = frames.take_frame(spare.pop().unwrap_or_default());
                match waiting.push(at, (place, buf)) {
                    Ok(()) => None,
                    Err((late, (place, buf))) => Some((place, format!("record {late}"), buf)),
                }
            }
        };
        if let Some((place, reason, bytes)) = refused {
            engine.stats.dead_letters += 1;
            out.dead_letter(&DeadLetter {
                reason,
                position: place.describe(name),
                original: original(&bytes, format),
            })?;
        }
        while let Some((_, (place, buf))) = waiting.pop_ready() {
            step.record(place, &buf, &mut controls, engine, out, &mut counts)?;
            spare.push(buf);
        }
        n += 1;
        if n.is_multiple_of(4096) {
            progress(frames.consumed());
        }
    }
    while let Some((_, (place, buf))) = waiting.pop() {
        step.record(place, &buf, &mut controls, engine, out, &mut counts)?;
    }
    progress(frames.consumed());
    controls.finish(engine, out, &mut counts)?;
    engine.due_each(now, |e| out.expiry(e))?;
    Ok(counts)
}

fn decode(bytes: &[u8], format: Format) -> Result<json::Decoded<'_>, DecodeError> {
    match format {
        Format::Json => json::decode_record_laid_out(bytes),
        Format::Binary => binary::decode_record(bytes).map(json::Decoded::from),
    }
}

/// Processing of records as they leave the reorder buffer, in time order.
struct Step<'n> {
    format: Format,
    name: &'n str,
    now: Millis,
    /// The latest record time processed: the stream's own clock.
    clock: Option<Millis>,
}

impl Step<'_> {
    fn record<R: BufRead>(
        &mut self,
        place: Place,
        bytes: &[u8],
        controls: &mut Controls<'_, R>,
        engine: &mut Engine<'_>,
        out: &mut impl Sink,
        counts: &mut ReplayCounts,
    ) -> Result<(), ReplayError> {
        let decoded = match decode(bytes, self.format) {
            Ok(r) => r,
            Err(e) => {
                engine.stats.dead_letters += 1;
                return Ok(out.dead_letter(&DeadLetter {
                    reason: e.to_string(),
                    position: place.describe(self.name),
                    original: original(bytes, self.format),
                })?);
            }
        };
        let r = &decoded.record;
        let t = r.start_time;
        controls.apply_through(t, engine, out, counts)?;
        // A fresh decision per record costs nothing (its copies are an empty inline
        // array); it borrows the record, whose bytes live only for this call.
        let mut d = Decision::default();
        engine.record(r, t, &mut d);
        out.decision_laid_out(&decoded, &d)?;
        // Windows whose deadline the stream has passed can no longer change (a later
        // right leaves them to their rule, a later record of theirs is refused as
        // expired): write them now, so they do not pile up in memory.
        if self.clock.is_none_or(|c| t > c) {
            self.clock = Some(t);
            engine.due_each(t.min(self.now), |e| out.expiry(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::io::Read;
    use std::rc::Rc;

    use super::*;
    use crate::adapters::generate::{GenConfig, Line, generate};
    use crate::core::pseudonym::tests::test_keyring;

    fn policy() -> crate::policy::Policy {
        crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo").unwrap()
    }

    /// What a replay handed its sink, with the input bytes read by the first decision.
    #[derive(Default)]
    struct Seen {
        read: Rc<Cell<u64>>,
        read_at_first_decision: Option<u64>,
        records: Vec<(String, Millis)>,
        dead: Vec<DeadLetter>,
        expiries: usize,
    }

    impl Sink for Seen {
        fn decision(&mut self, r: &Record<'_>, _: &Decision<'_>) -> std::io::Result<()> {
            self.read_at_first_decision.get_or_insert(self.read.get());
            self.records.push((r.record_id.to_string(), r.start_time));
            Ok(())
        }
        fn expiry(&mut self, _: &Expiry) -> std::io::Result<()> {
            self.expiries += 1;
            Ok(())
        }
        fn dead_letter(&mut self, d: &DeadLetter) -> std::io::Result<()> {
            self.dead.push(d.clone());
            Ok(())
        }
    }

    /// A reader that counts what it hands out.
    struct Counting<R> {
        inner: R,
        read: Rc<Cell<u64>>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    fn lines(records: &[String]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|r| format!("{r}\n").into_bytes())
            .collect()
    }

    fn generated(n: u64) -> Vec<String> {
        let cfg = GenConfig {
            records: n,
            subscribers: 50,
            malformed_rate: 0.0,
            ..GenConfig::default()
        };
        generate(&cfg)
            .lines
            .into_iter()
            .map(|l| match l {
                Line::Record(r) => serde_json::to_string(&r).unwrap(),
                Line::Malformed(m) => m,
            })
            .collect()
    }

    fn replay_lines(input: &[u8], now: Millis, limits: &ReplayLimits) -> Seen {
        let policy = policy();
        let keys = test_keyring();
        let mut engine = Engine::new(&policy, &keys);
        let mut seen = Seen::default();
        let reader = std::io::BufReader::with_capacity(
            8 * 1024,
            Counting {
                inner: input,
                read: seen.read.clone(),
            },
        );
        run(
            (reader, "r"),
            Format::Json,
            None::<(&str, &[u8])>,
            now,
            limits,
            &|_| {},
            &mut engine,
            &mut seen,
        )
        .unwrap();
        seen
    }

    fn now() -> Millis {
        Millis::parse("2026-03-01T00:00:00.000Z").unwrap()
    }

    /// Regression: replay read its whole input and sorted it before the first record,
    /// so memory grew with the input. It now processes records while it reads, an hour
    /// of stream time behind.
    #[test]
    fn records_are_processed_while_the_input_is_read() {
        let input = lines(&generated(20_000));
        let seen = replay_lines(&input, now(), &ReplayLimits::default());
        assert_eq!(seen.records.len(), 20_000);
        let at = seen.read_at_first_decision.unwrap();
        assert!(
            at < input.len() as u64 / 20,
            "the first record was processed after {at} of {} bytes were read",
            input.len()
        );
        assert!(seen.records.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    /// Stragglers within --max-reorder are put in time order; one later than that goes
    /// to the dead letter with its reason and position, and the run goes on.
    #[test]
    fn a_record_later_than_the_reorder_bound_is_dead_lettered_the_rest_sorted() {
        let mut records = generated(200);
        let mut shift = |i: usize, by_ms: i64| {
            let mut v: serde_json::Value = serde_json::from_str(&records[i]).unwrap();
            let t = Millis::parse(v["start_time"].as_str().unwrap()).unwrap();
            v["start_time"] = Millis(t.0 + by_ms).to_string().into();
            records[i] = v.to_string();
        };
        // Record 100 arrives 30 minutes late: within the hour, reordered.
        shift(100, -30 * 60_000);
        // Record 150 arrives two days late: refused.
        shift(150, -2 * 86_400_000);
        let seen = replay_lines(&lines(&records), now(), &ReplayLimits::default());
        assert_eq!(seen.records.len(), 199);
        assert!(
            seen.records.windows(2).all(|w| w[0].1 <= w[1].1),
            "time order"
        );
        assert_eq!(seen.dead.len(), 1, "{:?}", seen.dead);
        assert_eq!(seen.dead[0].position, "r:151");
        assert!(
            seen.dead[0].reason.contains("--max-reorder"),
            "{}",
            seen.dead[0].reason
        );
        assert!(
            seen.dead[0].reason.contains("more than 1 h after"),
            "{}",
            seen.dead[0].reason
        );
        // A buffer of 10 records refuses what it can no longer place, however long the
        // delay it would allow.
        let small = ReplayLimits {
            reorder_capacity: 10,
            max_reorder_ms: 365 * 86_400_000,
            ..ReplayLimits::default()
        };
        let mut records = generated(200);
        let v: serde_json::Value = serde_json::from_str(&records[0]).unwrap();
        records.insert(100, {
            let mut early = v.clone();
            early["record_id"] = "early".into();
            early.to_string()
        });
        let seen = replay_lines(&lines(&records), now(), &small);
        assert_eq!(seen.dead.len(), 1, "{:?}", seen.dead);
        assert!(
            seen.dead[0].reason.contains("--reorder-capacity"),
            "{:?}",
            seen.dead
        );
    }

    /// One limit in both modes: a record over 64 KiB goes to the dead letter with the
    /// reason Kafka mode gives, holding its first 64 KiB, and the records after it pass.
    #[test]
    fn a_record_over_the_size_limit_is_dead_lettered_as_in_kafka_mode() {
        let mut records = generated(20);
        let mut huge: serde_json::Value = serde_json::from_str(&records[5]).unwrap();
        huge["recording_entity"] = "x".repeat(10_000_000).into();
        records[5] = huge.to_string();
        let seen = replay_lines(&lines(&records), now(), &ReplayLimits::default());
        assert_eq!(seen.records.len(), 19);
        assert_eq!(seen.dead.len(), 1);
        let d = &seen.dead[0];
        assert_eq!(
            d.reason,
            crate::codec::too_large(records[5].len() as u64),
            "the same reason as Kafka mode's"
        );
        assert_eq!(d.original.len(), crate::codec::MAX_RECORD_BYTES);
        assert_eq!(d.position, "r:6");
    }

    /// Records from the year 1, 1900, 1970 and 9999 are refused against the clock: the
    /// ancient ones would be copied to every route and expired at once, the future one
    /// would open windows that never close.
    #[test]
    fn implausible_record_times_are_dead_lettered_against_the_clock() {
        let mut records = generated(20);
        for (i, t) in [
            "0001-01-01T00:00:00.000Z",
            "1900-06-01T00:00:00.000Z",
            "1970-01-01T00:00:00.000Z",
            "9999-12-31T23:59:59.999Z",
        ]
        .iter()
        .enumerate()
        {
            let mut v: serde_json::Value = serde_json::from_str(&records[i]).unwrap();
            v["start_time"] = (*t).into();
            records[i] = v.to_string();
        }
        let seen = replay_lines(&lines(&records), now(), &ReplayLimits::default());
        assert_eq!(seen.records.len(), 16);
        let reasons: Vec<&str> = seen.dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert_eq!(
            reasons
                .iter()
                .filter(|r| r.contains("3650 days before the clock"))
                .count(),
            3,
            "{reasons:?}"
        );
        assert!(reasons.iter().any(|r| r.contains("1 day after the clock")));
        // Without a clock to check against (behaviour cases without `now`), all pass.
        let any = ReplayLimits {
            times: None,
            ..ReplayLimits::any_order()
        };
        assert_eq!(
            replay_lines(&lines(&records), now(), &any).records.len(),
            20
        );
    }
}
