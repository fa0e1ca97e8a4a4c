//! Synthetic traffic: subscribers with devices and home cells, a real kind mix (calls,
//! SMS, hourly data partials), consent and rights events, and some malformed records and
//! control events. Reproducible: the same config and seed give the same bytes. Linear in
//! the number of records (one sort aside): which records are malformed is decided while
//! they are generated, not by inserting into the finished stream.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::core::control::{Change, ControlEvent};
use crate::core::record::{Cell, CloseCause, Kind, Rat, Record, Usage};
use crate::vocab::purpose::Purpose;
use crate::vocab::time::{DAY_MS, HOUR_MS, Millis};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// Distinct subscribers, at most `records` (see [`GenConfig::validate`]).
    pub subscribers: u32,
    /// Records to write (malformed ones included).
    pub records: u64,
    /// Seed: same seed, same output.
    pub seed: u64,
    /// First instant of traffic.
    pub start: Millis,
    /// Days of traffic.
    pub days: u32,
    /// Share of subscribers consenting to analytics.
    pub analytics_consent: f64,
    /// Share consenting to marketing.
    pub marketing_consent: f64,
    /// Share withdrawing a consent mid-stream.
    pub withdrawal_rate: f64,
    /// Share objecting to marketing (and, half as often, analytics).
    pub objection_rate: f64,
    /// Share with processing restricted for a while (a tenth to a quarter of the time
    /// they are a customer), while they still make traffic.
    pub restriction_rate: f64,
    /// Share asking for erasure.
    pub erasure_rate: f64,
    /// Share whose contract ends during the span. They make no traffic after it, but
    /// for records of the last [`LATE_AFTER_CONTRACT_END_MS`].
    pub contract_end_rate: f64,
    /// Share of malformed records.
    pub malformed_rate: f64,
}

/// A generator configuration that makes no sense, with every problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid generator settings: {}", problems.join("; "))]
pub struct GenError {
    /// Each problem, naming the setting as the command line does.
    pub problems: Vec<String>,
}

impl GenConfig {
    /// Checks every setting: rates are shares in 0..=1, at least one subscriber and one
    /// day, and no more subscribers than records.
    pub fn validate(&self) -> Result<(), GenError> {
        let mut problems = Vec::new();
        for (name, rate) in [
            ("analytics-consent", self.analytics_consent),
            ("marketing-consent", self.marketing_consent),
            ("withdrawal-rate", self.withdrawal_rate),
            ("objection-rate", self.objection_rate),
            ("restriction-rate", self.restriction_rate),
            ("erasure-rate", self.erasure_rate),
            ("contract-end-rate", self.contract_end_rate),
            ("malformed-rate", self.malformed_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                problems.push(format!(
                    "--{name} is {rate}, but it is a share of subscribers or records: give a number from 0 to 1"
                ));
            }
        }
        if self.subscribers == 0 {
            problems.push("--subscribers is 0: traffic needs at least 1 subscriber".into());
        }
        // Every subscriber is built, with its consent events and invoices, before any
        // record is drawn, and all of it is held in memory: the cost follows
        // --subscribers, not --records. At most --records subscribers can make a record,
        // so more would only cost memory and time (10 records for 100,000,000 subscribers
        // took 7.8 GB in 25 s). Refused rather than lowered, so the traffic written is
        // the traffic asked for.
        if self.records == 0 {
            problems.push("--records is 0: traffic needs at least 1 record".into());
        } else if u64::from(self.subscribers) > self.records {
            problems.push(format!(
                "--subscribers is {}, more than --records ({}): every subscriber is built (with its consent events and invoices) before the records are drawn, and at most --records of them can make a record; give --subscribers {} or fewer, or more --records",
                self.subscribers, self.records, self.records
            ));
        }
        if self.days == 0 {
            problems.push("--days is 0: traffic needs at least 1 day".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(GenError { problems })
        }
    }
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            subscribers: 1000,
            records: 20_000,
            seed: 42,
            start: Millis(1_767_225_600_000), // 2026-01-01T00:00:00Z
            days: 31,
            analytics_consent: 0.4,
            marketing_consent: 0.25,
            withdrawal_rate: 0.03,
            objection_rate: 0.02,
            restriction_rate: 0.01,
            erasure_rate: 0.005,
            contract_end_rate: 0.02,
            malformed_rate: 0.005,
        }
    }
}

