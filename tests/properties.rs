//! Properties over generated records and subscriber states, for every shipped policy:
//! consent-gated and analytics copies never hold a raw identifier they may not, neither in
//! the treated record nor anywhere in the bytes the JSON and binary encoders write for the
//! whole copy, and pseudonyms are stable under one key yet differ across purposes and keys.
//! Our FF1 agrees with the `fpe` crate's under random keys, tweaks and every length.

use aes::Aes256;
use cdrguard::codec::Envelopes;
use cdrguard::codec::{binary, json};
use cdrguard::core::control::SubscriberState;
use cdrguard::core::ff1::{self, Ff1};
use cdrguard::core::process::process;
use cdrguard::core::pseudonym::{Keyring, MasterKey};
use cdrguard::core::record::{Cell, CloseCause, Kind, Rat, Record, Usage};
use cdrguard::policy::{Policy, SHIPPED, parse_policy};
use cdrguard::vocab::consent::ConsentTag;
use cdrguard::vocab::purpose::{Field, Purpose, PurposeSet};
use cdrguard::vocab::time::Millis;
use fpe::ff1::{FF1, FlexibleNumeralString};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn policies() -> Vec<Policy> {
    SHIPPED
        .iter()
        .map(|(name, text)| parse_policy(text, name).expect("shipped policy compiles"))
        .collect()
}

fn keys(seed: u8) -> Keyring {
    Keyring::new(&[MasterKey::new("prop", &[seed; 32]).unwrap()]).unwrap()
}

fn digits(n: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(0u8..10, n)
        .prop_map(|d| d.iter().map(|x| (b'0' + x) as char).collect())
}

fn e164() -> impl Strategy<Value = String> {
    (1u8..10, digits(10)).prop_map(|(first, rest)| format!("+4{first}{rest}"))
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Moc),
        Just(Kind::Mtc),
        Just(Kind::SmsMo),
        Just(Kind::SmsMt),
        Just(Kind::Data)
    ]
}

prop_compose! {
    fn record()(
        kind in kind(),
        msisdn in e164(),
        imsi in digits(15),
        imei in proptest::option::of(digits(15)),
        other in e164(),
        t in 1_700_000_000_000i64..1_900_000_000_000i64,
        ip in (any::<u8>(), any::<u8>(), any::<u8>()),
        cell_id in any::<u32>(),
    ) -> Record<'static> {
        let data = kind == Kind::Data;
        let sms = matches!(kind, Kind::SmsMo | Kind::SmsMt);
        Record {
            record_id: format!("r-{t}").into(),
            kind,
            msisdn: msisdn.into(),
            imsi: imsi.into(),
            imei: imei.map(Into::into),
            other_party: (!data).then(|| other.into()),
            start_time: Millis(t),
            duration_s: (!sms).then_some(60),
            close_cause: CloseCause::Normal,
            cell: Some(Cell { mcc: "240".into(), mnc: "01".into(), lac_or_tac: 7, cell_id: cell_id as u64 }),
            serving_plmn: "24001".into(),
            service_centre: sms.then(|| "+46705008999".into()),
            apn: data.then(|| "internet".into()),
            charging_id: data.then_some(5),
            rat: Rat::Lte,
            ue_ip: data.then(|| format!("10.{}.{}.{}", ip.0, ip.1, ip.2).into()),
            usage: data.then(|| vec![Usage { rating_group: 1, ul_bytes: 1, dl_bytes: 2 }]),
            recording_entity: "msc-1".into(),
            local_seq_no: 1,
        }
    }
}

