//! Pseudonym key files: where keys come from (never from code), and how new ones are made.
//!
//! Two kinds: a master key file (`[[keys]]`), from which every purpose's pseudonym and
//! token keys are derived, and an exported token key file (`[[token_keys]]`), which holds
//! one purpose's token keys alone, for whoever reverses that purpose's tokens.

use std::path::Path;

use serde::Deserialize;

use crate::checked::{self, Findings, Problem, Refused};
use crate::core::pseudonym::{KeyError, Keyring, MasterKey, TokenKey, TokenKeyring};
use crate::vocab::purpose::Purpose;

/// What the first line of a refused key file calls the file.
const KIND: &str = "key file";

/// Why a key file was refused: every problem, with its place (never quoting a secret).
pub type KeyFileError = Refused;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    keys: Vec<toml::Spanned<RawKey>>,
    #[serde(default)]
    token_keys: Vec<toml::Spanned<RawTokenKey>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: toml::Spanned<String>,
    secret_hex: toml::Spanned<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenKey {
    key_id: toml::Spanned<String>,
    secret_hex: toml::Spanned<String>,
}

/// What a key file holds.
#[derive(Debug)]
pub enum KeyFile {
    /// Master keys: every purpose's pseudonyms and tokens (boxed: a keyring holds every
    /// purpose's AES key schedules).
    Master(Box<Keyring>),
    /// Exported token keys: only the tokens of their purposes.
    Tokens(TokenKeyring),
}

impl KeyFile {
    /// Reverses a token with whichever keys the file holds.
    pub fn reverse(&self, token: &str) -> Result<String, KeyError> {
        match self {
            KeyFile::Master(k) => k.reverse(token),
            KeyFile::Tokens(k) => k.reverse(token),
        }
    }
}

/// The keys of a file, checked: one kind or the other, never both, never none.
enum Keys {
    Master(Vec<MasterKey>),
    Tokens(Vec<TokenKey>),
}

/// Checks key-file text of either kind. Master keys are `[[keys]]` tables with `id` and
/// `secret_hex` (32+ bytes); the first key is active, later ones are older keys. Token
/// keys are `[[token_keys]]` tables with `key_id` (`master.purpose`) and `secret_hex`
/// (32 bytes). Ids must be unique: a token names its key by id, so two keys with one id
/// would make reversal ambiguous.
fn read_keys(text: &str, file: &str) -> Result<Keys, KeyFileError> {
    // The parser's message may quote the offending line, which could hold a secret: a
    // file that is not TOML, or not of this shape, is refused with this one instead.
    let not_a_key_file = |line| {
        let message = "not a key file (expected [[keys]] with id and secret_hex, or [[token_keys]] with key_id and secret_hex)";
        Refused::one(
            KIND,
            Problem {
                line,
                ..Problem::whole(file, message)
            },
        )
    };
    let root = checked::parse(text, file).map_err(|p| not_a_key_file(p.line))?;
    let mut found = Findings::new(file, text);
    let raw = RawFile::deserialize(toml::de::Deserializer::from(root))
        .map_err(|e| not_a_key_file(e.span().map(|s| found.line(s.start))))?;
    match (raw.keys.is_empty(), raw.token_keys.is_empty()) {
        (true, true) => found.whole("no [[keys]] entry"),
        (false, false) => found.whole(
            "holds both [[keys]] and [[token_keys]]: a token key file is exported on its own, so it can be handed out without the master keys",
        ),
        _ => {}
    }
    let keys = checked(
        "keys",
        &raw.keys,
        |k| (("id", &k.id), &k.secret_hex),
        MasterKey::new,
        &mut found,
    );
    let tokens = checked(
        "token_keys",
        &raw.token_keys,
        |k| (("key_id", &k.key_id), &k.secret_hex),
        TokenKey::new,
        &mut found,
    );
    if !found.is_empty() {
        return Err(found.refused(KIND));
    }
    Ok(if keys.is_empty() {
        Keys::Tokens(tokens)
    } else {
        Keys::Master(keys)
    })
}

