//! `cdrguard produce`: feeds record and control-event files (as `generate` writes them)
//! into a `run` configuration's input and control topics, keyed the way cdrguard expects:
//! records by msisdn, control events by what they set (`msisdn/type[/purpose]`), so the
//! compacted control topic keeps the latest of each. For trying a deployment out and for
//! load tests; production input comes from the operator's own mediation.

use std::path::Path;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use super::config::RunConfig;
use super::sink::SinkContext;
use crate::adapters::frames::{Frame, FrameReader};
use crate::codec::{Format, binary, json};

/// What was sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Produced {
    /// Control events sent.
    pub control: u64,
    /// Control lines not sent: unreadable, so without a key, which a compacted topic
    /// refuses.
    pub control_skipped: u64,
    /// Records sent, keyed by msisdn.
    pub records: u64,
    /// Unreadable records sent as they are (cut to 900 KiB, below the broker's message
    /// limit), without a key, so the dead-letter path can be tried too.
    pub records_unkeyed: u64,
}

/// Why producing stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// An input file could not be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The producer could not be made or refused a message.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker did not acknowledge every message.
    #[error("{0} message(s) were not delivered (see the log for the broker's errors)")]
    Undelivered(u64),
}

/// Frames larger than this are sent cut to it: below the broker's default message limit
/// (1 MB), and far above cdrguard's own record limit, so `run` refuses them as too large.
const SEND_LIMIT: usize = 900 * 1024;

/// The frames of a file, read one at a time.
fn frames(path: &Path, format: Format) -> Result<FrameReader<impl std::io::BufRead>, ProduceError> {
    let f = std::fs::File::open(path).map_err(|source| ProduceError::Read {
        file: path.display().to_string(),
        source,
    })?;
    Ok(FrameReader::with_limit(
        std::io::BufReader::with_capacity(256 * 1024, f),
        format,
        SEND_LIMIT,
    ))
}

/// The next frame's bytes (a frame over [`SEND_LIMIT`] cut to it), `None` at the end.
fn next<'r>(
    r: &'r mut FrameReader<impl std::io::BufRead>,
    path: &Path,
) -> Result<Option<(&'r [u8], bool)>, ProduceError> {
    let frame = r.next_frame().map_err(|source| ProduceError::Read {
        file: path.display().to_string(),
        source,
    })?;
    Ok(frame.map(|f| match f {
        Frame::Whole(_, b) => (b, true),
        Frame::TooLarge { head, .. } => (head, false),
    }))
}

/// Sends `control` (JSON lines) to the control topic, then `records` (in `format`) to the
/// input topic, and waits until the broker has acknowledged every message. Control
/// events go first, so consent is in place before the records it governs.
pub fn produce_files(
    cfg: &RunConfig,
    control: Option<&Path>,
    records: Option<&Path>,
    format: Format,
    progress: &dyn Fn(u64),
) -> Result<Produced, ProduceError> {
    let mut client = super::common(cfg);
    for (k, v) in &cfg.producer_properties {
        client.set(k, v);
    }
    client
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Java clients' partitioner, like `run`'s, so keys land where Java expects them.
        .set("partitioner", "murmur2_random");
    // The sink's context: delivery failures counted, and logged by topic and error only.
    let producer: ThreadedProducer<SinkContext> =
        client.create_with_context(SinkContext::default())?;
    let mut out = Produced::default();
    let mut sent = 0u64;
    let mut send = |topic: &str, key: Option<&[u8]>, payload: &[u8]| -> Result<(), KafkaError> {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                // A full local queue drains as the broker acknowledges.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
        sent += 1;
        if sent.is_multiple_of(10_000) {
            progress(sent);
        }
        Ok(())
    };
    if let Some(path) = control {
        let mut lines = frames(path, Format::Json)?;
        while let Some((line, whole)) = next(&mut lines, path)? {
            match json::decode_control(line).ok().filter(|_| whole) {
                Some(ev) => {
                    send(&cfg.control_topic, Some(ev.key().as_bytes()), line)?;
                    out.control += 1;
                }
                None => out.control_skipped += 1,
            }
        }
    }
    if let Some(path) = records {
        let mut reader = frames(path, format)?;
        while let Some((frame, whole)) = next(&mut reader, path)? {
            let decoded = match format {
                Format::Json => json::decode_record(frame),
                Format::Binary => binary::decode_record(frame),
            };
            match decoded.ok().filter(|_| whole) {
                Some(r) => {
                    send(&cfg.input_topic, Some(r.msisdn.as_bytes()), frame)?;
                    out.records += 1;
                }
                None => {
                    send(&cfg.input_topic, None, frame)?;
                    out.records_unkeyed += 1;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    progress(sent);
    match producer.context().failed() {
        0 => Ok(out),
        n => Err(ProduceError::Undelivered(n)),
    }
}
