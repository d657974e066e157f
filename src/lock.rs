//! The work-folder lock: one build at a time per folder; the second waits (saying so) or fails with `--no-wait`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Held for the life of the build; the OS releases it if qbuild dies.
pub struct Lock {
    file: File,
}

/// Why the lock was not taken.
pub enum LockError {
    /// Another qbuild holds it and we were told not to wait; ` (pid N)` or empty.
    Busy(String),
    Other(String),
}

pub fn acquire(state_dir: &Path, wait: bool) -> Result<Lock, LockError> {
    let path = state_dir.join("lock");
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| LockError::Other(format!("cannot open the lock {}: {e}", path.display())))
    };
    let mut file = open()?;
    // Polled, not a blocking flock: a signal qbuild handles (in `--watch`, Ctrl-C) must end
    // the wait, and the kernel restarts a blocking flock after it.
    let mut who: Option<String> = None;
    loop {
        match file.try_lock() {
            // The lock counts only if the path still names the file locked: a run that
            // replaced a shared lock file (see `unshare`) released the old one to whoever
            // waited on it.
            Ok(()) if is_at(&file, &path) => break,
            Ok(()) => {
                file = open()?;
                continue;
            }
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LockError::Other(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )))
            }
        }
        let who = match &who {
            Some(w) => w,
            None => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let w = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                if !wait {
                    return Err(LockError::Busy(w));
                }
                say!("qbuild: waiting for another qbuild{w} to finish in this folder...");
                who.insert(w)
            }
        };
        if crate::work::INTERRUPT.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            return Err(LockError::Other(format!(
                "interrupted while waiting for another qbuild{who}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut lock = Lock { file };
    if lock.file.metadata().is_ok_and(|m| m.nlink() > 1) {
        unshare(state_dir, &mut lock);
    }
    lock.stamp();
    Ok(lock)
}

/// Whether `path` names the open `file` (the same inode).
fn is_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The state folder was copied with hard links (`cp -al`, to branch a work folder
/// cheaply): its files are the original's too. Two folders would then share one lock
/// (each build waiting on the other's) and write into each other's explain store and
/// logs. Give this folder files of its own: a copy of each shared file renamed over it,
/// and a new lock, taken before it replaces the shared one. Files are replaced, never
/// written in place, so the original folder keeps what it had.
fn unshare(state_dir: &Path, lock: &mut Lock) {
    fn walk(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                walk(&p);
            } else if m.is_file() && m.nlink() > 1 && p.file_name() != Some("lock".as_ref()) {
                let tmp = p.with_extension("unshare-tmp");
                if std::fs::copy(&p, &tmp).is_ok() && std::fs::rename(&tmp, &p).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
    }
    walk(state_dir);
    let tmp = state_dir.join("lock.unshare-tmp");
    let fresh = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp);
    if let Ok(f) = fresh {
        if f.try_lock().is_ok() && std::fs::rename(&tmp, state_dir.join("lock")).is_ok() {
            lock.file = f;
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// The lock, if it is free right now and its file exists: taken without creating or
/// writing anything (a run that then refuses its Qairtfile leaves no trace). `stamp` it
/// once the run goes ahead.
pub fn try_existing(state_dir: &Path) -> Option<Lock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(state_dir.join("lock"))
        .ok()?;
    file.try_lock().ok()?;
    // A lock file shared with a hard-linked copy is left to `acquire`, which unshares it.
    if !is_at(&file, &state_dir.join("lock")) || file.metadata().ok()?.nlink() > 1 {
        return None;
    }
    Some(Lock { file })
}

impl Lock {
    /// Write this process's id into the lock file, for the message of a run that waits:
    /// over the old one, padded with spaces, never truncating (ext4 flushes a file that was
    /// truncated to zero when it is closed, a disk write on every run).
    pub fn stamp(&mut self) {
        let _ = self
            .file
            .write_all_at(format!("{:<10}", std::process::id()).as_bytes(), 0);
    }
}
