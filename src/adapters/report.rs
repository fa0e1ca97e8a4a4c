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
    let undeclared: Vec<&str> = crate::vocab::purpose::Purpose::ALL
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
    let undeclared: Vec<String> = crate::vocab::purpose::Purpose::ALL
        .iter()
        .filter(|p| stats.undeclared[**p as usize] > 0)
        .map(|p| format!("{} {}", p.id(), stats.undeclared[*p as usize]))
        .collect();
    if !undeclared.is_empty() {
        let _ = writeln!(
            o,
            "control events for a purpose this policy does not declare, ignored: {} ({})",
            stats.undeclared.iter().sum::<u64>(),
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
    use crate::adapters::engine::Engine;
    use crate::core::control::{Change, ControlEvent};
    use crate::vocab::purpose::Purpose;
    use crate::vocab::time::Millis;

    /// Regression: a consent or objection event for a purpose the policy does not
    /// declare was applied without a trace; a consent system that spells a purpose
    /// differently from the policy went unnoticed.
    #[test]
    fn control_events_for_undeclared_purposes_are_counted_and_reported() {
        let policy =
            crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "x").unwrap();
        let keys = crate::core::pseudonym::tests::test_keyring();
        let mut engine = Engine::new(&policy, &keys);
        let event = |change| ControlEvent {
            msisdn: "+46701234567".into(),
            at: Millis(0),
            change,
        };
        let care = Purpose::CustomerCare;
        assert!(
            policy.rule(care).is_none(),
            "Excedo declares no customer care"
        );
        for change in [
            Change::Consent {
                purpose: care,
                granted: true,
            },
            Change::Objection { purpose: care },
            Change::Consent {
                purpose: care,
                granted: false,
            },
            // Declared purposes, and events that name none, are not counted.
            Change::Consent {
                purpose: Purpose::Marketing,
                granted: true,
            },
            Change::Objection {
                purpose: Purpose::Analytics,
            },
            Change::Erasure,
        ] {
            engine.control(&event(change));
        }
        assert_eq!(engine.stats.controls, 6);
        assert_eq!(engine.stats.undeclared[care as usize], 3);
        assert_eq!(engine.stats.undeclared.iter().sum::<u64>(), 3);
        let s = summary(&policy, &engine.stats, 0, 0, 0);
        assert!(
            s.contains(
                "\ncontrol events for a purpose this policy does not declare, ignored: 3 (customer_care 3)\n"
            ),
            "{s}"
        );
        // Nothing is said when there are none.
        let s = summary(&policy, &Stats::default(), 0, 0, 0);
        assert!(!s.contains("does not declare, ignored"), "{s}");
    }

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