/// The entries of one key table, each made into a key by `make` from its id and decoded
/// secret; every refused entry adds a problem at the line of the key at fault (never its
/// secret).
fn checked<R, K>(
    table: &str,
    entries: &[toml::Spanned<R>],
    fields: impl Fn(
        &R,
    ) -> (
        (&'static str, &toml::Spanned<String>),
        &toml::Spanned<String>,
    ),
    make: impl Fn(&str, &[u8]) -> Result<K, KeyError>,
    found: &mut Findings,
) -> Vec<K> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let ((id_name, id), secret_hex) = fields(entry.get_ref());
        // Each problem is placed at the value at fault, named by its entry and key.
        let key = |name: &str| format!("{table}[{i}].{name}");
        let (id_at, secret_at) = (id.span().start, secret_hex.span().start);
        if let Some(j) = entries[..i]
            .iter()
            .position(|o| fields(o.get_ref()).0.1.get_ref() == id.get_ref())
        {
            let first = found.line(entries[j].span().start);
            found.at(
                id_at,
                &key(id_name),
                format!(
                    "key id {:?} is already used by {table}[{j}] (line {first})",
                    id.get_ref()
                ),
            );
            continue;
        }
        let secret = match hex::decode(secret_hex.get_ref().trim()) {
            Ok(s) => s,
            Err(_) => {
                found.at(
                    secret_at,
                    &key("secret_hex"),
                    format!("not hex (key {:?})", id.get_ref()),
                );
                continue;
            }
        };
        match make(id.get_ref(), &secret) {
            Ok(k) => match weak(&secret) {
                None => out.push(k),
                Some(why) => found.at(
                    secret_at,
                    &key("secret_hex"),
                    format!(
                        "the secret of key {:?} {why}: it does not look random; make a key with `cdrguard keys generate`",
                        id.get_ref()
                    ),
                ),
            },
            Err(e @ (KeyError::BadId(_) | KeyError::BadTokenKeyId(_))) => {
                found.at(id_at, &key(id_name), e.to_string())
            }
            Err(e) => found.at(secret_at, &key("secret_hex"), e.to_string()),
        }
    }
    out
}

/// Why a secret cannot have been drawn at random, if it cannot: a key typed by hand or
/// left as a placeholder (all zeros, `00112233...`, a counter, a phrase pasted twice)
/// would make every pseudonym guessable by whoever guesses the key. Three checks, each
/// over the whole secret (32 bytes or more):
///
/// - fewer than 16 distinct byte values (all zeros, any pattern of period 15 or less);
/// - fewer than 16 distinct differences between neighbouring bytes (counters, arithmetic
///   sequences, patterns of period 15 or less however shifted);
/// - a period of at most half its length (a 16-byte block repeated).
///
/// A uniformly random 32-byte secret fails the first with probability 3.2e-17, the
/// second (its 31 neighbour differences are again uniform and independent) with 4.6e-16,
/// and the third with 3e-39 (exact counts via Stirling numbers): together under 5e-16, so
/// a key from `keys generate` is never refused in practice. Longer secrets fail less.
fn weak(secret: &[u8]) -> Option<&'static str> {
    let distinct = |bytes: &mut dyn Iterator<Item = u8>| {
        let mut seen = [false; 256];
        bytes
            .filter(|b| !std::mem::replace(&mut seen[*b as usize], true))
            .count()
    };
    if distinct(&mut secret.iter().copied()) < 16 {
        return Some("has fewer than 16 distinct byte values");
    }
    if distinct(&mut secret.windows(2).map(|w| w[1].wrapping_sub(w[0]))) < 16 {
        return Some(
            "steps from byte to byte by fewer than 16 distinct amounts (a counter or a repeated pattern)",
        );
    }
    if (1..=secret.len() / 2).any(|p| secret[p..] == secret[..secret.len() - p]) {
        return Some("repeats itself");
    }
    None
}

