//! Output folders written whole or not at all. A run writes into a fresh folder beside its
//! target and swaps it into place only when it succeeded, so a failed or killed run never
//! leaves a half-written set, and no file of an earlier run (another policy's route with
//! raw identifiers, say) survives next to a new run's. Files that belong together (the
//! records and control events `generate` writes) go the same way: written beside their
//! targets, and renamed into place together only when all are complete.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The file that marks a folder as cdrguard's own output, which a later run may replace.
pub const MARKER: &str = ".cdrguard-output";

/// Why an output folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutDirError {
    /// The target holds files this tool did not write.
    #[error(
        "{dir} is not empty and was not written by cdrguard (it has no {MARKER} file): refusing to replace it; choose a new or empty folder, or pass --force to replace it"
    )]
    Foreign {
        /// The folder.
        dir: String,
    },
    /// Two of the files to write together are one and the same.
    #[error("{path} is given for two outputs: each needs a file of its own")]
    SamePath {
        /// The file.
        path: String,
    },
    /// A set of files failed to go in place, and putting a target's earlier content back
    /// failed too: it is kept beside the target.
    #[error("{cause}; the earlier {target} could not be put back and is kept as {kept}")]
    NotRestored {
        /// Why the set did not go in place.
        cause: Box<OutDirError>,
        /// The target now holding new content.
        target: String,
        /// Where its earlier content is.
        kept: String,
    },
    /// The file system refused.
    #[error("{dir}: {source}")]
    Io {
        /// The folder.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io(dir: &Path) -> impl FnOnce(std::io::Error) -> OutDirError + '_ {
    move |source| OutDirError::Io {
        dir: dir.display().to_string(),
        source,
    }
}

/// A folder being written, to be swapped into its target on success. Dropped without
/// [`Staged::commit`], it is removed.
#[derive(Debug)]
pub struct Staged {
    target: PathBuf,
    staging: PathBuf,
    done: bool,
}

/// The hidden sibling a run writes into: `.NAME.partial-PID`.
fn sibling(target: &Path, what: &str) -> (PathBuf, OsString) {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target.file_name().map(OsString::from).unwrap_or_default();
    let mut prefix = OsString::from(".");
    prefix.push(&name);
    prefix.push(format!(".{what}-"));
    let mut full = prefix.clone();
    full.push(std::process::id().to_string());
    (parent.join(full), prefix)
}

