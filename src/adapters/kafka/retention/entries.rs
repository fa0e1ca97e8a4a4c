//! The messages of the retention-schedule topic (compacted, one partition per input
//! partition) and of the retention topic: how a window, a remembered settlement and the
//! control events already applied are written, and how they are read back.
//!
//! Keys (the compaction keys):
//! - `PURPOSE/SUBJECT/BUCKET`: a window (`retention_window`; a tombstone when it is gone).
//!   The subject may hold `/`: the purpose is before the first, the bucket after the last.
//! - `settled/PURPOSE/START_MS/SUBJECT`: a settled invoice period remembered for late
//!   records (`retention_settlement`).
//! - `control-applied/PARTITION`: the control-topic offset up to which events were applied
//!   to this partition's windows (`control_applied`), so a right is applied exactly once.
//! - `crowd/MONTH/PURPOSE/DIGEST`: anonymised copies held back (`anonymised_crowd`, see
//!   [`super::crowds`]).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::crowds::{self, Crowd, CrowdKey};
use crate::codec::json::string;
use crate::core::retention::schedule::{Persist, WindowKey, WindowState};
use crate::core::retention::{Expiry, Reason};
use crate::policy::Policy;
use crate::vocab::purpose::Purpose;
use crate::vocab::time::Millis;

/// A message read back from the schedule topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A window's state (`None`: a tombstone).
    Window(WindowKey, Option<WindowState>),
    /// A remembered settlement (`None`: forgotten).
    Settlement {
        /// The route.
        purpose: Purpose,
        /// The subject.
        subject: String,
        /// The period's start.
        start: Millis,
        /// The period's end and the settlement's deadline.
        period: Option<(Millis, Millis)>,
    },
    /// A crowd of anonymised copies held back (`None`: released).
    Crowd(CrowdKey, Option<Crowd>),
    /// Control events up to this offset of this control partition are applied.
    Applied {
        /// The control-topic partition.
        partition: i32,
        /// The offset of the last event applied.
        offset: i64,
    },
}

/// Why a schedule message cannot be read. Never holds the message's content: keys and
/// values name subscribers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Not one of the three key forms.
    #[error("the key is not a window, settlement or control marker key")]
    Key,
    /// The key names a window, but its value cannot be read: the window is expired at once
    /// (deleting early is safe, late is not).
    #[error("the value of a window entry cannot be read")]
    Window(WindowKey),
    /// Another value cannot be read.
    #[error("the value of a {0} entry cannot be read")]
    Value(&'static str),
}

/// A window's value (schemas/retention-window.schema.json).
#[derive(Serialize, Deserialize)]
struct WindowValue<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    route: Cow<'a, str>,
    #[serde(borrow)]
    purpose: Cow<'a, str>,
    #[serde(borrow)]
    subscriber: Option<Cow<'a, str>>,
    bucket: i64,
    window_start: Millis,
    window_end: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    anchor: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    rule: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    after: Option<Cow<'a, str>>,
    deadline: Option<Millis>,
    /// The rule id, or the right that ended the window; older entries (written while a
    /// partition was being read back) carry none: their rule.
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    policy: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
struct SettlementValue {
    #[serde(rename = "type")]
    kind: String,
    period_end: Millis,
    deadline: Millis,
}

#[derive(Serialize, Deserialize)]
struct AppliedValue {
    #[serde(rename = "type")]
    kind: String,
    offset: i64,
}

/// The schedule-topic key of a window.
pub fn window_key(k: &WindowKey) -> String {
    let mut bucket = itoa::Buffer::new();
    let bucket = bucket.format(k.bucket);
    let id = k.purpose.id();
    let mut key = String::with_capacity(id.len() + k.subject.len() + bucket.len() + 2);
    key.push_str(id);
    key.push('/');
    key.push_str(&k.subject);
    key.push('/');
    key.push_str(bucket);
    key
}

