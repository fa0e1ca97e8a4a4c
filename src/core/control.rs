//! Subscriber control events (consent, objection, restriction, erasure, contract end,
//! invoice settlement) as DESIGN.md fixes them, and the per-subscriber state they build.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::policy::Policy;
use crate::vocab::purpose::{Purpose, PurposeSet};
use crate::vocab::time::{HOUR_MS, Millis};

/// What a control event sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Consent for a purpose granted (`true`) or withdrawn.
    Consent {
        /// The purpose consented to.
        purpose: Purpose,
        /// Granted or withdrawn.
        granted: bool,
    },
    /// Objection to a purpose (Art. 21).
    Objection {
        /// The purpose objected to.
        purpose: Purpose,
    },
    /// Restriction of processing (Art. 18) switched on or off.
    Restriction {
        /// Whether restriction is in force.
        active: bool,
    },
    /// Erasure request (Art. 17).
    Erasure,
    /// The contract ended: starts `contract_end` clocks.
    ContractEnded,
    /// An invoice was settled: starts `invoice_settled` clocks for that period.
    InvoiceSettled {
        /// First instant of the invoiced period.
        period_start: Millis,
        /// End of the invoiced period (exclusive).
        period_end: Millis,
    },
}

impl Change {
    /// The purpose a consent or objection event names when it changes nothing under this
    /// policy: a consent for a purpose neither declared nor whose consent a declared
    /// purpose takes, an objection to a purpose not declared. Such an event usually means
    /// that the consent system and the policy name purposes differently, so it is counted
    /// and reported rather than passed over.
    pub fn undeclared_purpose(&self, policy: &Policy) -> Option<Purpose> {
        match *self {
            Change::Consent { purpose, .. }
                if policy.rule(purpose).is_none()
                    && !policy.declared().any(|r| r.consent_key == Some(purpose)) =>
            {
                Some(purpose)
            }
            Change::Objection { purpose } if policy.rule(purpose).is_none() => Some(purpose),
            _ => None,
        }
    }
}

/// One control event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlEvent {
    /// The subscriber, E.164.
    pub msisdn: String,
    /// When it took effect.
    pub at: Millis,
    /// What it sets.
    pub change: Change,
}

/// The wire form: every field optional so that a wrong combination gets a precise reason.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawControl<'a> {
    /// Event type.
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// Subscriber.
    #[serde(borrow)]
    pub msisdn: Cow<'a, str>,
    /// Effective time.
    pub at: Millis,
    /// consent, objection.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Cow<'a, str>>,
    /// consent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<bool>,
    /// restriction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// invoice_settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<Millis>,
    /// invoice_settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_end: Option<Millis>,
}

/// Why a control event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control event: {0}")]
pub struct ControlError(pub String);

/// The event types, as the `type` field names them.
const TYPES: [&str; 6] = [
    "consent",
    "objection",
    "restriction",
    "erasure",
    "contract_ended",
    "invoice_settled",
];

impl RawControl<'_> {
    /// Checks the combination of fields the type needs and builds the event. A reason
    /// never repeats a value of the event: any of them may be a phone number.
    pub fn into_event(self) -> Result<ControlEvent, ControlError> {
        // Only a known type is named in a reason, and then as our own text.
        let Some(kind) = TYPES.iter().copied().find(|t| *t == self.kind) else {
            return Err(ControlError(format!(
                "unknown type (its value is not repeated); types are {}",
                TYPES.join(", ")
            )));
        };
        let err = |m: &str| Err(ControlError(format!("{kind} event {m}")));
        let purpose = match self.purpose.as_deref().map(Purpose::from_id) {
            Some(None) => return err("names an unknown purpose"),
            Some(Some(p)) => Some(p),
            None => None,
        };
        let extra = |allowed: [bool; 5]| {
            let present = [
                self.purpose.is_some(),
                self.granted.is_some(),
                self.active.is_some(),
                self.period_start.is_some(),
                self.period_end.is_some(),
            ];
            present.iter().zip(allowed).any(|(p, a)| *p && !a)
        };
        let change = match kind {
            "consent" => match (purpose, self.granted) {
                (Some(purpose), Some(granted)) if !extra([true, true, false, false, false]) => {
                    Change::Consent { purpose, granted }
                }
                _ => return err("needs exactly `purpose` and `granted`"),
            },
            "objection" => match purpose {
                Some(purpose) if !extra([true, false, false, false, false]) => {
                    Change::Objection { purpose }
                }
                _ => return err("needs exactly `purpose`"),
            },
            "restriction" => match self.active {
                Some(active) if !extra([false, false, true, false, false]) => {
                    Change::Restriction { active }
                }
                _ => return err("needs exactly `active`"),
            },
            "erasure" if !extra([false; 5]) => Change::Erasure,
            "contract_ended" if !extra([false; 5]) => Change::ContractEnded,
            "invoice_settled" => match (self.period_start, self.period_end) {
                // Invoice-anchored windows are hour buckets: a period edge inside an hour
                // would cut a window in two, so such a period is refused, not guessed at.
                (Some(s), Some(e)) if s < e && (s.0 % HOUR_MS != 0 || e.0 % HOUR_MS != 0) => {
                    return err("needs `period_start` and `period_end` on whole UTC hours \
                         (invoice retention windows are hour buckets)");
                }
                (Some(s), Some(e)) if s < e && !extra([false, false, false, true, true]) => {
                    Change::InvoiceSettled {
                        period_start: s,
                        period_end: e,
                    }
                }
                _ => return err("needs `period_start` before `period_end` and nothing else"),
            },
            // "erasure" and "contract_ended" with extra fields: the types are checked above.
            _ => return err("takes no extra fields"),
        };
        if !super::record::is_e164(&self.msisdn) {
            return err("has an msisdn that is not E.164");
        }
        Ok(ControlEvent {
            msisdn: self.msisdn.to_string(),
            at: self.at,
            change,
        })
    }
}

