//! The retention service inside `cdrguard run`: durable timers per input partition,
//! rebuilt from the compacted schedule topic, that turn windows into retention-expiry
//! events exactly once, on the same transactions as the copies.
//!
//! - [`entries`]: the schedule topic's messages and the retention topic's keys.

pub mod entries;
