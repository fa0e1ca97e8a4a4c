//! Which record times a policy can use at a given clock. A record from the future, or one
//! older than every route could keep it, is refused (to the dead letter) rather than
//! copied and expired at once, or left in a window that never closes.

use crate::policy::{Anchor, Policy};
use crate::vocab::time::{DAY_MS, Millis};

/// The settings: how far ahead of the clock a record may be, and how old a record may be
/// on a route that waits for a settlement or a contract end (whose deadline is unknown
/// until then).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeLimits {
    /// Records later than the clock by more than this are refused (clock skew between
    /// network elements is seconds; a day leaves room for time-zone mistakes upstream).
    pub max_future_ms: i64,
    /// Records older than this are refused where a route waits on an anchor: beyond the
    /// 7 years of bookkeeping law, so no record an operator must bill is lost.
    pub anchored_floor_ms: i64,
}

impl Default for TimeLimits {
    fn default() -> Self {
        TimeLimits {
            max_future_ms: DAY_MS,
            anchored_floor_ms: 3_650 * DAY_MS,
        }
    }
}

/// Why a record's time is refused. The reason names the bound and the clock, never the
/// record's own value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutOfBounds {
    /// Later than the clock allows.
    #[error("start_time is more than {tolerance} after the clock ({now})")]
    Future {
        /// The tolerance, e.g. `1 day`.
        tolerance: String,
        /// The clock.
        now: Millis,
    },
    /// Older than every route of the policy keeps copies.
    #[error(
        "start_time is before {earliest}: at the clock ({now}) no route of policy {policy} keeps a copy that old"
    )]
    Expired {
        /// The oldest time still kept.
        earliest: Millis,
        /// The clock.
        now: Millis,
        /// `policy@version`.
        policy: String,
    },
    /// Older than the floor of a route waiting on a settlement or contract end.
    #[error(
        "start_time is more than {floor} before the clock ({now}), the oldest a route waiting on a settlement or contract end accepts"
    )]
    Floor {
        /// The floor, e.g. `3650 days`.
        floor: String,
        /// The clock.
        now: Millis,
    },
}

/// The accepted record times at one clock.
#[derive(Clone, Debug)]
pub struct TimeBounds {
    now: Millis,
    earliest: Millis,
    latest: Millis,
    /// Whether `earliest` is the anchored floor (else an event-time route's reach).
    floor: bool,
    limits: TimeLimits,
    policy: String,
}

/// A duration as people write it: `1 day`, `3650 days`, `1 h`, `90 s`, `250 ms`.
pub fn describe_ms(ms: i64) -> String {
    match ms {
        DAY_MS => "1 day".into(),
        ms if ms != 0 && ms % DAY_MS == 0 => format!("{} days", ms / DAY_MS),
        ms if ms != 0 && ms % 3_600_000 == 0 => format!("{} h", ms / 3_600_000),
        ms if ms != 0 && ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms if ms != 0 && ms % 1_000 == 0 => format!("{} s", ms / 1_000),
        ms => format!("{ms} ms"),
    }
}

impl TimeBounds {
    /// The bounds of `policy` at `now`.
    pub fn new(policy: &Policy, now: Millis, limits: TimeLimits) -> TimeBounds {
        let floor_at = Millis(now.0.saturating_sub(limits.anchored_floor_ms));
        let mut earliest: Option<(Millis, bool)> = None;
        for r in policy.declared() {
            let ret = &r.retention;
            let (e, floor) = match ret.anchor {
                Anchor::EventTime => {
                    // The first day whose window is still open at `now`: the deadline
                    // (the period after the day's end) grows with the day, so search.
                    let open = |day: i64| ret.period.after(Millis((day + 1) * DAY_MS)) > now;
                    let (mut lo, mut hi) = (
                        now.0.div_euclid(DAY_MS) - ret.period.shortest_ms() / DAY_MS * 2 - 400,
                        now.0.div_euclid(DAY_MS) + 1,
                    );
                    while lo < hi {
                        let mid = lo + (hi - lo) / 2;
                        if open(mid) { hi = mid } else { lo = mid + 1 }
                    }
                    (Millis(lo * DAY_MS), false)
                }
                Anchor::InvoiceSettled | Anchor::ContractEnd => (floor_at, true),
            };
            if earliest.is_none_or(|(x, _)| e < x) {
                earliest = Some((e, floor));
            }
        }
        let (earliest, floor) = earliest.unwrap_or((floor_at, true));
        TimeBounds {
            now,
            earliest,
            latest: Millis(now.0.saturating_add(limits.max_future_ms)),
            floor,
            limits,
            policy: policy.tag.clone(),
        }
    }

