//! FF1 format-preserving encryption (NIST SP 800-38G) for decimal strings of 6 to 20
//! digits, with AES-256, written for the hot path: the numerals fit a `u64`, so no
//! big-integer arithmetic or allocation is needed. Cross-checked against the `fpe` crate
//! and NIST's sample vectors in the tests. FF3 is deliberately absent (broken).

use aes::Aes256;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};

/// Fewest digits accepted: below 10^6 values the domain is too small to be safe (SP
/// 800-38G rev. 1 requires radix^minlen >= 1,000,000).
pub const MIN_DIGITS: usize = 6;
/// Most digits accepted: keeps every half below 10^10 and every PRF output in one block.
pub const MAX_DIGITS: usize = 20;

/// An FF1 cipher with radix 10.
pub struct Ff1 {
    aes: Aes256,
}

const POW10: [u64; 11] = {
    let mut t = [1u64; 11];
    let mut i = 1;
    while i < 11 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

fn num(digits: &[u8]) -> u64 {
    digits.iter().fold(0u64, |acc, d| acc * 10 + *d as u64)
}

fn put(mut x: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = (x % 10) as u8;
        x /= 10;
    }
}

/// `x mod 10^m` for m in 1..=10 with a constant divisor per arm, so the compiler turns
/// each into a multiply and shift instead of a hardware division (the hot path of FF1).
#[inline(always)]
fn mod_pow10(x: u64, m: usize) -> u64 {
    match m {
        1 => x % 10,
        2 => x % 100,
        3 => x % 1_000,
        4 => x % 10_000,
        5 => x % 100_000,
        6 => x % 1_000_000,
        7 => x % 10_000_000,
        8 => x % 100_000_000,
        9 => x % 1_000_000_000,
        _ => x % 10_000_000_000,
    }
}

/// NUM(S) mod 10^m for S, the first `d` bytes of a PRF block (d is 8 or 12): the first
/// eight bytes as one `u64`, any further bytes 16 bits at a time (every intermediate stays
/// below 2^50).
fn prefix_mod_pow10(r: &[u8; 16], d: usize, m: usize) -> u64 {
    let first = u64::from_be_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
    r[8..d].chunks_exact(2).fold(mod_pow10(first, m), |acc, c| {
        mod_pow10((acc << 16) | u16::from_be_bytes([c[0], c[1]]) as u64, m)
    })
}

impl Ff1 {
    /// A cipher under a 256-bit key.
    pub fn new(key: &[u8; 32]) -> Ff1 {
        Ff1 {
            aes: Aes256::new(&Array::from(*key)),
        }
    }

    fn enc(&self, block: &mut [u8; 16]) {
        let mut b = Array::from(*block);
        self.aes.encrypt_block(&mut b);
        block.copy_from_slice(&b);
    }

    /// y = NUM(S) mod 10^m for round `i`, where the PRF input ends in `[NUM(x)]^b`.
    #[allow(clippy::too_many_arguments)]
    fn round_value(
        &self,
        p_mac: &[u8; 16],
        tweak: &[u8],
        i: u8,
        x: u64,
        b: usize,
        d: usize,
        m: usize,
    ) -> u64 {
        // Q = T || 0^((-t-b-1) mod 16) || [i]^1 || [x]^b, then CBC-MAC continues from
        // E(P). Q is XORed into the chain block by block where it lies instead of being
        // laid out first: [i] and [x]^b always end the last block, and with t + b + 1 <= 16
        // (every token: the tweak is empty) Q is that one block.
        let t = tweak.len();
        let blocks = (t + b + 1).div_ceil(16);
        let xb = x.to_be_bytes();
        let mut y = *p_mac;
        for k in 0..blocks {
            let start = k * 16;
            if start < t {
                for (a, c) in y.iter_mut().zip(&tweak[start..t.min(start + 16)]) {
                    *a ^= c;
                }
            }
            if k == blocks - 1 {
                y[15 - b] ^= i;
                for (a, c) in y[16 - b..].iter_mut().zip(&xb[8 - b..]) {
                    *a ^= c;
                }
            }
            self.enc(&mut y);
        }
        // d <= 12 here, so S is the first d bytes of R.
        prefix_mod_pow10(&y, d, m)
    }

    fn setup(&self, n: usize, tweak: &[u8]) -> ([u8; 16], usize, usize, usize, usize) {
        let u = n / 2;
        let v = n - u;
        // b = ceil(ceil(v * log2(10)) / 8), exact for v <= 10 via 10^v's bit length.
        let bits = 64 - (POW10[v] - 1).leading_zeros() as usize;
        let b = bits.div_ceil(8);
        let d = 4 * b.div_ceil(4) + 4;
        let mut p = [1u8, 2, 1, 0, 0, 10, 10, u as u8, 0, 0, 0, 0, 0, 0, 0, 0];
        p[8..12].copy_from_slice(&(n as u32).to_be_bytes());
        p[12..16].copy_from_slice(&(tweak.len() as u32).to_be_bytes());
        self.enc(&mut p);
        (p, u, v, b, d)
    }

