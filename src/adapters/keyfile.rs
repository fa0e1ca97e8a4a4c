//! Pseudonym key files: where keys come from (never from code), and how new ones are made.
//!
//! Two kinds: a master key file (`[[keys]]`), from which every purpose's pseudonym and
//! token keys are derived, and an exported token key file (`[[token_keys]]`), which holds
//! one purpose's token keys alone, for whoever reverses that purpose's tokens.

use std::path::Path;

use crate::core::pseudonym::{KeyError, Keyring, MasterKey, TokenKey, TokenKeyring};
use crate::core::purpose::Purpose;

/// Why a key file was refused: every problem, with its place.
#[derive(Debug, thiserror::Error)]
#[error("key file {file} refused:\n{}", problems.join("\n"))]
pub struct KeyFileError {
    /// The file.
    pub file: String,
    /// Each problem as `where: what` (never a secret).
    pub problems: Vec<String>,
}

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
    id: String,
    secret_hex: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenKey {
    key_id: String,
    secret_hex: String,
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

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
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
    let fail = |problems| KeyFileError {
        file: file.to_string(),
        problems,
    };
    // The parser's message may quote the offending line, which could hold a secret.
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| line_of(text, s.start));
        fail(vec![format!(
            "line {at}: not a key file (expected [[keys]] with id and secret_hex, or [[token_keys]] with key_id and secret_hex)"
        )])
    })?;
    let mut problems = Vec::new();
    match (raw.keys.is_empty(), raw.token_keys.is_empty()) {
        (true, true) => problems.push("no [[keys]] entry".into()),
        (false, false) => problems.push(
            "holds both [[keys]] and [[token_keys]]: a token key file is exported on its own, so it can be handed out without the master keys".into(),
        ),
        _ => {}
    }
    let keys = checked(
        text,
        "keys",
        &raw.keys,
        |k| (&k.id, &k.secret_hex),
        MasterKey::new,
        &mut problems,
    );
    let tokens = checked(
        text,
        "token_keys",
        &raw.token_keys,
        |k| (&k.key_id, &k.secret_hex),
        TokenKey::new,
        &mut problems,
    );
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    Ok(if keys.is_empty() {
        Keys::Tokens(tokens)
    } else {
        Keys::Master(keys)
    })
}

/// The entries of one key table, each made into a key by `make` from its id and decoded
/// secret; every refused entry adds a problem at its line (never its secret).
fn checked<R, K>(
    text: &str,
    table: &str,
    entries: &[toml::Spanned<R>],
    fields: impl Fn(&R) -> (&String, &String),
    make: impl Fn(&str, &[u8]) -> Result<K, KeyError>,
    problems: &mut Vec<String>,
) -> Vec<K> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let line = line_of(text, entry.span().start);
        let (id, secret_hex) = fields(entry.get_ref());
        if let Some(j) = entries[..i]
            .iter()
            .position(|o| fields(o.get_ref()).0 == id)
        {
            let first = line_of(text, entries[j].span().start);
            problems.push(format!(
                "line {line}: {table}[{i}]: key id {id:?} is already used by {table}[{j}] (line {first})"
            ));
            continue;
        }
        match hex::decode(secret_hex.trim()) {
            Ok(secret) => match make(id, &secret) {
                Ok(k) => out.push(k),
                Err(e) => problems.push(format!("line {line}: {table}[{i}]: {e}")),
            },
            Err(_) => problems.push(format!(
                "line {line}: {table}[{i}] ({id}): secret_hex is not hex"
            )),
        }
    }
    out
}

/// The master keys of a master key file, in file order. An exported token key file is
/// refused with a message that says what it is and what is needed instead.
fn master_keys(text: &str, file: &str) -> Result<Vec<MasterKey>, KeyFileError> {
    match read_keys(text, file)? {
        Keys::Master(k) => Ok(k),
        Keys::Tokens(t) => Err(KeyFileError {
            file: file.to_string(),
            problems: vec![format!(
                "holds only the token keys {} (written by `cdrguard keys export`): it reverses those tokens and nothing else; this needs the master key file ([[keys]])",
                t.iter()
                    .map(TokenKey::key_id)
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        }),
    }
}

fn no_key(file: &str) -> KeyFileError {
    KeyFileError {
        file: file.to_string(),
        problems: vec!["no usable key".into()],
    }
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

/// Reads a key file's text. Warns (on stderr, without the secret) when others may read it.
fn read(path: &Path) -> Result<(String, String), KeyFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| KeyFileError {
        file: name.clone(),
        problems: vec![format!("cannot read: {e}")],
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            eprintln!("warning: key file {name} is readable by other users; chmod 600 it");
        }
    }
    Ok((text, name))
}

/// Reads a master key file (see [`parse`]).
pub fn load(path: &Path) -> Result<Keyring, KeyFileError> {
    let (text, name) = read(path)?;
    parse(&text, &name)
}

/// Reads a key file of either kind (see [`parse_any`]).
pub fn load_any(path: &Path) -> Result<KeyFile, KeyFileError> {
    let (text, name) = read(path)?;
    parse_any(&text, &name)
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
    let (text, name) = read(keys)?;
    let masters = master_keys(&text, &name)?;
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
            k.key_id(crate::core::purpose::Purpose::Analytics),
            "k1.analytics"
        );
        let bad = "[[keys]]\nid = \"k 1\"\nsecret_hex = \"00\"\n[[keys]]\nid = \"k2\"\nsecret_hex = \"zz\"\n";
        let e = parse(bad, "bad.toml").unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(!e.to_string().contains("zz"));
        assert!(e.problems[0].starts_with("line 1: keys[0]"), "{e}");
        assert!(e.problems[1].starts_with("line 4: keys[1] (k2)"), "{e}");
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
            assert!(
                e.problems[0].starts_with(&format!("line {line}:")),
                "{e}\n{text}"
            );
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
        std::fs::write(&keys, rotated()).unwrap();
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
        assert!(e.problems[0].contains("holds both"), "{e}");
        let bad = "[[token_keys]]\nkey_id = \"k1\"\nsecret_hex = \"00\"\n\
                   [[token_keys]]\nkey_id = \"k1.marketing\"\nsecret_hex = \"0011\"\n";
        let e = parse_any(bad, "bad.toml").unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(e.problems[0].starts_with("line 1: token_keys[0]"), "{e}");
        assert!(e.problems[1].contains("exactly 32 bytes"), "{e}");
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
            e.problems[0].contains("key id \"k1\" is already used by keys[0] (line 3)"),
            "{e}"
        );
        assert!(e.problems[0].starts_with("line 6: keys[1]"), "{e}");
    }
}
