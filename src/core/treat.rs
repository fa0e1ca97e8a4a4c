//! Field treatments: builds the treated record a purpose may see from the input record.

use std::net::IpAddr;

use serde::Serialize;

use super::pseudonym::{Keyring, Token};
use super::record::{Cell, CloseCause, Kind, Rat, Record, Usage};
use crate::policy::PurposeRule;
use crate::vocab::purpose::{Field, Purpose};
use crate::vocab::time::Millis;
use crate::vocab::treatment::Treatment;

/// A text value of a copy: borrowed from the input, or derived and held inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Text<'a> {
    /// The input's own value (kept, or a prefix of it).
    Raw(&'a str),
    /// A pseudonym, token or generalised value.
    Inline(Token),
    /// A masked value (rare; may be longer than the inline buffer).
    Owned(String),
}

impl Text<'_> {
    /// The value.
    pub fn as_str(&self) -> &str {
        match self {
            Text::Raw(s) => s,
            Text::Inline(t) => t.as_str(),
            Text::Owned(s) => s,
        }
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The serving cell as a copy carries it: without `cell_id` once generalised to its area.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CellOut<'a> {
    /// Mobile country code.
    pub mcc: &'a str,
    /// Mobile network code.
    pub mnc: &'a str,
    /// Location or tracking area.
    pub lac_or_tac: u32,
    /// Cell identity, absent when generalised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell_id: Option<u64>,
}

/// Data volumes as a copy carries them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageOut<'a> {
    /// The input's entries, as they are.
    Raw(&'a [Usage]),
    /// Generalised: one entry for all rating groups (`rating_group` 0), each direction's
    /// total floored to a power of 1000 (0, 1 kB, 1 MB, 1 GB, ...).
    Total(Usage),
}

impl UsageOut<'_> {
    /// The entries.
    pub fn as_slice(&self) -> &[Usage] {
        match self {
            UsageOut::Raw(u) => u,
            UsageOut::Total(u) => std::slice::from_ref(u),
        }
    }
}

impl Serialize for UsageOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

/// A duration reduced to the lower bound of its class: under a minute (0), 1 to 5
/// minutes (60), 5 to 60 minutes (300), an hour or more (3600). Coarse on purpose: an
/// exact duration joins a copy to the billing copy of the same call.
pub fn duration_class(s: u32) -> u32 {
    match s {
        0..60 => 0,
        60..300 => 60,
        300..3600 => 300,
        _ => 3600,
    }
}

/// A volume floored to a power of 1000: its order of magnitude (bytes, kB, MB, GB, ...).
pub fn volume_class(bytes: u64) -> u64 {
    let mut class = 1u64;
    if bytes == 0 {
        return 0;
    }
    while let Some(next) = class.checked_mul(1000).filter(|n| *n <= bytes) {
        class = next;
    }
    if class == 1 { 0 } else { class }
}

/// Every rating group's volumes summed per direction, then classed: how much, not which
/// tariff or the exact byte count that would join the copy to its billing copy.
fn usage_total(u: &[Usage]) -> Usage {
    let (ul, dl) = u.iter().fold((0u64, 0u64), |(ul, dl), e| {
        (ul.saturating_add(e.ul_bytes), dl.saturating_add(e.dl_bytes))
    });
    Usage {
        rating_group: 0,
        ul_bytes: volume_class(ul),
        dl_bytes: volume_class(dl),
    }
}

/// The record as one purpose sees it: the input's field names, dropped fields absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Treated<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_id: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imsi: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imei: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_party: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_cause: Option<CloseCause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell: Option<CellOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_plmn: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_centre: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apn: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charging_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rat: Option<Rat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ue_ip: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording_entity: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_seq_no: Option<u64>,
}

impl Treated<'_> {
    /// The text of a personal-identifier field as the copy holds it (for checks and tests).
    pub fn identifier(&self, f: Field) -> Option<&str> {
        match f {
            Field::Msisdn => self.msisdn.as_ref(),
            Field::Imsi => self.imsi.as_ref(),
            Field::Imei => self.imei.as_ref(),
            Field::OtherParty => self.other_party.as_ref(),
            Field::UeIp => self.ue_ip.as_ref(),
            _ => None,
        }
        .map(Text::as_str)
    }
}

