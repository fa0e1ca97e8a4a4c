//! cdrguard: enforces operators' privacy policies on telecom usage records (CDRs).
//!
//! # Layout, in the order data flows
//!
//! - [`vocab`]: the words everything else shares: purposes, record fields, data
//!   categories, instants, consent states, field treatments. It stands on nothing.
//! - [`checked`]: the one reader of checked TOML files (policies, the run configuration,
//!   key files): a spanned table, the line of each span, and every problem of a file
//!   reported at once as `file:line: key: what`. It stands on nothing of ours.
//! - [`codec`]: decodes records and control events from JSON or the bincode-compatible
//!   binary form, and encodes copies and expiry events.
//! - [`policy`]: loads an operator policy file into the decision table the core consults,
//!   checks that its citations have the shape of a citation of the operator's text, and
//!   renders it as the Art. 30 record of processing.
//! - [`core`]: the pure per-record core: record and control models, subscriber state,
//!   field treatments, pseudonyms, `process` (one record in, copies out) and the
//!   retention schedule. No async, no Kafka, no clock, no logging.
//! - [`adapters`]: what runs the core: file replay (and the writers that hold back
//!   anonymised copies), the Kafka runtime and its telemetry (Prometheus metrics, health
//!   endpoints, logs), the demo, the synthetic generator, key files, behaviour cases.
//! - [`cli`]: the command line.

pub mod adapters;
pub mod checked;
pub mod cli;
pub mod codec;
pub mod core;
pub mod policy;
pub mod vocab;
