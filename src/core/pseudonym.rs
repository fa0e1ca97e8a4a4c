//! Keyed pseudonyms (irreversible) and FF1 tokens (reversible), with per-purpose keys.
//!
//! A plain hash of an MSISDN is not a pseudonym: the number space is small enough to
//! enumerate. Every value here is keyed. Keys are derived per purpose from a master key,
//! so the same subscriber gets unlinkable values in analytics and marketing copies.

use std::fmt;

use arrayvec::ArrayString;

use super::ff1::{self, Ff1};

use crate::vocab::purpose::Purpose;

/// Longest master key id accepted; keeps every token within its inline buffer.
pub const MAX_KEY_ID: usize = 15;

/// A pseudonym or token held inline (no heap on the hot path).
pub type Token = ArrayString<64>;

/// A master secret and its id. The secret never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    secret: [u8; 32],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Bad id.
    #[error("key id {0:?} must be 1 to 15 characters of [A-Za-z0-9_-]")]
    BadId(String),
    /// Secret too short.
    #[error("key {0:?}: the secret must be at least 32 bytes")]
    ShortSecret(String),
    /// A token names a key this keyring lacks.
    #[error("token names key {0:?}, which the keyring does not hold")]
    UnknownKey(String),
    /// A token key's id is not `master.purpose`.
    #[error("token key id {0:?} must be a key id, '.', and a purpose id (e.g. k1.marketing)")]
    BadTokenKeyId(String),
    /// A token key is not an AES-256 key.
    #[error("token key {0:?}: the secret must be exactly 32 bytes")]
    TokenKeySize(String),
    /// A token is not of the form this crate writes.
    #[error("not a token written by cdrguard")]
    NotAToken,
}

impl MasterKey {
    /// Refuses an id that is not 1 to 15 characters of `[A-Za-z0-9_-]`.
    fn check_id(id: &str) -> Result<(), KeyError> {
        if id.is_empty()
            || id.len() > MAX_KEY_ID
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(KeyError::BadId(id.to_string()));
        }
        Ok(())
    }

    /// Builds a key from its id and secret bytes (at least 32; longer secrets are
    /// compressed with BLAKE3's key derivation).
    pub fn new(id: &str, secret: &[u8]) -> Result<MasterKey, KeyError> {
        MasterKey::check_id(id)?;
        if secret.len() < 32 {
            return Err(KeyError::ShortSecret(id.to_string()));
        }
        Ok(MasterKey {
            id: id.to_string(),
            secret: blake3::derive_key("cdrguard master key v1", secret),
        })
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This key's token key for one purpose: the same FF1 key the keyring derives, alone.
    pub fn token_key(&self, p: Purpose) -> TokenKey {
        TokenKey {
            key_id: purpose_key_id(&self.id, p),
            secret: blake3::derive_key("cdrguard ff1 token v1", &material(self, p)),
        }
    }
}

/// Keys for one purpose.
struct PurposeKeys {
    key_id: ArrayString<32>,
    /// `key_id:`, the start of every pseudonym: copied whole instead of pushed in parts.
    pseudonym_prefix: Token,
    /// `key_id~`, the start of every token.
    token_prefix: Token,
    prf: [u8; 32],
    ff1: Ff1,
}

/// 16 bytes as 32 lowercase hex digits, computed eight bytes at a time in one `u128`
/// instead of a table lookup per nibble.
struct Hex([u8; 32]);