/// One generated input line: a record, or bytes that must go to the dead letter.
// Records dominate by far; boxing them to shrink the rare malformed line is not worth it.
#[allow(clippy::large_enum_variant)]
pub enum Line {
    /// A valid record.
    Record(Record<'static>),
    /// A malformed line and what is wrong with it.
    Malformed(String),
}

/// The generated traffic, in time order.
pub struct Synthetic {
    /// Records and malformed lines; a malformed line sits where its record's time put it.
    pub lines: Vec<Line>,
    /// Control events, in time order.
    pub controls: Vec<ControlEvent>,
    /// Malformed control lines, each with the index in `controls` it is written before
    /// (ascending; `controls.len()` means after the last).
    pub malformed_controls: Vec<(usize, String)>,
}

struct Subscriber {
    msisdn: String,
    imsi: String,
    imei: Option<String>,
    home: (u32, u64),
    mnc: &'static str,
    weight: f64,
    /// When the contract ends, if within the span.
    contract_end: Option<Millis>,
    /// When processing is restricted and when that is lifted, if it is.
    restriction: Option<(Millis, Millis)>,
}

/// How long after a contract end records still come: the last sessions closing and
/// partial records of the network, as real feeds have them. Later, a subscriber whose
/// contract ended makes no traffic.
pub const LATE_AFTER_CONTRACT_END_MS: i64 = 2 * DAY_MS;

/// Decides each subscriber's contract end and restriction, both inside the span and a
/// restriction before the contract end, so that records fall inside restrictions and
/// after contract ends the way they do in a real feed.
fn plan_lifecycle(cfg: &GenConfig, subs: &mut [Subscriber], rng: &mut SmallRng) {
    let span = cfg.days.max(1) as i64 * DAY_MS;
    for s in subs {
        if rng.random::<f64>() < cfg.contract_end_rate {
            s.contract_end = Some(Millis(cfg.start.0 + rng.random_range(0..span)));
        }
        if rng.random::<f64>() < cfg.restriction_rate {
            let active = s.contract_end.map_or(span, |e| e.0 - cfg.start.0).max(4);
            let length = rng.random_range(active / 10..=active / 4).max(1);
            let on = cfg.start.0 + rng.random_range(0..=active - length);
            s.restriction = Some((Millis(on), Millis(on + length)));
        }
    }
}

// Type allocation codes of common handsets (public TAC prefixes), so TAC statistics look real.
const TACS: [&str; 6] = [
    "35693803", "35328110", "35391110", "86765104", "35407115", "01332700",
];
const ROAMING: [&str; 4] = ["23802", "24201", "26201", "23410"];

fn luhn_digit(body: &str) -> u32 {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = (b - b'0') as u32;
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

fn subscriber(rng: &mut SmallRng, i: u32) -> Subscriber {
    let msisdn = format!("+4670{:07}", (i as u64 * 7_919 + 1_000_003) % 10_000_000);
    let imsi = format!("24001{:010}", 3_000_000_000u64 + i as u64);
    let imei = (rng.random::<f64>() < 0.95).then(|| {
        let body = format!(
            "{}{:06}",
            TACS[rng.random_range(0..TACS.len())],
            rng.random_range(0..1_000_000)
        );
        format!("{body}{}", luhn_digit(&body))
    });
    // A few heavy users and a long tail, as in real traffic.
    let weight = 1.0 / (1.0 + rng.random::<f64>() * 9.0);
    Subscriber {
        msisdn,
        imsi,
        imei,
        home: (rng.random_range(100..140), rng.random_range(10_000..99_999)),
        mnc: "01",
        weight,
        contract_end: None,
        restriction: None,
    }
}

fn e164(rng: &mut SmallRng) -> String {
    if rng.random::<f64>() < 0.8 {
        format!("+4670{:07}", rng.random_range(0..10_000_000))
    } else {
        format!("+468{:07}", rng.random_range(0..10_000_000))
    }
}

/// Generates traffic for `cfg`.
pub fn generate(cfg: &GenConfig) -> Synthetic {
    generate_with(cfg, &|_| {})
}

/// Generates traffic for `cfg`, telling `progress` how many records are done now and then.
/// Time and memory follow both `cfg.records` and `cfg.subscribers` (every subscriber is
/// built up front): check `cfg` with [`GenConfig::validate`] first.
pub fn generate_with(cfg: &GenConfig, progress: &dyn Fn(u64)) -> Synthetic {
    // One generator drives every step, in this order: the same seed gives the same bytes
    // only if each step draws the same numbers in the same sequence.
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let subs = subscribers(cfg, &mut rng);
    let made = draw_records(cfg, &subs, &mut rng, progress);
    let lines = into_lines(made);
    let controls = controls(cfg, &subs, &mut rng);
    let malformed_controls = malformed_controls(cfg, &controls, &mut rng);
    Synthetic {
        lines,
        controls,
        malformed_controls,
    }
}

/// Every subscriber with its lifecycle, built before any record so that records can
/// respect contract ends and restrictions.
fn subscribers(cfg: &GenConfig, rng: &mut SmallRng) -> Vec<Subscriber> {
    let mut subs: Vec<Subscriber> = (0..cfg.subscribers.max(1))
        .map(|i| subscriber(rng, i))
        .collect();
    plan_lifecycle(cfg, &mut subs, rng);
    subs
}

/// Each subscriber's share of the traffic, cumulated, so one uniform draw picks a
/// subscriber by binary search (heavy users are picked more often).
fn cumulative_weights(subs: &[Subscriber]) -> Vec<f64> {
    let total_weight: f64 = subs.iter().map(|s| s.weight).sum();
    subs.iter()
        .scan(0.0, |acc, s| {
            *acc += s.weight / total_weight;
            Some(*acc)
        })
        .collect()
}

/// One drawn call, SMS or data session: who, when, what, and in how many records.
struct Session {
    /// Index of the subscriber (also numbers its UE IP address).
    si: usize,
    /// When it starts; each data partial starts an hour after the one before.
    t: Millis,
    /// Call, SMS or data, for every record of the session.
    kind: Kind,
    /// Records it is cut into: 1, or 1 to 4 hourly partials for data.
    partials: u32,
    /// Shared by every partial of one data session, as a real PGW does.
    charging_id: u64,
}

/// `cfg.records` records in generation order, each with the way it will be broken if it is
/// one of the malformed ones: which are malformed is decided as they are drawn, so no
/// later pass inserts into the stream.
fn draw_records(
    cfg: &GenConfig,
    subs: &[Subscriber],
    rng: &mut SmallRng,
    progress: &dyn Fn(u64),
) -> Vec<(Record<'static>, Option<u8>)> {
    let cumulative = cumulative_weights(subs);
    let mut made: Vec<(Record<'static>, Option<u8>)> = Vec::with_capacity(cfg.records as usize);
    let mut seq = 0u64;
    while (made.len() as u64) < cfg.records {
        let Some(session) = draw_session(cfg, subs, &cumulative, rng) else {
            continue;
        };
        for part in 0..session.partials {
            if made.len() as u64 >= cfg.records {
                break;
            }
            if made.len().is_multiple_of(4096) {
                progress(made.len() as u64);
            }
            seq += 1;
            let r = session_record(cfg, &subs[session.si], &session, part, seq, rng);
            let broken = (rng.random::<f64>() < cfg.malformed_rate)
                .then(|| rng.random_range(0..MALFORMATIONS));
            made.push((r, broken));
        }
    }
    progress(made.len() as u64);
    made
}

/// Draws a session, or `None` when the subscriber drawn is a former customer at that time
/// (no traffic, but for a few late records).
fn draw_session(
    cfg: &GenConfig,
    subs: &[Subscriber],
    cumulative: &[f64],
    rng: &mut SmallRng,
) -> Option<Session> {
    let span = cfg.days.max(1) as i64 * DAY_MS;
    let x: f64 = rng.random();
    let si = cumulative.partition_point(|c| *c < x).min(subs.len() - 1);
    let t = Millis(cfg.start.0 + rng.random_range(0..span));
    if subs[si]
        .contract_end
        .is_some_and(|end| t.0 >= end.0 + LATE_AFTER_CONTRACT_END_MS)
    {
        return None;
    }
    let roll: f64 = rng.random();
    // Mix by record count: data partials ~50%, calls ~30%, SMS ~20%.
    let kind = match roll {
        r if r < 0.15 => Kind::Moc,
        r if r < 0.30 => Kind::Mtc,
        r if r < 0.40 => Kind::SmsMo,
        r if r < 0.50 => Kind::SmsMt,
        _ => Kind::Data,
    };
    let partials = if kind == Kind::Data {
        rng.random_range(1..=4)
    } else {
        1
    };
    let charging_id: u64 = rng.random_range(1..u32::MAX as u64);
    Some(Session {
        si,
        t,
        kind,
        partials,
        charging_id,
    })
}

/// Record `part` (0-based) of a session, number `seq` of the stream. The fields are drawn
/// in the order they are written here (a struct literal evaluates in source order), which
/// the seed's output depends on.
fn session_record(
    cfg: &GenConfig,
    s: &Subscriber,
    session: &Session,
    part: u32,
    seq: u64,
    rng: &mut SmallRng,
) -> Record<'static> {
    let Session {
        si,
        t,
        kind,
        partials,
        charging_id,
    } = *session;
    let last = part + 1 == partials;
    let roaming = rng.random::<f64>() < 0.03;
    Record {
        record_id: format!("cdr-{:x}-{seq:08}", cfg.seed).into(),
        kind,
        msisdn: s.msisdn.clone().into(),
        imsi: s.imsi.clone().into(),
        imei: s.imei.clone().map(Into::into),
        other_party: other_party(kind, rng),
        start_time: Millis(t.0 + part as i64 * HOUR_MS),
        duration_s: duration(kind, last, rng),
        close_cause: close_cause(kind, last, rng),
        cell: cell(s, rng),
        serving_plmn: if roaming {
            ROAMING[rng.random_range(0..ROAMING.len())].into()
        } else {
            "24001".into()
        },
        service_centre: matches!(kind, Kind::SmsMo | Kind::SmsMt).then(|| "+46705008999".into()),
        apn: (kind == Kind::Data).then(|| apn(rng).into()),
        charging_id: (kind == Kind::Data).then_some(charging_id),
        rat: rat(rng),
        ue_ip: (kind == Kind::Data).then(|| ue_ip(si).into()),
        usage: (kind == Kind::Data).then(|| usage(rng)),
        recording_entity: if kind == Kind::Data {
            "pgw-sto-1"
        } else {
            "msc-sto-2"
        }
        .into(),
        local_seq_no: seq,
    }
}

/// The other party: none for data and for a tenth of incoming SMS, a Swedish number
/// otherwise.
fn other_party(kind: Kind, rng: &mut SmallRng) -> Option<std::borrow::Cow<'static, str>> {
    match kind {
        Kind::Data => None,
        Kind::SmsMt if rng.random::<f64>() < 0.1 => None,
        _ => Some(e164(rng).into()),
    }
}

/// Seconds: calls are short with a long tail; a data partial that is not the session's
/// last covers its whole hour; SMS have no duration.
fn duration(kind: Kind, last: bool, rng: &mut SmallRng) -> Option<u32> {
    match kind {
        Kind::Moc | Kind::Mtc => Some((rng.random::<f64>().ln().abs() * 110.0) as u32 + 1),
        Kind::Data if !last => Some(3600),
        Kind::Data => Some(rng.random_range(1..3600)),
        _ => None,
    }
}

/// Why the record was closed: every data partial but the last is `Partial`; a few end
/// abnormally, and some data sessions on a volume limit.
fn close_cause(kind: Kind, last: bool, rng: &mut SmallRng) -> CloseCause {
    match (kind, !last) {
        (Kind::Data, true) => CloseCause::Partial,
        _ if rng.random::<f64>() < 0.02 => CloseCause::Abnormal,
        (Kind::Data, false) if rng.random::<f64>() < 0.1 => CloseCause::VolumeLimit,
        _ => CloseCause::Normal,
    }
}

/// Where the record was made: mostly near the subscriber's home (one of a few location
/// areas, one of 16 cells), sometimes without a cell.
fn cell(s: &Subscriber, rng: &mut SmallRng) -> Option<Cell<'static>> {
    (rng.random::<f64>() < 0.97).then(|| Cell {
        mcc: "240".into(),
        mnc: s.mnc.into(),
        lac_or_tac: s.home.0 + rng.random_range(0..3),
        cell_id: s.home.1 * 16 + rng.random_range(0..16),
    })
}

