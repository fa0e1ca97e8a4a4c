//! Adapters around the pure core: files, keys, the demo, the generator, behaviour cases.
//! (The Kafka runtime and telemetry will sit here too.)

pub mod cases;
pub mod demo;
pub mod engine;
pub mod files;
pub mod generate;
pub mod keyfile;
pub mod replay;
pub mod report;
