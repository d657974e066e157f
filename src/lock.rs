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
    // A copy of another folder's state (`cp -al` while that folder builds): its lock file
    // is the other folder's, held perhaps for hours. Unshare first, so this folder waits
    // for no one else's build.
    if foreign(state_dir, &path) {
        unshare_unlocked(state_dir);
    }
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
                let holder = holder.split_whitespace().next().unwrap_or_default();
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
    lock.stamp(state_dir);
    Ok(lock)
}

/// The state folder as the lock's stamp names it: its real path.
fn stamp_name(state_dir: &Path) -> String {
    state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Whether the lock file at `path` is shared with another folder's state (hard links) and
/// was last stamped by a run of that other folder.
fn foreign(state_dir: &Path, path: &Path) -> bool {
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    if m.nlink() < 2 {
        return false;
    }
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(text.split(|b| *b == 0).next().unwrap_or_default());
    match text.split_once(' ') {
        Some((_, dir)) if !dir.trim().is_empty() => dir.trim() != stamp_name(state_dir),
        _ => false,
    }
}

/// `unshare` before the lock is taken (the shared lock may be held by the other folder's
/// build). Runs of this folder take turns on `.qbuild/unsharing` (a file of this folder's
/// own, made here), and each checks again under it, so one unshares and the rest find
/// nothing left to do.
fn unshare_unlocked(state_dir: &Path) {
    let turn = state_dir.join("unsharing");
    let Ok(t) = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&turn)
    else {
        return;
    };
    if t.lock().is_err() {
        return;
    }
    if !foreign(state_dir, &state_dir.join("lock")) {
        return;
    }
    // The new lock, held while the other files are copied, goes in place first: a run of
    // this folder that starts meanwhile waits on it, not on the other folder's.
    let Some(mut lock) = replace_lock(state_dir) else {
        return;
    };
    // `running` names the other folder's build in progress: its commands are not this
    // folder's leftovers to stop.
    let running = state_dir.join("running");
    if std::fs::metadata(&running).is_ok_and(|m| m.nlink() > 1) {
        let _ = std::fs::remove_file(&running);
    }
    unshare(state_dir, &mut lock);
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
                let tmp = p.with_extension(format!("unshare-{}", std::process::id()));
                if std::fs::copy(&p, &tmp).is_ok() && std::fs::rename(&tmp, &p).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
    }
    walk(state_dir);
    if lock.file.metadata().is_ok_and(|m| m.nlink() > 1) {
        if let Some(fresh) = replace_lock(state_dir) {
            *lock = fresh;
        }
    }
}

/// A new lock file, locked and stamped, renamed over `lock` (`None` if any step fails; the
/// old file stays then).
fn replace_lock(state_dir: &Path) -> Option<Lock> {
    let tmp = state_dir.join(format!("lock.unshare-{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ok()?;
    let mut lock = Lock { file };
    let placed = lock.file.try_lock().is_ok() && {
        lock.stamp(state_dir);
        std::fs::rename(&tmp, state_dir.join("lock")).is_ok()
    };
    if !placed {
        let _ = std::fs::remove_file(&tmp);
        return None;
    }
    Some(lock)
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
    /// Write this process's id and the state folder into the lock file (for the message of
    /// a run that waits, and to tell a hard-linked copy's lock from this folder's): over the
    /// old stamp, ended by a NUL, never truncating (ext4 flushes a file that was truncated
    /// to zero when it is closed, a disk write on every run).
    pub fn stamp(&mut self, state_dir: &Path) {
        let text = format!("{:<10} {}\n\0", std::process::id(), stamp_name(state_dir));
        let _ = self.file.write_all_at(text.as_bytes(), 0);
    }
}