/// A data session's access point: mostly the internet, some IMS (voice over LTE).
fn apn(rng: &mut SmallRng) -> &'static str {
    if rng.random::<f64>() < 0.9 {
        "internet"
    } else {
        "ims"
    }
}

/// The radio technology: 5% GSM, 10% UMTS, 55% LTE, 30% NR.
fn rat(rng: &mut SmallRng) -> Rat {
    match rng.random_range(0..100) {
        0..=4 => Rat::Gsm,
        5..=14 => Rat::Umts,
        15..=69 => Rat::Lte,
        _ => Rat::Nr,
    }
}

/// The subscriber's private address: one per subscriber, from its index (distinct for up
/// to 2^22 subscribers).
fn ue_ip(si: usize) -> String {
    format!(
        "10.{}.{}.{}",
        64 + si / 65_536 % 64,
        si / 256 % 256,
        si % 256
    )
}

/// A data record's usage: one or two rating groups, volumes log-uniform because session
/// volumes span orders of magnitude.
fn usage(rng: &mut SmallRng) -> Vec<Usage> {
    let n = if rng.random::<f64>() < 0.3 { 2 } else { 1 };
    (0..n)
        .map(|k| Usage {
            rating_group: [10, 20, 30][k % 3],
            ul_bytes: log_uniform(rng, 1_000.0, 20_000_000.0),
            dl_bytes: log_uniform(rng, 10_000.0, 500_000_000.0),
        })
        .collect()
}

