//! The consumer lag of the input partitions this pipeline owns, for `/metrics`.
//!
//! Lag is measured against the last stable offset (LSO), not the high watermark: the
//! group consumer reads with `isolation.level = read_committed`, and librdkafka's
//! watermark query (`rd_kafka_query_watermark_offsets`, which `fetch_watermarks` calls)
//! sends its ListOffsets request with the client's own isolation level, so on this
//! consumer the "high" offset it returns is the LSO. Records behind an open transaction
//! upstream are not readable yet and do not count as lag.
//!
//! Nor is it the committed offset subtracted from that: a transactional producer writes a
//! commit marker after its records, which takes an offset but is never handed out, so the
//! offset committed after the last record stays one short of the end for good (lag stuck
//! at 1 on a caught-up partition). librdkafka's position moves past markers and aborted
//! records as it reads; the lag is what lies between the position and the LSO, plus the
//! records read but not yet committed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::Shared;

/// How often the lag is measured: a few round trips to the partitions' leaders each time.
const EVERY: Duration = Duration::from_secs(5);
/// How long one measurement may wait for the broker.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Measures the lag of the owned partitions every [`EVERY`] until aborted.
pub(super) fn spawn_sampler(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            let owned: Vec<(i32, u64)> = shared
                .snapshot()
                .iter()
                .map(|s| (s.partition, s.pending.load(Ordering::Relaxed)))
                .collect();
            if owned.is_empty() {
                continue;
            }
            let s = shared.clone();
            // The queries block on the broker: off the async workers.
            let measured = tokio::task::spawn_blocking(move || measure(&s, &owned)).await;
            if let Ok(lag) = measured {
                // Only partitions still owned: one revoked meanwhile has no series.
                let still: Vec<i32> = shared.snapshot().iter().map(|s| s.partition).collect();
                shared
                    .status
                    .set_lag(lag.into_iter().filter(|(p, _)| still.contains(p)).collect());
            }
        }
    })
}

/// Lag per partition: the LSO less the position (or, before anything was read, the
/// committed offset, or the log start), plus the records read and not yet committed.
/// A partition the broker does not answer for is left out of this measurement.
fn measure(shared: &Shared, owned: &[(i32, u64)]) -> BTreeMap<i32, i64> {
    let consumer = shared.consumer();
    let topic = &shared.cfg.input_topic;
    let positions = consumer.position().ok();
    let offset_in =
        |tpl: &TopicPartitionList, p: i32| match tpl.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
    let mut out = BTreeMap::new();
    let mut unread = Vec::new();
    for &(p, pending) in owned {
        let Ok((low, stable)) = consumer.fetch_watermarks(topic, p, TIMEOUT) else {
            continue;
        };
        match positions.as_ref().and_then(|t| offset_in(t, p)) {
            Some(pos) => {
                out.insert(p, (stable - pos).max(0) + pending as i64);
            }
            None => unread.push((p, low, stable)),
        }
    }
    if !unread.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for (p, _, _) in &unread {
            let _ = tpl.add_partition(topic, *p);
        }
        let committed = consumer.committed_offsets(tpl, TIMEOUT).ok();
        for (p, low, stable) in unread {
            let from = committed
                .as_ref()
                .and_then(|t| offset_in(t, p))
                .unwrap_or(low)
                .max(low);
            out.insert(p, (stable - from).max(0));
        }
    }
    out
}