impl Hex {
    fn new(bytes: &[u8; 16]) -> Hex {
        let mut out = [0u8; 32];
        for (dst, src) in out.chunks_exact_mut(16).zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(src);
            dst.copy_from_slice(&Hex::digits(u64::from_be_bytes(word)).to_be_bytes());
        }
        Hex(out)
    }

    /// The 16 digits of `x`, most significant first in big-endian byte order.
    fn digits(x: u64) -> u128 {
        const LANES32: u128 = 0x0000_0000_FFFF_FFFF_0000_0000_FFFF_FFFF;
        const LANES16: u128 = 0x0000_FFFF_0000_FFFF_0000_FFFF_0000_FFFF;
        const LANES8: u128 = 0x00FF_00FF_00FF_00FF_00FF_00FF_00FF_00FF;
        const HIGH: u128 = 0x0F00_0F00_0F00_0F00_0F00_0F00_0F00_0F00;
        const LOW: u128 = 0x000F_000F_000F_000F_000F_000F_000F_000F;
        const ONES: u128 = 0x0101_0101_0101_0101_0101_0101_0101_0101;
        // Spread the bytes one to each 16-bit lane, keeping their order.
        let mut t = u128::from(x);
        t = (t | (t << 32)) & LANES32;
        t = (t | (t << 16)) & LANES16;
        t = (t | (t << 8)) & LANES8;
        // Each lane's high nibble to its upper byte, its low nibble in its lower byte.
        let n = ((t << 4) & HIGH) | (t & LOW);
        // A nibble of 10 or more carries into bit 4 when 6 is added: those become letters
        // ('a' is 39 past '0' + 10). No byte carries into the next.
        let letters = ((n + ONES * 6) >> 4) & ONES;
        n + ONES * u128::from(b'0') + letters * 39
    }

    fn as_str(&self) -> &str {
        // SAFETY: `new` writes only the ASCII bytes '0'-'9' and 'a'-'f'. Checking them
        // cost a tenth of a pseudonym.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

/// All purpose keys derived from the active master key, plus older keys: they reverse
/// tokens written before a rotation and let rights find copies named under them.
pub struct Keyring {
    /// The active master key's id.
    id: String,
    active: [PurposeKeys; Purpose::COUNT],
    /// The keys listed after the active one, each a keyring of its own (with no older
    /// keys), so the same treatment code computes what copies carried under it.
    older: Vec<Keyring>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.each_key().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring").field("keys", &ids).finish()
    }
}

/// What a purpose's keys are derived from: the master secret and the purpose id.
fn material(master: &MasterKey, p: Purpose) -> Vec<u8> {
    let mut material = Vec::with_capacity(48);
    material.extend_from_slice(&master.secret);
    material.extend_from_slice(p.id().as_bytes());
    material
}

/// `master.purpose`, the key id stamped on a purpose's values.
fn purpose_key_id(master: &str, p: Purpose) -> ArrayString<32> {
    let mut key_id = ArrayString::new();
    // Fits: id <= 15 bytes, '.', purpose id <= 15 bytes.
    key_id.push_str(master);
    key_id.push('.');
    key_id.push_str(p.id());
    key_id
}

fn derive(master: &MasterKey) -> [PurposeKeys; Purpose::COUNT] {
    Purpose::ALL.map(|p| {
        let material = material(master, p);
        let prf = blake3::derive_key("cdrguard pseudonym prf v1", &material);
        let ff1_key = blake3::derive_key("cdrguard ff1 token v1", &material);
        let key_id = purpose_key_id(&master.id, p);
        let mut pseudonym_prefix = Token::new();
        pseudonym_prefix.push_str(&key_id);
        pseudonym_prefix.push(':');
        let mut token_prefix = Token::new();
        token_prefix.push_str(&key_id);
        token_prefix.push('~');
        PurposeKeys {
            key_id,
            pseudonym_prefix,
            token_prefix,
            prf,
            ff1: Ff1::new(&ff1_key),
        }
    })
}

/// The parts of a token written by [`Keyring::tokenise`]: its master key id, purpose, and
/// its body (an optional `+` and the encrypted digits).
fn split_token(token: &str) -> Result<(&str, Purpose, &str), KeyError> {
    let (key_id, body) = token.split_once('~').ok_or(KeyError::NotAToken)?;
    let (master, purpose) = key_id.split_once('.').ok_or(KeyError::NotAToken)?;
    let p = Purpose::from_id(purpose).ok_or(KeyError::NotAToken)?;
    Ok((master, p, body))
}

/// Decrypts a token's body with its purpose's FF1 key.
fn decrypt_body(ff1: &Ff1, body: &str) -> Result<String, KeyError> {
    let (plus, digits) = match body.strip_prefix('+') {
        Some(d) => ("+", d),
        None => ("", body),
    };
    let n = digits.len();
    if !(ff1::MIN_DIGITS..=ff1::MAX_DIGITS).contains(&n)
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(KeyError::NotAToken);
    }
    let mut buf: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
    if !ff1.decrypt(&[], &mut buf) {
        return Err(KeyError::NotAToken);
    }
    Ok(plus.to_string() + &buf.iter().map(|d| (b'0' + d) as char).collect::<String>())
}

