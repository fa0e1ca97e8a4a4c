//! Anonymised copies held back, then released in content order, and only where enough
//! subscribers share them.
//!
//! An anonymised copy holds no identifier, no time and no place, but a writer that
//! releases it in record order gives its time away: it sits between copies that carry
//! the hour (or arrives with a Kafka timestamp), and that hour's billing copies with the
//! same kind, duration and volume classes often belong to one subscriber. Held back over
//! a window and sorted, a copy's position tells only the window; released only where at
//! least `min_subscribers` distinct subscribers made copies with the same content in
//! that window, none can be narrowed below that many by joining it with the window's
//! billing copies (the billing crowd contains those subscribers).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::vocab::purpose::Purpose;

/// The fewest subscribers that must share an anonymised copy's content within its window
/// for the copy to be released (k-anonymity against the window's clear copies).
pub const MIN_SUBSCRIBERS: usize = 5;

/// Anonymised copies of one window, encoded, with `T` for whatever else the writer needs
/// to write one.
pub struct Holdback<T> {
    held: Vec<Held<T>>,
    /// Subscribers are told apart by a keyed hash that lives only in memory: a copy never
    /// carries who made it, and neither does anything this keeps.
    hasher: RandomState,
}

struct Held<T> {
    purpose: Purpose,
    bytes: Vec<u8>,
    subscriber: u64,
    extra: T,
}

