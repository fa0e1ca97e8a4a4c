//! FF1 format-preserving encryption (NIST SP 800-38G) for decimal strings of 6 to 20
//! digits, with AES-256, written for the hot path: the numerals fit a `u64`, so no
//! big-integer arithmetic or allocation is needed. Cross-checked against the `fpe` crate
//! and NIST's sample vectors in the tests. FF3 is deliberately absent (broken).

use aes::Aes256;
use aes::cipher::consts::U16;
use aes::cipher::{
    Array, BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
};

/// Fewest digits accepted: below 10^6 values the domain is too small to be safe (SP
/// 800-38G rev. 1 requires radix^minlen >= 1,000,000).
pub const MIN_DIGITS: usize = 6;
/// Most digits accepted: keeps every half below 10^10 and every PRF output in one block.
pub const MAX_DIGITS: usize = 20;
/// Longest tweak accepted, in bytes (tokens use none); Q is then at most three AES blocks.
pub const MAX_TWEAK: usize = 40;

/// An FF1 cipher with radix 10.
pub struct Ff1 {
    aes: Aes256,
    /// What every round shares for each length without a tweak (tokens use none),
    /// indexed by length minus [`MIN_DIGITS`]: worked out once per key instead of one
    /// AES block and the layout arithmetic per operation.
    untweaked: [Setup; MAX_DIGITS - MIN_DIGITS + 1],
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

/// NUM(S) mod 10^m for S, the first `d` bytes of a PRF block R (d is 8 or 12): its first
/// eight bytes as one `u64`, any further bytes 16 bits at a time (every intermediate stays
/// below 2^50).
fn prefix_mod_pow10(r: u128, d: usize, m: usize) -> u64 {
    (0..(d - 8) / 2).fold(mod_pow10((r >> 64) as u64, m), |acc, k| {
        mod_pow10((acc << 16) | ((r >> (48 - 16 * k)) as u64 & 0xffff), m)
    })
}

impl Ff1 {
    /// A cipher under a 256-bit key.
    pub fn new(key: &[u8; 32]) -> Ff1 {
        let aes = Aes256::new(&Array::from(*key));
        let mut untweaked = [Setup::default(); MAX_DIGITS - MIN_DIGITS + 1];
        aes.encrypt_with_backend(Untweaked(&mut untweaked));
        Ff1 { aes, untweaked }
    }

    /// Encrypts digits (values 0-9) in place. `false` if the length is out of range.
    pub fn encrypt(&self, tweak: &[u8], x: &mut [u8]) -> bool {
        self.run(tweak, x, false)
    }

    /// Decrypts digits in place. `false` if the length is out of range.
    pub fn decrypt(&self, tweak: &[u8], x: &mut [u8]) -> bool {
        self.run(tweak, x, true)
    }

    fn run(&self, tweak: &[u8], x: &mut [u8], decrypt: bool) -> bool {
        let n = x.len();
        if !(MIN_DIGITS..=MAX_DIGITS).contains(&n)
            || tweak.len() > MAX_TWEAK
            || x.iter().any(|d| *d > 9)
        {
            return false;
        }
        let setup = tweak.is_empty().then(|| self.untweaked[n - MIN_DIGITS]);
        self.aes.encrypt_with_backend(Operation {
            tweak,
            x,
            decrypt,
            setup,
        });
        true
    }
}

/// One AES block through the backend. Blocks are big-endian u128s, so the PRF input is
/// built with a few register operations instead of byte by byte.
#[inline(always)]
fn encrypt<B: BlockCipherEncBackend<BlockSize = U16>>(backend: &B, block: u128) -> u128 {
    let mut b = Array::from(block.to_be_bytes());
    backend.encrypt_block_inplace(&mut b);
    u128::from_be_bytes(b.into())
}

/// Works out the untweaked [`Setup`] of every length, in one session with the backend.
struct Untweaked<'a>(&'a mut [Setup; MAX_DIGITS - MIN_DIGITS + 1]);

impl BlockSizeUser for Untweaked<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for Untweaked<'_> {
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        let enc = |block: u128| encrypt(backend, block);
        for (i, s) in self.0.iter_mut().enumerate() {
            *s = Setup::new(&enc, MIN_DIGITS + i, &[]);
        }
    }
}

