//! Anonymised copies held to a crowd in Kafka mode, as files hold them: per UTC month of
//! their records, counted by content, released after the month closes, sorted by content,
//! and only where at least [`MIN_SUBSCRIBERS`] distinct subscribers share the content.
//!
//! The crowds of an input partition live in its partition of the schedule topic beside
//! its windows (keyed `crowd/MONTH/PURPOSE/DIGEST`), written in the copies' transactions
//! and read back with the timers, so neither a restart nor a rebalance loses or repeats
//! one. A release sends a crowd's copies and its tombstone in one transaction.
//!
//! Crowds are counted per input partition. Records are keyed by msisdn, so a subscriber
//! stays on one partition, but a crowd may span several: each partition counts only its
//! own subscribers, which can only withhold more (a content shared by five subscribers on
//! two partitions is withheld), never release a smaller crowd.
//!
//! Subscribers are told apart by a keyed fingerprint (a pseudonym under the oldest key of
//! the key file, so a rotation that adds a key does not count anyone twice); it is kept
//! with the crowd, never with a copy.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::adapters::holdback::MIN_SUBSCRIBERS;
use crate::core::pseudonym::Keyring;
use crate::vocab::purpose::Purpose;
use crate::vocab::time::{DAY_MS, Millis};

/// A month stays open this long after its end, for records that arrive late.
pub const GRACE_MS: i64 = DAY_MS;

/// A crowd's identity: month (`YYYY-MM`), route, and a digest of the content.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CrowdKey {
    /// The UTC month of the records.
    pub month: String,
    /// The route.
    pub purpose: Purpose,
    /// BLAKE3 of the content and headers, 16 bytes hex.
    pub digest: String,
}

/// The copies of one content in one month.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crowd {
    /// The encoded copy.
    #[serde(with = "hex::serde")]
    pub content: Vec<u8>,
    /// Its Kafka headers.
    pub headers: Vec<(String, String)>,
    /// Copies held.
    pub copies: u64,
    /// Distinct subscribers' fingerprints, up to the threshold.
    pub subscribers: Vec<u64>,
}

/// A crowd's schedule-topic message value.
#[derive(Serialize, Deserialize)]
struct CrowdValue {
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    crowd: Crowd,
}

/// One anonymised copy to hold.
#[derive(Clone, Debug)]
pub struct Anonymised {
    /// The route.
    pub purpose: Purpose,
    /// When its record happened.
    pub record_time: Millis,
    /// The encoded copy.
    pub content: Vec<u8>,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its subscriber's fingerprint.
    pub subscriber: u64,
}

/// The subscriber fingerprint of a crowd member.
pub fn fingerprint(keys: &Keyring, msisdn: &str) -> u64 {
    let oldest = keys.each_key().last().unwrap_or(keys);
    let token = oldest.pseudonym(Purpose::Analytics, "crowd", msisdn);
    let mut h = DefaultHasher::new();
    token.as_str().hash(&mut h);
    h.finish()
}

/// `YYYY-MM` of an instant.
pub fn month_of(t: Millis) -> String {
    t.to_string()[..7].to_string()
}

/// When a month's crowds may be released: its end plus the grace.
pub fn closes_at(month: &str) -> Option<Millis> {
    let start = Millis::parse(&format!("{month}-01T00:00:00.000Z")).ok()?;
    Some(Millis(start.add_months(1).0 + GRACE_MS))
}

/// A partition's crowds, journalled.
#[derive(Debug, Default)]
pub struct Crowds {
    held: BTreeMap<CrowdKey, Crowd>,
    touched: BTreeSet<CrowdKey>,
    /// Copies withheld: their crowd stayed under the threshold, or arrived after their
    /// month was released.
    pub withheld: u64,
}

/// What a release hands out.
pub struct Released {
    /// The route.
    pub purpose: Purpose,
    /// The crowd.
    pub crowd: Crowd,
}

impl Crowds {
    /// Holds one copy; a copy of a month already released (it came late) is withheld.
    pub fn hold(&mut self, a: Anonymised, now: Millis) {
        let month = month_of(a.record_time);
        if closes_at(&month).is_some_and(|c| c <= now) {
            self.withheld += 1;
            return;
        }
        let mut h = blake3::Hasher::new();
        h.update(&a.content);
        for (k, v) in &a.headers {
            h.update(k.as_bytes());
            h.update(&[0]);
            h.update(v.as_bytes());
            h.update(&[0]);
        }
        let key = CrowdKey {
            month,
            purpose: a.purpose,
            digest: hex::encode(&h.finalize().as_bytes()[..16]),
        };
        let crowd = self.held.entry(key.clone()).or_insert_with(|| Crowd {
            content: a.content,
            headers: a.headers,
            copies: 0,
            subscribers: Vec::new(),
        });
        crowd.copies += 1;
        if crowd.subscribers.len() < MIN_SUBSCRIBERS && !crowd.subscribers.contains(&a.subscriber) {
            crowd.subscribers.push(a.subscriber);
        }
        self.touched.insert(key);
    }

    /// Puts a crowd back as the schedule topic holds it (`None`: released).
    pub fn restore(&mut self, key: CrowdKey, crowd: Option<Crowd>) {
        match crowd {
            Some(c) => {
                self.held.insert(key, c);
            }
            None => {
                self.held.remove(&key);
            }
        }
    }