/// What treatments need besides the value: the purpose (whose keys to use) and keys.
pub struct Ctx<'k> {
    /// The purpose the copy is for.
    pub purpose: Purpose,
    /// Pseudonym and token keys.
    pub keys: &'k Keyring,
}

/// Keeps the first and last characters and stars the rest; a value too short to keep
/// anything hidden is starred whole.
pub fn mask(v: &str, first: u8, last: u8) -> String {
    let n = v.chars().count();
    let (first, last) = (first as usize, last as usize);
    if first + last >= n {
        return "*".repeat(n);
    }
    v.chars()
        .enumerate()
        .map(|(i, c)| if i < first || i >= n - last { c } else { '*' })
        .collect()
}

/// An IP address reduced to its network: /24 for IPv4, /48 for IPv6.
fn ip_network(v: &str) -> Option<Token> {
    use std::fmt::Write;
    let mut t = Token::new();
    match v.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => {
            let o = a.octets();
            write!(t, "{}.{}.{}.0/24", o[0], o[1], o[2]).ok()?;
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
            write!(t, "{net}/48").ok()?;
        }
    }
    Some(t)
}

/// Applies a treatment to a text field. A value a treatment cannot handle is dropped:
/// failing closed never leaks the raw value.
// Most fields are kept or dropped: inlined, those cost a few instructions where the
// value is stored, instead of a call returning a 72-byte value through memory.
#[inline(always)]
pub fn text<'a>(cx: &Ctx<'_>, f: Field, t: Treatment, v: &'a str) -> Option<Text<'a>> {
    match t {
        Treatment::Keep => Some(Text::Raw(v)),
        Treatment::Drop => None,
        _ => derived(cx, f, t, v),
    }
}

/// The treatments that compute a new value.
#[inline(never)]
pub(crate) fn derived<'a>(cx: &Ctx<'_>, f: Field, t: Treatment, v: &'a str) -> Option<Text<'a>> {
    match t {
        Treatment::Keep => Some(Text::Raw(v)),
        Treatment::Drop => None,
        Treatment::Mask { first, last } => Some(Text::Owned(mask(v, first, last))),
        Treatment::Pseudonymise => Some(Text::Inline(cx.keys.pseudonym(cx.purpose, f.name(), v))),
        Treatment::Tokenise => cx.keys.tokenise(cx.purpose, v).map(Text::Inline),
        Treatment::Generalise => match f {
            // The type allocation code: the device model, not the device.
            Field::Imei => v.get(..8).map(Text::Raw),
            Field::UeIp => ip_network(v).map(Text::Inline),
            _ => None,
        },
    }
}

/// One text field of a treated record, stored by each branch itself. Always inlined:
/// out of line, every kept field costs a call (the compiler's choice varies by build).
#[inline(always)]
fn set_text<'a>(
    cx: &Ctx<'_>,
    map: &[Treatment; Field::COUNT],
    dst: &mut Option<Text<'a>>,
    f: Field,
    v: Option<&'a str>,
) {
    match (v, map[f as usize]) {
        (Some(v), Treatment::Keep) => *dst = Some(Text::Raw(v)),
        (None, _) | (_, Treatment::Drop) => *dst = None,
        (Some(v), tr) => *dst = derived(cx, f, tr, v),
    }
}

/// A value no treatment but keep can reduce: kept or absent.
#[inline(always)]
pub fn plain<T>(t: Treatment, v: T) -> Option<T> {
    matches!(t, Treatment::Keep).then_some(v)
}

