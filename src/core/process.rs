//! `process`: one record, the subscriber's state and the time in; one copy per allowed
//! purpose out, each with its envelope and retention-schedule entry.

use arrayvec::ArrayVec;
use serde::Serialize;
use smallvec::SmallVec;

use super::control::SubscriberState;
use super::pseudonym::Keyring;
use super::record::{CloseCause, Kind, Rat, Record};
use super::retention::ScheduleEntry;
use super::treat::{self, CellOut, Text, Treated, UsageOut};
use crate::policy::{Anchor, ConsentFacts, Policy, PurposeRule, Retention};
use crate::vocab::consent::ConsentTag;
use crate::vocab::purpose::{Field, Purpose};
use crate::vocab::time::Millis;
use crate::vocab::treatment::Treatment;

/// What happened for one purpose, for counting and for the demo's summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The policy does not declare the purpose: never routed.
    NotDeclared,
    /// A copy was made.
    Copied,
    /// An anonymised copy was made in place of a consent-based one.
    Anonymised,
    /// No copy: consent required and not given.
    NoConsent,
    /// No copy: the subscriber objected.
    Objected,
    /// No copy: processing is restricted.
    Restricted,
    /// No copy: its retention had already run out when the record arrived.
    Expired,
    /// No copy: the subscriber asked for erasure and the purpose is not held through it
    /// (and, for a consent-based purpose, no consent was given after the request).
    Erased,
}

impl Outcome {
    /// Every outcome, for fixed-size counters.
    pub const ALL: [Outcome; 8] = [
        Outcome::NotDeclared,
        Outcome::Copied,
        Outcome::Anonymised,
        Outcome::NoConsent,
        Outcome::Objected,
        Outcome::Restricted,
        Outcome::Expired,
        Outcome::Erased,
    ];
    /// The label value.
    pub const fn id(self) -> &'static str {
        match self {
            Outcome::NotDeclared => "not_declared",
            Outcome::Copied => "copied",
            Outcome::Anonymised => "anonymised",
            Outcome::NoConsent => "no_consent",
            Outcome::Objected => "objected",
            Outcome::Restricted => "restricted",
            Outcome::Expired => "expired",
            Outcome::Erased => "erased",
        }
    }
}

/// The privacy envelope of one copy (DESIGN.md "Copies").
#[derive(Clone, Debug)]
pub struct Envelope<'a> {
    /// The record id as this copy may carry it (a pseudonym where the copy drops it);
    /// `None` for an anonymised copy, which must not link back to the record.
    pub record_id: Option<Text<'a>>,
    /// The purpose, which is also the route.
    pub purpose: Purpose,
    /// Basis id, e.g. `contract`; `anonymous` for an anonymised copy.
    pub legal_basis: &'static str,
    /// Article, e.g. `6(1)(b)`; `recital 26` (not personal data) when anonymised.
    pub gdpr_article: &'static str,
    /// `policy@version`.
    pub policy: &'a str,
    /// Consent state behind the copy.
    pub consent: ConsentTag,
    /// The field map applied.
    pub treatments: &'a [Treatment; Field::COUNT],
    /// Fields present in the input (bit per field), so only changed ones are listed.
    pub present: u32,
    /// Key id of pseudonyms and tokens in this copy.
    pub key_id: Option<&'a str>,
    /// The retention rule.
    pub retention: &'a Retention,
    /// What holds for every copy of this purpose in this consent state (decided when
    /// the policy was loaded).
    pub facts: &'a ConsentFacts,
}

impl Envelope<'_> {
    /// The fields this copy changed, with their treatment, in record order.
    pub fn changed(&self) -> impl Iterator<Item = (Field, Treatment)> + '_ {
        Field::ALL.into_iter().filter_map(move |f| {
            let t = self.treatments[f as usize];
            (self.present & (1 << f as u32) != 0 && t != Treatment::Keep).then_some((f, t))
        })
    }
}

/// The text values a copy's treatments computed (pseudonyms, tokens, masked and
/// generalised text): one for each text field the input carries whose treatment is
/// neither keep nor drop (`ConsentFacts::computed`), in record order. Most copies hold
/// none and the most any shipped policy computes is three, inline.
pub type Computed<'a> = SmallVec<[Option<Text<'a>>; 4]>;

