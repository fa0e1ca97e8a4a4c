//! Synthetic traffic: subscribers with devices and home cells, a real kind mix (calls,
//! SMS, hourly data partials), consent and rights events, and some malformed records.
//! Reproducible: the same config and seed give the same bytes.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::core::control::{Change, ControlEvent};
use crate::core::purpose::Purpose;
use crate::core::record::{Cell, CloseCause, Kind, Rat, Record, Usage};
use crate::core::time::{DAY_MS, HOUR_MS, Millis};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// Distinct subscribers.
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
    /// Share with processing restricted for a while.
    pub restriction_rate: f64,
    /// Share asking for erasure.
    pub erasure_rate: f64,
    /// Share whose contract ends during the span.
    pub contract_end_rate: f64,
    /// Share of malformed records.
    pub malformed_rate: f64,
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
            restriction_rate: 0.005,
            erasure_rate: 0.005,
            contract_end_rate: 0.01,
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
    /// Records and malformed lines.
    pub lines: Vec<Line>,
    /// Control events, in time order.
    pub controls: Vec<ControlEvent>,
}

struct Subscriber {
    msisdn: String,
    imsi: String,
    imei: Option<String>,
    home: (u32, u64),
    mnc: &'static str,
    weight: f64,
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
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let subs: Vec<Subscriber> = (0..cfg.subscribers.max(1))
        .map(|i| subscriber(&mut rng, i))
        .collect();
    let total_weight: f64 = subs.iter().map(|s| s.weight).sum();
    let cumulative: Vec<f64> = subs
        .iter()
        .scan(0.0, |acc, s| {
            *acc += s.weight / total_weight;
            Some(*acc)
        })
        .collect();
    let span = cfg.days.max(1) as i64 * DAY_MS;
    let mut lines = Vec::with_capacity(cfg.records as usize);
    let mut seq = 0u64;
    while (lines.len() as u64) < cfg.records {
        let x: f64 = rng.random();
        let si = cumulative.partition_point(|c| *c < x).min(subs.len() - 1);
        let s = &subs[si];
        let t = Millis(cfg.start.0 + rng.random_range(0..span));
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
        for part in 0..partials {
            if lines.len() as u64 >= cfg.records {
                break;
            }
            seq += 1;
            let start = Millis(t.0 + part as i64 * HOUR_MS);
            let roaming = rng.random::<f64>() < 0.03;
            let r = Record {
                record_id: format!("cdr-{:x}-{seq:08}", cfg.seed).into(),
                kind,
                msisdn: s.msisdn.clone().into(),
                imsi: s.imsi.clone().into(),
                imei: s.imei.clone().map(Into::into),
                other_party: match kind {
                    Kind::Data => None,
                    Kind::SmsMt if rng.random::<f64>() < 0.1 => None,
                    _ => Some(e164(&mut rng).into()),
                },
                start_time: start,
                duration_s: match kind {
                    Kind::Moc | Kind::Mtc => {
                        Some((rng.random::<f64>().ln().abs() * 110.0) as u32 + 1)
                    }
                    Kind::Data if part + 1 < partials => Some(3600),
                    Kind::Data => Some(rng.random_range(1..3600)),
                    _ => None,
                },
                close_cause: match (kind, part + 1 < partials) {
                    (Kind::Data, true) => CloseCause::Partial,
                    _ if rng.random::<f64>() < 0.02 => CloseCause::Abnormal,
                    (Kind::Data, false) if rng.random::<f64>() < 0.1 => CloseCause::VolumeLimit,
                    _ => CloseCause::Normal,
                },
                cell: (rng.random::<f64>() < 0.97).then(|| Cell {
                    mcc: "240".into(),
                    mnc: s.mnc.into(),
                    lac_or_tac: s.home.0 + rng.random_range(0..3),
                    cell_id: s.home.1 * 16 + rng.random_range(0..16),
                }),
                serving_plmn: if roaming {
                    ROAMING[rng.random_range(0..ROAMING.len())].into()
                } else {
                    "24001".into()
                },
                service_centre: matches!(kind, Kind::SmsMo | Kind::SmsMt)
                    .then(|| "+46705008999".into()),
                apn: (kind == Kind::Data).then(|| {
                    if rng.random::<f64>() < 0.9 {
                        "internet"
                    } else {
                        "ims"
                    }
                    .into()
                }),
                charging_id: (kind == Kind::Data).then_some(charging_id),
                rat: match rng.random_range(0..100) {
                    0..=4 => Rat::Gsm,
                    5..=14 => Rat::Umts,
                    15..=69 => Rat::Lte,
                    _ => Rat::Nr,
                },
                ue_ip: (kind == Kind::Data).then(|| {
                    format!(
                        "10.{}.{}.{}",
                        64 + si / 65_536 % 64,
                        si / 256 % 256,
                        si % 256
                    )
                    .into()
                }),
                usage: (kind == Kind::Data).then(|| {
                    let n = if rng.random::<f64>() < 0.3 { 2 } else { 1 };
                    (0..n)
                        .map(|k| Usage {
                            rating_group: [10, 20, 30][k % 3],
                            ul_bytes: rng.random_range(1_000..20_000_000),
                            dl_bytes: rng.random_range(10_000..500_000_000),
                        })
                        .collect()
                }),
                recording_entity: if kind == Kind::Data {
                    "pgw-sto-1"
                } else {
                    "msc-sto-2"
                }
                .into(),
                local_seq_no: seq,
            };
            if rng.random::<f64>() < cfg.malformed_rate {
                lines.push(Line::Malformed(malform(&mut rng, &r)));
            } else {
                lines.push(Line::Record(r));
            }
        }
    }
    lines.sort_by_key(|l| match l {
        Line::Record(r) => r.start_time,
        Line::Malformed(_) => Millis(i64::MIN),
    });
    // Keep malformed lines spread through the stream rather than first.
    let (mut bad, good): (Vec<Line>, Vec<Line>) = lines
        .into_iter()
        .partition(|l| matches!(l, Line::Malformed(_)));
    let mut lines = good;
    let n = lines.len().max(1);
    for (k, l) in bad.drain(..).enumerate() {
        let at = (k * 7_919 + 13) % n;
        lines.insert(at.min(lines.len()), l);
    }
    Synthetic {
        lines,
        controls: controls(cfg, &subs, &mut rng),
    }
}

