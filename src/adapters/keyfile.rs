//! Pseudonym key files: where keys come from (never from code), and how new ones are made.

use std::path::Path;

use crate::core::pseudonym::{Keyring, MasterKey};

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
    keys: Vec<toml::Spanned<RawKey>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    secret_hex: String,
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Parses key-file text: `[[keys]]` tables with `id` and `secret_hex` (32+ bytes); the
/// first key is active, later ones only reverse older tokens. Ids must be unique: a token
/// names its key by id, so two keys with one id would make reversal ambiguous.
pub fn parse(text: &str, file: &str) -> Result<Keyring, KeyFileError> {
    let fail = |problems| KeyFileError {
        file: file.to_string(),
        problems,
    };
    // The parser's message may quote the offending line, which could hold a secret.
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| line_of(text, s.start));
        fail(vec![format!(
            "line {at}: not a key file (expected [[keys]] with id and secret_hex)"
        )])
    })?;
    let mut problems = Vec::new();
    let mut keys = Vec::new();
    for (i, k) in raw.keys.iter().enumerate() {
        let line = line_of(text, k.span().start);
        let k = k.get_ref();
        if let Some(j) = raw.keys[..i].iter().position(|o| o.get_ref().id == k.id) {
            let first = line_of(text, raw.keys[j].span().start);
            problems.push(format!(
                "line {line}: keys[{i}]: key id {:?} is already used by keys[{j}] (line {first})",
                k.id
            ));
            continue;
        }
        match hex::decode(k.secret_hex.trim()) {
            Ok(secret) => match MasterKey::new(&k.id, &secret) {
                Ok(m) => keys.push(m),
                Err(e) => problems.push(format!("line {line}: keys[{i}]: {e}")),
            },
            Err(_) => problems.push(format!(
                "line {line}: keys[{i}] ({}): secret_hex is not hex",
                k.id
            )),
        }
    }
    if raw.keys.is_empty() {
        problems.push("no [[keys]] entry".into());
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    Keyring::new(&keys).ok_or_else(|| fail(vec!["no usable key".into()]))
}

/// Reads a key file. Warns (on stderr, without the secret) when others may read it.
pub fn load(path: &Path) -> Result<Keyring, KeyFileError> {
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
    parse(&text, &name)
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

/// Writes a new key file readable by its owner only.
pub fn write_new(path: &Path, id: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(generate(id).as_bytes())
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
