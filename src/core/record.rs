//! The usage record (CDR) as DESIGN.md fixes it, and the checks a record must pass.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::vocab::purpose::Field;
use crate::vocab::time::Millis;

/// The kind of usage a record describes.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    wincode::SchemaWrite,
    wincode::SchemaRead,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Mobile-originated call.
    Moc,
    /// Mobile-terminated call.
    Mtc,
    /// Mobile-originated SMS.
    SmsMo,
    /// Mobile-terminated SMS.
    SmsMt,
    /// Data session (often an hourly partial record).
    Data,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [Kind::Moc, Kind::Mtc, Kind::SmsMo, Kind::SmsMt, Kind::Data];
    /// The JSON name.
    pub const fn id(self) -> &'static str {
        match self {
            Kind::Moc => "moc",
            Kind::Mtc => "mtc",
            Kind::SmsMo => "sms_mo",
            Kind::SmsMt => "sms_mt",
            Kind::Data => "data",
        }
    }
    fn is_call(self) -> bool {
        matches!(self, Kind::Moc | Kind::Mtc)
    }
    fn is_sms(self) -> bool {
        matches!(self, Kind::SmsMo | Kind::SmsMt)
    }
}

/// Why the network closed the record.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    wincode::SchemaWrite,
    wincode::SchemaRead,
)]
#[serde(rename_all = "snake_case")]
pub enum CloseCause {
    /// Ended normally.
    Normal,
    /// Ended by a failure.
    Abnormal,
    /// An interim record of a longer session.
    Partial,
    /// Closed at a volume threshold.
    VolumeLimit,
    /// Closed at a time threshold.
    TimeLimit,
}

impl CloseCause {
    /// Every close cause.
    pub const ALL: [CloseCause; 5] = [
        CloseCause::Normal,
        CloseCause::Abnormal,
        CloseCause::Partial,
        CloseCause::VolumeLimit,
        CloseCause::TimeLimit,
    ];
    /// The JSON name.
    pub const fn id(self) -> &'static str {
        match self {
            CloseCause::Normal => "normal",
            CloseCause::Abnormal => "abnormal",
            CloseCause::Partial => "partial",
            CloseCause::VolumeLimit => "volume_limit",
            CloseCause::TimeLimit => "time_limit",
        }
    }
}

/// Radio access technology.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    wincode::SchemaWrite,
    wincode::SchemaRead,
)]
#[serde(rename_all = "snake_case")]
pub enum Rat {
    /// 2G.
    Gsm,
    /// 3G.
    Umts,
    /// 4G.
    Lte,
    /// 5G.
    Nr,
}

impl Rat {
    /// Every radio technology.
    pub const ALL: [Rat; 4] = [Rat::Gsm, Rat::Umts, Rat::Lte, Rat::Nr];
    /// The JSON name.
    pub const fn id(self) -> &'static str {
        match self {
            Rat::Gsm => "gsm",
            Rat::Umts => "umts",
            Rat::Lte => "lte",
            Rat::Nr => "nr",
        }
    }
}

/// The serving cell: location data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cell<'a> {
    /// Mobile country code, 3 digits.
    #[serde(borrow)]
    pub mcc: Cow<'a, str>,
    /// Mobile network code, 2 or 3 digits (leading zeros matter, hence text).
    #[serde(borrow)]
    pub mnc: Cow<'a, str>,
    /// Location or tracking area code.
    pub lac_or_tac: u32,
    /// Cell identity within the area.
    pub cell_id: u64,
}

/// Volume per rating group in a data record.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    wincode::SchemaWrite,
    wincode::SchemaRead,
)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Charging rating group.
    pub rating_group: u32,
    /// Uplink bytes.
    pub ul_bytes: u64,
    /// Downlink bytes.
    pub dl_bytes: u64,
}

