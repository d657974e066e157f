//! `--watch`: build, then rebuild whenever a source the targets need (or the Qairtfile, or the SDK's sdk.yaml) changes; a broken Qairtfile is reported and watching goes on.

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
#[derive(Default, Clone)]
struct Interest {
    files: HashSet<PathBuf>,
    /// Source folders: any change below them counts.
    trees: HashSet<PathBuf>,
    /// Outputs inside those folders (a generated file beside the test vectors): the
    /// build's own writes there are not a reason to build again.
    outputs: HashSet<PathBuf>,
}

impl Interest {
    /// A change at `p` matters if it is a watched file, inside a watched tree, or a folder
    /// on the way to one (a folder that appears, or is renamed, brings sources with it).
    fn wants(&self, p: &Path) -> bool {
        if self.outputs.contains(p) {
            return false;
        }
        self.files.contains(p)
            || self.trees.iter().any(|t| p.starts_with(t))
            || self
                .files
                .iter()
                .chain(&self.trees)
                .any(|f| f.starts_with(p))
    }

    fn add_file(&mut self, p: PathBuf) {
        // Through a symlink, the file that really changes is the target.
        if let Ok(real) = p.canonicalize() {
            if real != p {
                self.files.insert(real);
            }
        }
        self.files.insert(p);
    }

    /// The folders to register: each file's folder (editors replace files by rename), or
    /// its nearest existing ancestor while it does not exist; trees recursively.
    fn registrations(&self) -> HashSet<(PathBuf, bool)> {
        let mut out = HashSet::new();
        for f in &self.files {
            let mut dir = f.parent().map(Path::to_path_buf);
            while let Some(d) = dir {
                if d.is_dir() {
                    out.insert((d, false));
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
        for t in &self.trees {
            if t.is_dir() {
                out.insert((t.clone(), true));
            }
            if let Ok(real) = t.canonicalize() {
                if real != *t {
                    out.insert((real, true));
                }
            }
        }
        out
    }
}

fn interest(s: &Session, l: &Loaded) -> Interest {
    let mut i = Interest::default();
    i.add_file(s.file.clone());
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
                if let Ok(real) = p.canonicalize() {
                    i.trees.insert(real);
                }
                i.trees.insert(p);
            } else {
                i.add_file(p);
            }
        }
    }
    if let Some(t) = &l.toolchain {
        i.add_file(t.root.join("sdk.yaml"));
    }
    // The graph knows which outputs lie inside source folders it names (`holders`); the
    // watched trees are such folders.
    for f in g.holders.keys() {
        let p = s.workdir.join(g.path(*f));
        if i.trees.iter().any(|t| p.starts_with(t)) {
            // Through a symlinked tree, events name the real path.
            let real = p
                .parent()
                .and_then(|d| d.canonicalize().ok())
                .zip(p.file_name())
                .map(|(d, n)| d.join(n));
            if let Some(real) = real.filter(|r| *r != p) {
                i.outputs.insert(real);
            }
            i.outputs.insert(p);
        }
    }
    i
}

pub fn run(s: &Session) -> Result<i32, Diagnostic> {
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(|e| Diagnostic::plain(format!("cannot watch files: {e}")))?;
    let mut emit = crate::json_emitter(s.args.json);
    let mut watching: HashSet<(PathBuf, bool)> = HashSet::new();
    // What the last good load needed: kept while the Qairtfile (or the SDK) is broken, so
    // fixing whatever broke it is seen.
    let mut last = Interest::default();
    last.add_file(s.file.clone());
    loop {
        let loaded = match s.load() {
            Ok(l) => {
                last = interest(s, &l);
                Some(l)
            }
            Err(d) => {
                say!("{d}");
                say!("qbuild: fix the error above; watching for changes");
                emit(serde_json::json!({
                    "event": "qairtfile_error",
                    "error": d.message,
                    "at": d.position(),
                }));
                None
            }
        };
        let want = last.clone();
        // Watch before building, so a change made during the build is queued, not lost.
        for (dir, rec) in want.registrations() {
            if watching.contains(&(dir.clone(), rec)) {
                continue;
            }
            let mode = if rec {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match watcher.watch(&dir, mode) {
                Ok(()) => {
                    watching.insert((dir, rec));
                }
                Err(e) => {
                    let text = e.to_string();
                    let hint = if text.contains("max") || text.contains("No space") {
                        " (raise fs.inotify.max_user_watches)"
                    } else {
                        ""
                    };
                    say!(
                        "qbuild: warning: cannot watch {}: {text}{hint}",
                        dir.display()
                    );
                }
            }
        }
        if let Some(l) = &loaded {
            // The lock and the database are held only while building, so other qbuild
            // commands (--status, -n) can run while this one waits for changes.
            let (lock, db) = s.open_state()?;
            let mut db = Some(db);
            s.build(l, &mut db, None)?;
            drop(db);
            drop(lock);
        }
        drop(loaded);
        if crate::work::INTERRUPT.load(Ordering::SeqCst) != 0 {
            say!("qbuild: stopped watching");
            return Ok(128 + crate::work::INTERRUPT.load(Ordering::SeqCst));
        }
        say!(
            "qbuild: watching {} file(s) and {} folder(s); Ctrl-C to stop",
            want.files.len(),
            want.trees.len()
        );
        emit(
            serde_json::json!({ "event": "watching", "files": want.files.len(), "folders": want.trees.len() }),
        );
        // Wait for a change that matters; then let the burst settle.
        loop {
            let sig = crate::work::INTERRUPT.load(Ordering::SeqCst);
            if sig != 0 {
                say!("qbuild: stopped watching");
                return Ok(128 + sig);
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(ev)) if relevant(&ev, &want, &s.workdir) => break,
                Ok(Ok(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(Err(e)) => say!("qbuild: warning: watch error: {e}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Diagnostic::plain("the file watcher stopped"));
                }
            }
        }
        while rx.recv_timeout(QUIET).is_ok() {}
        say!("qbuild: change seen; rebuilding");
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