/// The master keys of a master key file, in file order. An exported token key file is
/// refused with a message that says what it is and what is needed instead.
fn master_keys(text: &str, file: &str) -> Result<Vec<MasterKey>, KeyFileError> {
    match read_keys(text, file)? {
        Keys::Master(k) => Ok(k),
        Keys::Tokens(t) => Err(Refused::one(
            KIND,
            Problem::whole(
                file,
                format!(
                    "holds only the token keys {} (written by `cdrguard keys export`): it reverses those tokens and nothing else; this needs the master key file ([[keys]])",
                    t.iter()
                        .map(TokenKey::key_id)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        )),
    }
}

fn no_key(file: &str) -> KeyFileError {
    Refused::one(KIND, Problem::whole(file, "no usable key"))
}

/// Parses a master key file: what pseudonymising and tokenising need (replay, run).
pub fn parse(text: &str, file: &str) -> Result<Keyring, KeyFileError> {
    Keyring::new(&master_keys(text, file)?).ok_or_else(|| no_key(file))
}

/// Parses a key file of either kind (for reversing tokens).
pub fn parse_any(text: &str, file: &str) -> Result<KeyFile, KeyFileError> {
    match read_keys(text, file)? {
        Keys::Master(k) => Keyring::new(&k).map(|r| KeyFile::Master(Box::new(r))),
        Keys::Tokens(t) => TokenKeyring::new(&t).map(KeyFile::Tokens),
    }
    .ok_or_else(|| no_key(file))
}

/// Reads a key file and parses it with `parse`. A file that group or others may read or
/// write is refused, as ssh refuses such a private key: whoever reads the secret can
/// compute every pseudonym and reverse every token, and whoever writes it can swap it.
/// The refusal says which `chmod` fixes it, and lists the file's other problems too.
fn read<T>(
    path: &Path,
    parse: impl FnOnce(&str, &str) -> Result<T, KeyFileError>,
) -> Result<T, KeyFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Refused::one(KIND, Problem::whole(&name, format!("cannot read: {e}"))))?;
    let mut problems = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            problems.push(Problem::whole(
                &name,
                format!(
                    "readable or writable by group or others (mode {:o}); a key file must be its owner's alone: run `chmod 600 {}`",
                    meta.permissions().mode() & 0o777,
                    shell_word(&name)
                ),
            ));
        }
    }
    match parse(&text, &name) {
        Ok(v) if problems.is_empty() => Ok(v),
        Ok(_) => Err(Refused {
            kind: KIND,
            file: name,
            problems,
        }),
        Err(mut e) => {
            problems.append(&mut e.problems);
            e.problems = problems;
            Err(e)
        }
    }
}

/// `s` as one shell word, so the `chmod` line can be pasted as it is.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Reads a master key file (see [`parse`]).
pub fn load(path: &Path) -> Result<Keyring, KeyFileError> {
    read(path, parse)
}

/// Reads a key file of either kind (see [`parse_any`]).
pub fn load_any(path: &Path) -> Result<KeyFile, KeyFileError> {
    read(path, parse_any)
}

/// Makes a new key file's text with a fresh random 256-bit secret.
pub fn generate(id: &str) -> String {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!(
        "# cdrguard pseudonym keys. Secret: keep it readable by cdrguard only (chmod 600).\n\
         # The first key is active; keep retired keys below it to reverse old tokens.\n\
         [[keys]]\nid = \"{id}\"\nsecret_hex = \"{}\"\n",
        hex::encode(secret)
    )
}

