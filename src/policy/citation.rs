//! The shape of a `source` citation, so a rule can only point at the operator's text:
//!
//! ```text
//! <seed file>, "<heading>", l.<line>: "<verbatim quote>" … "<verbatim quote>"
//! ```
//!
//! The heading is optional; the line is `l.N`, `l.N-M` (a passage over several lines) or
//! `l.N@C` (character C of line N, for seeds whose body is one long line). Several
//! citations are joined with `; `. The loader checks the shape and that every citation
//! names the policy's own seed; `tests/policies.rs` checks every quote against the seed.

/// One citation of an operator's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Citation {
    /// The seed file, e.g. `001_b83766f608041349.txt`.
    pub seed: String,
    /// The heading the passage sits under, verbatim, if given.
    pub heading: Option<String>,
    /// First and last 1-based line of the passage.
    pub lines: (usize, usize),
    /// Character offset of the quote within its line, if given (`l.N@C`).
    pub offset: Option<usize>,
    /// The quoted fragments, verbatim from the seed.
    pub quotes: Vec<String>,
}

/// The separator between two fragments of one passage.
pub const JOIN: &str = " … ";

fn seed_name(s: &str) -> Option<(&str, &str)> {
    let end = s.find(".txt")? + 4;
    let name = &s[..end];
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        .then_some((name, &s[end..]))
}

fn number(s: &str) -> Option<(usize, &str)> {
    let end = s.bytes().take_while(u8::is_ascii_digit).count();
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// Whether a closing quote may end here: at the end, before the next fragment, or before
/// the next citation.
fn closes(rest: &str) -> bool {
    rest.is_empty()
        || rest.starts_with(&format!("{JOIN}\""))
        || rest
            .strip_prefix("; ")
            .is_some_and(|r| seed_name(r).is_some_and(|(_, r)| r.starts_with(", ")))
}

fn quote(s: &str) -> Result<(String, &str), String> {
    let body = s
        .strip_prefix('"')
        .ok_or("a quote must start with a double quote")?;
    let mut from = 0;
    while let Some(i) = body[from..].find('"') {
        let at = from + i;
        if closes(&body[at + 1..]) {
            let q = &body[..at];
            if q.trim().is_empty() {
                return Err("empty quote".into());
            }
            return Ok((q.to_string(), &body[at + 1..]));
        }
        from = at + 1;
    }
    Err("a quote is not closed (or is followed by something other than ` … \"`, `; ` and the next citation, or the end)".into())
}

fn one(s: &str) -> Result<(Citation, &str), String> {
    let (seed, rest) = seed_name(s).ok_or("must start with the seed file name (`NNN_....txt`)")?;
    let rest = rest
        .strip_prefix(", ")
        .ok_or("the seed file must be followed by `, `")?;
    let (heading, rest) = match rest.strip_prefix('"') {
        Some(h) => {
            let end = h
                .find("\", l.")
                .ok_or("a heading must be quoted and followed by `, l.<line>`")?;
            if h[..end].trim().is_empty() {
                return Err("empty heading".into());
            }
            (Some(h[..end].to_string()), &h[end + 3..])
        }
        None => (None, rest),
    };
    let rest = rest
        .strip_prefix("l.")
        .ok_or("name the line: `l.<line>`, `l.<first>-<last>` or `l.<line>@<char>`")?;
    let (first, mut rest) = number(rest).ok_or("`l.` must be followed by a line number")?;
    let mut last = first;
    let mut offset = None;
    if let Some(r) = rest.strip_prefix('-') {
        (last, rest) = number(r).ok_or("`l.N-` must be followed by the last line")?;
    } else if let Some(r) = rest.strip_prefix('@') {
        let (o, r) = number(r).ok_or("`l.N@` must be followed by a character offset")?;
        offset = Some(o);
        rest = r;
    }
    if first == 0 || last < first {
        return Err("lines count from 1, and a range must not run backwards".into());
    }
    let mut rest = rest
        .strip_prefix(": ")
        .ok_or("the line must be followed by `: ` and the quote")?;
    let mut quotes = Vec::new();
    loop {
        let (q, r) = quote(rest)?;
        quotes.push(q);
        match r.strip_prefix(JOIN) {
            Some(r) => rest = r,
            None => {
                rest = r;
                break;
            }
        }
    }
    Ok((
        Citation {
            seed: seed.to_string(),
            heading,
            lines: (first, last),
            offset,
            quotes,
        },
        rest,
    ))
}

/// Parses a `source` value into its citations, or says what is wrong with its shape.
pub fn parse(text: &str) -> Result<Vec<Citation>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    loop {
        let (c, r) = one(rest)?;
        out.push(c);
        if r.is_empty() {
            return Ok(out);
        }
        rest = r
            .strip_prefix("; ")
            .ok_or("citations must be joined with `; `")?;
    }
}

/// Every double-quoted fragment of a free text (an assumption or a note), for checking
/// that what a text presents as the operator's words is the operator's words.
pub fn quoted_fragments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut parts = text.split('"');
    parts.next();
    while let (Some(inside), Some(_)) = (parts.next(), parts.next()) {
        out.push(inside);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_parse_with_heading_ranges_offsets_and_joins() {
        let c = parse(
            r#"001_ab.txt, "Rätt att bli raderad", l.75: "2. om behandlingen" … "4. om användaren"; 001_ab.txt, l.7@12-x: "y""#,
        );
        assert!(c.is_err(), "a bad second citation spoils the source");
        let c = parse(r#"001_ab.txt, "Rätt att bli raderad", l.75: "2. om behandlingen" … "4. om användaren"; 001_ab.txt, l.7@12: "y""#).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].heading.as_deref(), Some("Rätt att bli raderad"));
        assert_eq!(c[0].lines, (75, 75));
        assert_eq!(c[0].quotes, ["2. om behandlingen", "4. om användaren"]);
        assert_eq!((c[1].lines, c[1].offset), ((7, 7), Some(12)));
        let r = parse(r#"002_x.txt, "H", l.123-124: "a "quoted" word""#).unwrap();
        assert_eq!(r[0].lines, (123, 124));
        assert_eq!(r[0].quotes, [r#"a "quoted" word"#]);
    }

    #[test]
    fn shapeless_sources_are_refused() {
        for bad in [
            "s1",
            "001_ab.txt",
            "001_ab.txt, section 3",
            r#"001_ab.txt, "Heading": "quote""#,
            r#"001_ab.txt, l.0: "q""#,
            r#"001_ab.txt, l.9-3: "q""#,
            r#"001_ab.txt, l.3: unquoted"#,
            r#"001_ab.txt, l.3: "open"#,
            r#"001_ab.txt, l.3: """#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoted_fragments_are_found_in_free_text() {
        assert_eq!(
            quoted_fragments(r#"kept "till dess" (l.82) and "x"; not 'y'"#),
            ["till dess", "x"]
        );
    }
}