/// Breaks a record the ways real feeds break: truncation, a stray field, a bad number,
/// a field its kind needs gone missing, wrong types.
fn malform(rng: &mut SmallRng, r: &Record<'_>) -> String {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    let obj = v.as_object_mut();
    match (rng.random_range(0..5), obj) {
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
        if rng.random::<f64>() < cfg.restriction_rate {
            let on = during(rng);
            out.push(ev(on, Change::Restriction { active: true }));
            out.push(ev(
                Millis(on.0 + 3 * DAY_MS),
                Change::Restriction { active: false },
            ));
        }
        if rng.random::<f64>() < cfg.erasure_rate {
            out.push(ev(during(rng), Change::Erasure));
        }
        if rng.random::<f64>() < cfg.contract_end_rate {
            out.push(ev(Millis(cfg.start.0 + span), Change::ContractEnded));
        }
        // Monthly invoices, most settled 5 to 25 days after the period closes.
        let mut month = month_start(cfg.start);
        while month < Millis(cfg.start.0 + span) {
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
    use super::*;

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
        let json = |s: &Synthetic| {
            s.lines
                .iter()
                .map(|l| match l {
                    Line::Record(r) => serde_json::to_string(r).unwrap(),
                    Line::Malformed(m) => m.clone(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(json(&a), json(&b));
        let mut kinds = std::collections::HashMap::new();
        for l in &a.lines {
            if let Line::Record(r) = l {
                r.validate().unwrap();
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

    #[test]
    fn malformed_lines_fail_to_decode() {
        let cfg = GenConfig {
            records: 3_000,
            malformed_rate: 0.05,
            ..Default::default()
        };
        let s = generate(&cfg);
        let bad: Vec<&String> = s
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Malformed(m) => Some(m),
                _ => None,
            })
            .collect();
        assert!(bad.len() > 50);
        for m in bad {
            assert!(
                crate::codec::json::decode_record(m.as_bytes()).is_err(),
                "{m}"
            );
        }
    }
}
