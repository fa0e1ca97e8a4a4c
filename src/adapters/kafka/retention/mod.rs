//! The retention service inside `cdrguard run`: durable timers per input partition,
//! rebuilt from the compacted schedule topic, that turn windows into retention-expiry
//! events exactly once, on the same transactions (and the same producer) as the copies.
//!
//! - [`entries`]: the schedule topic's messages and the retention topic's keys.
//! - [`rebuild`]: reading a schedule partition back on assignment.
//! - [`timers`]: one partition's timers, reading back or in step.
//! - [`control`]: the control events the timers act on, each applied exactly once.
//! - [`crowds`]: anonymised copies held back per month until a crowd shares them.

pub mod control;
pub mod crowds;
pub mod entries;
pub mod rebuild;
pub mod timers;
