//! Checked TOML files (policies, the run configuration, key files): text read into a
//! spanned table, byte offsets turned into lines, and every problem of a file reported
//! at once as `file:line: key: what`.
//!
//! It sits beside [`crate::vocab`], below everything that reads such a file, so the
//! policy loader and the adapters share one reader without an import running up.

use std::fmt;

use toml::Spanned;
use toml::de::DeTable;

/// Where each line of a text starts, so a span's byte offset can name its line.
#[derive(Clone, Debug)]
pub struct LineIndex {
    /// Byte offset of the first byte of each line: 0, then one past every `\n`.
    starts: Vec<usize>,
}

impl LineIndex {
    /// Indexes `text`. Lines end at `\n`; a `\r` before it belongs to the line it ends.
    pub fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// The 1-based line holding byte `offset`; an offset past the end is on the last line.
    pub fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset)
    }
}

/// One thing wrong with a file, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file as named by the caller, or what stands in for one (`env VAR` for a
    /// setting that came from the environment).
    pub file: String,
    /// 1-based line; none when the problem is the whole file's or a key it lacks.
    pub line: Option<usize>,
    /// Dotted path of the key at fault, e.g. `purposes.analytics.fields.msisdn`; empty
    /// when the problem is the whole file's.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// A problem of the whole file: no line, no key.
    pub fn whole(file: &str, message: impl Into<String>) -> Problem {
        Problem {
            file: file.to_string(),
            line: None,
            key: String::new(),
            message: message.into(),
        }
    }
}

/// `file:line`, or `file` alone when there is no line to name.
pub fn place(file: &str, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("{file}:{l}"),
        None => file.to_string(),
    }
}

impl fmt::Display for Problem {
    // `file:line: key: what`, leaving out a part that is not there, so no reader (or
    // editor jumping to `file:line`) is sent to a line 0 or an empty key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&place(&self.file, self.line))?;
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A refused file: what it is, which, and every problem found in it.
#[derive(Clone, Debug, thiserror::Error)]
pub struct Refused {
    /// What the file is, as the first line names it: `policy`, `key file`, `config`.
    pub kind: &'static str,
    /// The file as named by the caller.
    pub file: String,
    /// Every problem, in file order.
    pub problems: Vec<Problem>,
}

impl Refused {
    /// A file refused for one problem (it cannot be read, or is not TOML).
    pub fn one(kind: &'static str, problem: Problem) -> Refused {
        Refused {
            kind,
            file: problem.file.clone(),
            problems: vec![problem],
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {} refused: {} problem(s)",
            self.kind,
            self.file,
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Parses `text` into a spanned table; spans are byte offsets into `text` as given. A
/// UTF-8 byte-order mark at the start (some editors write one) is skipped by the parser
/// and still counted in the offsets, so lines stay right. A syntax error is the file's
/// one problem, at its line: nothing after it can be read with any certainty.
pub fn parse<'i>(text: &'i str, file: &str) -> Result<Spanned<DeTable<'i>>, Problem> {
    DeTable::parse(text).map_err(|e| Problem {
        file: file.to_string(),
        // Indexed only here: a file that parses is indexed by whoever reads it.
        line: e.span().map(|s| LineIndex::new(text).line(s.start)),
        key: String::new(),
        message: format!("not valid TOML: {}", e.message()),
    })
}

/// The problems of one file, collected while it is read so one pass reports them all.
#[derive(Debug)]
pub struct Findings {
    file: String,
    lines: LineIndex,
    problems: Vec<Problem>,
}

impl Findings {
    /// Starts on `text`, named `file` in every problem.
    pub fn new(file: &str, text: &str) -> Findings {
        Findings {
            file: file.to_string(),
            lines: LineIndex::new(text),
            problems: Vec::new(),
        }
    }

    /// The 1-based line of byte `offset` of the text.
    pub fn line(&self, offset: usize) -> usize {
        self.lines.line(offset)
    }

    /// A problem with `key` at byte `offset` of the text.
    pub fn at(&mut self, offset: usize, key: &str, message: impl Into<String>) {
        let line = self.line(offset);
        self.on_line(line, key, message);
    }

