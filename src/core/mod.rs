//! The pure per-record core: no async, no Kafka, no clock reads, no logging.
//!
//! Everything here is a function of its arguments; "now" arrives as a [`time::Millis`].

pub mod bounds;
pub mod control;
pub mod ff1;
pub mod process;
pub mod pseudonym;
pub mod record;
pub mod retention;
pub mod treat;