/// One FF1 operation, run inside a single session with the AES key's backend. The aes
/// crate prepares its backend on every call (on CPUs with VAES it broadcasts all fifteen
/// round keys, several times the cost of the block itself), so the eleven or more blocks
/// of an operation share one preparation instead of paying it each.
struct Operation<'a> {
    tweak: &'a [u8],
    x: &'a mut [u8],
    decrypt: bool,
    /// The operation's setup where it was worked out beforehand (no tweak).
    setup: Option<Setup>,
}

impl BlockSizeUser for Operation<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for Operation<'_> {
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        let enc = |block: u128| encrypt(backend, block);
        let (tweak, x) = (self.tweak, self.x);
        let s = match self.setup {
            Some(s) => s,
            None => Setup::new(&enc, x.len(), tweak),
        };
        let (u, v) = (s.u, s.v);
        let (mut a, mut bb) = (num(&x[..u]), num(&x[u..]));
        if self.decrypt {
            for i in (0..10u8).rev() {
                let m = if i % 2 == 0 { u } else { v };
                let y = s.round_value(&enc, i, a, m);
                let c = mod_pow10(mod_pow10(bb, m) + POW10[m] - y, m);
                bb = a;
                a = c;
            }
            put(a, &mut x[..u]);
            put(bb, &mut x[u..]);
        } else {
            let (mut la, mut lb) = (u, v);
            for i in 0..10u8 {
                let m = if i % 2 == 0 { u } else { v };
                let y = s.round_value(&enc, i, bb, m);
                let c = mod_pow10(mod_pow10(a, m) + y, m);
                a = bb;
                la = lb;
                bb = c;
                lb = m;
            }
            put(a, &mut x[..la]);
            put(bb, &mut x[la..la + lb]);
        }
    }
}

/// What every round of one operation on n digits shares.
#[derive(Clone, Copy, Default)]
struct Setup {
    /// The CBC-MAC chain value the last block of every round's Q is XORed into: E(P)
    /// chained through Q's leading blocks, which hold only tweak bytes and zeros and are
    /// the same in every round, XORed with the tweak bytes that reach the last block.
    last: u128,
    u: usize,
    v: usize,
    /// Bytes of `[NUM(x)]^b`.
    b: usize,
    /// Bytes of S that are used.
    d: usize,
}

impl Setup {
    fn new(enc: &impl Fn(u128) -> u128, n: usize, tweak: &[u8]) -> Setup {
        let u = n / 2;
        let v = n - u;
        // b = ceil(ceil(v * log2(10)) / 8), exact for v <= 10 via 10^v's bit length.
        let bits = 64 - (POW10[v] - 1).leading_zeros() as usize;
        let b = bits.div_ceil(8);
        let d = 4 * b.div_ceil(4) + 4;
        // P = [1]^1 || [2]^1 || [1]^1 || [radix]^3 || [10]^1 || [u mod 256]^1 || [n]^4 || [t]^4
        let p = (0x0102_0100_000a_0a00_u128 << 64)
            | ((u as u128) << 64)
            | ((n as u128) << 32)
            | tweak.len() as u128;
        // Q = T || 0^((-t-b-1) mod 16) || [i]^1 || [x]^b: [i] and [x]^b end its last
        // block, so the blocks before it are tweak bytes and zeros only.
        let blocks = (tweak.len() + b + 1).div_ceil(16);
        let block = |k: usize| {
            let bytes = tweak.get(k * 16..).unwrap_or(&[]);
            let mut q = [0u8; 16];
            for (q, t) in q.iter_mut().zip(bytes) {
                *q = *t;
            }
            u128::from_be_bytes(q)
        };
        let chain = (0..blocks - 1).fold(enc(p), |mac, k| enc(mac ^ block(k)));
        Setup {
            last: chain ^ block(blocks - 1),
            u,
            v,
            b,
            d,
        }
    }

    /// y = NUM(S) mod 10^m for round `i`, where Q ends in `[i]^1 || [NUM(x)]^b`: one AES
    /// block per round, whatever the tweak's length.
    fn round_value(&self, enc: &impl Fn(u128) -> u128, i: u8, x: u64, m: usize) -> u64 {
        let r = enc(self.last ^ (u128::from(i) << (8 * self.b)) ^ u128::from(x));
        // d <= 12 here, so S is the first d bytes of R.
        prefix_mod_pow10(r, self.d, m)
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
