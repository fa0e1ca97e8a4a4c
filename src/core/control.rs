//! Subscriber control events (consent, objection, restriction, erasure, contract end,
//! invoice settlement) as DESIGN.md fixes them.