/// The stream in time order, each malformed record broken now. Stable, so records of the
/// same instant keep their generation order.
fn into_lines(mut made: Vec<(Record<'static>, Option<u8>)>) -> Vec<Line> {
    made.sort_by_key(|(r, _)| r.start_time);
    made.into_iter()
        .map(|(r, broken)| match broken {
            Some(how) => Line::Malformed(malform(how, &r)),
            None => Line::Record(r),
        })
        .collect()
}

fn log_uniform(rng: &mut SmallRng, lo: f64, hi: f64) -> u64 {
    (lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp() as u64
}

/// How many ways [`malform`] knows.
const MALFORMATIONS: u8 = 5;

/// Breaks a record the ways real feeds break: truncation, a stray field, a bad number,
/// a field its kind needs gone missing, wrong types.
fn malform(how: u8, r: &Record<'_>) -> String {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    let obj = v.as_object_mut();
    match (how, obj) {
        (0, _) => {
            let s = serde_json::to_string(r).unwrap_or_default();
            return s[..s.len() / 2].to_string();
        }
        (1, Some(o)) => {
            o.insert("subscriber_name".into(), "unknown".into());
        }
        (2, Some(o)) => {
            o.insert("msisdn".into(), "070-123 45 67".into());
        }
        (3, Some(o)) => {
            o.remove("start_time");
        }
        (_, Some(o)) => {
            o.insert("local_seq_no".into(), "seven".into());
        }
        _ => {}
    }
    v.to_string()
}

/// Control lines broken the ways a feed breaks them: an unknown type, a purpose that does
/// not exist, a bad instant, a missing subscriber, a stray field, a cut-off line. About
/// `malformed_rate` of them, spread through the file.
fn malformed_controls(
    cfg: &GenConfig,
    controls: &[ControlEvent],
    rng: &mut SmallRng,
) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, e) in controls.iter().enumerate() {
        if rng.random::<f64>() >= cfg.malformed_rate {
            continue;
        }
        let mut v = serde_json::to_value(e.to_raw()).unwrap_or_default();
        let Some(o) = v.as_object_mut() else { continue };
        let line = match rng.random_range(0..6) {
            0 => {
                o.insert("type".into(), "unsubscribe".into());
                v.to_string()
            }
            1 => {
                o.insert("type".into(), "consent".into());
                o.insert("purpose".into(), "telepathy".into());
                o.insert("granted".into(), true.into());
                v.to_string()
            }
            2 => {
                o.insert("at".into(), "yesterday".into());
                v.to_string()
            }
            3 => {
                o.remove("msisdn");
                v.to_string()
            }
            4 => {
                o.insert("reason".into(), "asked by phone".into());
                v.to_string()
            }
            _ => {
                let s = v.to_string();
                s[..s.len() / 2].to_string()
            }
        };
        out.push((i, line));
    }
    out
}