/// Whether `needle` occurs anywhere in `hay`.
fn holds(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn set(bits: u8) -> PurposeSet {
    let mut s = PurposeSet::EMPTY;
    for p in Purpose::ALL {
        s.set(p, bits & (1 << p as u8) != 0);
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn copies_never_leak_identifiers_they_may_not_hold(
        r in record(),
        consented in any::<u8>(),
        objected in any::<u8>(),
        restricted in any::<bool>(),
        erased in any::<bool>(),
        regranted in any::<u8>(),
    ) {
        prop_assert!(r.validate().is_ok());
        let keys = keys(3);
        let state = SubscriberState {
            consented: set(consented),
            objected: set(objected),
            restricted,
            erased_at: erased.then_some(Millis(0)),
            regranted: set(regranted),
            ..SubscriberState::default()
        };
        let raw: Vec<(Field, String)> = Field::ALL.iter().filter(|f| f.is_personal_identifier()).filter_map(|f| {
            let v = match f {
                Field::Msisdn => Some(r.msisdn.to_string()),
                Field::Imsi => Some(r.imsi.to_string()),
                Field::Imei => r.imei.as_deref().map(str::to_string),
                Field::OtherParty => r.other_party.as_deref().map(str::to_string),
                Field::UeIp => r.ue_ip.as_deref().map(str::to_string),
                _ => None,
            };
            v.map(|v| (*f, v))
        }).collect();
        for policy in policies() {
            let d = process(&r, &policy, &state, &keys, Millis(0));
            let envelopes = Envelopes::new(&policy);
            for c in &d.copies {
                let p = c.envelope.purpose;
                let rule = policy.rule(p).expect("copies only for declared purposes");
                let gated_without_consent = rule.consent_key.is_some_and(|k| !state.consented.contains(k));
                let json = serde_json::to_string(&c.record()).unwrap();
                // What is written out: the hand-written encoders' bytes of the whole copy,
                // envelope included, not only the treated record as serde sees it.
                let (mut as_json, mut as_binary) = (Vec::new(), Vec::new());
                json::encode_copy(&envelopes, c, &mut as_json);
                binary::encode_copy(&envelopes, c, &mut as_binary);
                for (f, v) in &raw {
                    let digits = v.trim_start_matches('+');
                    if gated_without_consent || p == Purpose::Analytics {
                        // Not even inside another value (a pseudonym, a token, a mask).
                        prop_assert!(!json.contains(digits), "{}: {} copy holds raw {}: {json}", policy.id, p.id(), f.name());
                    }
                    if gated_without_consent || p == Purpose::Analytics || rule.consent_key.is_some() {
                        for (encoding, bytes) in [("JSON", &as_json), ("binary", &as_binary)] {
                            prop_assert!(
                                !holds(bytes, digits),
                                "{}: {} copy's {encoding} bytes hold raw {}: {}",
                                policy.id, p.id(), f.name(), String::from_utf8_lossy(bytes)
                            );
                        }
                    }
                    if rule.consent_key.is_some() {
                        prop_assert!(c.record().identifier(*f) != Some(v.as_str()), "{}: consent-based {} copy holds raw {}", policy.id, p.id(), f.name());
                    }
                }
                if gated_without_consent {
                    prop_assert_eq!(c.envelope.consent, ConsentTag::Absent);
                }
                // After an erasure, a purpose not held through it gets only anonymised
                // copies unless consent was given again after the request.
                if rule.erasure.stops && state.erased(rule.consent_key) {
                    prop_assert_eq!(c.envelope.legal_basis, "anonymous", "{}: {} copy after erasure", policy.id, p.id());
                }
                if p == Purpose::Marketing {
                    let token = c.record().msisdn.as_ref().map(|t| t.as_str().to_string()).unwrap_or_default();
                    prop_assert_eq!(keys.reverse(&token).unwrap(), r.msisdn.to_string());
                }
            }
        }
    }

    #[test]
    fn pseudonyms_are_stable_per_key_and_unlinkable_across_purposes_and_keys(m in e164(), seed in 0u8..200) {
        let a = keys(seed);
        let b = keys(seed.wrapping_add(1));
        let x = a.pseudonym(Purpose::Analytics, "msisdn", &m);
        prop_assert_eq!(&x, &a.pseudonym(Purpose::Analytics, "msisdn", &m));
        let tail = |s: &str| s.rsplit(':').next().unwrap_or("").to_string();
        prop_assert_ne!(tail(&x), tail(&a.pseudonym(Purpose::Marketing, "msisdn", &m)));
        prop_assert_ne!(tail(&x), tail(&b.pseudonym(Purpose::Analytics, "msisdn", &m)));
        prop_assert!(!x.contains(m.trim_start_matches('+')));
        let t = a.tokenise(Purpose::Marketing, &m).unwrap();
        prop_assert_eq!(a.reverse(&t).unwrap(), m);
    }
}

/// `fpe`'s FF1 of `digits` under `tweak`, encrypting or decrypting: the reference our
/// hand-written FF1 is held to.
fn fpe_ff1(theirs: &FF1<Aes256>, tweak: &[u8], digits: &[u8], decrypt: bool) -> Vec<u8> {
    let ns = FlexibleNumeralString::from(digits.iter().map(|d| u16::from(*d)).collect::<Vec<_>>());
    let out = if decrypt {
        theirs.decrypt(tweak, &ns)
    } else {
        theirs.encrypt(tweak, &ns)
    }
    .expect("fpe takes every length and tweak ours does");
    Vec::<u16>::from(out).into_iter().map(|d| d as u8).collect()
}

/// Our FF1 against `fpe`'s for one input and tweak: encryption equal, decryption equal
/// (on its own input, so a fault that encryption and decryption share, which a round trip
/// cannot see, still shows), and our decryption undoes our encryption.
fn ff1_agrees(
    ours: &Ff1,
    theirs: &FF1<Aes256>,
    tweak: &[u8],
    x: &[u8],
) -> Result<(), TestCaseError> {
    let (n, t) = (x.len(), tweak.len());
    let mut enc = x.to_vec();
    prop_assert!(ours.encrypt(tweak, &mut enc), "n={} t={}: refused", n, t);
    prop_assert_eq!(
        &enc,
        &fpe_ff1(theirs, tweak, x, false),
        "encrypt, n={} t={}",
        n,
        t
    );
    let mut back = enc.clone();
    prop_assert!(ours.decrypt(tweak, &mut back));
    prop_assert_eq!(&back, &x, "round trip, n={} t={}", n, t);
    let mut dec = x.to_vec();
    prop_assert!(ours.decrypt(tweak, &mut dec));
    prop_assert_eq!(
        &dec,
        &fpe_ff1(theirs, tweak, x, true),
        "decrypt, n={} t={}",
        n,
        t
    );
    Ok(())
}

proptest! {
    // Each case checks 56 pairs of input length and tweak length against fpe's big-integer
    // FF1, which is slow unoptimised.
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Our FF1 is NIST SP 800-38G's, as the `fpe` crate implements it, under random keys:
    /// every input length we accept (each with a random tweak length), every tweak length
    /// we accept (each with a random input length), and the lengths just outside refused.
    #[test]
    fn ff1_matches_the_fpe_crate_for_every_length_and_tweak_length(
        key in any::<[u8; 32]>(),
        tweak in proptest::collection::vec(any::<u8>(), ff1::MAX_TWEAK),
        digits in proptest::collection::vec(0u8..10, ff1::MAX_DIGITS),
        tweak_lens in proptest::collection::vec(
            0..=ff1::MAX_TWEAK,
            ff1::MAX_DIGITS - ff1::MIN_DIGITS + 1,
        ),
        input_lens in proptest::collection::vec(
            ff1::MIN_DIGITS..=ff1::MAX_DIGITS,
            ff1::MAX_TWEAK + 1,
        ),
    ) {
        let ours = Ff1::new(&key);
        let theirs = FF1::<Aes256>::new(&key, 10).expect("radix 10");
        for n in ff1::MIN_DIGITS..=ff1::MAX_DIGITS {
            let t = tweak_lens[n - ff1::MIN_DIGITS];
            ff1_agrees(&ours, &theirs, &tweak[..t], &digits[..n])?;
        }
        for (t, n) in input_lens.iter().enumerate() {
            ff1_agrees(&ours, &theirs, &tweak[..t], &digits[..*n])?;
        }
        let mut short = digits[..ff1::MIN_DIGITS - 1].to_vec();
        prop_assert!(!ours.encrypt(&[], &mut short));
        let mut long = [0u8; ff1::MAX_DIGITS + 1];
        prop_assert!(!ours.encrypt(&[], &mut long));
        let mut x = digits[..ff1::MIN_DIGITS].to_vec();
        prop_assert!(!ours.encrypt(&[0; ff1::MAX_TWEAK + 1], &mut x));
    }
}