impl<T> Default for Holdback<T> {
    fn default() -> Self {
        Holdback {
            held: Vec::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<T> Holdback<T> {
    /// Holds one copy of `purpose`, encoded as `bytes`, made from a record of `msisdn`.
    pub fn hold(&mut self, purpose: Purpose, bytes: Vec<u8>, msisdn: &str, extra: T) {
        let subscriber = self.hasher.hash_one(msisdn);
        self.held.push(Held {
            purpose,
            bytes,
            subscriber,
            extra,
        });
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Releases the window: every copy whose content at least `min_subscribers` distinct
    /// subscribers share goes to `emit`, in content order; the others are dropped.
    /// Returns how many were dropped.
    pub fn release<E>(
        &mut self,
        min_subscribers: usize,
        mut emit: impl FnMut(Purpose, &[u8], T) -> Result<(), E>,
    ) -> Result<u64, E> {
        self.held
            .sort_unstable_by(|a, b| (a.purpose, &a.bytes).cmp(&(b.purpose, &b.bytes)));
        let mut withheld = 0u64;
        let mut held = std::mem::take(&mut self.held).into_iter().peekable();
        let mut group: Vec<Held<T>> = Vec::new();
        let mut subscribers: Vec<u64> = Vec::new();
        while let Some(h) = held.next() {
            let last = held
                .peek()
                .is_none_or(|n| (n.purpose, &n.bytes) != (h.purpose, &h.bytes));
            group.push(h);
            if !last {
                continue;
            }
            subscribers.clear();
            subscribers.extend(group.iter().map(|g| g.subscriber));
            subscribers.sort_unstable();
            subscribers.dedup();
            if subscribers.len() >= min_subscribers {
                for g in group.drain(..) {
                    emit(g.purpose, &g.bytes, g.extra)?;
                }
            } else {
                withheld += group.len() as u64;
                group.clear();
            }
        }
        Ok(withheld)
    }
}

/// Anonymised copies of one window counted by content instead of held one by one, for
/// writers that need nothing else per copy (files): memory follows the distinct contents
/// of a window (a few thousand: anonymised copies are generalised), not its copies.
pub struct Crowds {
    /// Per purpose (in route order), by content.
    groups: [HashMap<Box<[u8]>, Crowd>; Purpose::COUNT],
    hasher: RandomState,
    min_subscribers: usize,
}

struct Crowd {
    copies: u64,
    /// Distinct subscribers seen, up to the threshold (more are not needed to decide).
    subscribers: smallvec::SmallVec<[u64; MIN_SUBSCRIBERS]>,
}

impl Crowds {
    /// Crowds released when at least `min_subscribers` distinct subscribers share them.
    pub fn new(min_subscribers: usize) -> Crowds {
        Crowds {
            groups: Default::default(),
            hasher: RandomState::new(),
            min_subscribers,
        }
    }

    /// Counts one copy of `purpose`, encoded as `bytes`, made from a record of `msisdn`.
    pub fn hold(&mut self, purpose: Purpose, bytes: &[u8], msisdn: &str) {
        let subscriber = self.hasher.hash_one(msisdn);
        let map = &mut self.groups[purpose as usize];
        let crowd = match map.get_mut(bytes) {
            Some(c) => c,
            None => map.entry(bytes.into()).or_insert_with(|| Crowd {
                copies: 0,
                subscribers: smallvec::SmallVec::new(),
            }),
        };
        crowd.copies += 1;
        if crowd.subscribers.len() < self.min_subscribers
            && !crowd.subscribers.contains(&subscriber)
        {
            crowd.subscribers.push(subscriber);
        }
    }

    /// Releases the window: every content enough subscribers share goes to `emit`, once
    /// per copy, route by route in content order; the others are dropped. Returns how
    /// many copies were dropped.
    pub fn release<E>(
        &mut self,
        mut emit: impl FnMut(Purpose, &[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut withheld = 0;
        for (purpose, map) in Purpose::ALL.into_iter().zip(&mut self.groups) {
            let mut groups: Vec<_> = map.drain().collect();
            groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (bytes, crowd) in groups {
                if crowd.subscribers.len() >= self.min_subscribers {
                    for _ in 0..crowd.copies {
                        emit(purpose, &bytes)?;
                    }
                } else {
                    withheld += crowd.copies;
                }
            }
        }
        Ok(withheld)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Crowds decide exactly as the copy-by-copy holdback does.
    #[test]
    fn crowds_release_what_the_holdback_releases() {
        let mut h = Holdback::default();
        let mut c = Crowds::new(MIN_SUBSCRIBERS);
        for i in 0..400u32 {
            let content = format!("c{}", i % 17).into_bytes();
            let who = format!("+46{}", (i * 7) % (3 + i % 11));
            let p = if i % 5 == 0 {
                Purpose::Marketing
            } else {
                Purpose::Analytics
            };
            h.hold(p, content.clone(), &who, ());
            c.hold(p, &content, &who);
        }
        let mut a = Vec::new();
        let wa = h
            .release(MIN_SUBSCRIBERS, |p, b, ()| {
                a.push((p, b.to_vec()));
                Ok::<(), ()>(())
            })
            .unwrap();
        let mut b = Vec::new();
        let wb = c
            .release(|p, x| {
                b.push((p, x.to_vec()));
                Ok::<(), ()>(())
            })
            .unwrap();
        assert!(
            wa > 0 && !a.is_empty(),
            "some crowds are released, some withheld"
        );
        assert_eq!((a, wa), (b, wb));
    }

    fn released(h: &mut Holdback<u32>, k: usize) -> (Vec<(Vec<u8>, u32)>, u64) {
        let mut out = Vec::new();
        let withheld = h
            .release(k, |_, b, x| {
                out.push((b.to_vec(), x));
                Ok::<(), ()>(())
            })
            .unwrap();
        (out, withheld)
    }

    #[test]
    fn copies_shared_by_enough_subscribers_are_released_in_content_order() {
        let mut h = Holdback::default();
        // Five subscribers share "b"; "a" comes from one subscriber, five times.
        for (i, m) in ["+461", "+462", "+463", "+464", "+465"].iter().enumerate() {
            h.hold(Purpose::Analytics, b"b".to_vec(), m, i as u32);
            h.hold(Purpose::Analytics, b"a".to_vec(), "+469", 10 + i as u32);
        }
        h.hold(Purpose::Analytics, b"b".to_vec(), "+461", 99);
        let (out, withheld) = released(&mut h, 5);
        assert_eq!(withheld, 5, "one subscriber's copies are held back");
        assert_eq!(out.len(), 6);
        assert!(out.iter().all(|(b, _)| b == b"b"));
        assert!(h.is_empty(), "a release empties the window");
        // With a threshold of one, everything goes, sorted by content.
        for m in ["+463", "+461", "+462"] {
            h.hold(Purpose::Analytics, m.as_bytes().to_vec(), m, 0);
        }
        let (out, withheld) = released(&mut h, 1);
        assert_eq!(withheld, 0);
        let order: Vec<&[u8]> = out.iter().map(|(b, _)| b.as_slice()).collect();
        assert_eq!(order, [b"+461", b"+462", b"+463"]);
    }

    #[test]
    fn routes_are_counted_apart() {
        let mut h = Holdback::default();
        for m in ["+461", "+462", "+463"] {
            h.hold(Purpose::Analytics, b"x".to_vec(), m, 0);
            h.hold(Purpose::Marketing, b"x".to_vec(), m, 1);
        }
        let (out, withheld) = released(&mut h, 4);
        assert!(out.is_empty());
        assert_eq!(withheld, 6, "three subscribers per route, not six");
    }
}