/// The record's value of text field `f`; `None` where the record lacks it or `f` is not
/// one of [`TEXT_FIELDS`](crate::vocab::purpose::TEXT_FIELDS). With `f` a constant, this is the field itself.
#[inline(always)]
pub fn text_value<'a>(r: &'a Record<'_>, f: Field) -> Option<&'a str> {
    match f {
        Field::RecordId => Some(&r.record_id),
        Field::Msisdn => Some(&r.msisdn),
        Field::Imsi => Some(&r.imsi),
        Field::Imei => r.imei.as_deref(),
        Field::OtherParty => r.other_party.as_deref(),
        Field::ServingPlmn => Some(&r.serving_plmn),
        Field::ServiceCentre => r.service_centre.as_deref(),
        Field::Apn => r.apn.as_deref(),
        Field::UeIp => r.ue_ip.as_deref(),
        Field::RecordingEntity => Some(&r.recording_entity),
        _ => None,
    }
}

/// The start time under its treatment: kept, floored to its hour, or dropped.
#[inline(always)]
pub fn start_time(t: Treatment, v: Millis) -> Option<Millis> {
    match t {
        Treatment::Keep => Some(v),
        Treatment::Generalise => Some(v.floor_hour()),
        _ => None,
    }
}

/// The duration under its treatment: kept, reduced to its class, or dropped.
#[inline(always)]
pub fn duration(t: Treatment, v: Option<u32>) -> Option<u32> {
    v.and_then(|d| match t {
        Treatment::Keep => Some(d),
        Treatment::Generalise => Some(duration_class(d)),
        _ => None,
    })
}

/// The serving cell under its treatment: kept, generalised to its area, or dropped.
#[inline(always)]
pub fn cell<'a>(t: Treatment, c: Option<&'a Cell<'_>>) -> Option<CellOut<'a>> {
    let area = |c: &'a Cell<'_>, cell_id| CellOut {
        mcc: &c.mcc,
        mnc: &c.mnc,
        lac_or_tac: c.lac_or_tac,
        cell_id,
    };
    match (c, t) {
        (Some(c), Treatment::Keep) => Some(area(c, Some(c.cell_id))),
        (Some(c), Treatment::Generalise) => Some(area(c, None)),
        _ => None,
    }
}

/// The volumes under their treatment: kept, totalled and classed, or dropped.
#[inline(always)]
pub fn usage(t: Treatment, u: Option<&[Usage]>) -> Option<UsageOut<'_>> {
    u.and_then(|u| match t {
        Treatment::Keep => Some(UsageOut::Raw(u)),
        Treatment::Generalise => Some(UsageOut::Total(usage_total(u))),
        _ => None,
    })
}

/// The record as a copy that keeps every field carries it (what [`treat`] makes with
/// every field kept, without keys).
pub fn kept<'a>(r: &'a Record<'_>) -> Treated<'a> {
    let raw = |v: &'a str| Some(Text::Raw(v));
    Treated {
        record_id: raw(&r.record_id),
        kind: Some(r.kind),
        msisdn: raw(&r.msisdn),
        imsi: raw(&r.imsi),
        imei: r.imei.as_deref().and_then(raw),
        other_party: r.other_party.as_deref().and_then(raw),
        start_time: Some(r.start_time),
        duration_s: r.duration_s,
        close_cause: Some(r.close_cause),
        cell: r.cell.as_ref().map(|c| CellOut {
            mcc: &c.mcc,
            mnc: &c.mnc,
            lac_or_tac: c.lac_or_tac,
            cell_id: Some(c.cell_id),
        }),
        serving_plmn: raw(&r.serving_plmn),
        service_centre: r.service_centre.as_deref().and_then(raw),
        apn: r.apn.as_deref().and_then(raw),
        charging_id: r.charging_id,
        rat: Some(r.rat),
        ue_ip: r.ue_ip.as_deref().and_then(raw),
        usage: r.usage.as_deref().map(UsageOut::Raw),
        recording_entity: raw(&r.recording_entity),
        local_seq_no: Some(r.local_seq_no),
    }
}

/// Builds the treated record for one purpose's field map.
pub fn treat<'a>(cx: &Ctx<'_>, map: &[Treatment; Field::COUNT], r: &'a Record<'_>) -> Treated<'a> {
    let record_id = text(
        cx,
        Field::RecordId,
        map[Field::RecordId as usize],
        &r.record_id,
    );
    let mut t = Treated::default();
    treat_into(cx, map, r, record_id, &mut t);
    t
}

