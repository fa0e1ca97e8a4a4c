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
use crate::adapters::replay::frames;
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
    /// Unreadable records sent as they are, without a key (for the dead-letter path).
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

fn read(path: &Path) -> Result<Vec<u8>, ProduceError> {
    std::fs::read(path).map_err(|source| ProduceError::Read {
        file: path.display().to_string(),
        source,
    })
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
        let buf = read(path)?;
        for (_, line) in frames(&buf, Format::Json) {
            match json::decode_control(line) {
                Ok(ev) => {
                    send(&cfg.control_topic, Some(ev.key().as_bytes()), line)?;
                    out.control += 1;
                }
                Err(_) => out.control_skipped += 1,
            }
        }
    }
    if let Some(path) = records {
        let buf = read(path)?;
        for (_, frame) in frames(&buf, format) {
            let decoded = match format {
                Format::Json => json::decode_record(frame),
                Format::Binary => binary::decode_record(frame),
            };
            match decoded {
                Ok(r) => {
                    send(&cfg.input_topic, Some(r.msisdn.as_bytes()), frame)?;
                    out.records += 1;
                }
                Err(_) => {
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
