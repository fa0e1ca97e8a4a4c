//! `process`: one record, the subscriber's state and the time in; one copy per allowed
//! purpose out, each with its envelope and retention-schedule entry.

use arrayvec::ArrayVec;
use serde::Serialize;

use super::control::SubscriberState;
use super::pseudonym::Keyring;
use super::purpose::{Field, Purpose};
use super::record::Record;
use super::time::Millis;
use super::treat::{self, Text, Treated};
use crate::policy::{Anchor, Policy, PurposeRule, Retention, Treatment};

/// Consent as the envelope states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentTag {
    /// The purpose rests on consent and the subscriber gave it.
    Granted,
    /// The purpose does not rest on consent.
    NotRequired,
    /// The purpose rests on consent, none is recorded: only an anonymised copy is made.
    Absent,
}

impl ConsentTag {
    /// The header value.
    pub const fn id(self) -> &'static str {
        match self {
            ConsentTag::Granted => "granted",
            ConsentTag::NotRequired => "not_required",
            ConsentTag::Absent => "absent",
        }
    }
}

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
}

impl Outcome {
    /// Every outcome, for fixed-size counters.
    pub const ALL: [Outcome; 7] = [
        Outcome::NotDeclared,
        Outcome::Copied,
        Outcome::Anonymised,
        Outcome::NoConsent,
        Outcome::Objected,
        Outcome::Restricted,
        Outcome::Expired,
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

/// One copy: the treated record and its envelope.
#[derive(Clone, Debug)]
pub struct Copy<'a> {
    /// The record as the purpose may see it.
    pub record: Treated<'a>,
    /// Tags, also sent as Kafka headers.
    pub envelope: Envelope<'a>,
    /// When the record happened (kept even where the copy generalises its time).
    pub record_time: Millis,
    /// Whether the copy's msisdn is the route's subscriber reference (false for anonymised
    /// copies and routes that drop it).
    pub names_subscriber: bool,
}

/// An entry the retention schedule needs to know this copy exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleEntry<'c> {
    /// Route.
    pub purpose: Purpose,
    /// The subscriber as the route's copies name them; `None` for anonymised copies.
    pub subscriber: Option<&'c str>,
    /// When the record happened.
    pub record_time: Millis,
    /// The rule.
    pub rule: &'c Retention,
}

impl Copy<'_> {
    /// The retention-schedule entry for this copy.
    pub fn schedule_entry(&self) -> ScheduleEntry<'_> {
        ScheduleEntry {
            purpose: self.envelope.purpose,
            subscriber: if self.names_subscriber {
                self.record.msisdn.as_ref().map(Text::as_str)
            } else {
                None
            },
            record_time: self.record_time,
            rule: self.envelope.retention,
        }
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
        // The invoice for the record's period cannot have been settled before the record
        // was billed: the clock has not started.
        Anchor::InvoiceSettled => false,
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
        let stopped = if state.restricted && rule.restriction.stops {
            Some(Outcome::Restricted)
        } else if state.objected.contains(p) && rule.objection.stops {
            Some(Outcome::Objected)
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
            (Some(true), _) => (&rule.fields, ConsentTag::Granted, false),
            (Some(false), Some(anon)) => (anon, ConsentTag::Absent, true),
            (Some(false), None) => {
                d.outcomes[p as usize] = Some(Outcome::NoConsent);
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
        let (legal_basis, gdpr_article) = if anonymised {
            ("anonymous", "recital 26")
        } else if consent == ConsentTag::Granted {
            ("consent", "6(1)(a)")
        } else {
            let b = rule.primary_basis();
            (b.id(), b.article())
        };
        let uses_keys = matches!(record_id, Some(Text::Inline(_)))
            || map
                .iter()
                .any(|t| matches!(t, Treatment::Pseudonymise | Treatment::Tokenise));
        d.copies.push(Copy {
            record: Treated::default(),
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
            },
            record_time: r.start_time,
            names_subscriber: !anonymised && rule.subscriber_field.is_some(),
        });
        // Treated where the copy is stored: a copy is about a kilobyte, so a move costs.
        if let Some(c) = d.copies.last_mut() {
            treat::treat_into(&cx, map, r, copy_id, &mut c.record);
        }
        d.outcomes[p as usize] = Some(if anonymised {
            Outcome::Anonymised
        } else {
            Outcome::Copied
        });
    }
}

/// How a route's copies name a subscriber: the msisdn under that route's treatment.
/// Rights arrive keyed by msisdn; this finds the same reference the copies carry.
pub fn subscriber_ref<'m>(rule: &PurposeRule, keys: &Keyring, msisdn: &'m str) -> Option<Text<'m>> {
    let f = rule.subscriber_field?;
    let cx = treat::Ctx {
        purpose: rule.purpose,
        keys,
    };
    treat::text(&cx, f, rule.treatment(f), msisdn)
}