/// [`treat`] into a treated record in place, with the record id already treated.
/// `process` builds copies where they are stored (a copy is about a kilobyte, so each
/// move of one costs), and needs the treated id for the envelope too. Inlined there: the
/// map's treatments and the record's fields are then at hand in `process`'s registers.
#[inline(always)]
pub fn treat_into<'a>(
    cx: &Ctx<'_>,
    map: &[Treatment; Field::COUNT],
    r: &'a Record<'_>,
    record_id: Option<Text<'a>>,
    out: &mut Treated<'a>,
) {
    let t = |f: Field| map[f as usize];
    // Field by field, each value written once, straight into the copy. Text values are
    // stored by each branch itself: a value merged from several branches is built in a
    // temporary first, and copying it out costs a store-forwarding stall per field.
    let set =
        |dst: &mut Option<Text<'a>>, f: Field, v: Option<&'a str>| set_text(cx, map, dst, f, v);
    out.record_id = record_id;
    out.kind = plain(t(Field::Kind), r.kind);
    set(&mut out.msisdn, Field::Msisdn, Some(&r.msisdn));
    set(&mut out.imsi, Field::Imsi, Some(&r.imsi));
    set(&mut out.imei, Field::Imei, r.imei.as_deref());
    set(
        &mut out.other_party,
        Field::OtherParty,
        r.other_party.as_deref(),
    );
    out.start_time = match t(Field::StartTime) {
        Treatment::Keep => Some(r.start_time),
        Treatment::Generalise => Some(r.start_time.floor_hour()),
        _ => None,
    };
    out.duration_s = r.duration_s.and_then(|d| match t(Field::DurationS) {
        Treatment::Keep => Some(d),
        Treatment::Generalise => Some(duration_class(d)),
        _ => None,
    });
    out.close_cause = plain(t(Field::CloseCause), r.close_cause);
    let area = |c: &'a Cell<'_>, cell_id| CellOut {
        mcc: &c.mcc,
        mnc: &c.mnc,
        lac_or_tac: c.lac_or_tac,
        cell_id,
    };
    match (&r.cell, t(Field::Cell)) {
        (Some(c), Treatment::Keep) => out.cell = Some(area(c, Some(c.cell_id))),
        (Some(c), Treatment::Generalise) => out.cell = Some(area(c, None)),
        _ => out.cell = None,
    }
    set(
        &mut out.serving_plmn,
        Field::ServingPlmn,
        Some(&r.serving_plmn),
    );
    set(
        &mut out.service_centre,
        Field::ServiceCentre,
        r.service_centre.as_deref(),
    );
    set(&mut out.apn, Field::Apn, r.apn.as_deref());
    out.charging_id = r.charging_id.and_then(|c| plain(t(Field::ChargingId), c));
    out.rat = plain(t(Field::Rat), r.rat);
    set(&mut out.ue_ip, Field::UeIp, r.ue_ip.as_deref());
    out.usage = r.usage.as_deref().and_then(|u| match t(Field::Usage) {
        Treatment::Keep => Some(UsageOut::Raw(u)),
        Treatment::Generalise => Some(UsageOut::Total(usage_total(u))),
        _ => None,
    });
    set(
        &mut out.recording_entity,
        Field::RecordingEntity,
        Some(&r.recording_entity),
    );
    out.local_seq_no = plain(t(Field::LocalSeqNo), r.local_seq_no);
}