/// One copy: the record as its purpose may see it, and its envelope.
///
/// The treated record is not built: a copy is the input record, the field map (in the
/// envelope) and the values the map computed. Kept fields are read from the record where
/// they are written, and the encoders write a copy straight from these; building a
/// treated record of about a kilobyte per copy, then reading it back, cost more than the
/// encoding itself. [`Copy::record`] builds it where one is wanted.
#[derive(Clone, Debug)]
pub struct Copy<'a> {
    /// The input record.
    pub source: &'a Record<'a>,
    /// The values the field map computed.
    pub computed: Computed<'a>,
    /// Tags, also sent as Kafka headers.
    pub envelope: Envelope<'a>,
    /// When the record happened (kept even where the copy generalises its time).
    pub record_time: Millis,
    /// Whether the copy's msisdn is the route's subscriber reference (false for anonymised
    /// copies and routes that drop it).
    pub names_subscriber: bool,
}

impl<'a> Copy<'a> {
    #[inline(always)]
    fn treatment(&self, f: Field) -> Treatment {
        self.envelope.treatments[f as usize]
    }

    /// Text field `f` as the copy carries it (`None` for a field that is not text).
    #[inline(always)]
    pub fn text(&self, f: Field) -> Option<&str> {
        let v = treat::text_value(self.source, f)?;
        match self.treatment(f) {
            Treatment::Keep => Some(v),
            Treatment::Drop => None,
            _ => self.computed_text(f).map(Text::as_str),
        }
    }

    /// The computed value of text field `f`: the values are in record order, so it is
    /// preceded by one for every computed field before it that the input carries.
    fn computed_text(&self, f: Field) -> Option<&Text<'a>> {
        let e = &self.envelope;
        let before = e.facts.computed & e.present & ((1u32 << f as u32) - 1);
        self.computed.get(before.count_ones() as usize)?.as_ref()
    }

    /// The record kind, where the copy carries it.
    #[inline(always)]
    pub fn kind(&self) -> Option<Kind> {
        treat::plain(self.treatment(Field::Kind), self.source.kind)
    }

    /// The start time as the copy carries it.
    #[inline(always)]
    pub fn start_time(&self) -> Option<Millis> {
        treat::start_time(self.treatment(Field::StartTime), self.source.start_time)
    }

    /// The duration as the copy carries it.
    #[inline(always)]
    pub fn duration_s(&self) -> Option<u32> {
        treat::duration(self.treatment(Field::DurationS), self.source.duration_s)
    }

    /// The close cause, where the copy carries it.
    #[inline(always)]
    pub fn close_cause(&self) -> Option<CloseCause> {
        treat::plain(self.treatment(Field::CloseCause), self.source.close_cause)
    }

    /// The serving cell as the copy carries it.
    #[inline(always)]
    pub fn cell(&self) -> Option<CellOut<'a>> {
        treat::cell(self.treatment(Field::Cell), self.source.cell.as_ref())
    }

    /// The charging id, where the copy carries it.
    #[inline(always)]
    pub fn charging_id(&self) -> Option<u64> {
        self.source
            .charging_id
            .and_then(|c| treat::plain(self.treatment(Field::ChargingId), c))
    }

    /// The radio technology, where the copy carries it.
    #[inline(always)]
    pub fn rat(&self) -> Option<Rat> {
        treat::plain(self.treatment(Field::Rat), self.source.rat)
    }

    /// The volumes as the copy carries them.
    #[inline(always)]
    pub fn usage(&self) -> Option<UsageOut<'a>> {
        treat::usage(self.treatment(Field::Usage), self.source.usage.as_deref())
    }

    /// The sequence number, where the copy carries it.
    #[inline(always)]
    pub fn local_seq_no(&self) -> Option<u64> {
        treat::plain(self.treatment(Field::LocalSeqNo), self.source.local_seq_no)
    }

    /// The treated record: the input's field names, dropped fields absent.
    pub fn record(&self) -> Treated<'a> {
        let text = |f: Field| match (treat::text_value(self.source, f), self.treatment(f)) {
            (None, _) | (_, Treatment::Drop) => None,
            (Some(v), Treatment::Keep) => Some(Text::Raw(v)),
            _ => self.computed_text(f).cloned(),
        };
        Treated {
            record_id: text(Field::RecordId),
            kind: self.kind(),
            msisdn: text(Field::Msisdn),
            imsi: text(Field::Imsi),
            imei: text(Field::Imei),
            other_party: text(Field::OtherParty),
            start_time: self.start_time(),
            duration_s: self.duration_s(),
            close_cause: self.close_cause(),
            cell: self.cell(),
            serving_plmn: text(Field::ServingPlmn),
            service_centre: text(Field::ServiceCentre),
            apn: text(Field::Apn),
            charging_id: self.charging_id(),
            rat: self.rat(),
            ue_ip: text(Field::UeIp),
            usage: self.usage(),
            recording_entity: text(Field::RecordingEntity),
            local_seq_no: self.local_seq_no(),
        }
    }

    /// The retention-schedule entry for this copy.
    pub fn schedule_entry(&self) -> ScheduleEntry<'_> {
        ScheduleEntry {
            purpose: self.envelope.purpose,
            subscriber: if self.names_subscriber {
                self.text(Field::Msisdn)
            } else {
                None
            },
            record_time: self.record_time,
            rule: self.envelope.retention,
        }
    }

    /// Whether this is an anonymised copy (made without consent, holding no personal
    /// data). Such copies must not be released in record order: their position among
    /// copies that carry times would tell their time (see the adapters' writers).
    pub fn is_anonymised(&self) -> bool {
        self.envelope.consent == ConsentTag::Absent
    }
}