/// One usage record. Strings borrow from the input buffer where they can.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record<'a> {
    /// Unique per record.
    #[serde(borrow)]
    pub record_id: Cow<'a, str>,
    /// Call, SMS or data.
    pub kind: Kind,
    /// The subscriber, E.164.
    #[serde(borrow)]
    pub msisdn: Cow<'a, str>,
    /// 15 digits.
    #[serde(borrow)]
    pub imsi: Cow<'a, str>,
    /// 14-16 digits.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub imei: Option<Cow<'a, str>>,
    /// The other party, E.164.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub other_party: Option<Cow<'a, str>>,
    /// When usage started.
    pub start_time: Millis,
    /// Seconds (calls, data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u32>,
    /// Why the record closed.
    pub close_cause: CloseCause,
    /// Serving cell.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<Cell<'a>>,
    /// Serving network, MCCMNC.
    #[serde(borrow)]
    pub serving_plmn: Cow<'a, str>,
    /// SMS centre, E.164.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub service_centre: Option<Cow<'a, str>>,
    /// Access point name (data).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub apn: Option<Cow<'a, str>>,
    /// Charging id (data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging_id: Option<u64>,
    /// Radio technology.
    pub rat: Rat,
    /// The device's IP address (data).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub ue_ip: Option<Cow<'a, str>>,
    /// Volumes (data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Vec<Usage>>,
    /// The network element that wrote the record.
    #[serde(borrow)]
    pub recording_entity: Cow<'a, str>,
    /// Sequence number at the recording entity.
    pub local_seq_no: u64,
}

/// A record that decoded but breaks the contract: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {problem}")]
pub struct RecordError {
    /// The offending field's JSON name.
    pub field: &'static str,
    /// What is wrong with it (never the raw value: it may be an identifier).
    pub problem: &'static str,
}

fn bad(field: Field, problem: &'static str) -> RecordError {
    RecordError {
        field: field.name(),
        problem,
    }
}

pub(crate) fn is_e164(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 4 && b.len() <= 16 && b[0] == b'+' && b[1] != b'0' && all_digits(&b[1..])
}

/// Whether `b` is one or more ASCII digits. Identifiers are 2 to 16 digits: those are
/// checked in at most two overlapping words instead of byte by byte.
fn all_digits(b: &[u8]) -> bool {
    match b.len() {
        0 => false,
        n @ 8..=16 => digits_in_word(word::<8>(&b[..8])) && digits_in_word(word::<8>(&b[n - 8..])),
        n @ 4..8 => digits_in_word(word::<4>(&b[..4]) | word::<4>(&b[n - 4..]) << 32),
        _ => b.iter().all(u8::is_ascii_digit),
    }
}

/// The first `N` bytes of `b` (which holds at least `N`), little-endian in a `u64`.
#[inline(always)]
fn word<const N: usize>(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..N].copy_from_slice(&b[..N]);
    u64::from_le_bytes(w)
}

/// Whether every byte of `w` is an ASCII digit.
#[inline(always)]
fn digits_in_word(w: u64) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // For an ASCII byte b (high bit clear), b + 0x46 sets the high bit iff b > b'9', and
    // (b | 0x80) - 0x30 clears it iff b < b'0'; neither carries into the next byte. A byte
    // with its high bit set fails through `w` itself (whatever its neighbours show).
    let above = w.wrapping_add(ONES * 0x46);
    let below = !((w | HIGH).wrapping_sub(ONES * 0x30));
    (w | above | below) & HIGH == 0
}

/// Whether `b` is an IPv4 address in the form `Ipv4Addr`'s parser accepts: four decimal
/// octets of one to three digits, none above 255, none with a leading zero. Every data
/// record carries one; this is several times cheaper than the parser. Anything it does
/// not accept (IPv6 included) goes to the parser, which decides.
fn is_plain_ipv4(b: &[u8]) -> bool {
    let mut i = 0;
    for octet in 0..4 {
        if octet > 0 {
            if b.get(i) != Some(&b'.') {
                return false;
            }
            i += 1;
        }
        let start = i;
        let mut v = 0u32;
        while i - start < 3
            && let Some(d) = b.get(i).filter(|d| d.is_ascii_digit())
        {
            v = v * 10 + u32::from(d - b'0');
            i += 1;
        }
        let n = i - start;
        if n == 0 || v > 255 || (n > 1 && b[start] == b'0') {
            return false;
        }
    }
    i == b.len()
}