fn controls(cfg: &GenConfig, subs: &[Subscriber], rng: &mut SmallRng) -> Vec<ControlEvent> {
    let mut out = Vec::new();
    let span = cfg.days.max(1) as i64 * DAY_MS;
    let before = Millis(cfg.start.0 - 30 * DAY_MS);
    let during = |rng: &mut SmallRng| Millis(cfg.start.0 + rng.random_range(0..span));
    for s in subs {
        let ev = |at, change| ControlEvent {
            msisdn: s.msisdn.clone(),
            at,
            change,
        };
        for (p, rate) in [
            (Purpose::Analytics, cfg.analytics_consent),
            (Purpose::Marketing, cfg.marketing_consent),
        ] {
            if rng.random::<f64>() < rate {
                out.push(ev(
                    before,
                    Change::Consent {
                        purpose: p,
                        granted: true,
                    },
                ));
                if rng.random::<f64>() < cfg.withdrawal_rate / rate.max(0.01) {
                    out.push(ev(
                        during(rng),
                        Change::Consent {
                            purpose: p,
                            granted: false,
                        },
                    ));
                }
            }
        }
        if rng.random::<f64>() < cfg.objection_rate {
            out.push(ev(
                during(rng),
                Change::Objection {
                    purpose: Purpose::Marketing,
                },
            ));
        }
        if rng.random::<f64>() < cfg.objection_rate / 2.0 {
            out.push(ev(
                during(rng),
                Change::Objection {
                    purpose: Purpose::Analytics,
                },
            ));
        }
        if let Some((on, off)) = s.restriction {
            out.push(ev(on, Change::Restriction { active: true }));
            out.push(ev(off, Change::Restriction { active: false }));
        }
        if rng.random::<f64>() < cfg.erasure_rate {
            out.push(ev(during(rng), Change::Erasure));
        }
        if let Some(end) = s.contract_end {
            out.push(ev(end, Change::ContractEnded));
        }
        // Monthly invoices, most settled 5 to 25 days after the period closes; the last
        // one covers the month the contract ended in.
        let mut month = month_start(cfg.start);
        while month < Millis(cfg.start.0 + span) && s.contract_end.is_none_or(|e| month <= e) {
            let next = month.add_months(1);
            if rng.random::<f64>() < 0.97 {
                let at = Millis(next.0 + rng.random_range(5..25) * DAY_MS);
                out.push(ev(
                    at,
                    Change::InvoiceSettled {
                        period_start: month,
                        period_end: next,
                    },
                ));
            }
            month = next;
        }
    }
    out.sort_by_key(|e| e.at);
    out
}