/// Everything `process` decided for one record.
#[derive(Debug, Default)]
pub struct Decision<'a> {
    /// One copy per allowed purpose, in route order.
    pub copies: ArrayVec<Copy<'a>, { Purpose::COUNT }>,
    /// The outcome for every purpose, indexed by `Purpose as usize`.
    pub outcomes: [Option<Outcome>; Purpose::COUNT],
}

fn presence(r: &Record<'_>) -> u32 {
    let mut bits = 0u32;
    let mut on = |f: Field, p: bool| {
        if p {
            bits |= 1 << f as u32;
        }
    };
    for f in [
        Field::RecordId,
        Field::Kind,
        Field::Msisdn,
        Field::Imsi,
        Field::StartTime,
        Field::CloseCause,
        Field::ServingPlmn,
        Field::Rat,
        Field::RecordingEntity,
        Field::LocalSeqNo,
    ] {
        on(f, true);
    }
    on(Field::Imei, r.imei.is_some());
    on(Field::OtherParty, r.other_party.is_some());
    on(Field::DurationS, r.duration_s.is_some());
    on(Field::Cell, r.cell.is_some());
    on(Field::ServiceCentre, r.service_centre.is_some());
    on(Field::Apn, r.apn.is_some());
    on(Field::ChargingId, r.charging_id.is_some());
    on(Field::UeIp, r.ue_ip.is_some());
    on(Field::Usage, r.usage.is_some());
    bits
}

/// Whether a copy of this record would already be past its retention deadline.
fn expired_on_arrival(
    rule: &PurposeRule,
    r: &Record<'_>,
    s: &SubscriberState,
    now: Millis,
) -> bool {
    let ret = &rule.retention;
    match ret.anchor {
        // The same deadline the schedule gives the record's window, so a record is refused
        // only when its window would already have expired.
        // The deadline is at least the period after the record, so a younger record
        // needs no calendar arithmetic; a late one gets the exact test.
        Anchor::EventTime => {
            now.0.saturating_sub(r.start_time.0) >= ret.period.shortest_ms()
                && super::retention::event_time_deadline(ret, r.start_time) <= now
        }
        Anchor::ContractEnd => s.contract_ended.is_some_and(|t| ret.period.after(t) <= now),
        // A record arriving after its period was settled: with settlements in period
        // order, the latest one bounds its deadline.
        Anchor::InvoiceSettled => s
            .settled
            .is_some_and(|st| r.start_time < st.through && ret.period.after(st.at) <= now),
    }
}

/// Decides and builds every copy of one record. Pure: the same inputs give the same
/// copies; `now` only decides whether a late record's retention has already run out.
///
/// The record must have passed [`Record::validate`].
pub fn process<'a>(
    r: &'a Record<'_>,
    policy: &'a Policy,
    state: &SubscriberState,
    keys: &'a Keyring,
    now: Millis,
) -> Decision<'a> {
    let mut d = Decision::default();
    process_into(r, policy, state, keys, now, &mut d);
    d
}