/// A window's value, written by hand: these are about two messages per input record (a
/// perf profile of the e2e run put serde's writing of them at 3.4% of cdrguard's CPU).
/// Byte for byte what serde_json writes for [`WindowValue`] (the field order and the
/// omitted and null members included), which reads it back;
/// `tests::hand_written_window_values_are_serde_json`.
fn window_value(k: &WindowKey, st: &WindowState, policy: &Policy) -> Vec<u8> {
    let rule = policy.rule(k.purpose).map(|r| &r.retention);
    let mut out = Vec::with_capacity(320 + k.subject.len());
    let time = |out: &mut Vec<u8>, m: Millis| {
        out.push(b'"');
        out.extend_from_slice(m.to_buf().as_bytes());
        out.push(b'"');
    };
    out.extend_from_slice(b"{\"type\":\"retention_window\",\"route\":");
    string(&mut out, k.purpose.id());
    out.extend_from_slice(b",\"purpose\":");
    string(&mut out, k.purpose.id());
    out.extend_from_slice(b",\"subscriber\":");
    if k.subject.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        string(&mut out, &k.subject);
    }
    out.extend_from_slice(b",\"bucket\":");
    out.extend_from_slice(itoa::Buffer::new().format(k.bucket).as_bytes());
    out.extend_from_slice(b",\"window_start\":");
    time(&mut out, st.from);
    out.extend_from_slice(b",\"window_end\":");
    time(&mut out, st.to);
    if let Some(r) = rule {
        out.extend_from_slice(b",\"anchor\":");
        string(&mut out, r.anchor.id());
        out.extend_from_slice(b",\"rule\":");
        string(&mut out, r.rule_id.as_str());
        out.extend_from_slice(b",\"after\":");
        string(&mut out, r.after.as_str());
    }
    out.extend_from_slice(b",\"deadline\":");
    match st.deadline {
        Some(d) => time(&mut out, d),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"reason\":");
    string(&mut out, reason_text(&st.reason));
    out.extend_from_slice(b",\"policy\":");
    string(&mut out, policy.tag.as_str());
    out.push(b'}');
    out
}