/// How a route's copies name a subscriber: the msisdn under that route's treatment.
/// Rights arrive keyed by msisdn; this finds the same reference the copies carry.
pub fn subscriber_ref<'m>(rule: &PurposeRule, keys: &Keyring, msisdn: &'m str) -> Option<Text<'m>> {
    let f = rule.subscriber_field?;
    let cx = Ctx {
        purpose: rule.purpose,
        keys,
    };
    text(&cx, f, rule.treatment(f), msisdn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pseudonym::tests::test_keyring;
    use crate::core::record::tests::data_record;

    #[test]
    fn treatments_reduce_values_as_named() {
        let keys = test_keyring();
        let cx = Ctx {
            purpose: Purpose::Analytics,
            keys: &keys,
        };
        let mut map = [Treatment::Drop; Field::COUNT];
        map[Field::Msisdn as usize] = Treatment::Pseudonymise;
        map[Field::Imei as usize] = Treatment::Generalise;
        map[Field::UeIp as usize] = Treatment::Generalise;
        map[Field::StartTime as usize] = Treatment::Generalise;
        map[Field::Cell as usize] = Treatment::Generalise;
        map[Field::Imsi as usize] = Treatment::Mask { first: 5, last: 0 };
        let r = data_record();
        let t = treat(&cx, &map, &r);
        assert!(
            t.msisdn
                .as_ref()
                .unwrap()
                .as_str()
                .starts_with("test1.analytics:")
        );
        assert_eq!(t.imei.unwrap().as_str(), "35693803");
        assert_eq!(t.ue_ip.unwrap().as_str(), "10.1.2.0/24");
        assert_eq!(
            t.start_time.unwrap().to_string(),
            "2026-03-01T12:00:00.000Z"
        );
        assert_eq!(t.cell.unwrap().cell_id, None);
        assert_eq!(t.imsi.unwrap().as_str(), "24001**********");
        assert!(t.record_id.is_none() && t.usage.is_none() && t.kind.is_none());
    }

    #[test]
    fn durations_and_volumes_generalise_to_coarse_classes() {
        assert_eq!(
            [0, 59, 60, 299, 300, 3599, 3600, 86_400].map(duration_class),
            [0, 0, 60, 60, 300, 300, 3600, 3600]
        );
        assert_eq!(
            [0, 1, 999, 1000, 999_999, 1_000_000, 7_654_321_000, u64::MAX].map(volume_class),
            [
                0,
                0,
                0,
                1000,
                1000,
                1_000_000,
                1_000_000_000,
                1_000_000_000_000_000_000
            ]
        );
        let keys = test_keyring();
        let cx = Ctx {
            purpose: Purpose::Analytics,
            keys: &keys,
        };
        let mut map = [Treatment::Drop; Field::COUNT];
        map[Field::DurationS as usize] = Treatment::Generalise;
        map[Field::Usage as usize] = Treatment::Generalise;
        let mut r = data_record();
        r.duration_s = Some(1234);
        r.usage = Some(vec![
            Usage {
                rating_group: 10,
                ul_bytes: 400_000,
                dl_bytes: 2_500_000,
            },
            Usage {
                rating_group: 20,
                ul_bytes: 700_000,
                dl_bytes: 1,
            },
        ]);
        let t = treat(&cx, &map, &r);
        assert_eq!(t.duration_s, Some(300));
        assert_eq!(
            t.usage.as_ref().unwrap().as_slice(),
            [Usage {
                rating_group: 0,
                ul_bytes: 1_000_000,
                dl_bytes: 1_000_000,
            }]
        );
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"duration_s":300,"usage":[{"rating_group":0,"ul_bytes":1000000,"dl_bytes":1000000}]}"#
        );
    }

    #[test]
    fn text_values_are_the_text_fields() {
        let mut r = data_record();
        r.other_party = Some("+46709876543".into());
        r.service_centre = Some("+46700000001".into());
        for f in Field::ALL {
            assert_eq!(
                text_value(&r, f).is_some(),
                crate::vocab::purpose::TEXT_FIELDS & 1 << f as u32 != 0,
                "{f:?}"
            );
        }
        assert_eq!(text_value(&r, Field::Apn), Some("internet"));
        assert_eq!(text_value(&data_record(), Field::OtherParty), None);
    }

    #[test]
    fn mask_never_reveals_a_short_value() {
        assert_eq!(mask("12345", 3, 3), "*****");
        assert_eq!(mask("+46701234567", 3, 2), "+46*******67");
        assert_eq!(
            ip_network("2001:db8:abcd:12::1").unwrap().as_str(),
            "2001:db8:abcd::/48"
        );
    }
}
