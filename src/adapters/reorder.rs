//! A bounded reorder buffer: items that arrive almost in time order leave in time order.
//!
//! Feeds are sorted by time but for stragglers (a network element flushing late). The
//! buffer holds every item until the newest time seen is `max_delay` past it, or until it
//! holds `capacity` items, whichever comes first; then the earliest leaves. An item
//! earlier than one already released cannot be put in its place any more, so it is
//! refused (to the dead letter) with the bound that refused it. Memory is bounded by
//! `capacity`, whatever the input's size.

use std::collections::VecDeque;

use crate::vocab::time::Millis;

/// Why an item was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Late {
    /// It was more than `max_delay` earlier than the newest item seen.
    #[error(
        "arrived more than {} after a later one (--max-reorder): too late to be put in time order",
        crate::core::bounds::describe_ms(*max_delay_ms)
    )]
    Delay {
        /// The bound.
        max_delay_ms: i64,
    },
    /// The buffer was full and released a later item before it arrived.
    #[error(
        "arrived after the reorder buffer, full at {capacity} items (--reorder-capacity), had released a later one"
    )]
    Capacity {
        /// The bound.
        capacity: usize,
    },
}

/// The buffer.
pub struct Reorder<T> {
    /// Items in time order (then arrival order). Most arrive in order and go to the back;
    /// a straggler is inserted where it belongs.
    queue: VecDeque<(Millis, T)>,
    max_delay_ms: i64,
    capacity: usize,
    /// The newest time seen.
    newest: Option<Millis>,
    /// Nothing earlier than this may enter any more: the latest time released because the
    /// buffer was full.
    floor: Option<Millis>,
}

impl<T> Reorder<T> {
    /// A buffer releasing items `max_delay_ms` behind the newest, holding at most
    /// `capacity` (at least 1).
    pub fn new(max_delay_ms: i64, capacity: usize) -> Reorder<T> {
        Reorder {
            queue: VecDeque::new(),
            max_delay_ms: max_delay_ms.max(0),
            capacity: capacity.max(1),
            newest: None,
            floor: None,
        }
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The earliest time still accepted: items before it are refused.
    fn watermark(&self) -> Option<Millis> {
        let delay = self
            .newest
            .map(|n| Millis(n.0.saturating_sub(self.max_delay_ms)));
        match (delay, self.floor) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether an item at `at` would still be accepted.
    pub fn check(&self, at: Millis) -> Result<(), Late> {
        if self.floor.is_some_and(|f| at < f) {
            return Err(Late::Capacity {
                capacity: self.capacity,
            });
        }
        if self
            .newest
            .is_some_and(|n| at.0 < n.0.saturating_sub(self.max_delay_ms))
        {
            return Err(Late::Delay {
                max_delay_ms: self.max_delay_ms,
            });
        }
        Ok(())
    }

    /// Puts an item in, or gives it back with why it is too late.
    pub fn push(&mut self, at: Millis, item: T) -> Result<(), (Late, T)> {
        if let Err(late) = self.check(at) {
            return Err((late, item));
        }
        self.newest = Some(self.newest.map_or(at, |n| n.max(at)));
        match self.queue.back() {
            Some((last, _)) if at < *last => {
                // After every item of the same instant: equal times keep arrival order.
                let i = self.queue.partition_point(|(t, _)| *t <= at);
                self.queue.insert(i, (at, item));
            }
            _ => self.queue.push_back((at, item)),
        }
        Ok(())
    }

    /// The earliest item, if it may leave now: it is before every item still to come
    /// (more than `max_delay` behind the newest), or the buffer is over capacity.
    pub fn pop_ready(&mut self) -> Option<(Millis, T)> {
        let first = self.queue.front()?.0;
        if self.queue.len() > self.capacity {
            self.floor = Some(self.floor.map_or(first, |f| f.max(first)));
        } else if self.watermark().is_none_or(|w| first >= w) {
            return None;
        }
        self.queue.pop_front()
    }

    /// Whether every item at or before `t` that will ever be accepted is already in:
    /// nothing at or before `t` can arrive any more.
    pub fn settled_through(&self, t: Millis) -> bool {
        self.watermark().is_some_and(|w| w > t)
    }

    /// The earliest item held, whatever the newest (at the end of the input).
    pub fn pop(&mut self) -> Option<(Millis, T)> {
        self.queue.pop_front()
    }

    /// The time of the earliest item held.
    pub fn peek_time(&self) -> Option<Millis> {
        self.queue.front().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_ready(r: &mut Reorder<u32>) -> Vec<u32> {
        std::iter::from_fn(|| r.pop_ready().map(|(_, x)| x)).collect()
    }

    #[test]
    fn stragglers_within_the_delay_leave_in_time_order() {
        let mut r = Reorder::new(10, 100);
        let mut out = Vec::new();
        for (i, t) in [0i64, 5, 3, 12, 11, 20, 14, 40].into_iter().enumerate() {
            r.push(Millis(t), i as u32).unwrap();
            out.extend(drain_ready(&mut r));
        }
        out.extend(std::iter::from_fn(|| r.pop().map(|(_, x)| x)));
        // Times 0 3 5 11 12 14 20 40 in arrival indices.
        assert_eq!(out, vec![0, 2, 1, 4, 3, 6, 5, 7]);
    }

    #[test]
    fn an_item_later_than_the_delay_is_refused_with_the_bound() {
        let mut r = Reorder::new(10, 100);
        r.push(Millis(100), 1).unwrap();
        assert_eq!(r.push(Millis(90), 2), Ok(()));
        assert_eq!(
            r.push(Millis(89), 3),
            Err((Late::Delay { max_delay_ms: 10 }, 3))
        );
        assert!(r.settled_through(Millis(89)));
        assert!(!r.settled_through(Millis(90)));
    }

    #[test]
    fn a_full_buffer_releases_early_and_refuses_what_it_can_no_longer_order() {
        let mut r = Reorder::new(1_000, 2);
        for (t, x) in [(10, 1), (20, 2), (30, 3)] {
            r.push(Millis(t), x).unwrap();
        }
        assert_eq!(
            drain_ready(&mut r),
            vec![1],
            "over capacity: the earliest leaves"
        );
        assert_eq!(r.len(), 2);
        // Within the delay, but before what was released.
        assert_eq!(
            r.push(Millis(5), 9),
            Err((Late::Capacity { capacity: 2 }, 9))
        );
        assert_eq!(r.push(Millis(10), 4), Ok(()), "the same instant still fits");
    }
}