/// [`window_value`] through serde: what it must match.
#[cfg(test)]
fn window_value_serde(k: &WindowKey, st: &WindowState, policy: &Policy) -> Vec<u8> {
    let rule = policy.rule(k.purpose).map(|r| &r.retention);
    let v = WindowValue {
        kind: "retention_window".into(),
        route: k.purpose.id().into(),
        purpose: k.purpose.id().into(),
        subscriber: (!k.subject.is_empty()).then_some(k.subject.as_str().into()),
        bucket: k.bucket,
        window_start: st.from,
        window_end: st.to,
        anchor: rule.map(|r| r.anchor.id().into()),
        rule: rule.map(|r| r.rule_id.as_str().into()),
        after: rule.map(|r| r.after.as_str().into()),
        deadline: st.deadline,
        reason: Some(reason_text(&st.reason).into()),
        policy: policy.tag.as_str().into(),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

fn reason_text(r: &Reason) -> &str {
    match r {
        Reason::ConsentWithdrawn => "consent_withdrawn",
        Reason::Objection => "objection",
        Reason::Erasure => "erasure",
        Reason::Rule(id) => id,
    }
}

/// The message (key, value; `None`: a tombstone) that persists one change.
pub fn encode(change: &Persist, policy: &Policy) -> (String, Option<Vec<u8>>) {
    match change {
        Persist::Window(k, state) => (
            window_key(k),
            state.as_ref().map(|st| window_value(k, st, policy)),
        ),
        Persist::Settlement {
            purpose,
            subject,
            start,
            period,
        } => {
            let key = format!("settled/{}/{}/{subject}", purpose.id(), start.0);
            let value = period.map(|(end, deadline)| {
                serde_json::to_vec(&SettlementValue {
                    kind: "retention_settlement".into(),
                    period_end: end,
                    deadline,
                })
                .unwrap_or_default()
            });
            (key, value)
        }
    }
}

/// The marker of the control events applied to a partition's windows.
pub fn encode_applied(partition: i32, offset: i64) -> (String, Vec<u8>) {
    (
        format!("control-applied/{partition}"),
        serde_json::to_vec(&AppliedValue {
            kind: "control_applied".into(),
            offset,
        })
        .unwrap_or_default(),
    )
}

/// Reads one schedule-topic message back (`value` `None`: a tombstone).
pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<Entry, EntryError> {
    let key = std::str::from_utf8(key).map_err(|_| EntryError::Key)?;
    if let Some(rest) = key.strip_prefix("control-applied/") {
        let partition = rest.parse().map_err(|_| EntryError::Key)?;
        let offset = match value {
            None => -1,
            Some(v) => {
                serde_json::from_slice::<AppliedValue>(v)
                    .map_err(|_| EntryError::Value("control marker"))?
                    .offset
            }
        };
        return Ok(Entry::Applied { partition, offset });
    }
    if let Some(c) = crowds::decode(key, value) {
        return c
            .map(|(k, crowd)| Entry::Crowd(k, crowd))
            .map_err(|()| EntryError::Value("crowd"));
    }
    if let Some(rest) = key.strip_prefix("settled/") {
        let mut parts = rest.splitn(3, '/');
        let (Some(p), Some(start), Some(subject)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(EntryError::Key);
        };
        let purpose = Purpose::from_id(p).ok_or(EntryError::Key)?;
        let start = Millis(start.parse().map_err(|_| EntryError::Key)?);
        let period = match value {
            None => None,
            Some(v) => {
                let s: SettlementValue =
                    serde_json::from_slice(v).map_err(|_| EntryError::Value("settlement"))?;
                Some((s.period_end, s.deadline))
            }
        };
        return Ok(Entry::Settlement {
            purpose,
            subject: subject.to_string(),
            start,
            period,
        });
    }
    let (p, rest) = key.split_once('/').ok_or(EntryError::Key)?;
    let (subject, bucket) = rest.rsplit_once('/').ok_or(EntryError::Key)?;
    let k = WindowKey {
        purpose: Purpose::from_id(p).ok_or(EntryError::Key)?,
        subject: subject.to_string(),
        bucket: bucket.parse().map_err(|_| EntryError::Key)?,
    };
    let Some(v) = value else {
        return Ok(Entry::Window(k, None));
    };
    let Ok(w) = serde_json::from_slice::<WindowValue<'_>>(v) else {
        return Err(EntryError::Window(k));
    };
    let reason = match (w.reason.as_deref(), w.rule.as_deref()) {
        (Some("consent_withdrawn"), _) => Reason::ConsentWithdrawn,
        (Some("objection"), _) => Reason::Objection,
        (Some("erasure"), _) => Reason::Erasure,
        (Some(r), _) | (None, Some(r)) => Reason::Rule(r.to_string()),
        (None, None) => Reason::Rule(String::new()),
    };
    Ok(Entry::Window(
        k,
        Some(WindowState {
            from: w.window_start,
            to: w.window_end,
            deadline: w.deadline,
            reason,
        }),
    ))
}

/// The retention topic's key of an expiry: its route and subject, so a store reading by
/// key sees one subscriber's expiries in order.
pub fn expiry_key(e: &Expiry) -> String {
    format!("{}/{}", e.route, e.subscriber.as_deref().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo").unwrap()
    }

    #[test]
    fn hand_written_window_values_are_serde_json() {
        let t = |s: &str| Millis::parse(s).unwrap();
        let subjects = [
            "",
            "+46701234567",
            "k1.analytics:ab/cd",
            "quote\"back\\slash",
            "tab\tnew\nline\u{1}",
            "åäö ünïcode ✓",
        ];
        let reasons = [
            Reason::Rule("excedo.billing".into()),
            Reason::Rule("odd \"rule\" id".into()),
            Reason::ConsentWithdrawn,
            Reason::Objection,
            Reason::Erasure,
        ];
        let mut seen = 0;
        for name in [
            "alleato",
            "excedo",
            "hektor-mobil",
            "partnersec",
            "select-telecom",
        ] {
            let p =
                crate::policy::parse_policy(crate::policy::shipped(name).unwrap(), name).unwrap();
            for purpose in Purpose::ALL {
                for subject in subjects {
                    for reason in &reasons {
                        for deadline in [None, Some(t("2033-01-31T23:59:59.999Z"))] {
                            for bucket in [-3, 0, 20_500, 492_001, i64::MAX] {
                                let k = WindowKey {
                                    purpose,
                                    subject: subject.into(),
                                    bucket,
                                };
                                let st = WindowState {
                                    from: t("2026-02-01T00:00:00Z"),
                                    to: t("2026-02-01T23:59:59.999Z"),
                                    deadline,
                                    reason: reason.clone(),
                                };
                                let fast = window_value(&k, &st, &p);
                                assert_eq!(
                                    String::from_utf8_lossy(&fast),
                                    String::from_utf8_lossy(&window_value_serde(&k, &st, &p)),
                                    "{name} {purpose:?} {subject:?}"
                                );
                                assert_eq!(
                                    window_key(&k),
                                    format!("{}/{}/{}", purpose.id(), subject, bucket)
                                );
                                // And it reads back.
                                let Entry::Window(back_k, Some(back)) =
                                    decode(window_key(&k).as_bytes(), Some(&fast)).unwrap()
                                else {
                                    panic!("not a window");
                                };
                                assert_eq!((back_k, back.deadline), (k, st.deadline));
                                seen += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(seen > 1000);
    }

    #[test]
    fn windows_settlements_and_markers_read_back_as_written() {
        let p = policy();
        let t = |s: &str| Millis::parse(s).unwrap();
        let key = WindowKey {
            purpose: Purpose::Analytics,
            subject: "k1.analytics:ab/cd".into(),
            bucket: 20_500,
        };
        for reason in [
            Reason::Rule("excedo.analytics".into()),
            Reason::ConsentWithdrawn,
            Reason::Erasure,
        ] {
            let st = WindowState {
                from: t("2026-02-17T00:00:00.000Z"),
                to: t("2026-02-17T23:59:59.999Z"),
                deadline: Some(t("2027-02-18T00:00:00.000Z")),
                reason,
            };
            let (k, v) = encode(&Persist::Window(key.clone(), Some(st.clone())), &p);
            assert_eq!(k, "analytics/k1.analytics:ab/cd/20500");
            assert_eq!(
                decode(k.as_bytes(), v.as_deref()),
                Ok(Entry::Window(key.clone(), Some(st)))
            );
        }
        let (k, v) = encode(&Persist::Window(key.clone(), None), &p);
        assert_eq!(v, None);
        assert_eq!(
            decode(k.as_bytes(), None),
            Ok(Entry::Window(key.clone(), None))
        );
        let s = Persist::Settlement {
            purpose: Purpose::Billing,
            subject: "+46701234567".into(),
            start: t("2026-01-01T00:00:00.000Z"),
            period: Some((t("2026-02-01T00:00:00.000Z"), t("2026-08-15T00:00:00.000Z"))),
        };
        let (k, v) = encode(&s, &p);
        let Persist::Settlement {
            purpose,
            subject,
            start,
            period,
        } = s
        else {
            unreachable!()
        };
        assert_eq!(
            decode(k.as_bytes(), v.as_deref()),
            Ok(Entry::Settlement {
                purpose,
                subject,
                start,
                period
            })
        );
        let (k, v) = encode_applied(2, 4711);
        assert_eq!(
            decode(k.as_bytes(), Some(&v)),
            Ok(Entry::Applied {
                partition: 2,
                offset: 4711
            })
        );
    }

    /// An unreadable value under a window key still names the window, so it can be
    /// expired at once; an unreadable key names nothing.
    #[test]
    fn an_unreadable_window_still_names_its_window() {
        assert_eq!(
            decode(b"fraud/+46701234567/20500", Some(b"{not json")),
            Err(EntryError::Window(WindowKey {
                purpose: Purpose::Fraud,
                subject: "+46701234567".into(),
                bucket: 20_500
            }))
        );
        assert_eq!(decode(b"telepathy/x/1", Some(b"{}")), Err(EntryError::Key));
        assert_eq!(decode(b"\xff\xfe", None), Err(EntryError::Key));
        let e = decode(b"fraud/+46701234567/20500", Some(b"{")).unwrap_err();
        assert!(!e.to_string().contains("4670"), "{e}");
    }

    /// The entries a partition wrote while it was being read back (the window batch of
    /// that moment) read back too.
    #[test]
    fn batch_entries_without_a_reason_read_as_their_rule() {
        let v = br#"{"type":"retention_window","route":"fraud","purpose":"fraud","subscriber":"+46701234567","bucket":20500,"window_start":"2026-02-17T00:00:00.000Z","window_end":"2026-02-17T23:59:59.999Z","anchor":"event_time","rule":"excedo.fraud","after":"6 months","deadline":"2026-08-18T00:00:00.000Z","policy":"excedo@2018-05-25"}"#;
        let Ok(Entry::Window(_, Some(st))) = decode(b"fraud/+46701234567/20500", Some(v)) else {
            panic!()
        };
        assert_eq!(st.reason, Reason::Rule("excedo.fraud".into()));
    }
}
