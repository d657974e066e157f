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
/// Longest a burst of relevant changes holds the rebuild back.
const SETTLE_MAX: Duration = Duration::from_secs(1);

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
        // Through a symlink, the file that really changes is the target; and every link on
        // the way can be retargeted (`current -> v2` on shared storage, a linked folder
        // above the file, that folder's own chain): each is watched.
        let mut todo = vec![p.clone()];
        let mut seen = HashSet::new();
        while let Some(at) = todo.pop() {
            if seen.len() > 256 || !seen.insert(at.clone()) {
                continue;
            }
            self.files.insert(at.clone());
            for a in at.ancestors().skip(1) {
                if std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink()) {
                    todo.push(a.to_path_buf());
                }
            }
            if let Ok(text) = std::fs::read_link(&at) {
                let next = at.parent().unwrap_or(Path::new("/")).join(text);
                todo.push(PathBuf::from(crate::expand::normalize(
                    &next.to_string_lossy(),
                )));
            }
        }
        if let Ok(real) = p.canonicalize() {
            if real != p {
                self.files.insert(real);
            }
        }
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
                // Every link on the way to the folder can be retargeted (`tv -> cur -> v1`):
                // each is watched as a file.
                i.add_file(p.clone());
                i.trees.insert(p);
            } else {
                i.add_file(p);
            }
        }
    }
    if let Ok(Some(tc)) = &g.model.toolchain {
        add_toolchain(&mut i, &s.workdir, tc);
    }
    // A recursive watch sees a link inside a source folder, not what it leads to (test
    // vectors linked from shared storage): watch those files, and those folders as trees.
    // Found anew each round, so a link made while watching is followed from the next.
    let (mut files, mut trees) = (Vec::new(), Vec::new());
    for t in &i.trees {
        links_below(t, &mut files, &mut trees, &mut 0);
    }
    // (Already real paths.)
    i.files.extend(files);
    i.trees.extend(trees);
    // The graph knows which outputs lie inside source folders it names (`holders`); the
    // watched trees are such folders.
    for f in g.holders.keys() {
        let p = s.workdir.join(g.path(*f));
        if i.trees.iter().any(|t| p.starts_with(t)) {
            // Through a symlinked tree, events name the real path.
            if let Some(real) = crate::clean::real_path(&p).filter(|r| *r != p) {
                i.outputs.insert(real);
            }
            i.outputs.insert(p);
        }
    }
    i
}

/// The SDK's version file and tools (and its root, while it is missing): an SDK fixed or
/// upgraded, or a tool made executable again, is a change like any other.
fn add_toolchain(i: &mut Interest, workdir: &Path, tc: &crate::expand::Toolchain) {
    let root = workdir.join(&tc.root);
    i.add_file(root.join(&tc.version_file));
    for t in &tc.tools {
        i.add_file(root.join(t));
    }
}

/// The real files and folders that symlinks under `dir` lead to (at most 100,000 entries
/// looked at; a folder link is not walked into, so a loop cannot hold the walk).
fn links_below(dir: &Path, files: &mut Vec<PathBuf>, trees: &mut Vec<PathBuf>, seen: &mut usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        *seen += 1;
        if *seen > 100_000 {
            return;
        }
        let Ok(ft) = e.file_type() else { continue };
        let p = e.path();
        if ft.is_symlink() {
            if let Ok(real) = p.canonicalize() {
                if real.is_file() {
                    files.push(real);
                } else if real.is_dir() {
                    trees.push(real);
                }
            }
        } else if ft.is_dir() {
            links_below(&p, files, trees, seen);
        }
    }
}

/// A folder's identity: inode and birth time (`None` if it is gone).
type FolderId = Option<(u64, Option<std::time::SystemTime>)>;

/// Which folder `p` is (through links): its inode and birth time, to notice a watched
/// folder replaced by a new one (which often gets the freed inode number back at once).
fn inode(p: &Path) -> FolderId {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.ino(), m.created().ok()))
}

