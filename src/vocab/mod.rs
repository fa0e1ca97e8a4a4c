//! The words policies and the core share: purposes, record fields and data categories,
//! instants, consent states and field treatments. Everything else stands on these; they
//! stand on nothing of the crate.

pub mod consent;
pub mod purpose;
pub mod time;
pub mod treatment;