/// One purpose's token key under one master key, without the master key: the FF1 key
/// that `keys export` writes for the holder of that purpose's tokens. It derives nothing:
/// no pseudonym of any purpose, no other purpose's tokens. Never printed.
#[derive(Clone)]
pub struct TokenKey {
    key_id: ArrayString<32>,
    secret: [u8; 32],
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("key_id", &self.key_id.as_str())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl TokenKey {
    /// A token key from its id (`master.purpose`, as tokens carry it) and its 32-byte
    /// FF1 key, as an exported key file holds them.
    pub fn new(key_id: &str, secret: &[u8]) -> Result<TokenKey, KeyError> {
        let (master, purpose) = key_id
            .split_once('.')
            .ok_or_else(|| KeyError::BadTokenKeyId(key_id.to_string()))?;
        let p =
            Purpose::from_id(purpose).ok_or_else(|| KeyError::BadTokenKeyId(key_id.to_string()))?;
        MasterKey::check_id(master)?;
        let secret: [u8; 32] = secret
            .try_into()
            .map_err(|_| KeyError::TokenKeySize(key_id.to_string()))?;
        Ok(TokenKey {
            key_id: purpose_key_id(master, p),
            secret,
        })
    }

    /// `master.purpose`, e.g. `k1.marketing`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The FF1 key itself, for writing it to a key file; never to be printed.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }
}

/// Token keys without any master key (an exported key file): reverses the tokens of the
/// purposes and keys it holds, and can compute nothing else.
pub struct TokenKeyring {
    keys: Vec<(ArrayString<32>, Ff1)>,
}

impl fmt::Debug for TokenKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("TokenKeyring").field("keys", &ids).finish()
    }
}

impl TokenKeyring {
    /// A ring of the given token keys; `None` when there are none.
    pub fn new(keys: &[TokenKey]) -> Option<TokenKeyring> {
        (!keys.is_empty()).then(|| TokenKeyring {
            keys: keys
                .iter()
                .map(|k| (k.key_id, Ff1::new(&k.secret)))
                .collect(),
        })
    }

    /// The key ids held, e.g. `k2.marketing`.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    /// Reverses a token of a purpose and key this ring holds.
    pub fn reverse(&self, token: &str) -> Result<String, KeyError> {
        let (master, p, body) = split_token(token)?;
        let want = purpose_key_id(master, p);
        let ff1 = self
            .keys
            .iter()
            .find(|(id, _)| *id == want)
            .map(|(_, f)| f)
            .ok_or_else(|| KeyError::UnknownKey(want.to_string()))?;
        decrypt_body(ff1, body)
    }
}

impl Keyring {
    /// A keyring whose first key is active; the others are only read with (old tokens,
    /// rights reaching old copies), never written with.
    pub fn new(keys: &[MasterKey]) -> Option<Keyring> {
        let (first, rest) = keys.split_first()?;
        Some(Keyring {
            id: first.id.clone(),
            active: derive(first),
            older: rest
                .iter()
                .map(|k| Keyring {
                    id: k.id.clone(),
                    active: derive(k),
                    older: Vec::new(),
                })
                .collect(),
        })
    }

    /// This keyring under each of its keys, the active one first: itself, then a keyring
    /// whose active key is each older key in turn. Copies written before a rotation name
    /// their subscriber under an older key, so a right must look under every one.
    pub fn each_key(&self) -> impl Iterator<Item = &Keyring> {
        std::iter::once(self).chain(&self.older)
    }

    /// The active master key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether `other` holds the same keys in the same order: the same ids computing the
    /// same values (a key re-issued under its old id is a different key).
    pub fn same_keys(&self, other: &Keyring) -> bool {
        self.each_key().count() == other.each_key().count()
            && self.each_key().zip(other.each_key()).all(|(a, b)| {
                a.id == b.id && a.active.iter().zip(&b.active).all(|(x, y)| x.prf == y.prf)
            })
    }

    /// The key id stamped on values for this purpose, e.g. `k2026a.analytics`.
    pub fn key_id(&self, p: Purpose) -> &str {
        &self.active[p as usize].key_id
    }