/// What the watched paths are now: each file's and each tree entry's name and stat (not
/// the build's own outputs inside a tree), hashed; `None` when a stat is too recent to be
/// told from a later write in the same clock tick, or a tree is too big to walk. Equal
/// before a build and after the changes that follow it, nothing a build reads has changed:
/// a command's temporary file in a source folder, made and removed, is no change (and a
/// failing job, which reruns each round, made a new one each round, for ever).
fn fingerprint(i: &Interest) -> Option<blake3::Hash> {
    use std::os::unix::fs::MetadataExt;
    let now = crate::hash::wall_now_ns();
    let mut h = blake3::Hasher::new();
    let mut racy = false;
    // Hash one path and its stat; its metadata, if it exists.
    let mut note = |h: &mut blake3::Hasher, p: &Path| {
        h.update(p.as_os_str().as_encoded_bytes());
        let Ok(m) = std::fs::symlink_metadata(p) else {
            h.update(b"\0-");
            return None;
        };
        for v in [m.dev(), m.ino(), u64::from(m.mode())] {
            h.update(&v.to_le_bytes());
        }
        // A folder is its entries (walked as a tree), not its times: a file made and
        // removed in it changes those.
        if m.is_dir() {
            return Some(m);
        }
        h.update(&m.size().to_le_bytes());
        let nanos = [m.mtime_nsec(), m.ctime_nsec()];
        for v in [m.mtime(), m.ctime()].into_iter().chain(nanos) {
            h.update(&v.to_le_bytes());
        }
        // Changed within a tick of the coarse clock file times come from (at most 10 ms;
        // on a filesystem keeping whole seconds, two seconds) of now: a write later in
        // that tick could leave the same stat. (A round starts QUIET after the last
        // change it saw, so the sources of a round are seldom that recent.)
        let tick = if nanos == [0, 0] {
            2_000_000_000
        } else {
            20_000_000
        };
        let ctime = m
            .ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.ctime_nsec());
        racy |= ctime >= now.saturating_sub(tick);
        Some(m)
    };
    let mut files: Vec<&PathBuf> = i.files.iter().collect();
    files.sort();
    for f in files {
        note(&mut h, f);
    }
    let mut trees: Vec<&PathBuf> = i.trees.iter().collect();
    trees.sort();
    let mut seen = 0usize;
    for t in trees {
        h.update(b"\0tree");
        let mut todo = vec![t.clone()];
        while let Some(dir) = todo.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                note(&mut h, &dir);
                continue;
            };
            let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            names.sort();
            for p in names {
                seen += 1;
                if seen > 100_000 {
                    return None;
                }
                if i.outputs.iter().any(|o| p.starts_with(o)) {
                    continue;
                }
                if note(&mut h, &p).is_some_and(|m| m.is_dir()) {
                    todo.push(p);
                }
            }
        }
    }
    (!racy).then(|| h.finalize())
}

/// After Ctrl-C (or SIGTERM): says so, and gives the exit status.
fn stopped() -> Option<i32> {
    let sig = crate::work::INTERRUPT.load(Ordering::SeqCst);
    (sig != 0).then(|| {
        say!("qbuild: stopped watching");
        128 + sig
    })
}