    /// Encrypts digits (values 0-9) in place. `false` if the length is out of range.
    pub fn encrypt(&self, tweak: &[u8], x: &mut [u8]) -> bool {
        let n = x.len();
        if !(MIN_DIGITS..=MAX_DIGITS).contains(&n) || tweak.len() > 40 || x.iter().any(|d| *d > 9) {
            return false;
        }
        let (p, u, v, b, d) = self.setup(n, tweak);
        let (mut a, mut bb) = (num(&x[..u]), num(&x[u..]));
        let (mut la, mut lb) = (u, v);
        for i in 0..10u8 {
            let m = if i % 2 == 0 { u } else { v };
            let y = self.round_value(&p, tweak, i, bb, b, d, m);
            let c = mod_pow10(mod_pow10(a, m) + y, m);
            a = bb;
            la = lb;
            bb = c;
            lb = m;
        }
        put(a, &mut x[..la]);
        put(bb, &mut x[la..la + lb]);
        true
    }

    /// Decrypts digits in place. `false` if the length is out of range.
    pub fn decrypt(&self, tweak: &[u8], x: &mut [u8]) -> bool {
        let n = x.len();
        if !(MIN_DIGITS..=MAX_DIGITS).contains(&n) || tweak.len() > 40 || x.iter().any(|d| *d > 9) {
            return false;
        }
        let (p, u, v, b, d) = self.setup(n, tweak);
        let (mut a, mut bb) = (num(&x[..u]), num(&x[u..]));
        for i in (0..10u8).rev() {
            let m = if i % 2 == 0 { u } else { v };
            let y = self.round_value(&p, tweak, i, a, b, d, m);
            let c = mod_pow10(mod_pow10(bb, m) + POW10[m] - y, m);
            bb = a;
            a = c;
        }
        put(a, &mut x[..u]);
        put(bb, &mut x[u..]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fpe::ff1::{FF1, FlexibleNumeralString};

    fn digits(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn nist_sp800_38g_samples_7_and_8() {
        // FF1-AES256 samples from NIST's published examples.
        let key: [u8; 32] =
            hex::decode("2B7E151628AED2A6ABF7158809CF4F3CEF4359D8D580AA4F7F036D6F04FC6A94")
                .unwrap()
                .try_into()
                .unwrap();
        let f = Ff1::new(&key);
        let mut x = digits("0123456789");
        assert!(f.encrypt(&[], &mut x));
        assert_eq!(x, digits("6657667009"));
        let tweak = hex::decode("39383736353433323130").unwrap();
        let mut x = digits("0123456789");
        assert!(f.encrypt(&tweak, &mut x));
        assert_eq!(x, digits("1001623463"));
        assert!(f.decrypt(&tweak, &mut x));
        assert_eq!(x, digits("0123456789"));
    }

    #[test]
    fn agrees_with_the_fpe_crate_for_every_length() {
        let key = [0x42u8; 32];
        let ours = Ff1::new(&key);
        let theirs = FF1::<Aes256>::new(&key, 10).unwrap();
        let mut seed = 12345u64;
        for n in MIN_DIGITS..=MAX_DIGITS {
            for _ in 0..20 {
                let mut x: Vec<u8> = (0..n)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((seed >> 33) % 10) as u8
                    })
                    .collect();
                let plain = x.clone();
                let ns = FlexibleNumeralString::from(
                    plain.iter().map(|d| *d as u16).collect::<Vec<_>>(),
                );
                let want: Vec<u16> = theirs.encrypt(&[], &ns).unwrap().into();
                assert!(ours.encrypt(&[], &mut x));
                assert_eq!(
                    x.iter().map(|d| *d as u16).collect::<Vec<_>>(),
                    want,
                    "n={n}"
                );
                assert!(ours.decrypt(&[], &mut x));
                assert_eq!(x, plain);
            }
        }
        assert!(!ours.encrypt(&[], &mut [1, 2, 3, 4, 5]));
    }

    #[test]
    fn agrees_with_the_fpe_crate_for_every_tweak_length() {
        // Tweaks up to 40 bytes make Q one, two or three blocks long.
        let key = [0x17u8; 32];
        let ours = Ff1::new(&key);
        let theirs = FF1::<Aes256>::new(&key, 10).unwrap();
        for t in 0..=40usize {
            let tweak: Vec<u8> = (0..t as u8).map(|b| b.wrapping_mul(37)).collect();
            for n in [6, 11, 12, 19, 20] {
                let plain: Vec<u8> = (0..n).map(|k| ((k * 7 + t) % 10) as u8).collect();
                let ns = FlexibleNumeralString::from(
                    plain.iter().map(|d| *d as u16).collect::<Vec<_>>(),
                );
                let want: Vec<u16> = theirs.encrypt(&tweak, &ns).unwrap().into();
                let mut x = plain.clone();
                assert!(ours.encrypt(&tweak, &mut x));
                let got: Vec<u16> = x.iter().map(|d| *d as u16).collect();
                assert_eq!(got, want, "t={t} n={n}");
                assert!(ours.decrypt(&tweak, &mut x));
                assert_eq!(x, plain);
            }
        }
    }
}