    /// Irreversible pseudonym: `key_id:` + 128 bits of keyed BLAKE3, hex. The field name
    /// is mixed in so an IMSI and an MSISDN that happen to share digits do not collide.
    pub fn pseudonym(&self, p: Purpose, field: &str, value: &str) -> Token {
        let k = &self.active[p as usize];
        // The message is `field || 0 || value`. Laid out on the stack it takes BLAKE3's
        // one-shot path, which costs about half of three incremental updates; only values
        // longer than any identifier need the incremental hasher.
        let mut msg = [0u8; 160];
        let n = field.len() + 1 + value.len();
        let digest = if n <= msg.len() {
            msg[..field.len()].copy_from_slice(field.as_bytes());
            msg[field.len() + 1..n].copy_from_slice(value.as_bytes());
            blake3::keyed_hash(&k.prf, &msg[..n])
        } else {
            let mut h = blake3::Hasher::new_keyed(&k.prf);
            h.update(field.as_bytes());
            h.update(&[0]);
            h.update(value.as_bytes());
            h.finalize()
        };
        let mut digits = [0u8; 16];
        digits.copy_from_slice(&digest.as_bytes()[..16]);
        let mut out = k.pseudonym_prefix;
        out.push_str(Hex::new(&digits).as_str());
        out
    }

    /// Reversible FF1 token of a digit string (an optional leading `+` is kept, so the
    /// token still looks like a number): `key_id~` + encrypted digits. `None` when the
    /// value is not 6 to 20 digits (FF1's domain must be large enough to be safe).
    pub fn tokenise(&self, p: Purpose, value: &str) -> Option<Token> {
        let k = &self.active[p as usize];
        let (plus, digits) = match value.strip_prefix('+') {
            Some(d) => ("+", d),
            None => ("", value),
        };
        let mut buf = [0u8; ff1::MAX_DIGITS];
        let n = digits.len();
        if !(ff1::MIN_DIGITS..=ff1::MAX_DIGITS).contains(&n)
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        for (slot, b) in buf.iter_mut().zip(digits.bytes()) {
            *slot = b - b'0';
        }
        if !k.ff1.encrypt(&[], &mut buf[..n]) {
            return None;
        }
        // The digits as text in one piece, not pushed a char (and a capacity check) each.
        let mut text = [0u8; ff1::MAX_DIGITS];
        for (t, d) in text.iter_mut().zip(&buf[..n]) {
            *t = b'0' + d;
        }
        let mut out = k.token_prefix;
        out.push_str(plus);
        out.push_str(std::str::from_utf8(&text[..n]).ok()?);
        Some(out)
    }