/// The text of a token key file: each master key's token key for `purpose`, in the
/// master file's order, so tokens written before a rotation reverse too.
pub fn export_text(keys: &[MasterKey], purpose: Purpose) -> String {
    let mut out = format!(
        "# cdrguard token keys for {p}, exported from a master key file. They reverse {p}\n\
         # tokens and nothing else. Secret: keep it readable by its holder only (chmod 600).\n",
        p = purpose.id()
    );
    for k in keys {
        let t = k.token_key(purpose);
        out.push_str(&format!(
            "[[token_keys]]\nkey_id = \"{}\"\nsecret_hex = \"{}\"\n",
            t.key_id(),
            hex::encode(t.secret())
        ));
    }
    out
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The master key file was refused.
    #[error(transparent)]
    Keys(#[from] KeyFileError),
    /// The output could not be written (it may exist already: it is never overwritten).
    #[error("cannot write {file}")]
    Write {
        /// The output file.
        file: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Writes a token key file for `purpose` from the master key file at `keys`, readable
/// by its owner only. Returns the key ids written.
pub fn export(keys: &Path, purpose: Purpose, out: &Path) -> Result<Vec<String>, ExportError> {
    let masters = read(keys, master_keys)?;
    write_private(out, &export_text(&masters, purpose)).map_err(|source| ExportError::Write {
        file: out.display().to_string(),
        source,
    })?;
    Ok(masters
        .iter()
        .map(|k| k.token_key(purpose).key_id().to_string())
        .collect())
}

/// Writes a new file readable by its owner only; an existing file is never overwritten.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(text.as_bytes())
}

/// Writes a new key file readable by its owner only.
pub fn write_new(path: &Path, id: &str) -> std::io::Result<()> {
    write_private(path, &generate(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_parse_and_bad_ones_list_every_problem() {
        let k = parse(&generate("k1"), "gen").unwrap();
        assert_eq!(
            k.key_id(crate::vocab::purpose::Purpose::Analytics),
            "k1.analytics"
        );
        let bad = "[[keys]]\nid = \"k 1\"\nsecret_hex = \"00\"\n[[keys]]\nid = \"k2\"\nsecret_hex = \"zz\"\n";
        let e = parse(bad, "bad.toml").unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(!e.to_string().contains("zz"));
        assert!(
            e.to_string().contains("\n  bad.toml:2: keys[0].id: key id"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("\n  bad.toml:6: keys[1].secret_hex: not hex (key \"k2\")"),
            "{e}"
        );
    }

    /// A key file with `secret` as the secret of its one key.
    fn with_secret(secret: &[u8]) -> String {
        format!(
            "[[keys]]\nid = \"k1\"\nsecret_hex = \"{}\"\n",
            hex::encode(secret)
        )
    }

    /// Regression: an all-zero secret (or `00112233...`) was accepted, and a bad secret
    /// was reported at its `[[keys]]` line rather than its own.
    #[test]
    fn a_secret_that_is_not_random_is_refused_at_its_own_line() {
        let counter: Vec<u8> = (0..32).collect();
        // 16 random bytes twice: 16 distinct values and 16 distinct steps, yet half a key.
        let half = hex::decode("76fe013b822806fd4768bcb1c79e3d3f").unwrap();
        let halves = [half.clone(), half].concat();
        let pairs: Vec<u8> = (0..32).map(|i| [0x00, 0x11, 0x22, 0x33][i % 4]).collect();
        for (secret, why) in [
            (&[0u8; 32][..], "fewer than 16 distinct byte values"),
            (&pairs, "fewer than 16 distinct byte values"),
            (&counter, "fewer than 16 distinct amounts"),
            (&halves, "repeats itself"),
        ] {
            let text = with_secret(secret);
            let e = parse(&text, "k.toml").unwrap_err();
            let shown = e.to_string();
            assert_eq!(e.problems.len(), 1, "{shown}");
            assert!(
                shown.contains("\n  k.toml:3: keys[0].secret_hex: the secret of key \"k1\" ")
                    && shown.contains(why),
                "{why}: {shown}"
            );
            assert!(!shown.contains(&hex::encode(secret)), "{shown}");
            // Token key files are held to the same test.
            let token = text
                .replace("[[keys]]", "[[token_keys]]")
                .replace("id = \"k1\"", "key_id = \"k1.marketing\"");
            let e = parse_any(&token, "t.toml").unwrap_err();
            assert!(
                e.to_string().contains("t.toml:3: token_keys[0].secret_hex"),
                "{e}"
            );
        }
        // A short secret is also reported at the secret, not the table.
        let e = parse(&with_secret(&[1, 2, 3]), "k.toml").unwrap_err();
        assert!(
            e.to_string().contains(
                "k.toml:3: keys[0].secret_hex: key \"k1\": the secret must be at least 32 bytes"
            ),
            "{e}"
        );
        // Random secrets pass (the odds of refusing one are below 1e-15).
        for _ in 0..1000 {
            assert!(parse(&generate("k1"), "gen").is_ok());
        }
    }

    /// Regression: a key file readable by others was only warned about.
    #[cfg(unix)]
    #[test]
    fn a_key_file_others_may_read_or_write_is_refused_with_the_chmod_that_fixes_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my keys.toml");
        std::fs::write(&path, generate("k1")).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load(&path).unwrap_err().to_string();
            let want = format!(
                "(mode {mode:o}); a key file must be its owner's alone: run `chmod 600 '{}'`",
                path.display()
            );
            assert!(e.contains(&want), "{mode:o}: {e}");
            assert!(load_any(&path).is_err(), "{mode:o}");
            let out = dir.path().join(format!("export-{mode:o}.toml"));
            assert!(export(&path, Purpose::Marketing, &out).is_err(), "{mode:o}");
            assert!(!out.exists());
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(load(&path).is_ok(), "{mode:o}");
            assert!(load_any(&path).is_ok(), "{mode:o}");
        }
        // The file's other problems are listed with it.
        std::fs::write(&path, with_secret(&[0; 32])).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert_eq!(
            shell_word("/etc/cdrguard/keys.toml"),
            "/etc/cdrguard/keys.toml"
        );
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word("-k.toml"), "'-k.toml'");
    }

    /// Regression: an error at the start of line 3 was reported on line 2 (the text before
    /// it was counted in lines, and it ends with a newline).
    #[test]
    fn syntax_errors_name_their_own_line_without_the_secret() {
        let secret = "ab".repeat(32);
        for (text, line) in [
            (
                format!("[[keys]]\nid = \"k1\"\ncolour = \"red\"\nsecret_hex = \"{secret}\"\n"),
                3,
            ),
            (format!("[[keys]]\nid = \"k1\"\nsecret_hex = {secret}\n"), 3),
            (
                format!("\n\n\n\n[keys]\nid = \"k1\"\nsecret_hex = \"{secret}\"\n"),
                5,
            ),
        ] {
            let e = parse(&text, "k.toml").unwrap_err();
            assert_eq!(e.problems[0].line, Some(line), "{e}\n{text}");
            assert!(!e.to_string().contains(&secret));
        }
    }

    /// The `secret_hex` values of a key file's text.
    fn secrets(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("secret_hex = \""))
            .map(|l| l.trim_end_matches('"').to_string())
            .collect()
    }

    /// A master key file after a rotation: k2 active, k1 older.
    fn rotated() -> String {
        let old: String = generate("k1")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("{}{old}", generate("k2"))
    }

    #[test]
    fn an_exported_token_key_file_reverses_its_purposes_tokens_and_nothing_else() {
        let master = rotated();
        let ring = parse(&master, "m.toml").unwrap();
        let msisdn = "+46701234567";
        let old_only = master.split("[[keys]]").nth(2).unwrap();
        let old_ring = parse(&format!("[[keys]]{old_only}"), "old.toml").unwrap();
        let tokens = [
            ring.tokenise(Purpose::Marketing, msisdn).unwrap(),
            old_ring.tokenise(Purpose::Marketing, msisdn).unwrap(),
        ];
        let exported = export_text(&master_keys(&master, "m.toml").unwrap(), Purpose::Marketing);
        let file = parse_any(&exported, "e.toml").unwrap();
        assert!(matches!(file, KeyFile::Tokens(_)), "{file:?}");
        // Tokens of the active key and of the key before the rotation reverse.
        for t in &tokens {
            assert_eq!(file.reverse(t).unwrap(), msisdn, "{t}");
        }
        // Another purpose's tokens do not.
        let fraud = ring.tokenise(Purpose::Fraud, msisdn).unwrap();
        assert_eq!(
            file.reverse(&fraud),
            Err(KeyError::UnknownKey("k2.fraud".into()))
        );
        // Its secrets are not the master secrets...
        let (master_secrets, exported_secrets) = (secrets(&master), secrets(&exported));
        assert_eq!((master_secrets.len(), exported_secrets.len()), (2, 2));
        for m in &master_secrets {
            assert!(!exported.contains(m.as_str()), "the master secret leaked");
        }
        // ...and taken for one (the file edited into a [[keys]] file), they give other
        // analytics pseudonyms than the master keys do: the holder cannot compute them.
        let real: Vec<_> = ring
            .each_key()
            .map(|k| k.pseudonym(Purpose::Analytics, "msisdn", msisdn))
            .collect();
        for (id, secret) in ["k2", "k1"].iter().zip(&exported_secrets) {
            let fake = Keyring::new(&[MasterKey::new(id, &hex::decode(secret).unwrap()).unwrap()])
                .unwrap();
            let p = fake.pseudonym(Purpose::Analytics, "msisdn", msisdn);
            assert!(!real.contains(&p), "{id}");
        }
        // What pseudonymises (replay, run) refuses it, saying what it is.
        let e = parse(&exported, "e.toml").unwrap_err().to_string();
        assert!(
            e.contains("holds only the token keys k2.marketing, k1.marketing")
                && e.contains("needs the master key file"),
            "{e}"
        );
        for s in &exported_secrets {
            assert!(!e.contains(s.as_str()), "{e}");
        }
    }

    #[test]
    fn export_writes_a_new_file_for_its_owner_only_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, out) = (dir.path().join("keys.toml"), dir.path().join("m.toml"));
        write_private(&keys, &rotated()).unwrap();
        let ids = export(&keys, Purpose::Marketing, &out).unwrap();
        assert_eq!(ids, ["k2.marketing", "k1.marketing"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&out).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(load_any(&out).unwrap(), KeyFile::Tokens(_)));
        let before = std::fs::read_to_string(&out).unwrap();
        assert!(matches!(
            export(&keys, Purpose::Marketing, &out),
            Err(ExportError::Write { .. })
        ));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), before);
        // A token key file cannot be exported from again.
        let again = dir.path().join("again.toml");
        assert!(matches!(
            export(&out, Purpose::Marketing, &again),
            Err(ExportError::Keys(_))
        ));
        assert!(!again.exists());
    }

    #[test]
    fn a_file_mixing_master_and_token_keys_or_with_bad_token_keys_is_refused() {
        let master = generate("k1");
        let exported = export_text(&master_keys(&master, "m").unwrap(), Purpose::Marketing);
        let mixed = format!("{master}{exported}");
        let e = parse_any(&mixed, "x.toml").unwrap_err();
        assert!(e.problems[0].message.contains("holds both"), "{e}");
        let bad = "[[token_keys]]\nkey_id = \"k1\"\nsecret_hex = \"00\"\n\
                   [[token_keys]]\nkey_id = \"k1.marketing\"\nsecret_hex = \"0011\"\n";
        let e = parse_any(bad, "bad.toml").unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(
            e.to_string()
                .contains("\n  bad.toml:2: token_keys[0].key_id: token key id"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("\n  bad.toml:6: token_keys[1].secret_hex: token key \"k1.marketing\": the secret must be exactly 32 bytes"),
            "{e}"
        );
    }

    /// Regression: two keys with one id were accepted; a token names its key by id.
    #[test]
    fn duplicate_key_ids_are_refused() {
        let one = generate("k1");
        let text = format!(
            "{one}{}",
            one.lines().skip(2).collect::<Vec<_>>().join("\n")
        );
        let e = parse(&text, "k.toml").unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.to_string().contains(
                "\n  k.toml:7: keys[1].id: key id \"k1\" is already used by keys[0] (line 3)"
            ),
            "{e}"
        );
    }
}