/// [`process`] into a decision the caller owns (emptied first). A decision holds up to
/// six copies of about a kilobyte each, and returning one by value copies all of it:
/// hot loops declare one per record and pass it in.
pub fn process_into<'a>(
    r: &'a Record<'_>,
    policy: &'a Policy,
    state: &SubscriberState,
    keys: &'a Keyring,
    now: Millis,
    d: &mut Decision<'a>,
) {
    d.copies.clear();
    d.outcomes = [None; Purpose::COUNT];
    let present = presence(r);
    for p in Purpose::ALL {
        let Some(rule) = policy.rule(p) else {
            d.outcomes[p as usize] = Some(Outcome::NotDeclared);
            continue;
        };
        // An erasure voids the consent given before it; a purpose without consent stays
        // stopped. Anonymised copies hold no personal data, so the fallback remains.
        let erased = rule.erasure.stops && state.erased(rule.consent_key);
        let stopped = if state.restricted && rule.restriction.stops {
            Some(Outcome::Restricted)
        } else if state.objected.contains(p) && rule.objection.stops {
            Some(Outcome::Objected)
        } else if erased && rule.consent_key.is_none() {
            Some(Outcome::Erased)
        } else if expired_on_arrival(rule, r, state, now) {
            Some(Outcome::Expired)
        } else {
            None
        };
        if let Some(o) = stopped {
            d.outcomes[p as usize] = Some(o);
            continue;
        }
        let consented = rule.consent_key.map(|k| state.consented.contains(k));
        let (map, consent, anonymised) = match (consented, rule.anonymised.as_ref()) {
            (None, _) => (&rule.fields, ConsentTag::NotRequired, false),
            (Some(true), _) if !erased => (&rule.fields, ConsentTag::Granted, false),
            (Some(_), Some(anon)) => (anon, ConsentTag::Absent, true),
            (Some(given), None) => {
                d.outcomes[p as usize] = Some(if given {
                    Outcome::Erased
                } else {
                    Outcome::NoConsent
                });
                continue;
            }
        };
        let cx = treat::Ctx { purpose: p, keys };
        let copy_id = treat::text(
            &cx,
            Field::RecordId,
            map[Field::RecordId as usize],
            &r.record_id,
        );
        // Every copy names its record for de-duplication; where the copy may not carry the
        // raw id it gets this purpose's pseudonym of it instead.
        let record_id = match (&copy_id, anonymised) {
            (_, true) => None,
            (Some(id), false) => Some(id.clone()),
            (None, false) => Some(Text::Inline(keys.pseudonym(
                p,
                Field::RecordId.name(),
                &r.record_id,
            ))),
        };
        let facts = rule.facts(consent);
        let (legal_basis, gdpr_article) = facts.basis_tags;
        let uses_keys = matches!(record_id, Some(Text::Inline(_))) || facts.keyed;
        d.copies.push(Copy {
            source: r,
            computed: Computed::new(),
            envelope: Envelope {
                record_id,
                purpose: p,
                legal_basis,
                gdpr_article,
                policy: &policy.tag,
                consent,
                treatments: map,
                present,
                key_id: uses_keys.then(|| keys.key_id(p)),
                retention: &rule.retention,
                facts,
            },
            record_time: r.start_time,
            names_subscriber: !anonymised && rule.subscriber_field.is_some(),
        });
        // Computed where the copy is stored: a token is 72 bytes, so a move costs.
        let mut computed = facts.computed & present;
        if computed != 0
            && let Some(c) = d.copies.last_mut()
        {
            // The record id's value is computed already (the envelope needed it).
            if computed & 1 << Field::RecordId as u32 != 0 {
                c.computed.push(copy_id);
                computed &= computed - 1;
            }
            while computed != 0 {
                let f = Field::ALL[computed.trailing_zeros() as usize];
                computed &= computed - 1;
                let v = treat::text_value(r, f)
                    .and_then(|v| treat::derived(&cx, f, map[f as usize], v));
                c.computed.push(v);
            }
        }
        d.outcomes[p as usize] = Some(if anonymised {
            Outcome::Anonymised
        } else {
            Outcome::Copied
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::control::{Change, Settled};
    use crate::core::pseudonym::MasterKey;

    const CALL: &str = r#"{"record_id":"r-1","kind":"moc","msisdn":"+46701234567","imsi":"240011234567890","imei":"356938035643809","other_party":"+46709876543","start_time":"2026-03-02T10:15:30.250Z","duration_s":125,"close_cause":"normal","cell":{"mcc":"240","mnc":"01","lac_or_tac":1201,"cell_id":987654},"serving_plmn":"24001","rat":"lte","recording_entity":"msc-sto-1","local_seq_no":1}"#;

    fn policy(name: &str) -> Policy {
        let text = crate::policy::shipped(name).expect("shipped policy");
        crate::policy::parse_policy(text, name).expect("policy loads")
    }

    fn keys() -> Keyring {
        Keyring::new(&[MasterKey::new("t", &[5u8; 32]).expect("key")]).expect("keyring")
    }

    fn record() -> Record<'static> {
        let r: Record<'static> = serde_json::from_str(CALL).expect("record");
        r.validate().expect("valid");
        r
    }

    fn t(s: &str) -> Millis {
        Millis::parse(s).expect("time")
    }

    /// The record's start time: the stream as it happened.
    fn now() -> Millis {
        t("2026-03-02T10:15:30.250Z")
    }

    fn state(changes: &[(Change, &str)]) -> SubscriberState {
        let mut s = SubscriberState::default();
        for (c, at) in changes {
            s.apply(c, t(at));
        }
        s
    }

    fn grant(p: Purpose) -> (Change, &'static str) {
        (
            Change::Consent {
                purpose: p,
                granted: true,
            },
            "2026-01-01T00:00:00.000Z",
        )
    }

    fn outcome(policy: &Policy, s: &SubscriberState, now: Millis, p: Purpose) -> Outcome {
        let r = record();
        let k = keys();
        let d = process(&r, policy, s, &k, now);
        d.outcomes[p as usize].expect("every purpose has an outcome")
    }

    #[test]
    fn consent_decides_consent_based_purposes_only() {
        let p = policy("excedo");
        let none = SubscriberState::default();
        assert_eq!(
            outcome(&p, &none, now(), Purpose::Analytics),
            Outcome::NoConsent
        );
        assert_eq!(
            outcome(&p, &none, now(), Purpose::Marketing),
            Outcome::NoConsent
        );
        assert_eq!(outcome(&p, &none, now(), Purpose::Billing), Outcome::Copied);
        assert_eq!(
            outcome(&p, &none, now(), Purpose::CustomerCare),
            Outcome::NotDeclared
        );
        let s = state(&[grant(Purpose::Analytics)]);
        assert_eq!(outcome(&p, &s, now(), Purpose::Analytics), Outcome::Copied);
        assert_eq!(
            outcome(&p, &s, now(), Purpose::Marketing),
            Outcome::NoConsent
        );
    }

    #[test]
    fn restriction_then_objection_then_erasure_then_expiry_then_consent() {
        let p = policy("excedo");
        let a = Purpose::Analytics;
        let objection = (Change::Objection { purpose: a }, "2026-02-01T00:00:00.000Z");
        let restriction = (
            Change::Restriction { active: true },
            "2026-02-01T00:00:00.000Z",
        );
        let erasure = (Change::Erasure, "2026-02-01T00:00:00.000Z");
        let all = state(&[grant(a), objection.clone(), restriction, erasure.clone()]);
        assert_eq!(outcome(&p, &all, now(), a), Outcome::Restricted);
        let s = state(&[grant(a), objection, erasure.clone()]);
        assert_eq!(outcome(&p, &s, now(), a), Outcome::Objected);
        // Erased outranks an expired record, which outranks missing consent.
        let late = t("2028-01-01T00:00:00.000Z");
        let s = state(&[grant(a), erasure]);
        assert_eq!(outcome(&p, &s, now(), a), Outcome::Erased);
        assert_eq!(
            outcome(&p, &s, late, Purpose::Troubleshooting),
            Outcome::Erased
        );
        let s = state(&[grant(a)]);
        assert_eq!(outcome(&p, &s, late, a), Outcome::Expired);
        assert_eq!(
            outcome(&p, &SubscriberState::default(), late, a),
            Outcome::Expired
        );
        // Billing and fraud continue under restriction and through an erasure (Excedo).
        let s = state(&[
            (
                Change::Restriction { active: true },
                "2026-02-01T00:00:00.000Z",
            ),
            (Change::Erasure, "2026-02-01T00:00:00.000Z"),
        ]);
        for q in [Purpose::Billing, Purpose::Fraud] {
            assert_eq!(outcome(&p, &s, now(), q), Outcome::Copied, "{q:?}");
        }
    }

    #[test]
    fn erasure_stops_routing_until_consent_is_granted_after_it() {
        let p = policy("excedo");
        let erased = state(&[
            grant(Purpose::Analytics),
            grant(Purpose::Marketing),
            (Change::Erasure, "2026-02-01T00:00:00.000Z"),
        ]);
        let r = record();
        let k = keys();
        let d = process(&r, &p, &erased, &k, now());
        let routed: Vec<Purpose> = d.copies.iter().map(|c| c.envelope.purpose).collect();
        // Troubleshooting rests on contract but is not held through an erasure.
        assert_eq!(routed, vec![Purpose::Billing, Purpose::Fraud]);
        for q in [
            Purpose::Analytics,
            Purpose::Marketing,
            Purpose::Troubleshooting,
        ] {
            assert_eq!(d.outcomes[q as usize], Some(Outcome::Erased), "{q:?}");
        }
        let mut again = erased;
        again.apply(
            &Change::Consent {
                purpose: Purpose::Marketing,
                granted: true,
            },
            t("2026-02-02T00:00:00.000Z"),
        );
        assert_eq!(
            outcome(&p, &again, now(), Purpose::Marketing),
            Outcome::Copied
        );
        assert_eq!(
            outcome(&p, &again, now(), Purpose::Analytics),
            Outcome::Erased
        );
        // Without consent the label stays no_consent: the erasure stopped nothing.
        let s = state(&[(Change::Erasure, "2026-02-01T00:00:00.000Z")]);
        assert_eq!(
            outcome(&p, &s, now(), Purpose::Analytics),
            Outcome::NoConsent
        );
    }

    #[test]
    fn after_an_erasure_an_anonymising_purpose_falls_back_to_its_anonymised_copy() {
        let p = policy("alleato");
        let s = state(&[
            grant(Purpose::Analytics),
            (Change::Erasure, "2026-02-01T00:00:00.000Z"),
        ]);
        let r = record();
        let k = keys();
        let d = process(&r, &p, &s, &k, now());
        let c = d
            .copies
            .iter()
            .find(|c| c.envelope.purpose == Purpose::Analytics)
            .expect("anonymised analytics copy");
        assert_eq!(c.envelope.consent, ConsentTag::Absent);
        assert_eq!(c.envelope.legal_basis, "anonymous");
        assert!(c.envelope.record_id.is_none() && c.envelope.key_id.is_none());
        assert!(!c.names_subscriber);
        assert_eq!(
            d.outcomes[Purpose::Analytics as usize],
            Some(Outcome::Anonymised)
        );
    }

    #[test]
    fn expired_on_arrival_uses_the_schedules_deadlines() {
        let p = policy("excedo");
        let none = SubscriberState::default();
        // Fraud: 6 months after the record's day ends (2026-03-03) = 2026-09-03.
        let f = Purpose::Fraud;
        assert_eq!(
            outcome(&p, &none, t("2026-09-02T23:59:59.999Z"), f),
            Outcome::Copied
        );
        assert_eq!(
            outcome(&p, &none, t("2026-09-03T00:00:00.000Z"), f),
            Outcome::Expired
        );
        // Troubleshooting: 12 months after the contract ended.
        let ts = Purpose::Troubleshooting;
        let ended = state(&[(Change::ContractEnded, "2026-03-01T00:00:00.000Z")]);
        assert_eq!(
            outcome(&p, &ended, t("2027-02-28T23:59:59.999Z"), ts),
            Outcome::Copied
        );
        assert_eq!(
            outcome(&p, &ended, t("2027-03-01T00:00:00.000Z"), ts),
            Outcome::Expired
        );
    }

    #[test]
    fn a_record_from_a_settled_period_past_its_deadline_is_not_copied() {
        let p = policy("excedo");
        let b = Purpose::Billing;
        let settled = |through: &str, at: &str| SubscriberState {
            settled: Some(Settled {
                through: t(through),
                at: t(at),
            }),
            ..SubscriberState::default()
        };
        // March settled 2026-04-15T08:00: due 6 months later.
        let s = settled("2026-04-01T00:00:00.000Z", "2026-04-15T08:00:00.000Z");
        assert_eq!(
            outcome(&p, &s, t("2026-10-15T07:59:59.999Z"), b),
            Outcome::Copied
        );
        assert_eq!(
            outcome(&p, &s, t("2026-10-15T08:00:00.000Z"), b),
            Outcome::Expired
        );
        // A record after the settled period is not covered by it.
        let s = settled("2026-03-01T00:00:00.000Z", "2026-03-15T08:00:00.000Z");
        assert_eq!(
            outcome(&p, &s, t("2027-01-01T00:00:00.000Z"), b),
            Outcome::Copied
        );
        // Unsettled: the clock has not started, however late.
        assert_eq!(
            outcome(
                &p,
                &SubscriberState::default(),
                t("2030-01-01T00:00:00.000Z"),
                b
            ),
            Outcome::Copied
        );
    }

    #[test]
    fn per_policy_envelope_facts_match_the_rule() {
        for (name, _) in crate::policy::SHIPPED {
            let p = policy(name);
            for rule in p.declared() {
                for c in ConsentTag::ALL {
                    let scanned = rule
                        .map(c)
                        .iter()
                        .any(|t| matches!(t, Treatment::Pseudonymise | Treatment::Tokenise));
                    assert_eq!(
                        rule.facts(c).keyed,
                        scanned,
                        "{name} {:?} {c:?}",
                        rule.purpose
                    );
                    assert_eq!(rule.facts(c).basis_tags, rule.basis_tags(c));
                }
            }
        }
    }

    /// Copies are read straight from their record, field map and computed values: every
    /// copy of the shipped policies, in each consent state, carries what the
    /// straightforward treatment (`treat::treat`, the whole treated record) builds.
    #[test]
    fn copies_carry_what_the_treatment_builds() {
        use crate::codec::CopyFields;
        let keys = crate::core::pseudonym::tests::test_keyring();
        let mut copies = 0;
        crate::codec::tests::for_every_copy(|_, r, c| {
            let cx = treat::Ctx {
                purpose: c.envelope.purpose,
                keys: &keys,
            };
            let want = treat::treat(&cx, c.envelope.treatments, r);
            assert_eq!(c.record(), want);
            for f in Field::ALL {
                assert_eq!(c.text(f), CopyFields::text(&want, f), "{f:?}");
            }
            assert_eq!(
                c.schedule_entry().subscriber,
                c.names_subscriber
                    .then(|| want.msisdn.as_ref().map(Text::as_str))
                    .flatten()
            );
            copies += 1;
        });
        assert!(copies > 10_000);
    }

    #[test]
    fn record_ids_and_key_ids_follow_the_copys_treatment() {
        let p = policy("excedo");
        let s = state(&[grant(Purpose::Analytics), grant(Purpose::Marketing)]);
        let r = record();
        let k = keys();
        let d = process(&r, &p, &s, &k, now());
        let copy = |q: Purpose| {
            d.copies
                .iter()
                .find(|c| c.envelope.purpose == q)
                .expect("copy")
        };
        let id = |q: Purpose| {
            copy(q)
                .envelope
                .record_id
                .as_ref()
                .map(|t| t.as_str().to_string())
        };
        // Billing keeps the raw id and needs no key.
        assert_eq!(id(Purpose::Billing).as_deref(), Some("r-1"));
        assert_eq!(copy(Purpose::Billing).envelope.key_id, None);
        // Analytics drops it for this purpose's pseudonym of it, and names its key.
        let want = k.pseudonym(Purpose::Analytics, "record_id", "r-1");
        assert_eq!(id(Purpose::Analytics).as_deref(), Some(want.as_str()));
        assert_ne!(
            Some(want.as_str()),
            Some(k.pseudonym(Purpose::Marketing, "record_id", "r-1").as_str())
        );
        assert_eq!(
            copy(Purpose::Analytics).envelope.key_id,
            Some(k.key_id(Purpose::Analytics))
        );
        assert_eq!(
            copy(Purpose::Marketing).envelope.key_id,
            Some(k.key_id(Purpose::Marketing))
        );
        // Every copy names its record; the schedule entry names the route's subscriber.
        for c in &d.copies {
            assert!(c.envelope.record_id.is_some());
            assert!(c.names_subscriber);
            assert_eq!(c.schedule_entry().record_time, r.start_time);
        }
        let analytics = copy(Purpose::Analytics).schedule_entry();
        let rule = p.rule(Purpose::Analytics).expect("declared");
        assert_eq!(
            analytics.subscriber,
            treat::subscriber_ref(rule, &k, "+46701234567")
                .as_ref()
                .map(Text::as_str)
        );
    }
}
