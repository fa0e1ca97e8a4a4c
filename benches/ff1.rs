//! The cost of one marketing token's FF1 encryption: our hand-written FF1 against the
//! `fpe` crate's, a 12-digit number under the same key and the tokeniser's (empty) tweak.
//! Each iteration starts from the plaintext digits, as tokenising a record does.
//!
//! Run: cargo bench --bench ff1 -- ff1

use std::hint::black_box;

use aes::Aes256;
use cdrguard::core::ff1::Ff1;
use criterion::{Criterion, criterion_group, criterion_main};
use fpe::ff1::{FF1, FlexibleNumeralString};

/// Times both implementations in one group, so one run compares them under one load.
fn bench(c: &mut Criterion) {
    let key = [0x42u8; 32];
    // The tokeniser's tweak (`Keyring::tokenise` passes none).
    let tweak: &[u8] = &[];
    let plain: [u8; 12] = [4, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let ours = Ff1::new(&key);
    let theirs = FF1::<Aes256>::new(&key, 10).expect("radix 10");

    // Both must compute the same token, or the comparison means nothing.
    let mut x = plain;
    assert!(ours.encrypt(tweak, &mut x));
    let want: Vec<u16> = theirs
        .encrypt(
            tweak,
            &FlexibleNumeralString::from(plain.map(u16::from).to_vec()),
        )
        .expect("12 digits")
        .into();
    assert_eq!(x.map(u16::from).to_vec(), want);

    let mut g = c.benchmark_group("ff1");
    g.bench_function("ours_encrypt_12_digits", |b| {
        b.iter(|| {
            let mut x = black_box(plain);
            ours.encrypt(tweak, &mut x);
            black_box(x)
        })
    });
    g.bench_function("fpe_encrypt_12_digits", |b| {
        b.iter(|| {
            let ns = FlexibleNumeralString::from(black_box(plain).map(u16::from).to_vec());
            black_box(theirs.encrypt(tweak, &ns).expect("12 digits"))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
