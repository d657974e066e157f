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
                let w = match read_stamp(&path).first() {
                    Some(pid) => format!(" (pid {pid})"),
                    None => String::new(),
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
    if shared(state_dir, &lock) {
        unshare(state_dir, &mut lock);
    }
    lock.stamp(state_dir);
    Ok(lock)
}

/// Whether `path` names the open `file` (the same inode).
fn is_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Which state folder this is, as the lock's stamp names it: device and inode of
/// `.qbuild/`. A path would not do: one folder has many (a bind mount, a rename, a
/// symlinked parent), and a copy made with `cp -al` gets folders of its own, so new inodes.
fn state_id(state_dir: &Path) -> String {
    std::fs::metadata(state_dir)
        .map(|m| format!("{}:{}", m.dev(), m.ino()))
        .unwrap_or_default()
}

/// Whether the lock file at `path` has other links and was last stamped by a run of
/// another state folder (one `cp -al` copied this one from, or copied from this one).
fn foreign(state_dir: &Path, path: &Path) -> bool {
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    if m.nlink() < 2 {
        return false;
    }
    // `PID DEV:INO PATH`; an older stamp (the pid alone) names no folder.
    let stamp = read_stamp(path);
    let id = stamp.get(1).map_or("", String::as_str);
    let is_id = id
        .split_once(':')
        .is_some_and(|(d, i)| d.parse::<u64>().is_ok() && i.parse::<u64>().is_ok());
    is_id && id != state_id(state_dir)
}

/// The words of the lock's stamp (see `Lock::stamp`), up to its NUL.
fn read_stamp(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = bytes.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Whether this folder's state still shares files with another folder's (a `cp -al`): its
/// lock or one of the files every build writes has other links. (A copy whose lock was
/// missing, or whose first unsharing was killed after the lock, shows it here.)
fn shared(state_dir: &Path, lock: &Lock) -> bool {
    let linked = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.nlink() > 1);
    lock.file.metadata().is_ok_and(|m| m.nlink() > 1)
        || ["snapshot", "journal", "state.sled/db"]
            .iter()
            .any(|f| linked(&state_dir.join(f)))
}

/// `unshare` before the lock is taken: the shared lock may be held by the other folder's
/// build. Runs of this folder take turns on `.qbuild/unsharing`, and each checks again
/// under it, so one unshares and the rest find nothing left to do. The lock is replaced
/// last: a run killed before that leaves the stamp foreign, and the next run goes on.
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
    if t.lock().is_err() || !foreign(state_dir, &state_dir.join("lock")) {
        return;
    }
    // `running` names the other folder's build in progress: its commands are not this
    // folder's leftovers to stop.
    let running = state_dir.join("running");
    if std::fs::metadata(&running).is_ok_and(|m| m.nlink() > 1) {
        let _ = std::fs::remove_file(&running);
    }
    copy_shared_files(state_dir);
    drop(replace_lock(state_dir));
}

/// Give this folder state files of its own (see `shared`): a copy of each shared file
/// renamed over it, then, if the held lock is shared too, a new lock in its place. Files
/// are replaced, never written in place, so the other folder keeps what it had. Two
/// folders would otherwise share one lock (each waiting on the other's builds) and write
/// into each other's explain store and logs.
fn unshare(state_dir: &Path, lock: &mut Lock) {
    copy_shared_files(state_dir);
    if lock.file.metadata().is_ok_and(|m| m.nlink() > 1) {
        if let Some(fresh) = replace_lock(state_dir) {
            *lock = fresh;
        }
    }
}

/// Copy each file with other links under `state_dir` (but `lock`) and rename the copy over
/// it. A copy a killed run left behind is removed first.
fn copy_shared_files(state_dir: &Path) {
    fn walk(dir: &Path, tmp: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                walk(&p, tmp);
            } else if m.is_file() && m.nlink() > 1 && p.file_name() != Some("lock".as_ref()) {
                // (A copy that cannot be put in place is not left behind.)
                let copied = std::fs::copy(&p, tmp).is_ok();
                if copied && std::fs::rename(tmp, &p).is_err() {
                    let _ = std::fs::remove_file(tmp);
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(state_dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix(".unshare-"))
                .and_then(|p| p.split('-').next_back())
                .and_then(|p| p.parse::<i32>().ok());
            // SAFETY: kill(2) with signal 0 only asks whether the process exists.
            if pid.is_some_and(|p| unsafe { libc::kill(p, 0) } != 0) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Each copy is made in `.qbuild/` itself (inside `state.sled/`, sled would take a stray
    // copy for a snapshot of its own).
    walk(
        state_dir,
        &state_dir.join(format!(".unshare-{}", std::process::id())),
    );
}

/// A new lock file, locked and stamped, renamed over `lock` (`None` if any step fails; the
/// old file stays then).
fn replace_lock(state_dir: &Path) -> Option<Lock> {
    let tmp = state_dir.join(format!(".unshare-lock-{}", std::process::id()));
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
    let lock = Lock { file };
    // A state shared with a hard-linked copy is left to `acquire`, which unshares it.
    if !is_at(&lock.file, &state_dir.join("lock")) || shared(state_dir, &lock) {
        return None;
    }
    Some(lock)
}

impl Lock {
    /// Write this process's id and the state folder into the lock file (for the message of
    /// a run that waits, and to tell a hard-linked copy's lock from this folder's): over the
    /// old stamp, ended by a NUL, never truncating (ext4 flushes a file that was truncated
    /// to zero when it is closed, a disk write on every run).
    pub fn stamp(&mut self, state_dir: &Path) {
        let text = format!(
            "{:<10} {} {}\n\0",
            std::process::id(),
            state_id(state_dir),
            state_dir.display()
        );
        let _ = self.file.write_all_at(text.as_bytes(), 0);
    }
}
