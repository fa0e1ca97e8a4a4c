//! File sinks: one JSON-lines file per route, `retention.jsonl` and `dead-letter.jsonl`,
//! written into a staging folder that replaces the output folder whole on success (see
//! [`super::outdir`]).
//!
//! Anonymised copies are held back per UTC calendar month of their records and written
//! when the month is over, sorted by content, and only where at least
//! [`MIN_SUBSCRIBERS`] subscribers share their content that month (see
//! [`super::holdback`]). They carry no time, so the month costs their readers nothing:
//! it only keeps their position in the file from telling a finer one.

use std::io::Write;
use std::path::Path;

use super::holdback::{Crowds, MIN_SUBSCRIBERS};
use super::lines::Lines;
use super::outdir::{OutDirError, Staged};
use crate::codec::{DeadLetter, Envelopes, json};
use crate::core::process::Copy;
use crate::core::retention::Expiry;
use crate::policy::Policy;
use crate::vocab::purpose::Purpose;

/// Writers for every output of a run.
pub struct Outputs {
    dir: Staged,
    routes: [Option<Lines>; Purpose::COUNT],
    retention: Lines,
    dead_letter: Lines,
    line: Vec<u8>,
    /// A record's fields written once, for its copies (`json::RecordJson`).
    fields: Vec<u8>,
    /// The policy's envelopes, encoded once.
    envelopes: Envelopes,
    /// Anonymised copies of the month being written, counted by content.
    held: Crowds,
    /// That month, `YYYY-MM` (UTC).
    month: Option<[u8; 7]>,
    /// Anonymised copies not written: too few subscribers shared their content that month.
    withheld: u64,
}

/// Why the outputs could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OutputsError {
    /// The folder may not be replaced, or cannot be made.
    #[error(transparent)]
    Folder(#[from] OutDirError),
    /// A file could not be created.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Outputs {
    /// Prepares `target` (see [`Staged::new`]: it must be missing, empty or an earlier
    /// cdrguard output, unless `force`) and creates one file per declared route in the
    /// folder that will replace it (empty files included, so a reader sees that the route
    /// exists and received nothing).
    pub fn create(target: &Path, policy: &Policy, force: bool) -> Result<Outputs, OutputsError> {
        let staged = Staged::new(target, force)?;
        let dir = staged.path().to_path_buf();
        let mut routes: [Option<Lines>; Purpose::COUNT] = Default::default();
        for r in policy.declared() {
            routes[r.purpose as usize] = Some(Lines::create(
                &dir.join(format!("{}.jsonl", r.purpose.id())),
            )?);
        }
        Ok(Outputs {
            dir: staged,
            routes,
            retention: Lines::create(&dir.join("retention.jsonl"))?,
            dead_letter: Lines::create(&dir.join("dead-letter.jsonl"))?,
            line: Vec::with_capacity(2048),
            fields: Vec::new(),
            envelopes: Envelopes::new(policy),
            held: Crowds::new(MIN_SUBSCRIBERS),
            month: None,
            withheld: 0,
        })
    }

    /// Records of `at`'s month come next (they arrive in time order, as replay feeds
    /// them): a new month writes the anonymised copies held for the previous one.
    pub fn advance_to(&mut self, at: crate::vocab::time::Millis) -> std::io::Result<()> {
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
        self.withheld += self
            .held
            .release(|p, line| match routes[p as usize].as_mut() {
                Some(w) => w.write_all(line),
                None => Ok(()),
            })?;
        Ok(())
    }

    /// The folder being written (it replaces the target when the run finishes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a copy to its route's file; an anonymised copy is held until its month is
    /// over, and needs the record's `msisdn` to count the subscribers that share it.
    ///
    /// `fields`, where given, are the copy's record's fields written once.
    pub fn copy(
        &mut self,
        c: &Copy<'_>,
        fields: Option<&json::RecordJson<'_>>,
        msisdn: &str,
    ) -> std::io::Result<()> {
        let encode = |b: &mut Vec<u8>, envelopes: &Envelopes| match fields {
            Some(f) => f.encode_copy(envelopes, c, b),
            None => json::encode_copy(envelopes, c, b),
        };
        let Some(w) = self.routes[c.envelope.purpose as usize].as_mut() else {
            // process() only copies for declared purposes; all of them have a file.
            return Err(std::io::Error::other(
                "copy for a route without an output file",
            ));
        };
        if c.is_anonymised() {
            self.line.clear();
            encode(&mut self.line, &self.envelopes);
            self.line.push(b'\n');
            self.held.hold(c.envelope.purpose, &self.line, msisdn);
            return Ok(());
        }
        let envelopes = &self.envelopes;
        w.line(|b| encode(b, envelopes))
    }

    /// Writes every copy of a decoded record (see [`Outputs::copy`]), its fields written
    /// once for all of them (`json::RecordJson`).
    pub fn copies(&mut self, r: &json::Decoded<'_>, copies: &[Copy<'_>]) -> std::io::Result<()> {
        // Taken out while the fields borrow it, so that `copy` can have `self`.
        let mut scratch = std::mem::take(&mut self.fields);
        let fields = json::RecordJson::of_input(r, &mut scratch);
        let written = copies
            .iter()
            .try_for_each(|c| self.copy(c, Some(&fields), &r.record.msisdn));
        self.fields = scratch;
        written
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

    /// Writes what is held, flushes everything and puts the folder in the target's
    /// place. Returns how many anonymised copies were withheld (too few subscribers shared
    /// their content in their month). Dropped without finishing, the outputs leave the
    /// target as it was.
    pub fn finish(mut self) -> Result<u64, OutputsError> {
        self.release_held()?;
        for w in self.routes.iter_mut().flatten() {
            w.finish()?;
        }
        self.retention.finish()?;
        self.dead_letter.finish()?;
        let Outputs { dir, withheld, .. } = self;
        dir.commit()?;
        Ok(withheld)
    }
}