    /// Reverses a token written by [`Keyring::tokenise`] with any key this keyring holds.
    pub fn reverse(&self, token: &str) -> Result<String, KeyError> {
        let (master, p, body) = split_token(token)?;
        let keys = self
            .each_key()
            .find(|k| k.id == master)
            .map(|k| &k.active[p as usize])
            .ok_or_else(|| KeyError::UnknownKey(master.to_string()))?;
        decrypt_body(&keys.ff1, body)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A keyring for tests; real keys come from a key file.
    pub(crate) fn test_keyring() -> Keyring {
        Keyring::new(&[MasterKey::new("test1", &[7u8; 32]).unwrap()]).unwrap()
    }

    #[test]
    fn pseudonyms_are_stable_per_key_and_differ_across_purposes_and_keys() {
        let k = test_keyring();
        let a = k.pseudonym(Purpose::Analytics, "msisdn", "+46701234567");
        assert_eq!(a, k.pseudonym(Purpose::Analytics, "msisdn", "+46701234567"));
        assert!(a.starts_with("test1.analytics:"));
        assert!(!a.contains("46701234567"));
        assert_ne!(a, k.pseudonym(Purpose::Marketing, "msisdn", "+46701234567"));
        let other = Keyring::new(&[MasterKey::new("test2", &[8u8; 32]).unwrap()]).unwrap();
        let b = other.pseudonym(Purpose::Analytics, "msisdn", "+46701234567");
        assert_ne!(a[a.len() - 32..], b[b.len() - 32..]);
    }

    #[test]
    fn hex_digits_are_the_hex_crates() {
        let mut b = [0u8; 16];
        for round in 0..64u8 {
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i as u8)
                    .wrapping_mul(17)
                    .wrapping_add(round.wrapping_mul(71));
            }
            if round == 0 {
                b = [0xFF; 16];
            }
            assert_eq!(Hex::new(&b).as_str(), hex::encode(b));
        }
        let every: Vec<u8> = (0..=255).collect();
        for chunk in every.chunks_exact(16) {
            let b: [u8; 16] = chunk.try_into().unwrap();
            assert_eq!(Hex::new(&b).as_str(), hex::encode(b));
        }
    }

    #[test]
    fn pseudonyms_are_keyed_blake3_of_field_zero_value_at_any_length() {
        let k = test_keyring();
        let master = blake3::derive_key("cdrguard master key v1", &[7u8; 32]);
        let prf = blake3::derive_key(
            "cdrguard pseudonym prf v1",
            &[&master[..], b"analytics"].concat(),
        );
        // Short values take the one-shot path, long ones the incremental hasher.
        for value in ["+46701234567".to_string(), "x".repeat(150), "y".repeat(400)] {
            let msg = [&b"apn"[..], &[0], value.as_bytes()].concat();
            let want = blake3::keyed_hash(&prf, &msg);
            assert_eq!(
                k.pseudonym(Purpose::Analytics, "apn", &value).as_str(),
                format!("test1.analytics:{}", &want.to_hex()[..32])
            );
        }
    }

    /// Regression: a 16-character key id made every troubleshooting pseudonym 65 bytes,
    /// one more than its inline buffer, and panicked.
    #[test]
    fn the_longest_key_id_fits_every_purpose() {
        let id = "k".repeat(MAX_KEY_ID);
        let k = Keyring::new(&[MasterKey::new(&id, &[7u8; 32]).unwrap()]).unwrap();
        for p in Purpose::ALL {
            let t = k.pseudonym(p, "record_id", "r-1");
            assert!(t.starts_with(&format!("{id}.{}:", p.id())));
            assert!(k.tokenise(p, "+46701234567").is_some());
        }
        assert!(MasterKey::new(&"k".repeat(MAX_KEY_ID + 1), &[7u8; 32]).is_err());
    }

    #[test]
    fn tokens_reverse_with_the_key_and_only_with_it() {
        let k = test_keyring();
        let t = k.tokenise(Purpose::Marketing, "+46701234567").unwrap();
        assert!(t.starts_with("test1.marketing~+"));
        assert!(!t.ends_with("46701234567"));
        assert_eq!(k.reverse(&t).unwrap(), "+46701234567");
        let other = Keyring::new(&[MasterKey::new("test2", &[8u8; 32]).unwrap()]).unwrap();
        assert_eq!(other.reverse(&t), Err(KeyError::UnknownKey("test1".into())));
        assert!(k.tokenise(Purpose::Marketing, "+4612").is_none());
    }

    #[test]
    fn a_rotated_keyring_writes_with_its_first_key_and_reads_with_every_key() {
        let old = test_keyring();
        let old_token = old.tokenise(Purpose::Marketing, "+46701234567").unwrap();
        let k = Keyring::new(&[
            MasterKey::new("test2", &[8u8; 32]).unwrap(),
            MasterKey::new("test1", &[7u8; 32]).unwrap(),
        ])
        .unwrap();
        assert_eq!(k.key_id(Purpose::Marketing), "test2.marketing");
        assert_eq!(k.reverse(&old_token).unwrap(), "+46701234567");
        let each: Vec<Token> = k
            .each_key()
            .map(|g| g.pseudonym(Purpose::Analytics, "msisdn", "+46701234567"))
            .collect();
        assert_eq!(
            each,
            [
                k.pseudonym(Purpose::Analytics, "msisdn", "+46701234567"),
                old.pseudonym(Purpose::Analytics, "msisdn", "+46701234567"),
            ]
        );
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let m = MasterKey::new("k1", &[0xAB; 32]).unwrap();
        let s = format!(
            "{m:?} {:?}",
            Keyring::new(std::slice::from_ref(&m)).unwrap()
        );
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("abab"),
            "{s}"
        );
        assert!(MasterKey::new("k1", &[1; 8]).is_err());
        let t = TokenKey::new("k1.marketing", &[0xAB; 32]).unwrap();
        let s = format!(
            "{t:?} {:?}",
            TokenKeyring::new(std::slice::from_ref(&t)).unwrap()
        );
        assert!(s.contains("k1.marketing"), "{s}");
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("abab"),
            "{s}"
        );
        assert!(TokenKey::new("k1.marketing", &[1; 31]).is_err());
    }
}