fn month_start(t: Millis) -> Millis {
    use chrono::{DateTime, Datelike, TimeZone, Utc};
    let dt = DateTime::from_timestamp_millis(t.0).unwrap_or_default();
    Utc.with_ymd_and_hms(dt.year(), dt.month(), 1, 0, 0, 0)
        .single()
        .map(|d| Millis(d.timestamp_millis()))
        .unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn json(s: &Synthetic) -> Vec<String> {
        s.lines
            .iter()
            .map(|l| match l {
                Line::Record(r) => serde_json::to_string(r).unwrap(),
                Line::Malformed(m) => m.clone(),
            })
            .collect()
    }

    #[test]
    fn same_seed_same_traffic_and_records_are_valid() {
        let cfg = GenConfig {
            subscribers: 50,
            records: 2_000,
            ..Default::default()
        };
        let a = generate(&cfg);
        let b = generate(&cfg);
        assert_eq!(a.lines.len(), 2_000);
        assert_eq!(json(&a), json(&b));
        assert_eq!(a.malformed_controls, b.malformed_controls);
        let other = generate(&GenConfig { seed: 43, ..cfg });
        assert_ne!(json(&a), json(&other));
        let mut kinds = std::collections::HashMap::new();
        let mut last = Millis(i64::MIN);
        for l in &a.lines {
            if let Line::Record(r) = l {
                r.validate().unwrap();
                assert!(r.start_time >= last, "records are in time order");
                last = r.start_time;
                *kinds.entry(r.kind.id()).or_insert(0) += 1;
            }
        }
        assert!(
            kinds["data"] > kinds["moc"] && kinds["moc"] > 0 && kinds["sms_mt"] > 0,
            "{kinds:?}"
        );
        assert!(
            a.controls
                .iter()
                .any(|c| matches!(c.change, Change::InvoiceSettled { .. }))
        );
    }

    /// Regression: restrictions lasted three days and, at the demo's density, held no
    /// record, and every contract ended at the very end of the span; so no record was
    /// ever restricted and no contract-anchored clock ever ran out.
    #[test]
    fn restrictions_hold_records_and_contracts_end_inside_the_traffic() {
        let cfg = GenConfig {
            days: 730,
            malformed_rate: 0.0,
            ..Default::default()
        };
        let end_of_span = Millis(cfg.start.0 + 730 * DAY_MS);
        let s = generate(&cfg);
        let mut on: HashMap<&str, Millis> = HashMap::new();
        let mut restricted: HashMap<&str, (Millis, Millis)> = HashMap::new();
        let mut ended: HashMap<&str, Millis> = HashMap::new();
        for c in &s.controls {
            let m = c.msisdn.as_str();
            match c.change {
                Change::Restriction { active: true } => {
                    on.insert(m, c.at);
                }
                Change::Restriction { active: false } => {
                    restricted.insert(m, (on[m], c.at));
                }
                Change::ContractEnded => {
                    ended.insert(m, c.at);
                }
                _ => {}
            }
        }
        assert!(
            ended.len() >= 10 && restricted.len() >= 5,
            "{ended:?} {restricted:?}"
        );
        for (m, e) in &ended {
            assert!(cfg.start < *e && *e < end_of_span, "{m}: {e}");
            if let Some((_, off)) = restricted.get(m) {
                assert!(off <= e, "{m}: a restriction while still a customer");
            }
        }
        let (mut inside, mut late) = (0, 0);
        for l in &s.lines {
            let Line::Record(r) = l else { continue };
            let m: &str = &r.msisdn;
            if restricted
                .get(m)
                .is_some_and(|(a, b)| *a <= r.start_time && r.start_time < *b)
            {
                inside += 1;
            }
            if let Some(e) = ended.get(m)
                && r.start_time >= *e
            {
                assert!(r.start_time.0 < e.0 + LATE_AFTER_CONTRACT_END_MS, "{m}");
                late += 1;
            }
        }
        assert!(inside >= 10, "records inside restrictions: {inside}");
        assert!(late < 20, "records after a contract end: {late}");
        // Same seed, same lifecycle.
        assert_eq!(generate(&cfg).controls, s.controls);
    }

    #[test]
    fn malformed_lines_fail_to_decode_and_are_spread_through_the_stream() {
        let cfg = GenConfig {
            records: 3_000,
            malformed_rate: 0.05,
            ..Default::default()
        };
        let s = generate(&cfg);
        let at: Vec<usize> = s
            .lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| matches!(l, Line::Malformed(_)).then_some(i))
            .collect();
        assert!(at.len() > 50, "{}", at.len());
        assert!(at[0] < 300 && *at.last().unwrap() > 2_700, "{at:?}");
        for l in &s.lines {
            if let Line::Malformed(m) = l {
                assert!(
                    crate::codec::json::decode_record(m.as_bytes()).is_err(),
                    "{m}"
                );
            }
        }
        assert!(
            s.malformed_controls.len() > 5,
            "{}",
            s.malformed_controls.len()
        );
        let mut prev = 0;
        for (i, m) in &s.malformed_controls {
            assert!(*i >= prev && *i <= s.controls.len());
            prev = *i;
            assert!(
                crate::codec::json::decode_control(m.as_bytes()).is_err(),
                "{m}"
            );
        }
        // And none at all when none are asked for.
        let clean = generate(&GenConfig {
            malformed_rate: 0.0,
            ..cfg
        });
        assert!(clean.lines.iter().all(|l| matches!(l, Line::Record(_))));
        assert!(clean.malformed_controls.is_empty());
    }

    /// The instant a generated line carries, read from its text: records and most
    /// malformed lines have one (a line cut in half may lose it, and one kind of
    /// malformation removes it).
    fn start_time(line: &str) -> Option<Millis> {
        let (_, rest) = line.split_once(r#""start_time":""#)?;
        Millis::parse(rest.split('"').next()?).ok()
    }

    /// Regression: each malformed line was inserted into a Vec holding the whole run, so
    /// malformed lines made generation quadratic (400k records: 14.5 s against 9.7 s
    /// without any, 4x per 2x). Now whether a record is malformed is decided while it is
    /// made, and its line is written where its record's time puts it, in the one pass
    /// that writes every line. This checks that placement, not the clock (a timed
    /// comparison failed under load): an inserted line lands at a spot picked
    /// regardless of its time, among records of other times, and breaks the time order.
    #[test]
    fn malformed_lines_sit_where_their_time_puts_them_not_inserted_later() {
        let seen = std::cell::RefCell::new(Vec::new());
        let s = generate_with(
            &GenConfig {
                records: 4_000,
                subscribers: 200,
                malformed_rate: 0.5,
                ..Default::default()
            },
            &|n| seen.borrow_mut().push(n),
        );
        assert_eq!(s.lines.len(), 4_000);
        let seen = seen.into_inner();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress only grows");
        assert_eq!(seen.last(), Some(&4_000));
        let (mut malformed, mut placed) = (0, 0);
        let mut last = (Millis(i64::MIN), 0);
        for (i, text) in json(&s).iter().enumerate() {
            let bad = matches!(s.lines[i], Line::Malformed(_));
            malformed += usize::from(bad);
            let Some(t) = start_time(text) else {
                assert!(bad, "line {i}: a record without a time: {text}");
                continue;
            };
            placed += usize::from(bad);
            assert!(
                t >= last.0,
                "line {i} ({}) at {t} comes after line {} at {}: {text}",
                if bad { "malformed" } else { "a record" },
                last.1,
                last.0
            );
            last = (t, i);
        }
        // Enough malformed lines keep their time for the order to say where they went.
        assert!(
            malformed > 1_500 && placed > malformed / 2,
            "{placed} of {malformed} malformed lines carry a time"
        );
    }

    #[test]
    fn settings_are_checked_with_every_problem_named() {
        assert_eq!(GenConfig::default().validate(), Ok(()));
        let e = GenConfig {
            subscribers: 0,
            analytics_consent: 1.5,
            malformed_rate: -0.1,
            objection_rate: f64::NAN,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.problems.len(), 4, "{e}");
        let text = e.to_string();
        for want in [
            "--subscribers",
            "--analytics-consent is 1.5",
            "--malformed-rate",
            "--objection-rate",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }

    /// Regression: `--records 10 --subscribers 100000000` took 7.8 GB in 25 s, building
    /// every subscriber before drawing 10 records. More subscribers than records are
    /// refused, naming both settings, before anything is built.
    #[test]
    fn more_subscribers_than_records_are_refused() {
        let e = GenConfig {
            records: 10,
            subscribers: 100_000_000,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].contains("--subscribers is 100000000, more than --records (10)")
                && e.problems[0].contains("--subscribers 10 or fewer"),
            "{e}"
        );
        // Listed with the other problems.
        let e = GenConfig {
            records: 10,
            subscribers: 11,
            days: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        let e = GenConfig {
            records: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.problems,
            ["--records is 0: traffic needs at least 1 record"]
        );
        // As many as records is fine, and so are the demo's defaults.
        let even = GenConfig {
            records: 10,
            subscribers: 10,
            ..Default::default()
        };
        assert_eq!(even.validate(), Ok(()));
        assert_eq!(generate(&even).lines.len(), 10);
        assert_eq!(
            (
                GenConfig::default().records,
                GenConfig::default().subscribers
            ),
            (20_000, 1_000)
        );
    }
}