pub fn run(s: &Session) -> Result<i32, Diagnostic> {
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(|e| Diagnostic::plain(format!("cannot watch files: {e}")))?;
    let mut emit = crate::json_emitter(s.args.json);
    // Each registered folder, with its inode then: a folder deleted and made again is a new
    // one, which the watch on the old one no longer sees.
    let mut watching: std::collections::HashMap<(PathBuf, bool), FolderId> = Default::default();
    // What the last good load needed: kept while the Qairtfile (or the SDK) is broken, so
    // fixing whatever broke it is seen.
    let mut last = Interest::default();
    last.add_file(s.file.clone());
    loop {
        // The work folder by its path each round: moved aside and made again (a checkout,
        // a restore), the process's folder would still be the old one, and relative paths
        // (sources, commands) would read it.
        let _ = std::env::set_current_dir(&s.workdir);
        // Taken before anything is read (the Qairtfile, the SDK, the sources), over what the
        // last round needed (when that changes, the two never match: a build follows).
        let mut before = fingerprint(&last);
        let loaded = match s.load() {
            Ok(l) => {
                last = interest(s, &l);
                Some(l)
            }
            Err(d) => {
                // The Qairtfile may be fine and the SDK not (too old, a tool missing): then
                // fixing the SDK must be seen too, even if no load ever succeeded.
                if let Ok(g) = crate::load_graph(&s.file, &s.args.file) {
                    if let Ok(Some(tc)) = &g.model.toolchain {
                        add_toolchain(&mut last, &s.workdir, tc);
                    }
                }
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
        watching.retain(|(dir, _), ino| {
            let same = inode(dir) == *ino;
            if !same {
                let _ = watcher.unwatch(dir);
            }
            same
        });
        // Watch before building, so a change made during the build is queued, not lost.
        for (dir, rec) in want.registrations() {
            if watching.contains_key(&(dir.clone(), rec)) {
                continue;
            }
            let mode = if rec {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match watcher.watch(&dir, mode) {
                Ok(()) => {
                    let ino = inode(&dir);
                    watching.insert((dir, rec), ino);
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
            // With --no-wait, a build another qbuild holds the folder for skips this round
            // (the next change brings another), rather than ending the watch.
            match crate::open_state_unless_busy(&s.workdir, !s.args.no_wait) {
                Ok(Ok((lock, db))) => {
                    let mut db = Some(db);
                    s.build(l, &mut db, None)?;
                    drop(db);
                    drop(lock);
                }
                Ok(Err(who)) => {
                    // Not built: any change brings the next build.
                    before = None;
                    say!("qbuild: another qbuild{who} is building here; this change is not built (--no-wait)");
                    emit(serde_json::json!({ "event": "skipped", "reason": "busy" }));
                }
                Err(d) => return stopped().ok_or(d),
            }
        }
        drop(loaded);
        if let Some(code) = stopped() {
            return Ok(code);
        }
        say!(
            "qbuild: watching {} file(s) and {} folder(s); Ctrl-C to stop",
            want.files.len(),
            want.trees.len()
        );
        emit(
            serde_json::json!({ "event": "watching", "files": want.files.len(), "folders": want.trees.len() }),
        );
        // Wait for a change that matters; then let the burst settle. A burst after which
        // every watched path is as it was before the build is no change.
        loop {
            if let Some(end) = wait_for_change(&rx, &want, &s.workdir) {
                return end;
            }
            settle(&rx, &want, &s.workdir);
            if before.is_none() || fingerprint(&want) != before {
                break;
            }
        }
        say!("qbuild: change seen; rebuilding");
        emit(serde_json::json!({ "event": "rebuilding" }));
    }
}

type Events = mpsc::Receiver<notify::Result<notify::Event>>;

/// Block until an event that matters to `want` comes; `Some` ends the watch (a signal,
/// or the watcher gone).
fn wait_for_change(
    rx: &Events,
    want: &Interest,
    workdir: &Path,
) -> Option<Result<i32, Diagnostic>> {
    loop {
        if let Some(code) = stopped() {
            return Some(Ok(code));
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(ev)) if relevant(&ev, want, workdir) => return None,
            Ok(Ok(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Err(e)) => say!("qbuild: warning: watch error: {e}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Some(Err(Diagnostic::plain("the file watcher stopped")));
            }
        }
    }
}

/// Let a burst of changes settle: until QUIET passes with no event that matters, at most
/// SETTLE_MAX. Only changes that matter extend the quiet time (a log written beside the
/// sources, or a file read over and over, would otherwise hold the rebuild back forever).
fn settle(rx: &Events, want: &Interest, workdir: &Path) {
    let t0 = std::time::Instant::now();
    let mut last = t0;
    while let Some(left) = QUIET.checked_sub(last.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(Ok(ev)) if relevant(&ev, want, workdir) => {
                last = std::time::Instant::now();
                if t0.elapsed() > SETTLE_MAX {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

fn relevant(ev: &notify::Event, want: &Interest, workdir: &Path) -> bool {
    if matches!(ev.kind, EventKind::Access(_) | EventKind::Other) {
        return false;
    }
    let state = crate::state_dir(workdir);
    ev.paths.iter().any(|p| {
        if p.starts_with(&state) {
            return false;
        }
        // One folder watched under two names (`store/current/x` and `store/v1/y`) is one
        // inotify watch, whose events all come under one of the names: judge a path by
        // its folder's real place too.
        want.wants(p)
            || crate::clean::real_path(p).is_some_and(|real| real != *p && want.wants(&real))
    })
}
