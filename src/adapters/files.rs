//! File sinks: one JSON-lines file per route, `retention.jsonl` and `dead-letter.jsonl`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

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
        })
    }

    /// The output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a copy to its route's file.
    pub fn copy(&mut self, c: &Copy<'_>) -> std::io::Result<()> {
        let Some(w) = self.routes[c.envelope.purpose as usize].as_mut() else {
            // process() only copies for declared purposes; all of them have a file.
            return Err(std::io::Error::other(
                "copy for a route without an output file",
            ));
        };
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

    /// Flushes everything.
    pub fn finish(mut self) -> std::io::Result<()> {
        for w in self.routes.iter_mut().flatten() {
            w.flush()?;
        }
        self.retention.flush()?;
        self.dead_letter.flush()
    }
}