    /// A problem with `key` on a line known already (one recorded by an earlier step).
    pub fn on_line(&mut self, line: usize, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.clone(),
            line: Some(line),
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// A problem of the whole file.
    pub fn whole(&mut self, message: impl Into<String>) {
        self.problems.push(Problem::whole(&self.file, message));
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// The file refused as a `kind`, with what was found in file order: the whole file's
    /// problems first, then by line; problems on one line in the order they were found.
    pub fn refused(mut self, kind: &'static str) -> Refused {
        self.problems.sort_by_key(|p| p.line);
        Refused {
            kind,
            file: self.file,
            problems: self.problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_from_one_at_the_edges() {
        let text = "a = 1\nb = 2\nc = 3";
        let lines = LineIndex::new(text);
        assert_eq!(lines.line(0), 1, "the first byte");
        assert_eq!(lines.line(5), 1, "a line's own newline");
        assert_eq!(lines.line(6), 2, "the byte after a newline");
        assert_eq!(
            lines.line(text.len() - 1),
            3,
            "a last line without a newline"
        );
        assert_eq!(lines.line(text.len()), 3, "the end");
        assert_eq!(lines.line(text.len() + 10), 3, "past the end");
        assert_eq!(LineIndex::new("").line(0), 1, "an empty text");
        // A trailing newline starts a line of its own (an empty one).
        assert_eq!(LineIndex::new("a\n").line(2), 2);
    }

    #[test]
    fn crlf_lines_end_at_their_newline() {
        let text = "a = 1\r\nb = 2\r\n";
        let lines = LineIndex::new(text);
        assert_eq!(lines.line(5), 1, "the \\r");
        assert_eq!(lines.line(6), 1, "the \\n");
        assert_eq!(lines.line(7), 2, "the next line's first byte");
        let root = parse(text, "f").unwrap();
        let (b, _) = root.get_ref().get_key_value("b").unwrap();
        assert_eq!(lines.line(b.span().start), 2);
    }

    /// Regression guard: editors that save with a byte-order mark must not shift lines
    /// or make a file unreadable.
    #[test]
    fn a_byte_order_mark_is_skipped_and_lines_stay_right() {
        let text = "\u{feff}a = 1\nb = 2\n";
        let root = parse(text, "f").unwrap();
        let lines = LineIndex::new(text);
        for (key, line) in [("a", 1), ("b", 2)] {
            let (k, _) = root.get_ref().get_key_value(key).unwrap();
            assert_eq!(lines.line(k.span().start), line, "{key}");
        }
    }

    #[test]
    fn a_syntax_error_is_one_problem_at_its_line() {
        let p = parse("a = 1\n[b\n", "f.toml").unwrap_err();
        assert_eq!(
            (p.file.as_str(), p.line, p.key.as_str()),
            ("f.toml", Some(2), "")
        );
        assert!(p.message.starts_with("not valid TOML: "), "{p}");
        assert!(
            p.to_string().starts_with("f.toml:2: not valid TOML: "),
            "{p}"
        );
    }

    #[test]
    fn problems_print_no_empty_parts() {
        let p = |line, key: &str| Problem {
            file: "f.toml".into(),
            line,
            key: key.into(),
            message: "bad".into(),
        };
        assert_eq!(p(Some(3), "a.b").to_string(), "f.toml:3: a.b: bad");
        assert_eq!(p(Some(3), "").to_string(), "f.toml:3: bad");
        assert_eq!(p(None, "a.b").to_string(), "f.toml: a.b: bad");
        assert_eq!(p(None, "").to_string(), "f.toml: bad");
        assert_eq!(Problem::whole("f.toml", "bad"), p(None, ""));
    }

    #[test]
    fn findings_are_refused_in_file_order_under_one_line() {
        let text = "a = 1\nb = 2\nc = 3\n";
        let mut found = Findings::new("f.toml", text);
        assert!(found.is_empty());
        found.at(text.find('c').unwrap(), "c", "third");
        found.at(text.find('a').unwrap(), "a", "first");
        found.whole("the file's");
        found.on_line(1, "a", "first, again");
        assert!(!found.is_empty());
        let e = found.refused("thing");
        assert_eq!(
            e.to_string(),
            "thing f.toml refused: 4 problem(s)\n  f.toml: the file's\n  f.toml:1: a: first\n  \
             f.toml:1: a: first, again\n  f.toml:3: c: third\n"
        );
        let one = Refused::one("thing", Problem::whole("g", "cannot read"));
        assert_eq!(
            one.to_string(),
            "thing g refused: 1 problem(s)\n  g: cannot read\n"
        );
    }
}
