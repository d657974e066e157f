//! The work-folder lock: one build at a time per folder; the second waits (saying so) or fails with `--no-wait`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
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
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| LockError::Other(format!("cannot open the lock {}: {e}", path.display())))?;
    // Polled, not a blocking flock: a signal qbuild handles (in `--watch`, Ctrl-C) must end
    // the wait, and the kernel restarts a blocking flock after it.
    let mut who: Option<String> = None;
    loop {
        match file.try_lock() {
            Ok(()) => break,
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
    lock.stamp();
    Ok(lock)
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