impl ControlEvent {
    /// The compaction key: what the event sets, so the latest of each survives.
    pub fn key(&self) -> String {
        let m = &self.msisdn;
        match &self.change {
            Change::Consent { purpose, .. } => format!("{m}/consent/{}", purpose.id()),
            Change::Objection { purpose } => format!("{m}/objection/{}", purpose.id()),
            Change::Restriction { .. } => format!("{m}/restriction"),
            Change::Erasure => format!("{m}/erasure"),
            Change::ContractEnded => format!("{m}/contract_ended"),
            Change::InvoiceSettled { period_start, .. } => {
                format!("{m}/invoice_settled/{period_start}")
            }
        }
    }

    /// The wire form.
    pub fn to_raw(&self) -> RawControl<'_> {
        let mut r = RawControl {
            msisdn: Cow::Borrowed(&self.msisdn),
            at: self.at,
            ..Default::default()
        };
        match &self.change {
            Change::Consent { purpose, granted } => {
                r.kind = "consent".into();
                r.purpose = Some(purpose.id().into());
                r.granted = Some(*granted);
            }
            Change::Objection { purpose } => {
                r.kind = "objection".into();
                r.purpose = Some(purpose.id().into());
            }
            Change::Restriction { active } => {
                r.kind = "restriction".into();
                r.active = Some(*active);
            }
            Change::Erasure => r.kind = "erasure".into(),
            Change::ContractEnded => r.kind = "contract_ended".into(),
            Change::InvoiceSettled {
                period_start,
                period_end,
            } => {
                r.kind = "invoice_settled".into();
                r.period_start = Some(*period_start);
                r.period_end = Some(*period_end);
            }
        }
        r
    }
}

/// What the core needs to know about one subscriber when routing a record.
///
/// Small and `Copy` so a consent store can hand out snapshots without holding a lock
/// while the record is processed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriberState {
    /// Purposes with consent granted.
    pub consented: PurposeSet,
    /// Purposes objected to.
    pub objected: PurposeSet,
    /// Restriction of processing in force.
    pub restricted: bool,
    /// When the contract ended, if it has.
    pub contract_ended: Option<Millis>,
    /// When the latest erasure request took effect, if there was one. Purposes whose
    /// erasure effect is `expire` get no copy from then on (see [`Self::erased`]).
    pub erased_at: Option<Millis>,
    /// Consent purposes granted again after that erasure: a new consent, given after the
    /// request, lifts it for the purposes it grants.
    pub regranted: PurposeSet,
    /// The latest invoice settlement, so a record arriving after its retention already
    /// ran out is not copied.
    pub settled: Option<Settled>,
}

/// How far a subscriber's invoices are settled: every record before `through` belongs to
/// a settled period, settled at or before `at`.
///
/// That holds when a subscriber's invoices are settled in period order (the README's
/// assumption): the latest settlement then bounds every earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settled {
    /// The end of the latest settled period (exclusive).
    pub through: Millis,
    /// The latest settlement time.
    pub at: Millis,
}