fn need<T>(kind_needs: bool, v: &Option<T>, f: Field) -> Result<(), RecordError> {
    match (kind_needs, v.is_some()) {
        (true, false) => Err(bad(f, "missing, but this kind of record needs it")),
        (false, true) => Err(bad(f, "not allowed for this kind of record")),
        _ => Ok(()),
    }
}

impl Record<'_> {
    /// Checks formats and what each kind needs. Cheap: no allocation. A record that
    /// fails goes to the dead letter with the returned reason.
    pub fn validate(&self) -> Result<(), RecordError> {
        let k = self.kind;
        if self.record_id.is_empty() || self.record_id.len() > 128 {
            return Err(bad(Field::RecordId, "must be 1 to 128 characters"));
        }
        if !is_e164(&self.msisdn) {
            return Err(bad(Field::Msisdn, "not an E.164 number"));
        }
        if self.imsi.len() != 15 || !all_digits(self.imsi.as_bytes()) {
            return Err(bad(Field::Imsi, "must be 15 digits"));
        }
        if let Some(imei) = &self.imei
            && (!(14..=16).contains(&imei.len()) || !all_digits(imei.as_bytes()))
        {
            return Err(bad(Field::Imei, "must be 14 to 16 digits"));
        }
        // An SMS-MT may arrive from an unknown sender; every other non-data kind names one.
        match (&self.other_party, k) {
            (None, Kind::Moc | Kind::Mtc | Kind::SmsMo) => {
                return Err(bad(
                    Field::OtherParty,
                    "missing, but this kind of record needs it",
                ));
            }
            (Some(_), Kind::Data) => {
                return Err(bad(
                    Field::OtherParty,
                    "not allowed for this kind of record",
                ));
            }
            (Some(o), _) if !is_e164(o) => {
                return Err(bad(Field::OtherParty, "not an E.164 number"));
            }
            _ => {}
        }
        need(
            k.is_call() || k == Kind::Data,
            &self.duration_s,
            Field::DurationS,
        )?;
        if let Some(c) = &self.cell
            && (c.mcc.len() != 3
                || !all_digits(c.mcc.as_bytes())
                || !(2..=3).contains(&c.mnc.len())
                || !all_digits(c.mnc.as_bytes()))
        {
            return Err(bad(Field::Cell, "mcc must be 3 digits and mnc 2 or 3"));
        }
        if !(5..=6).contains(&self.serving_plmn.len()) || !all_digits(self.serving_plmn.as_bytes())
        {
            return Err(bad(Field::ServingPlmn, "must be MCCMNC, 5 or 6 digits"));
        }
        need(k.is_sms(), &self.service_centre, Field::ServiceCentre)?;
        if let Some(sc) = &self.service_centre
            && !is_e164(sc)
        {
            return Err(bad(Field::ServiceCentre, "not an E.164 number"));
        }
        let data = k == Kind::Data;
        need(data, &self.apn, Field::Apn)?;
        need(data, &self.charging_id, Field::ChargingId)?;
        need(data, &self.ue_ip, Field::UeIp)?;
        need(data, &self.usage, Field::Usage)?;
        if let Some(ip) = &self.ue_ip
            && !is_plain_ipv4(ip.as_bytes())
            && ip.parse::<std::net::IpAddr>().is_err()
        {
            return Err(bad(Field::UeIp, "not an IPv4 or IPv6 address"));
        }
        if self.recording_entity.is_empty() {
            return Err(bad(Field::RecordingEntity, "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid data record for tests across the crate.
    pub(crate) fn data_record() -> Record<'static> {
        Record {
            record_id: "r-1".into(),
            kind: Kind::Data,
            msisdn: "+46701234567".into(),
            imsi: "240011234567890".into(),
            imei: Some("35693803564380".into()),
            other_party: None,
            start_time: Millis::parse("2026-03-01T12:34:56.789Z").unwrap(),
            duration_s: Some(3600),
            close_cause: CloseCause::Partial,
            cell: Some(Cell {
                mcc: "240".into(),
                mnc: "01".into(),
                lac_or_tac: 1234,
                cell_id: 56789,
            }),
            serving_plmn: "24001".into(),
            service_centre: None,
            apn: Some("internet".into()),
            charging_id: Some(99),
            rat: Rat::Lte,
            ue_ip: Some("10.1.2.3".into()),
            usage: Some(vec![Usage {
                rating_group: 10,
                ul_bytes: 1000,
                dl_bytes: 50000,
            }]),
            recording_entity: "pgw-sto-1".into(),
            local_seq_no: 7,
        }
    }

    #[test]
    fn a_valid_record_passes() {
        assert_eq!(data_record().validate(), Ok(()));
    }

    #[test]
    fn digit_checks_match_a_byte_by_byte_check() {
        let bytes = [
            b'0', b'9', b'5', b'/', b':', b'a', b' ', 0, 0x7F, 0x80, 0xB9, 0xFF, 0xC3,
        ];
        for n in 0..=20usize {
            for pos in 0..n.max(1) {
                for &bad in &bytes {
                    let mut v: Vec<u8> = (0..n).map(|i| b'0' + (i % 10) as u8).collect();
                    if n > 0 {
                        v[pos] = bad;
                    }
                    let want = !v.is_empty() && v.iter().all(u8::is_ascii_digit);
                    assert_eq!(all_digits(&v), want, "{v:?}");
                }
            }
        }
    }

    #[test]
    fn the_ipv4_shortcut_accepts_only_what_the_parser_accepts() {
        let mut cases: Vec<String> = [
            "0.0.0.0",
            "255.255.255.255",
            "256.1.1.1",
            "1.2.3.04",
            "01.2.3.4",
            "00.1.1.1",
            "1.2.3",
            "1.2.3.4.",
            ".1.2.3.4",
            "1..2.3",
            "1.2.3.4.5",
            "1234.1.1.1",
            "1.2.3.-4",
            "+1.2.3.4",
            " 1.2.3.4",
            "1.2.3.4 ",
            "::1",
            "::ffff:1.2.3.4",
            "2001:db8::1",
            "",
            "1.2.3.a",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every octet from 0 to 299 in each position, written with and without padding.
        for v in 0..300u32 {
            for s in [v.to_string(), format!("{v:02}"), format!("{v:03}")] {
                cases.push(format!("{s}.1.2.3"));
                cases.push(format!("10.{s}.2.3"));
                cases.push(format!("10.1.2.{s}"));
            }
        }
        for c in &cases {
            let parser = c.parse::<std::net::IpAddr>().is_ok();
            if is_plain_ipv4(c.as_bytes()) {
                assert!(parser, "{c:?}");
            }
            // The shortcut covers every IPv4 address the parser takes.
            if c.parse::<std::net::Ipv4Addr>().is_ok() {
                assert!(is_plain_ipv4(c.as_bytes()), "{c:?}");
            }
        }
    }

    #[test]
    fn each_kind_needs_its_fields() {
        let mut r = data_record();
        r.ue_ip = None;
        assert_eq!(r.validate().unwrap_err().field, "ue_ip");
        let mut r = data_record();
        r.kind = Kind::Moc;
        assert_eq!(r.validate().unwrap_err().field, "other_party");
        let mut r = data_record();
        r.msisdn = "0701234567".into();
        assert_eq!(r.validate().unwrap_err().field, "msisdn");
        let mut r = data_record();
        r.ue_ip = Some("999.1.1.1".into());
        assert_eq!(r.validate().unwrap_err().field, "ue_ip");
    }
}