    /// The oldest record time accepted.
    pub fn earliest(&self) -> Millis {
        self.earliest
    }

    /// Whether a record at `t` may be processed.
    pub fn check(&self, t: Millis) -> Result<(), OutOfBounds> {
        if t > self.latest {
            return Err(OutOfBounds::Future {
                tolerance: describe_ms(self.limits.max_future_ms),
                now: self.now,
            });
        }
        if t < self.earliest {
            return Err(if self.floor {
                OutOfBounds::Floor {
                    floor: describe_ms(self.limits.anchored_floor_ms),
                    now: self.now,
                }
            } else {
                OutOfBounds::Expired {
                    earliest: self.earliest,
                    now: self.now,
                    policy: self.policy.clone(),
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::retention::event_time_deadline;
    use crate::vocab::purpose::Purpose;

    fn policy(name: &str) -> Policy {
        crate::policy::parse_policy(crate::policy::shipped(name).unwrap(), name).unwrap()
    }

    fn t(s: &str) -> Millis {
        Millis::parse(s).unwrap()
    }

    #[test]
    fn future_records_beyond_the_tolerance_are_refused() {
        let now = t("2026-12-01T00:00:00.000Z");
        let b = TimeBounds::new(&policy("excedo"), now, TimeLimits::default());
        assert_eq!(b.check(t("2026-12-02T00:00:00.000Z")), Ok(()));
        let e = b.check(t("2026-12-02T00:00:00.001Z")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "start_time is more than 1 day after the clock (2026-12-01T00:00:00.000Z)"
        );
        assert!(b.check(t("9999-12-31T23:59:59.999Z")).is_err());
    }

    #[test]
    fn a_route_waiting_on_an_anchor_keeps_ten_years_then_the_floor_refuses() {
        // Excedo bills on invoice settlement: ancient records stop at the floor.
        let now = t("2026-12-01T00:00:00.000Z");
        let b = TimeBounds::new(&policy("excedo"), now, TimeLimits::default());
        assert_eq!(b.check(t("2017-01-01T00:00:00.000Z")), Ok(()));
        for old in [
            "1970-01-01T00:00:00.000Z",
            "1900-01-01T00:00:00.000Z",
            "0001-01-01T00:00:00.000Z",
        ] {
            let e = b.check(t(old)).unwrap_err();
            assert!(matches!(e, OutOfBounds::Floor { .. }), "{e}");
            assert!(e.to_string().contains("3650 days"), "{e}");
        }
    }

    #[test]
    fn without_an_anchored_route_the_longest_event_time_rule_decides() {
        // Excedo without its anchored routes (billing on settlement, troubleshooting on
        // contract end): fraud, analytics and marketing keep copies from the event on.
        let mut p = policy("excedo");
        p.purposes[Purpose::Billing as usize] = None;
        p.purposes[Purpose::Troubleshooting as usize] = None;
        assert!(
            p.declared()
                .all(|r| r.retention.anchor == Anchor::EventTime)
        );
        for now in ["2026-12-01T12:00:00.000Z", "2026-03-01T00:00:00.000Z"] {
            let now = t(now);
            let b = TimeBounds::new(&p, now, TimeLimits::default());
            let e = b.earliest();
            assert_eq!(e.0 % DAY_MS, 0);
            let kept = |x: Millis| {
                p.declared()
                    .any(|r| event_time_deadline(&r.retention, x) > now)
            };
            assert!(kept(e), "the earliest accepted day is still kept somewhere");
            assert!(!kept(Millis(e.0 - 1)), "the day before is kept nowhere");
            assert_eq!(b.check(e), Ok(()));
            let err = b.check(Millis(e.0 - 1)).unwrap_err();
            assert!(matches!(err, OutOfBounds::Expired { .. }), "{err}");
            assert!(err.to_string().contains("excedo@"), "{err}");
        }
    }
}