impl SubscriberState {
    /// Applies an event's routing effect, from the next record on. Invoice settlement
    /// changes no routing; it only lets a late record be recognised as already expired.
    pub fn apply(&mut self, change: &Change, at: Millis) {
        match change {
            Change::Consent { purpose, granted } => {
                self.consented.set(*purpose, *granted);
                // Only a consent dated after the erasure lifts it; events may reach a
                // Kafka consumer out of `at` order, and an older grant must not.
                if self.erased_at.is_some_and(|e| at > e) {
                    self.regranted.set(*purpose, *granted);
                }
            }
            Change::Objection { purpose } => self.objected.set(*purpose, true),
            Change::Restriction { active } => self.restricted = *active,
            Change::ContractEnded => self.contract_ended = Some(at),
            Change::Erasure => {
                if self.erased_at.is_none_or(|e| at >= e) {
                    if self.erased_at != Some(at) {
                        self.regranted = PurposeSet::EMPTY;
                    }
                    self.erased_at = Some(at);
                }
            }
            Change::InvoiceSettled { period_end, .. } => {
                let s = self.settled.get_or_insert(Settled {
                    through: *period_end,
                    at,
                });
                s.through = s.through.max(*period_end);
                s.at = s.at.max(at);
            }
        }
    }

    /// Whether an erasure stops copies for a purpose whose erasure effect is `expire`
    /// and whose consent (if any) is `consent_key`: from the request on, until that
    /// consent is granted again after it. A purpose without consent stays stopped.
    pub fn erased(&self, consent_key: Option<Purpose>) -> bool {
        self.erased_at.is_some() && !consent_key.is_some_and(|k| self.regranted.contains(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ControlEvent, String> {
        let raw: RawControl = serde_json::from_str(s).map_err(|e| e.to_string())?;
        raw.into_event().map_err(|e| e.to_string())
    }

    #[test]
    fn events_parse_and_round_trip() {
        let escaped =
            r#"{"type":"erasure","msisdn":"\u002b46701234567","at":"2026-01-01T00:00:00.000Z"}"#;
        assert_eq!(parse(escaped).unwrap().msisdn, "+46701234567");
        let s = r#"{"type":"consent","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"marketing","granted":true}"#;
        let e = parse(s).unwrap();
        assert_eq!(e.key(), "+46701234567/consent/marketing");
        assert_eq!(serde_json::to_string(&e.to_raw()).unwrap(), s);
        let s = r#"{"type":"invoice_settled","msisdn":"+46701234567","at":"2026-02-05T00:00:00.000Z","period_start":"2026-01-01T00:00:00.000Z","period_end":"2026-02-01T00:00:00.000Z"}"#;
        assert!(matches!(
            parse(s).unwrap().change,
            Change::InvoiceSettled { .. }
        ));
    }

    #[test]
    fn wrong_combinations_are_refused_with_a_reason() {
        let e = parse(
            r#"{"type":"consent","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"marketing"}"#,
        );
        assert!(
            e.unwrap_err()
                .contains("needs exactly `purpose` and `granted`")
        );
        let e = parse(
            r#"{"type":"objection","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","purpose":"spam"}"#,
        );
        assert!(e.unwrap_err().contains("unknown purpose"));
        let e = parse(
            r#"{"type":"erasure","msisdn":"+46701234567","at":"2026-01-01T00:00:00.000Z","colour":"red"}"#,
        );
        assert!(e.unwrap_err().contains("unknown field"));
    }

    /// Regression: an unknown `type` was echoed (up to 32 characters) in the reason, and
    /// with an unknown purpose the whole of it was; a feed that puts a phone number there
    /// would have put it in the dead letter's reason.
    #[test]
    fn reasons_never_repeat_a_value_of_the_event() {
        let at = r#""at":"2026-01-01T00:00:00.000Z""#;
        for line in [
            format!(r#"{{"type":"+46701234567","msisdn":"+46709876543",{at}}}"#),
            format!(
                r#"{{"type":"+46701234567","msisdn":"+46709876543",{at},"purpose":"+46701234567"}}"#
            ),
            format!(
                r#"{{"type":"consent","msisdn":"+46709876543",{at},"purpose":"+46701234567","granted":true}}"#
            ),
            format!(r#"{{"type":"erasure","msisdn":"+46701234567",{at},"active":true}}"#),
            format!(r#"{{"type":"erasure","msisdn":"070-123 45 67",{at}}}"#),
        ] {
            let e = parse(&line).unwrap_err();
            assert!(
                !e.contains("4670") && !e.contains("123 45"),
                "{e} repeats a value"
            );
        }
        let e = parse(&format!(
            r#"{{"type":"+46701234567","msisdn":"+46709876543",{at}}}"#
        ))
        .unwrap_err();
        assert_eq!(
            e,
            "control event: unknown type (its value is not repeated); types are consent, objection, restriction, erasure, contract_ended, invoice_settled"
        );
    }

    #[test]
    fn state_follows_events() {
        let mut s = SubscriberState::default();
        let at = Millis(0);
        s.apply(
            &Change::Consent {
                purpose: Purpose::Marketing,
                granted: true,
            },
            at,
        );
        assert!(s.consented.contains(Purpose::Marketing));
        s.apply(
            &Change::Consent {
                purpose: Purpose::Marketing,
                granted: false,
            },
            at,
        );
        assert!(!s.consented.contains(Purpose::Marketing));
        s.apply(&Change::Restriction { active: true }, at);
        assert!(s.restricted);
    }
    fn grant(p: Purpose, granted: bool) -> Change {
        Change::Consent {
            purpose: p,
            granted,
        }
    }

    #[test]
    fn erasure_holds_until_consent_is_granted_after_it() {
        let mut s = SubscriberState::default();
        let a = Some(Purpose::Analytics);
        let m = Some(Purpose::Marketing);
        assert!(!s.erased(a));
        s.apply(&grant(Purpose::Analytics, true), Millis(10));
        s.apply(&Change::Erasure, Millis(20));
        assert!(s.erased(a) && s.erased(m) && s.erased(None));
        // The consent given before the erasure stays recorded but no longer lifts it.
        assert!(s.consented.contains(Purpose::Analytics));
        // A grant dated at the erasure, or before it (arriving late), does not lift it.
        s.apply(&grant(Purpose::Analytics, true), Millis(20));
        s.apply(&grant(Purpose::Analytics, true), Millis(15));
        assert!(s.erased(a));
        // A grant after it does, for that purpose only; a purpose without consent stays.
        s.apply(&grant(Purpose::Analytics, true), Millis(30));
        assert!(!s.erased(a) && s.erased(m) && s.erased(None));
        // Withdrawn again, then a newer erasure: erased again until a newer grant.
        s.apply(&grant(Purpose::Analytics, false), Millis(40));
        assert!(s.erased(a));
        s.apply(&grant(Purpose::Analytics, true), Millis(50));
        s.apply(&Change::Erasure, Millis(60));
        assert!(s.erased(a));
        // An older erasure arriving late changes nothing.
        s.apply(&grant(Purpose::Analytics, true), Millis(70));
        s.apply(&Change::Erasure, Millis(55));
        assert!(!s.erased(a));
        assert_eq!(s.erased_at, Some(Millis(60)));
    }

    #[test]
    fn settlements_keep_the_latest_period_end_and_time() {
        let mut s = SubscriberState::default();
        let settle = |s: &mut SubscriberState, start, end, at| {
            s.apply(
                &Change::InvoiceSettled {
                    period_start: Millis(start),
                    period_end: Millis(end),
                },
                Millis(at),
            )
        };
        settle(&mut s, 100, 200, 250);
        assert_eq!(
            s.settled,
            Some(Settled {
                through: Millis(200),
                at: Millis(250)
            })
        );
        // An older period arriving late neither moves the end back nor the time.
        settle(&mut s, 0, 100, 150);
        assert_eq!(
            s.settled,
            Some(Settled {
                through: Millis(200),
                at: Millis(250)
            })
        );
        settle(&mut s, 200, 300, 320);
        assert_eq!(
            s.settled,
            Some(Settled {
                through: Millis(300),
                at: Millis(320)
            })
        );
    }

    #[test]
    fn state_stays_small_and_copy() {
        fn copy<T: Copy>() {}
        copy::<SubscriberState>();
        assert!(std::mem::size_of::<SubscriberState>() <= 64);
    }

    #[test]
    fn invoice_periods_off_the_hour_are_refused() {
        let at = r#""at":"2026-04-05T00:00:00.000Z""#;
        let ev = |s: &str, e: &str| {
            parse(&format!(
                r#"{{"type":"invoice_settled","msisdn":"+46701234567",{at},"period_start":"{s}","period_end":"{e}"}}"#
            ))
        };
        assert!(ev("2026-03-01T00:00:00.000Z", "2026-04-01T00:00:00.000Z").is_ok());
        for (s, e) in [
            ("2026-03-01T00:30:00.000Z", "2026-04-01T00:00:00.000Z"),
            ("2026-03-01T00:00:00.000Z", "2026-04-01T00:00:00.001Z"),
        ] {
            let err = ev(s, e).unwrap_err();
            assert!(err.contains("whole UTC hours"), "{err}");
        }
        assert!(
            ev("2026-04-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z")
                .unwrap_err()
                .contains("before `period_end`")
        );
    }
}
