//! One field table, checked everywhere it is spelled out.
//!
//! The record's fields are declared once, by `fields!` in `vocab::purpose` (name, order,
//! class). The hot encoders and decoders spell them out by hand for speed: the `Record`
//! struct and its serde names, the fast JSON decoder's key match, the JSON copy writer's
//! keys and order, the binary layout, the presence bits of an envelope, and the schemas
//! users read. These tests hold every one of them to the table, so a field added to the
//! table and forgotten in any of them (or put in another order) fails here.

use std::borrow::Cow;

use serde::de::{IgnoredAny, MapAccess, Visitor};

use crate::core::pseudonym::tests::test_keyring;
use crate::core::record::{Cell, CloseCause, Kind, Rat, Record, Usage};
use crate::core::treat::{Ctx, treat};
use crate::vocab::purpose::{Field, Purpose};
use crate::vocab::time::Millis;
use crate::vocab::treatment::Treatment;

/// A record with every field present (no kind has them all, so it would fail
/// validation; the encoders and decoders tested here do not validate).
fn full() -> Record<'static> {
    Record {
        record_id: Cow::Borrowed("r-1"),
        kind: Kind::Data,
        msisdn: Cow::Borrowed("+46701234567"),
        imsi: Cow::Borrowed("240011234567890"),
        imei: Some(Cow::Borrowed("356938035643809")),
        other_party: Some(Cow::Borrowed("+46709876543")),
        start_time: Millis::parse("2026-03-02T10:15:30.250Z").unwrap(),
        duration_s: Some(61),
        close_cause: CloseCause::Normal,
        cell: Some(Cell {
            mcc: Cow::Borrowed("240"),
            mnc: Cow::Borrowed("01"),
            lac_or_tac: 1201,
            cell_id: 987_654,
        }),
        serving_plmn: Cow::Borrowed("24001"),
        service_centre: Some(Cow::Borrowed("+46705008999")),
        apn: Some(Cow::Borrowed("internet")),
        charging_id: Some(77),
        rat: Rat::Lte,
        ue_ip: Some(Cow::Borrowed("10.1.2.3")),
        usage: Some(vec![Usage {
            rating_group: 10,
            ul_bytes: 1_000,
            dl_bytes: 20_000,
        }]),
        recording_entity: Cow::Borrowed("pgw-1"),
        local_seq_no: 9,
    }
}

/// The keys of a JSON object, in the order they are written.
fn keys_in_order(json: &[u8]) -> Vec<String> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some((k, IgnoredAny)) = m.next_entry::<String, IgnoredAny>()? {
                out.push(k);
            }
            Ok(out)
        }
    }
    use serde::Deserializer;
    serde_json::Deserializer::from_slice(json)
        .deserialize_map(Keys)
        .unwrap()
}

fn names() -> Vec<String> {
    Field::ALL.iter().map(|f| f.name().to_string()).collect()
}

#[test]
fn the_record_struct_carries_every_field_under_its_name_in_table_order() {
    let json = serde_json::to_vec(&full()).unwrap();
    assert_eq!(keys_in_order(&json), names());
}

#[test]
fn the_fast_json_decoder_knows_every_field_by_its_name() {
    for f in Field::ALL {
        assert_eq!(
            super::json_fast::record_field(f.name().as_bytes()),
            Some(f),
            "{}",
            f.name()
        );
    }
    assert_eq!(super::json_fast::record_field(b"subscriber_name"), None);
    // A record with every field takes the fast path whole, and reads as serde reads it.
    let json = serde_json::to_vec(&full()).unwrap();
    let (fast, layout) = super::json_fast::record(&json).expect("every field on the fast path");
    assert!(
        layout.is_some(),
        "serde's compact form is laid out as copies are written"
    );
    let slow: Record<'_> = serde_json::from_slice(&json).unwrap();
    assert_eq!(fast, slow);
    assert_eq!(fast, full());
}

#[test]
fn the_json_copy_writer_writes_every_field_under_its_name_in_table_order() {
    let keys = test_keyring();
    let cx = Ctx {
        purpose: Purpose::Billing,
        keys: &keys,
    };
    let r = full();
    let kept = treat(&cx, &[Treatment::Keep; Field::COUNT], &r);
    assert_eq!(crate::core::treat::kept(&r), kept);
    let mut out = Vec::new();
    super::json::write_record(&kept, &mut out);
    assert_eq!(keys_in_order(&out), names());
    assert_eq!(
        serde_json::from_slice::<Record<'_>>(&out).unwrap(),
        r,
        "each value under its own field's name"
    );
}

