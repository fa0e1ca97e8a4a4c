//! The run summary: a table per route of what happened, printed by demo and replay.

use std::fmt::Write;

use super::engine::Stats;
use crate::core::process::Outcome;
use crate::policy::Policy;

/// Renders the summary table.
pub fn summary(policy: &Policy, stats: &Stats, open_windows: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "policy {}: {} records, {} dead letters, {} control events",
        policy.tag, stats.records, stats.dead_letters, stats.controls
    );
    let _ = writeln!(
        o,
        "{:<16} {:>9} {:>10} {:>10} {:>8} {:>10} {:>7} {:>8} {:>9}",
        "route",
        "copies",
        "anonymised",
        "no_consent",
        "objected",
        "restricted",
        "erased",
        "expired",
        "expiries"
    );
    for r in policy.declared() {
        let p = r.purpose;
        let c = |o| stats.count(p, o);
        let _ = writeln!(
            o,
            "{:<16} {:>9} {:>10} {:>10} {:>8} {:>10} {:>7} {:>8} {:>9}",
            p.id(),
            c(Outcome::Copied),
            c(Outcome::Anonymised),
            c(Outcome::NoConsent),
            c(Outcome::Objected),
            c(Outcome::Restricted),
            c(Outcome::Erased),
            c(Outcome::Expired),
            stats.expiries[p as usize]
        );
    }
    let undeclared: Vec<&str> = crate::core::purpose::Purpose::ALL
        .iter()
        .filter(|p| policy.rule(**p).is_none())
        .map(|p| p.id())
        .collect();
    if !undeclared.is_empty() {
        let _ = writeln!(
            o,
            "not declared by this policy, never routed: {}",
            undeclared.join(", ")
        );
    }
    let _ = writeln!(o, "retention windows still open: {open_windows}");
    o
}
