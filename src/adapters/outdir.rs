//! Output folders written whole or not at all. A run writes into a fresh folder beside its
//! target and swaps it into place only when it succeeded, so a failed or killed run never
//! leaves a half-written set, and no file of an earlier run (another policy's route with
//! raw identifiers, say) survives next to a new run's.

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
