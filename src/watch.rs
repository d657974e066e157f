//! `--watch`: build, then rebuild whenever a source the targets need (or the Qairtfile) changes; a broken Qairtfile is reported and watching goes on.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};

use crate::diag::Diagnostic;
use crate::{Loaded, Session};

/// Quiet time that ends a burst of events (trailing-edge debounce).
const QUIET: Duration = Duration::from_millis(80);

/// What a change must touch to trigger a build.
#[derive(Default)]
struct Interest {
    files: HashSet<PathBuf>,
    /// Source folders: any change below them counts.
    trees: Vec<PathBuf>,
}

impl Interest {
    fn wants(&self, p: &Path) -> bool {
        self.files.contains(p) || self.trees.iter().any(|t| p.starts_with(t))
    }
}

fn interest(s: &Session, loaded: Option<&Loaded>) -> Interest {
    let mut i = Interest::default();
    i.files.insert(s.file.clone());
    let Some(l) = loaded else {
        return i;
    };
    let g = &l.graph;
    let want = g.closure(&l.jobs);
    for (ji, job) in g.jobs.iter().enumerate() {
        if !want[ji] {
            continue;
        }
        for f in job.ins.iter().chain(&job.order) {
            let file = &g.files[f.idx()];
            if file.producer.is_some() {
                continue;
            }
            let p = s.workdir.join(&file.path);
            if p.is_dir() {
                if !i.trees.contains(&p) {
                    i.trees.push(p);
                }
            } else {
                i.files.insert(p);
            }
        }
    }
    if let Some(t) = &l.toolchain {
        i.files.insert(t.root.join("sdk.yaml"));
    }
    i
}

pub fn run(s: &Session) -> Result<i32, Diagnostic> {
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(|e| Diagnostic::plain(format!("cannot watch files: {e}")))?;
    let (_lock, db) = s.open_state()?;
    let mut db = Some(db);
    let mut emit = crate::json_emitter(s.args.json);
    let mut watching: HashSet<(PathBuf, bool)> = HashSet::new();
    loop {
        let loaded = match s.load() {
            Ok(l) => Some(l),
            Err(d) => {
                eprintln!("{d}");
                eprintln!("qbuild: fix the Qairtfile; watching it for changes");
                emit(serde_json::json!({
                    "event": "qairtfile_error",
                    "error": d.message,
                    "at": d.position(),
                }));
                None
            }
        };
        // Watch before building, so a change made during the build is queued, not lost.
        let want = interest(s, loaded.as_ref());
        // Watch the folders holding the files (atomic saves replace the file) and the trees.
        let mut targets: HashSet<(PathBuf, bool)> = want
            .files
            .iter()
            .filter_map(|f| f.parent().map(|d| (d.to_path_buf(), false)))
            .collect();
        targets.extend(want.trees.iter().map(|t| (t.clone(), true)));
        for (dir, rec) in &targets {
            if watching.contains(&(dir.clone(), *rec)) || !dir.is_dir() {
                continue;
            }
            let mode = if *rec {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match watcher.watch(dir, mode) {
                Ok(()) => {
                    watching.insert((dir.clone(), *rec));
                }
                Err(e) => {
                    let hint =
                        if e.to_string().contains("max") || e.to_string().contains("No space") {
                            " (raise fs.inotify.max_user_watches)"
                        } else {
                            ""
                        };
                    eprintln!("qbuild: warning: cannot watch {}: {e}{hint}", dir.display());
                }
            }
        }
        if let Some(l) = &loaded {
            s.build(l, &mut db)?;
        }
        eprintln!(
            "qbuild: watching {} file(s) and {} folder(s); Ctrl-C to stop",
            want.files.len(),
            want.trees.len()
        );
        emit(
            serde_json::json!({ "event": "watching", "files": want.files.len(), "folders": want.trees.len() }),
        );
        drop(loaded);
        // Wait for a change that matters; then let the burst settle.
        loop {
            let sig = crate::work::INTERRUPT.load(Ordering::SeqCst);
            if sig != 0 {
                eprintln!("qbuild: stopped watching");
                return Ok(128 + sig);
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(ev)) if relevant(&ev, &want, &s.workdir) => break,
                Ok(Ok(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(Err(e)) => eprintln!("qbuild: warning: watch error: {e}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Diagnostic::plain("the file watcher stopped"));
                }
            }
        }
        while rx.recv_timeout(QUIET).is_ok() {}
        eprintln!("qbuild: change seen; rebuilding");
    }
}

fn relevant(ev: &notify::Event, want: &Interest, workdir: &Path) -> bool {
    if matches!(ev.kind, EventKind::Access(_) | EventKind::Other) {
        return false;
    }
    let state = workdir.join(".qbuild");
    ev.paths
        .iter()
        .any(|p| !p.starts_with(&state) && want.wants(p))
}
