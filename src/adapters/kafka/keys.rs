//! Key rotation without a restart: the key file is read again on SIGHUP or when it
//! changes, checked as at start, and its keys take over at the next transaction boundary,
//! so every transaction's copies name subscribers under one keyring. A file that fails
//! its checks is refused, its problems logged, and the keys in use kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::adapters::keyfile;
use crate::adapters::telemetry::names;
use crate::core::pseudonym::Keyring;

/// How often the key file's metadata is looked at. A mounted Secret or ConfigMap changes
/// by a symlink swap that sends no signal; a look every few seconds costs nothing.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// The keys in use, and the keys read since, waiting for a transaction boundary.
#[derive(Debug)]
pub struct KeyCell {
    active: Mutex<Arc<Keyring>>,
    staged: Mutex<Option<Arc<Keyring>>>,
}

impl KeyCell {
    /// A cell holding the keys a run starts with.
    pub fn new(keys: Arc<Keyring>) -> Arc<KeyCell> {
        Arc::new(KeyCell {
            active: Mutex::new(keys),
            staged: Mutex::new(None),
        })
    }

    /// The keys in use.
    pub fn active(&self) -> Arc<Keyring> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keys to take over at the next transaction boundary (replacing any staged before).
    pub fn stage(&self, keys: Arc<Keyring>) {
        *self.staged.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys);
    }

    /// At a transaction boundary (every partition locked, nothing uncommitted): staged
    /// keys take over. Returns them when they did.
    pub fn switch(&self) -> Option<Arc<Keyring>> {
        let next = self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = next.clone();
        metrics::counter!(names::KEY_SWITCHES).increment(1);
        tracing::info!(active_key = next.id(), keys = ?next, "new keys in use from this transaction on");
        Some(next)
    }
}

/// What identifies a version of the file: a rename over it (how Kubernetes updates a
/// mounted Secret) changes the inode, an edit in place the time or size.
fn version(path: &Path) -> Option<(u64, u64, SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    // Through the symlinks: a mounted Secret's file is a link into a versioned folder.
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// Reads the key file again and stages it if it passes the checks made at start and
/// differs from the keys in use. Logs the outcome, never a secret.
pub fn reload(path: &Path, cell: &KeyCell) -> &'static str {
    let outcome = match keyfile::load(path) {
        Err(e) => {
            // The error lists every problem by line and key; it never holds key material.
            tracing::error!(file = %path.display(), problems = %e, "key file refused; the keys in use are kept");
            "refused"
        }
        Ok(k) if k.same_keys(&cell.active()) => "unchanged",
        Ok(k) => {
            let current = cell.active();
            let dropped: Vec<&str> = current
                .each_key()
                .map(Keyring::id)
                .filter(|id| !k.each_key().any(|n| n.id() == *id))
                .collect();
            if !dropped.is_empty() {
                // Allowed (an operator may retire a key whose copies are all gone), but
                // rights can no longer reach windows named under it.
                tracing::warn!(dropped = ?dropped, "the new key file drops keys in use: rights will not reach windows named under them");
            }
            tracing::info!(file = %path.display(), active_key = k.id(), "key file read; its keys take over at the next commit");
            cell.stage(Arc::new(k));
            "staged"
        }
    };
    metrics::counter!(names::KEY_RELOADS, "outcome" => outcome).increment(1);
    outcome
}

/// Watches the key file (until the task is aborted): reloads on SIGHUP, and when its
/// version changes. It takes no part in stopping: the run's stop is one notification,
/// which a second listener would take from the run.
pub fn spawn_watcher(
    path: PathBuf,
    cell: Arc<KeyCell>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        let mut seen = version(&path);
        loop {
            let asked = tokio::select! {
                _ = hup.recv() => true,
                _ = tokio::time::sleep(LOOK_EVERY) => false,
            };
            let now = version(&path);
            if asked || now != seen {
                seen = now;
                reload(&path, &cell);
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn new_keys_wait_for_the_boundary_and_a_bad_file_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = keyfile::generate("k1");
        let path = write(dir.path(), "keys.toml", &k1);
        let cell = KeyCell::new(Arc::new(keyfile::load(&path).unwrap()));
        assert_eq!(reload(&path, &cell), "unchanged");
        assert!(cell.switch().is_none(), "nothing staged");

        // k2 active, k1 kept for the copies made under it.
        write(dir.path(), "keys.toml", &(keyfile::generate("k2") + &k1));
        assert_eq!(reload(&path, &cell), "staged");
        assert_eq!(cell.active().id(), "k1", "not before the boundary");
        assert_eq!(cell.switch().unwrap().id(), "k2");
        assert_eq!(cell.active().id(), "k2");
        assert!(cell.switch().is_none(), "switched once");

        // A broken file: refused, k2 stays.
        write(
            dir.path(),
            "keys.toml",
            "[[keys]]\nid = \"k3\"\nsecret_hex = \"zz\"\n",
        );
        assert_eq!(reload(&path, &cell), "refused");
        assert!(cell.switch().is_none());
        assert_eq!(cell.active().id(), "k2");

        // The same ids with another secret is a change.
        write(dir.path(), "keys.toml", &(keyfile::generate("k2") + &k1));
        assert_eq!(reload(&path, &cell), "staged");
    }
}
