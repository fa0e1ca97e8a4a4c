//! Adapters around the pure core: files, keys, the demo, the generator, behaviour cases,
//! the Kafka runtime and its telemetry (metrics, health endpoints, logs).

pub mod cases;
pub mod demo;
pub mod engine;
pub mod files;
pub mod frames;
pub mod generate;
pub mod holdback;
pub mod kafka;
pub mod keyfile;
pub mod lines;
pub mod outdir;
pub mod reorder;
pub mod replay;
pub mod report;
pub mod telemetry;
