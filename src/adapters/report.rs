//! The run summary: a table per route of what happened, printed by demo and replay.

use std::fmt::Write;

use super::engine::Stats;
use crate::core::process::Outcome;
use crate::policy::Policy;

/// Renders the summary table. `control_dead_letters` counts refused control lines, which
/// the engine never sees; `withheld`, the anonymised copies the writer held back (too few
/// subscribers shared their content in their month).
pub fn summary(
    policy: &Policy,
    stats: &Stats,
    open_windows: usize,
    control_dead_letters: u64,
    withheld: u64,
) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "policy {}: {} records, {} control events, {} dead letters ({} records, {} control events)",
        policy.tag,
        stats.records,
        stats.controls,
        stats.dead_letters + control_dead_letters,
        stats.dead_letters,
        control_dead_letters
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
    let anonymised: u64 = policy
        .declared()
        .map(|r| stats.count(r.purpose, Outcome::Anonymised))
        .sum();
    if anonymised > 0 {
        let _ = writeln!(
            o,
            "anonymised copies withheld: {withheld} of {anonymised} (fewer than {} subscribers shared their content that month)",
            super::holdback::MIN_SUBSCRIBERS
        );
    }
    let _ = writeln!(o, "retention windows still open: {open_windows}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: refused control lines went to the dead letter but not into the count.
    #[test]
    fn the_summary_counts_record_and_control_dead_letters() {
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "x").unwrap();
        let stats = Stats {
            records: 10,
            dead_letters: 2,
            controls: 5,
            ..Stats::default()
        };
        let s = summary(&policy, &stats, 0, 3, 0);
        assert!(
            s.starts_with(
                "policy excedo@2018-05-25: 10 records, 5 control events, 5 dead letters (2 records, 3 control events)"
            ),
            "{s}"
        );
    }
}
