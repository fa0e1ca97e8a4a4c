//! File sinks: one JSON-lines file per route, `retention.jsonl` and `dead-letter.jsonl`.
//!
//! Anonymised copies are held back per UTC calendar month of their records and written
//! when the month is over, sorted by content, and only where at least
//! [`MIN_SUBSCRIBERS`] subscribers share their content that month (see
//! [`super::holdback`]). They carry no time, so the month costs their readers nothing:
//! it only keeps their position in the file from telling a finer one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::holdback::{Holdback, MIN_SUBSCRIBERS};
use crate::codec::{DeadLetter, json};
use crate::core::process::Copy;
use crate::core::purpose::Purpose;
use crate::core::retention::Expiry;
use crate::policy::Policy;

/// Writers for every output of a run.
pub struct Outputs {
    dir: PathBuf,
    routes: [Option<BufWriter<File>>; Purpose::COUNT],
    retention: BufWriter<File>,
    dead_letter: BufWriter<File>,
    line: Vec<u8>,
    /// Anonymised copies of the month being written.
    held: Holdback<()>,
    /// That month, `YYYY-MM` (UTC).
    month: Option<[u8; 7]>,
    /// Anonymised copies not written: too few subscribers shared their content that month.
    withheld: u64,
}

fn create(path: &Path) -> std::io::Result<BufWriter<File>> {
    File::create(path)
        .map(|f| BufWriter::with_capacity(256 * 1024, f))
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl Outputs {
    /// Creates `dir` and one file per declared route (empty files included, so a reader
    /// sees that the route exists and received nothing).
    pub fn create(dir: &Path, policy: &Policy) -> std::io::Result<Outputs> {
        std::fs::create_dir_all(dir)?;
        let mut routes: [Option<BufWriter<File>>; Purpose::COUNT] = Default::default();
        for r in policy.declared() {
            routes[r.purpose as usize] =
                Some(create(&dir.join(format!("{}.jsonl", r.purpose.id())))?);
        }
        Ok(Outputs {
            dir: dir.to_path_buf(),
            routes,
            retention: create(&dir.join("retention.jsonl"))?,
            dead_letter: create(&dir.join("dead-letter.jsonl"))?,
            line: Vec::with_capacity(2048),
            held: Holdback::default(),
            month: None,
            withheld: 0,
        })
    }

    /// Records of `at`'s month come next (they arrive in time order, as replay feeds
    /// them): a new month writes the anonymised copies held for the previous one.
    pub fn advance_to(&mut self, at: crate::core::time::Millis) -> std::io::Result<()> {
        let mut month = [0u8; 7];
        month.copy_from_slice(&at.to_buf().as_bytes()[..7]);
        if self.month != Some(month) {
            self.release_held()?;
            self.month = Some(month);
        }
        Ok(())
    }

    /// Writes the held anonymised copies that enough subscribers share, sorted.
    fn release_held(&mut self) -> std::io::Result<()> {
        let routes = &mut self.routes;
        self.withheld += self.held.release(MIN_SUBSCRIBERS, |p, line, ()| {
            match routes[p as usize].as_mut() {
                Some(w) => w.write_all(line),
                None => Ok(()),
            }
        })?;
        Ok(())
    }

    /// The output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a copy to its route's file; an anonymised copy is held until its month is
    /// over, and needs the record's `msisdn` to count the subscribers that share it.
    pub fn copy(&mut self, c: &Copy<'_>, msisdn: &str) -> std::io::Result<()> {
        let Some(w) = self.routes[c.envelope.purpose as usize].as_mut() else {
            // process() only copies for declared purposes; all of them have a file.
            return Err(std::io::Error::other(
                "copy for a route without an output file",
            ));
        };
        if c.is_anonymised() {
            let mut line = Vec::with_capacity(256);
            json::encode_copy(c, &mut line);
            line.push(b'\n');
            self.held.hold(c.envelope.purpose, line, msisdn, ());
            return Ok(());
        }
        self.line.clear();
        json::encode_copy(c, &mut self.line);
        self.line.push(b'\n');
        w.write_all(&self.line)
    }

    /// Writes an expiry event.
    pub fn expiry(&mut self, e: &Expiry) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.retention, e)?;
        self.retention.write_all(b"\n")
    }

    /// Writes a dead letter.
    pub fn dead_letter(&mut self, d: &DeadLetter) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.dead_letter, d)?;
        self.dead_letter.write_all(b"\n")
    }

    /// Writes what is held and flushes everything. Returns how many anonymised copies
    /// were withheld (too few subscribers shared their content in their month).
    pub fn finish(mut self) -> std::io::Result<u64> {
        self.release_held()?;
        for w in self.routes.iter_mut().flatten() {
            w.flush()?;
        }
        self.retention.flush()?;
        self.dead_letter.flush()?;
        Ok(self.withheld)
    }
}