impl Staged {
    /// Checks that `target` may be replaced (missing, empty, or cdrguard's own output; any
    /// folder with `force`) and makes the folder to write into. Leftovers of runs that
    /// were killed (their process is gone) are removed.
    pub fn new(target: &Path, force: bool) -> Result<Staged, OutDirError> {
        match std::fs::read_dir(target) {
            Ok(mut entries) => {
                let empty = entries.next().is_none();
                if !empty && !force && !target.join(MARKER).is_file() {
                    return Err(OutDirError::Foreign {
                        dir: target.display().to_string(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(target)(e)),
        }
        let (staging, prefix) = sibling(target, "partial");
        let parent = staging.parent().unwrap_or(Path::new(".")).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        remove_leftovers(&parent, &prefix);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        std::fs::create_dir(&staging).map_err(io(&staging))?;
        std::fs::write(
            staging.join(MARKER),
            format!(
                "Written by cdrguard {}. The next run into this folder replaces it whole.\n",
                env!("CARGO_PKG_VERSION")
            ),
        )
        .map_err(io(&staging))?;
        Ok(Staged {
            target: target.to_path_buf(),
            staging,
            done: false,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The folder the run is for.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Puts the written folder in the target's place. An existing target is exchanged
    /// with it in one step where the file system can (Linux `renameat2`), so readers see
    /// the old set or the new one, never a mix or nothing; then the old set is removed.
    pub fn commit(mut self) -> Result<(), OutDirError> {
        if self.target.exists() {
            if !exchange(&self.staging, &self.target) {
                // No atomic exchange here: move the old set aside, then the new one in.
                let (aside, _) = sibling(&self.target, "old");
                std::fs::rename(&self.target, &aside).map_err(io(&self.target))?;
                std::fs::rename(&self.staging, &self.target).map_err(io(&self.target))?;
                std::fs::remove_dir_all(&aside).map_err(io(&aside))?;
                self.done = true;
                return Ok(());
            }
            // The staging path now holds the old set.
            std::fs::remove_dir_all(&self.staging).map_err(io(&self.staging))?;
        } else {
            std::fs::rename(&self.staging, &self.target).map_err(io(&self.target))?;
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Files written beside their targets (hidden, `.NAME.partial-PID`) and renamed into
/// place together by [`StagedFiles::commit`], so that a failed or killed run leaves every
/// target as it was: never one file of a set new and another old or half written.
/// Dropped without a commit, the files written are removed. Only a kill between the
/// renames (one system call each, after everything else is done) can leave a mix, with
/// the earlier content of the renamed targets beside them as `.NAME.old-PID`.
#[derive(Debug)]
pub struct StagedFiles {
    /// Each target, the file written for it and that file, open until the commit.
    files: Vec<(PathBuf, PathBuf, Option<std::fs::File>)>,
}

impl StagedFiles {
    /// Creates an empty file beside each target (in its folder, so that the rename is
    /// one step of one file system). Done before the caller spends time on the content,
    /// so a folder that is missing or not writable is found at once. Leftovers of runs
    /// that were killed (their process is gone) are removed.
    pub fn new(targets: &[&Path]) -> Result<StagedFiles, OutDirError> {
        let mut staged = StagedFiles { files: Vec::new() };
        for target in targets {
            let (temp, prefix) = sibling(target, "partial");
            if staged.files.iter().any(|(_, t, _)| *t == temp) {
                return Err(OutDirError::SamePath {
                    path: target.display().to_string(),
                });
            }
            let parent = temp.parent().unwrap_or(Path::new("."));
            remove_leftover_files(parent, &prefix);
            let file = std::fs::File::create(&temp).map_err(io(&temp))?;
            staged.files.push((target.to_path_buf(), temp, Some(file)));
        }
        Ok(staged)
    }

    /// The open file to write for the `i`th target.
    pub fn file(&self, i: usize) -> &std::fs::File {
        self.files[i]
            .2
            .as_ref()
            .expect("files stay open until the commit, which consumes them")
    }

    /// The path of the file written for the `i`th target.
    pub fn path(&self, i: usize) -> &Path {
        &self.files[i].1
    }

    /// Puts every written file in its target's place. Each is flushed to disk first, so
    /// that after a crash a target holds the new content or the old, never a file the
    /// rename got to before the data did. A target that exists is replaced only by the
    /// rename, and keeps its permissions. If one rename fails, the targets already
    /// renamed get their earlier content back (or are removed, if they had none), so
    /// the set stays as it was.
    pub fn commit(mut self) -> Result<(), OutDirError> {
        for (_, temp, file) in &mut self.files {
            if let Some(f) = file.take() {
                f.sync_all().map_err(io(temp))?;
            }
        }
        // A link to each existing target's content, so that a later failed rename can
        // put it back.
        let mut kept: Vec<Option<PathBuf>> = Vec::new();
        let mut failed = None;
        for (target, temp, _) in &self.files {
            match keep_old(target, temp) {
                Ok(old) => kept.push(old),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut renamed = 0;
        if failed.is_none() {
            for (target, temp, _) in &self.files {
                if let Err(e) = std::fs::rename(temp, target) {
                    failed = Some(io(target)(e));
                    break;
                }
                renamed += 1;
            }
        }
        if failed.is_some() {
            // Best effort: the first failure is what the caller needs to hear. An earlier
            // content that cannot be put back stays beside its target, never removed.
            for ((target, _, _), old) in self.files.iter().zip(&mut kept).take(renamed) {
                match old.take() {
                    Some(o) if std::fs::rename(&o, target).is_err() => {
                        failed = failed.map(|cause| OutDirError::NotRestored {
                            cause: Box::new(cause),
                            target: target.display().to_string(),
                            kept: o.display().to_string(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        let _ = std::fs::remove_file(target);
                    }
                }
            }
        }
        // What is still kept is a second name for content that stays in its target.
        for old in kept.iter().flatten() {
            let _ = std::fs::remove_file(old);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // The renames are entries of the folders: flushed too, so that after a crash the
        // files are not found by their old names. Best effort: not every system can.
        for (_, temp, _) in &self.files {
            if let Some(parent) = temp.parent() {
                let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
            }
        }
        self.files.clear();
        Ok(())
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (_, temp, file) in self.files.drain(..) {
            drop(file);
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Before `temp` replaces `target`: gives `temp` the target's permissions and links the
/// target's content to a hidden sibling (`.NAME.old-PID`, copied where the file system
/// has no hard links), returned so a failed commit can put it back. `None` when there is
/// nothing to keep: no target, or a folder (which the rename then refuses).
fn keep_old(target: &Path, temp: &Path) -> Result<Option<PathBuf>, OutDirError> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if !m.is_dir() => {
            if m.is_file() {
                std::fs::set_permissions(temp, m.permissions()).map_err(io(temp))?;
            }
            let (old, _) = sibling(target, "old");
            let _ = std::fs::remove_file(&old);
            if std::fs::hard_link(target, &old).is_err() {
                std::fs::copy(target, &old).map_err(io(target))?;
            }
            Ok(Some(old))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(target)(e)),
    }
}

/// Removes `PREFIX<pid>` files in `parent` whose process no longer runs: what a killed
/// run of [`StagedFiles`] left. Only names that are exactly the prefix and a number.
fn remove_leftover_files(parent: &Path, prefix: &OsString) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = prefix.to_string_lossy();
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name.strip_prefix(prefix.as_ref()) else {
            continue;
        };
        let dead = pid
            .parse::<u32>()
            .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists());
        if dead && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes `PREFIX<pid>` folders in `parent` whose process no longer runs.
fn remove_leftovers(parent: &Path, prefix: &OsString) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = prefix.to_string_lossy();
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name.strip_prefix(prefix.as_ref()) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && e.path().join(MARKER).is_file() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Swaps two paths in one step; false where the system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (
        std::ffi::CString::new(a.as_os_str().as_bytes()),
        std::ffi::CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_committed_run_replaces_the_earlier_set_whole() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let s = Staged::new(&out, false).unwrap();
        std::fs::write(s.path().join("fraud.jsonl"), "raw").unwrap();
        s.commit().unwrap();
        assert_eq!(files(&out), [MARKER, "fraud.jsonl"]);
        let s = Staged::new(&out, false).unwrap();
        std::fs::write(s.path().join("billing.jsonl"), "new").unwrap();
        s.commit().unwrap();
        assert_eq!(
            files(&out),
            [MARKER, "billing.jsonl"],
            "the earlier run's fraud file is gone"
        );
        assert_eq!(files(root.path()), ["out"], "nothing left beside it");
    }

    #[test]
    fn a_failed_run_leaves_the_earlier_set_untouched_and_nothing_beside_it() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let s = Staged::new(&out, false).unwrap();
        std::fs::write(s.path().join("billing.jsonl"), "complete").unwrap();
        s.commit().unwrap();
        {
            let s = Staged::new(&out, false).unwrap();
            std::fs::write(s.path().join("billing.jsonl"), "half").unwrap();
            // Dropped without commit: the run failed.
        }
        assert_eq!(
            std::fs::read_to_string(out.join("billing.jsonl")).unwrap(),
            "complete"
        );
        assert_eq!(files(root.path()), ["out"]);
    }

    #[test]
    fn a_folder_cdrguard_did_not_write_is_refused_unless_forced() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("mine");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("thesis.tex"), "years of work").unwrap();
        let e = Staged::new(&out, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(out.join("thesis.tex").exists());
        // An empty folder is fine, and so is anything with --force.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        Staged::new(&empty, false).unwrap().commit().unwrap();
        Staged::new(&out, true).unwrap().commit().unwrap();
        assert_eq!(files(&out), [MARKER]);
    }

    #[test]
    fn staged_files_replace_their_targets_keeping_permissions_and_clear_leftovers() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a.jsonl"), root.path().join("b.jsonl"));
        std::fs::write(&a, "old a").unwrap();
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
        // What a killed run left: its process id cannot be running.
        let dead = root.path().join(".b.jsonl.partial-4294967295");
        std::fs::write(&dead, "half").unwrap();
        let s = StagedFiles::new(&[&a, &b]).unwrap();
        assert!(!dead.exists());
        s.file(0).write_all(b"new a").unwrap();
        s.file(1).write_all(b"new b").unwrap();
        // Nothing changes before the commit.
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old a");
        assert!(!b.exists());
        assert!(s.path(0).starts_with(root.path()));
        s.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "new a");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new b");
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the replaced file keeps its permissions"
        );
        assert_eq!(files(root.path()), ["a.jsonl", "b.jsonl"]);
        // Dropped without a commit: nothing changes, nothing is left.
        let s = StagedFiles::new(&[&a, &b]).unwrap();
        s.file(0).write_all(b"newer a").unwrap();
        drop(s);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "new a");
        assert_eq!(files(root.path()), ["a.jsonl", "b.jsonl"]);
    }

    #[test]
    fn leftovers_of_a_killed_run_are_cleared() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        // A process id that cannot be running (above the kernel's maximum).
        let dead = root.path().join(".out.partial-4294967295");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(MARKER), "").unwrap();
        let s = Staged::new(&out, false).unwrap();
        assert!(!dead.exists());
        s.commit().unwrap();
        assert_eq!(files(root.path()), ["out"]);
    }
}