    /// Releases the crowds of months closed at `now`, month by month and route by route in
    /// content order, until `budget` copies went out (a crowd goes whole). Crowds under the
    /// threshold are dropped and counted as withheld.
    pub fn release(&mut self, now: Millis, budget: &mut usize) -> Vec<Released> {
        let closed: Vec<(String, Purpose)> = self
            .held
            .keys()
            .filter(|k| closes_at(&k.month).is_some_and(|c| c <= now))
            .map(|k| (k.month.clone(), k.purpose))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut out = Vec::new();
        for (month, purpose) in closed {
            let mut keys: Vec<CrowdKey> = self
                .held
                .keys()
                .filter(|k| k.month == month && k.purpose == purpose)
                .cloned()
                .collect();
            keys.sort_by(|a, b| self.held[a].content.cmp(&self.held[b].content));
            for k in keys {
                if *budget == 0 {
                    return out;
                }
                let Some(c) = self.held.remove(&k) else {
                    continue;
                };
                self.touched.insert(k);
                if c.subscribers.len() >= MIN_SUBSCRIBERS {
                    *budget = budget.saturating_sub(c.copies as usize);
                    out.push(Released { purpose, crowd: c });
                } else {
                    self.withheld += c.copies;
                }
            }
        }
        out
    }

    /// Whether a month is closed at `now` and waits to be released.
    pub fn has_due(&self, now: Millis) -> bool {
        self.held
            .keys()
            .any(|k| closes_at(&k.month).is_some_and(|c| c <= now))
    }

    /// Whether anything changed since the last drain.
    pub fn has_changes(&self) -> bool {
        !self.touched.is_empty()
    }

    /// The messages that persist what changed: `(key, value)`, `None` a tombstone.
    pub fn drain(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        std::mem::take(&mut self.touched)
            .into_iter()
            .map(|k| {
                let value = self.held.get(&k).map(|c| {
                    // Serialising strings, numbers and hex into a Vec cannot fail.
                    serde_json::to_vec(&CrowdValue {
                        kind: "anonymised_crowd".into(),
                        crowd: c.clone(),
                    })
                    .unwrap_or_default()
                });
                (crowd_key(&k), value)
            })
            .collect()
    }

    /// Crowds held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// The schedule-topic key of a crowd.
pub fn crowd_key(k: &CrowdKey) -> String {
    format!("crowd/{}/{}/{}", k.month, k.purpose.id(), k.digest)
}

/// Reads a crowd message back: `None` if the key is not a crowd's; `Some(Err)` if its
/// value cannot be read.
pub fn decode(key: &str, value: Option<&[u8]>) -> Option<Result<(CrowdKey, Option<Crowd>), ()>> {
    let rest = key.strip_prefix("crowd/")?;
    let mut parts = rest.splitn(3, '/');
    let (Some(month), Some(p), Some(digest)) = (parts.next(), parts.next(), parts.next()) else {
        return Some(Err(()));
    };
    let Some(purpose) = Purpose::from_id(p) else {
        return Some(Err(()));
    };
    let k = CrowdKey {
        month: month.to_string(),
        purpose,
        digest: digest.to_string(),
    };
    Some(match value {
        None => Ok((k, None)),
        Some(v) => serde_json::from_slice::<CrowdValue>(v)
            .map(|c| (k, Some(c.crowd)))
            .map_err(|_| ()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(content: &str, who: u64, at: &str) -> Anonymised {
        Anonymised {
            purpose: Purpose::Analytics,
            record_time: Millis::parse(at).unwrap(),
            content: content.as_bytes().to_vec(),
            headers: vec![("consent".into(), "absent".into())],
            subscriber: who,
        }
    }

    #[test]
    fn only_crowds_of_five_are_released_after_their_month_closes_in_content_order() {
        let mut c = Crowds::default();
        let during = Millis::parse("2026-03-20T00:00:00.000Z").unwrap();
        for who in 0..5 {
            c.hold(copy("b", who, "2026-03-02T10:00:00.000Z"), during);
            c.hold(copy("a", who, "2026-03-03T10:00:00.000Z"), during);
        }
        for _ in 0..7 {
            c.hold(copy("lonely", 9, "2026-03-04T10:00:00.000Z"), during);
        }
        let mut budget = 100;
        assert!(
            c.release(during, &mut budget).is_empty(),
            "the month is open"
        );
        // Closed only a day after its end.
        let end = Millis::parse("2026-04-01T12:00:00.000Z").unwrap();
        assert!(c.release(end, &mut budget).is_empty());
        let after = Millis::parse("2026-04-02T00:00:00.000Z").unwrap();
        let out = c.release(after, &mut budget);
        let got: Vec<(String, u64)> = out
            .iter()
            .map(|r| {
                (
                    String::from_utf8(r.crowd.content.clone()).unwrap(),
                    r.crowd.copies,
                )
            })
            .collect();
        assert_eq!(got, [("a".to_string(), 5), ("b".to_string(), 5)]);
        assert_eq!(c.withheld, 7, "one subscriber's copies stay held back");
        assert!(c.is_empty());
        // A copy of the released month that comes late is withheld, not a new crowd.
        c.hold(copy("a", 1, "2026-03-05T10:00:00.000Z"), after);
        assert_eq!(c.withheld, 8);
        assert!(c.is_empty());
    }

    #[test]
    fn crowds_read_back_as_written() {
        let mut c = Crowds::default();
        let now = Millis::parse("2026-03-20T00:00:00.000Z").unwrap();
        for who in 0..3 {
            c.hold(copy("x", who, "2026-03-02T10:00:00.000Z"), now);
        }
        let msgs = c.drain();
        assert_eq!(msgs.len(), 1);
        let (k, v) = &msgs[0];
        let (key, crowd) = decode(k, v.as_deref()).unwrap().unwrap();
        let mut back = Crowds::default();
        back.restore(key, crowd);
        assert_eq!(back.held, c.held);
        assert!(decode("fraud/x/1", None).is_none());
        assert_eq!(
            decode("crowd/2026-03/analytics/ab", Some(b"{")),
            Some(Err(()))
        );
    }
}