#[test]
fn the_binary_layout_follows_the_table_order() {
    // Changing one field changes the encoding first at that field's place, so the first
    // differing byte moves forward field by field exactly when the layout has the table's
    // order.
    let mut base = Vec::new();
    super::binary::encode_record(&full(), &mut base);
    let mut last = None;
    for f in Field::ALL {
        let mut r = full();
        match f {
            Field::RecordId => r.record_id = Cow::Borrowed("r-2"),
            Field::Kind => r.kind = Kind::Moc,
            Field::Msisdn => r.msisdn = Cow::Borrowed("+46701234568"),
            Field::Imsi => r.imsi = Cow::Borrowed("240011234567891"),
            Field::Imei => r.imei = None,
            Field::OtherParty => r.other_party = None,
            Field::StartTime => r.start_time = Millis(r.start_time.0 + 1),
            Field::DurationS => r.duration_s = Some(62),
            Field::CloseCause => r.close_cause = CloseCause::Abnormal,
            Field::Cell => r.cell = None,
            Field::ServingPlmn => r.serving_plmn = Cow::Borrowed("24002"),
            Field::ServiceCentre => r.service_centre = None,
            Field::Apn => r.apn = None,
            Field::ChargingId => r.charging_id = Some(78),
            Field::Rat => r.rat = Rat::Nr,
            Field::UeIp => r.ue_ip = None,
            Field::Usage => r.usage = None,
            Field::RecordingEntity => r.recording_entity = Cow::Borrowed("pgw-2"),
            Field::LocalSeqNo => r.local_seq_no = 10,
        }
        let mut changed = Vec::new();
        super::binary::encode_record(&r, &mut changed);
        let at = base
            .iter()
            .zip(&changed)
            .position(|(a, b)| a != b)
            .unwrap_or(base.len().min(changed.len()));
        assert!(
            last.is_none_or(|(l, _)| at > l),
            "{} is encoded at byte {at}, not after {:?}",
            f.name(),
            last
        );
        last = Some((at, f.name()));
        // And the binary decoder reads it back whole.
        let back = super::binary::decode_record_unchecked(&changed).unwrap();
        assert_eq!(back, r, "{}", f.name());
    }
}

#[test]
fn an_envelope_marks_each_present_field_by_its_table_bit() {
    let policy =
        crate::policy::parse_policy(crate::policy::shipped("excedo").unwrap(), "excedo").unwrap();
    let keys = test_keyring();
    let state = crate::core::control::SubscriberState::default();
    let r = full();
    let d = crate::core::process::process(&r, &policy, &state, &keys, r.start_time);
    let all = (1u32 << Field::COUNT) - 1;
    assert_eq!(d.copies[0].envelope.present, all);
    let mut r = full();
    r.imei = None;
    r.usage = None;
    let d = crate::core::process::process(&r, &policy, &state, &keys, r.start_time);
    assert_eq!(
        d.copies[0].envelope.present,
        all & !(1 << Field::Imei as u32) & !(1 << Field::Usage as u32)
    );
}

#[test]
fn the_schemas_users_read_list_every_field_in_table_order() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let schema = std::fs::read(dir.join("record.schema.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_slice(&schema).unwrap();
    let props = &schema["properties"];
    let raw = serde_json::to_vec(props).unwrap();
    let mut got = keys_in_order(&raw);
    let mut want = names();
    // serde_json orders object keys when it reads them: compare the set here, the
    // order in the binary layout's table below.
    got.sort();
    want.sort();
    assert_eq!(got, want, "record.schema.json properties");
    let layout = std::fs::read_to_string(dir.join("binary.md")).unwrap();
    for (table, label) in [(0, "RecordWire"), (1, "CopyWire")] {
        let rows: Vec<String> = layout
            .split("| 1 | `record_id`")
            .nth(table + 1)
            .unwrap_or_else(|| panic!("{label} table"))
            .lines()
            .take(Field::COUNT)
            .enumerate()
            .map(|(i, l)| {
                let l = if i == 0 {
                    "`record_id`".to_string()
                } else {
                    l.to_string()
                };
                l.split('`').nth(1).unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(rows, names(), "schemas/binary.md, {label}");
    }
}
