//! qbuild: an incremental build system for the QAIRT LLM compile pipeline; `run` is the whole program behind a thin `main`.

// Every message goes through `say!`: `eprintln!` panics when stderr is gone.
#![warn(clippy::print_stderr, clippy::print_stdout)]

/// Print a line to stderr, or drop it if stderr is gone (`qbuild 2>&1 | head`): unlike
/// `eprintln!`, which panics there, a run whose reader left still finishes and records its
/// work, as it does when progress lines cannot be written.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod artifact;
pub mod clean;
pub mod cli;
pub mod db;
pub mod diag;
pub mod exec;
pub mod expand;
pub mod graph;
pub mod hash;
pub mod journal;
pub mod lock;
pub mod progress;
pub mod qairtfile;
pub mod stale;
pub mod toolchain;
pub mod watch;
pub mod work;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use clap::Parser;

use crate::diag::Diagnostic;
use crate::graph::Graph;

/// Exit codes.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_BAD_INPUT: i32 = 2;

/// Parse a Qairtfile into a checked graph; diagnostics name the file as `shown`.
pub fn load_graph(path: &Path, shown: &Path) -> Result<Graph, Diagnostic> {
    let q = qairtfile::load(path, shown)?;
    // The Qairtfile sits in the work folder.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let roots = expand::WorkRoots::of(dir.unwrap_or(Path::new(".")));
    let model = expand::expand_in(&q, Some(&roots))?;
    Graph::build(model)
}

/// The whole program; returns the exit code.
pub fn run() -> i32 {
    // First: the opening scan may hash on another thread before anything else is set up.
    // SAFETY: the handler only writes and exits, both async-signal-safe. (Rust's own
    // SIGBUS handler watches for stack overflows, which Linux reports as SIGSEGV.)
    unsafe {
        libc::signal(
            libc::SIGBUS,
            on_bus_error as *const () as libc::sighandler_t,
        );
    }
    // Before any thread starts: every command inherits the run's token.
    exec::mark_environment();
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) => return refused_arguments(&e),
    };
    let json = args.json;
    match run_args(args) {
        Ok(code) => code,
        Err(e) => {
            say!("{e}");
            // A script reading --json learns why nothing ran, not only the exit status.
            error_event(json, &e.message, &e.position(), e.hint.as_deref());
            EXIT_BAD_INPUT
        }
    }
}

/// The `--json` event before exit status 2.
fn error_event(json: bool, error: &str, at: &str, hint: Option<&str>) {
    json_emitter(json)(serde_json::json!({
        "event": "error",
        "error": error,
        "at": at,
        "hint": hint,
        "exit": EXIT_BAD_INPUT,
    }));
}

/// Arguments clap did not accept (or `--help` / `--version`): clap's own message, and with
/// `--json` among the arguments, the same `error` event as any other refusal.
fn refused_arguments(e: &clap::Error) -> i32 {
    let _ = e.print();
    if !e.use_stderr() {
        return 0; // --help, --version
    }
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    error_event(
        json,
        first.strip_prefix("error: ").unwrap_or(first),
        "",
        None,
    );
    EXIT_BAD_INPUT
}

/// qbuild's current folder, read once: it changes only at `-C`, before anything asks.
pub(crate) fn current_dir() -> Option<&'static Path> {
    static CWD: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    CWD.get_or_init(|| std::env::current_dir().ok()).as_deref()
}

/// Where qbuild keeps its state for the work folder `workdir`: `.qbuild/` inside it.
pub fn state_dir(workdir: &Path) -> PathBuf {
    workdir.join(".qbuild")
}

fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    PathBuf::from(expand::normalize(&joined.to_string_lossy()))
}

/// Where this run works: resolved once from the arguments.
pub struct Session {
    pub args: cli::Args,
    /// The folder qbuild was started in (target paths may be relative to it).
    pub cwd: PathBuf,
    /// The Qairtfile, absolute.
    pub file: PathBuf,
    pub workdir: PathBuf,
    /// A dry run that reads the state without the lock and writes nothing: beside another
    /// qbuild's build, or in a folder it cannot write. Decided once the state is opened.
    pub lock_free: std::cell::Cell<bool>,
}

/// A loaded Qairtfile: the graph, the jobs the targets need, the verified toolchain.
pub struct Loaded {
    pub graph: Graph,
    pub jobs: Vec<graph::JobId>,
    /// `None` without a `[toolchain]`, and in a mode that needs none (`needs_toolchain`).
    pub toolchain: Option<toolchain::Verified>,
}

impl Session {
    /// Whether this run needs the `[toolchain]` verified: a build, `-n`, `--status`,
    /// `--watch` and `--check` do (its version is part of the keys that decide what is
    /// stale). `--list`, `--graph`, `--clean` and `--clean-dead` run no tool and compare no
    /// key (clean goes by job ids, which hash only output paths, and by the recorded
    /// output hashes), so a user who removed an SDK can still list and clean.
    pub fn needs_toolchain(&self) -> bool {
        let a = &self.args;
        a.check || !(a.list || a.graph || a.clean || a.clean_dead)
    }

    /// Parse, expand and check the Qairtfile; resolve the targets; verify the toolchain
    /// if this mode needs it.
    pub fn load(&self) -> Result<Loaded, Diagnostic> {
        let t = std::time::Instant::now();
        let graph = load_graph(&self.file, &self.args.file)?;
        graph.check_names(&self.workdir)?;
        work::phase("load Qairtfile", t);
        let targets: Vec<(String, Option<std::ops::Range<usize>>)> =
            if !self.args.targets.is_empty() {
                self.args
                    .targets
                    .iter()
                    .map(|t| (t.clone(), None))
                    .collect()
            } else if !graph.model.default.is_empty() {
                graph
                    .model
                    .default
                    .iter()
                    .map(|s| (s.text.clone(), Some(s.span.clone())))
                    .collect()
            } else {
                vec![("all".to_string(), None)]
            };
        let jobs = graph.resolve_targets(&targets, &self.cwd, &self.workdir)?;
        self.check_trace_path(&graph)?;
        let toolchain = match &graph.model.toolchain {
            _ if !self.needs_toolchain() => None,
            Err(e) => return Err(e.clone()),
            Ok(Some(tc)) => Some(toolchain::verify(tc, &self.workdir, &graph.model.source)?),
            Ok(None) => None,
        };
        Ok(Loaded {
            graph,
            jobs,
            toolchain,
        })
    }

    /// `--trace FILE` may not name the Qairtfile, a file or folder of the build (or a path
    /// inside one), or anything in `.qbuild/`: the trace would overwrite it, even in a dry
    /// run. Checked before anything runs.
    fn check_trace_path(&self, graph: &Graph) -> Result<(), Diagnostic> {
        let Some(t) = &self.args.trace else {
            return Ok(());
        };
        let refuse = |what: String| {
            Err(
                Diagnostic::plain(format!("--trace {}: {what}", t.display()))
                    .with_hint("name a file outside the build's inputs and outputs"),
            )
        };
        let mut abs = absolute(t);
        // A link at the path (perhaps to a file not made yet) is written through: follow it.
        for _ in 0..40 {
            match std::fs::read_link(&abs) {
                Ok(text) => {
                    let next = abs.parent().unwrap_or(Path::new("/")).join(text);
                    abs = absolute(&next);
                }
                Err(_) => break,
            }
        }
        // Where the file is, or would be: through links on its folders too.
        let real = abs
            .canonicalize()
            .ok()
            .or_else(|| clean::real_path(&abs))
            .unwrap_or_else(|| abs.clone());
        if real
            == self
                .file
                .canonicalize()
                .unwrap_or_else(|_| self.file.clone())
        {
            return refuse("that is the Qairtfile, which the trace would overwrite".into());
        }
        let real_wd = self
            .workdir
            .canonicalize()
            .unwrap_or_else(|_| self.workdir.clone());
        let Ok(rel) = real.strip_prefix(&real_wd) else {
            return Ok(());
        };
        let rel = rel.to_string_lossy();
        if expand::in_state_folder(&rel) {
            return refuse(
                "that is in qbuild's state folder .qbuild/, which the trace would damage".into(),
            );
        }
        let hit = graph.files_at_and_above(&rel).next();
        match hit {
            Some((at, _)) if at == rel => {
                refuse("that is a file of the build, which the trace would overwrite".into())
            }
            Some((at, _)) => refuse(format!(
                "that is inside {at}, a folder of the build, which the trace would change"
            )),
            None => Ok(()),
        }
    }

    pub fn options(&self, toolchain: Option<&toolchain::Verified>) -> work::Options {
        let a = &self.args;
        work::Options {
            jobs: a.jobs.map(|n| n.get()),
            keep_going: a.keep_going,
            dry_run: a.dry_run || a.status,
            read_only: self.writes_nothing(),
            explain: a.explain || a.status,
            verbose: a.verbose,
            trace: a.trace.is_some(),
            toolchain: toolchain
                .map(|t| vec![(t.name.clone(), t.version.clone())])
                .unwrap_or_default(),
        }
    }

    /// Where qbuild keeps its state for this work folder.
    pub fn state_dir(&self) -> PathBuf {
        state_dir(&self.workdir)
    }

    /// See `lock_free`.
    pub fn writes_nothing(&self) -> bool {
        self.lock_free.get()
    }

    /// A dry run (`-n`, `--status`, `--clean -n`) where qbuild cannot write its state
    /// folder (or, without one, the work folder): it reads the state without the lock and
    /// writes nothing, as `ninja -n` does, instead of failing to open the lock.
    fn read_only_dry_run(&self) -> bool {
        use std::os::unix::ffi::OsStrExt;
        if !(self.args.dry_run || self.args.status) {
            return false;
        }
        let state_dir = self.state_dir();
        let probe = if state_dir.is_dir() {
            state_dir
        } else {
            self.workdir.clone()
        };
        let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: access(2) reads the NUL-terminated path we own.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) != 0 }
    }

    /// Run one build; if the state database proves unreadable, set it aside and build
    /// again from a fresh one (everything reruns; nothing untrustworthy is used).
    pub fn build(
        &self,
        loaded: &Loaded,
        db: &mut Option<db::Db>,
        pre: Option<work::Preloaded>,
    ) -> Result<(work::Summary, i32), Diagnostic> {
        let current = db
            .as_ref()
            .ok_or_else(|| Diagnostic::plain("internal: no state database"))?;
        match self.build_once(loaded, current, pre) {
            Err(BuildFailure::Corrupt(why)) if self.writes_nothing() => {
                say!("qbuild: warning: {why}; this dry run writes nothing, so it stays as it is and the answer is as if nothing had been built");
                // No such folder: an empty state, read without writing anything.
                let none = db::Db::reader(&self.state_dir().join("(unreadable)"));
                self.build_once(loaded, &none, None).map_err(|e| match e {
                    BuildFailure::Corrupt(w) => Diagnostic::plain(w),
                    BuildFailure::Other(d) => d,
                })
            }
            Err(BuildFailure::Corrupt(why)) => {
                let old = db
                    .take()
                    .ok_or_else(|| Diagnostic::plain("internal: no state database"))?;
                let mut warn = |m: String| say!("qbuild: warning: {m}");
                let fresh = old
                    .reset(&why, &mut warn)
                    .map_err(|e| Diagnostic::plain(e.to_string()))?;
                let out = self.build_once(loaded, &fresh, None);
                *db = Some(fresh);
                out.map_err(|e| match e {
                    BuildFailure::Corrupt(w) => {
                        Diagnostic::plain(format!("the fresh state database failed too: {w}"))
                    }
                    BuildFailure::Other(d) => d,
                })
            }
            Err(BuildFailure::Other(d)) => Err(d),
            Ok(r) => Ok(r),
        }
    }

    fn build_once(
        &self,
        loaded: &Loaded,
        db: &db::Db,
        pre: Option<work::Preloaded>,
    ) -> Result<(work::Summary, i32), BuildFailure> {
        let args = &self.args;
        let opts = self.options(loaded.toolchain.as_ref());
        let json = args.json;
        // (Not with -v, nor with --json lines on the same terminal: both write past a bar.)
        let to_terminal = json && std::io::stdout().is_terminal();
        let live = !(args.verbose || to_terminal);
        let mut progress = progress::for_terminal(json && !std::io::stderr().is_terminal(), live);
        let mut emit = json_emitter(json);
        // Opened before anything runs: a path that cannot be written is bad input (exit 2),
        // not a surprise after a long build.
        let trace = match &args.trace {
            Some(path) => Some(std::fs::File::create(path).map_err(|e| {
                BuildFailure::Other(Diagnostic::plain(format!(
                    "--trace {}: {e}",
                    path.display()
                )))
            })?),
            None => None,
        };
        let summary = match work::build(
            &loaded.graph,
            &self.workdir,
            db,
            &loaded.jobs,
            &opts,
            progress.as_mut(),
            &mut emit,
            pre,
        ) {
            Ok(s) => s,
            Err(work::WorkError::Corrupt(why)) => return Err(BuildFailure::Corrupt(why)),
            Err(e) => return Err(BuildFailure::Other(Diagnostic::plain(e.to_string()))),
        };
        progress.done();
        if let (Some(file), Some(path)) = (trace, &args.trace) {
            // The build is done and recorded: a trace that cannot be written is a warning.
            if let Err(e) = write_trace(file, &summary.spans) {
                say!("qbuild: warning: --trace {}: {e}", path.display());
            }
        }
        let status = if summary.interrupted.is_some() {
            "interrupted"
        } else if summary.ok() {
            "ok"
        } else {
            "failed"
        };
        emit(serde_json::json!({
            "event": "build_finished",
            "status": status,
            "ran": summary.ran,
            "up_to_date": summary.up_to_date,
            "failed": summary.failed,
            "interrupted": summary.interrupted_jobs,
            "skipped": summary.skipped,
            "not_started": summary.stopped,
            "would_run": summary.would_run,
            "hashed_bytes": summary.hashed_bytes,
        }));
        let verb = if args.status {
            "stale:"
        } else if opts.dry_run {
            "would run"
        } else {
            "ran"
        };
        let count = if opts.dry_run {
            summary.would_run
        } else {
            summary.ran
        };
        let mut line = format!("qbuild: {verb} {count}, {} up to date", summary.up_to_date);
        if summary.failed > 0 {
            line.push_str(&format!(", {} failed", summary.failed));
        }
        if summary.interrupted_jobs > 0 {
            line.push_str(&format!(", {} interrupted", summary.interrupted_jobs));
        }
        if summary.skipped > 0 {
            line.push_str(&format!(
                ", {} not run (a dependency failed)",
                summary.skipped
            ));
        }
        if summary.stopped > 0 {
            line.push_str(&format!(
                ", {} not started (the build stopped)",
                summary.stopped
            ));
        }
        // (Stopped before anything finished is not "nothing to do".)
        if count == 0
            && summary.failed + summary.interrupted_jobs + summary.stopped == 0
            && !opts.dry_run
        {
            line = format!("qbuild: nothing to do, {} up to date", summary.up_to_date);
        }
        if let Some(sig) = summary.interrupted {
            line.push_str(&format!("; stopped by {}", signal_name(sig)));
        }
        say!("{line}");
        let code = match summary.interrupted {
            Some(sig) => 128 + sig,
            None if summary.ok() => EXIT_OK,
            None => EXIT_FAILED,
        };
        Ok((summary, code))
    }

    /// Take the work-folder lock and open the state database.
    pub fn open_state(&self) -> Result<(lock::Lock, db::Db), Diagnostic> {
        open_state(&self.workdir, !self.args.no_wait)
    }
}

/// What `prefetch` hands over: the lock (not yet stamped), the state and its scan.
type Prefetched = Option<(lock::Lock, db::Db, work::Preloaded)>;

/// A build's lock, state and scan, fetched before the Qairtfile is loaded: on a second
/// thread while the main thread loads it (at 100k jobs the two take about as long, so a
/// no-op waits for the longer one instead of both), or right here when the state is small.
/// Only for a folder built before, with the lock free and nothing left running by a killed
/// qbuild; else (`None`) the build opens its state after loading. It writes nothing, so a
/// run that refuses its Qairtfile leaves no trace.
fn prefetch(workdir: PathBuf) -> Option<Fetch> {
    let state_dir = state_dir(&workdir);
    let snapshot = std::fs::metadata(state_dir.join("snapshot")).ok()?;
    if state_dir.join("running").exists() {
        return None;
    }
    let fetch = move || {
        let lock = lock::try_existing(&state_dir)?;
        let db = db::Db::new(&state_dir);
        let pre = work::preload(&workdir, &db, true);
        Some((lock, db, pre))
    };
    // Below this, loading the state and stat'ing its files takes about as long as a new
    // thread takes to start running here (~0.1-0.5 ms: it often waits for the main
    // thread's core): the demo's no-op (14 KB of snapshot) went from 2.69 to 2.27 ms in
    // line (200 rounds). At 160 KB (600 jobs) in line was 3% faster per round but the
    // thread had the best runs; at 1.6 MB (6,000 jobs) the thread saved 7%.
    const IN_LINE_BELOW: u64 = 32 << 10;
    Some(if snapshot.len() < IN_LINE_BELOW {
        Fetch::Done(Box::new(fetch()))
    } else {
        Fetch::Thread(std::thread::spawn(fetch))
    })
}

/// What `prefetch` started or already did.
enum Fetch {
    Thread(std::thread::JoinHandle<Prefetched>),
    Done(Box<Prefetched>),
}

impl Fetch {
    /// The prefetched state (`None` if the thread panicked or could not take the lock).
    fn join(self) -> Prefetched {
        match self {
            Fetch::Thread(h) => h.join().ok().flatten(),
            Fetch::Done(p) => *p,
        }
    }
}

/// Take the work-folder lock, stop what a killed qbuild left running, open the state.
fn open_state(workdir: &Path, wait: bool) -> Result<(lock::Lock, db::Db), Diagnostic> {
    open_state_unless_busy(workdir, wait)?.map_err(|who| {
        Diagnostic::plain(format!(
            "another qbuild{who} is building in {}; not waiting (--no-wait)",
            workdir.display()
        ))
    })
}

/// `open_state`, or (without `wait`) `Err(" (pid N)")` when another qbuild holds the lock.
pub(crate) fn open_state_unless_busy(
    workdir: &Path,
    wait: bool,
) -> Result<Result<(lock::Lock, db::Db), String>, Diagnostic> {
    let state_dir = state_dir(workdir);
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        match std::fs::symlink_metadata(&state_dir) {
            Ok(m) if !m.is_dir() => Diagnostic::plain(format!(
                "{} is not a folder, so qbuild cannot keep its state there",
                state_dir.display()
            ))
            .with_hint("move that file away (qbuild makes the folder itself)"),
            _ => Diagnostic::plain(format!("cannot create {}: {e}", state_dir.display())),
        }
    })?;
    let lock = match lock::acquire(&state_dir, wait) {
        Ok(l) => l,
        Err(lock::LockError::Busy(who)) => return Ok(Err(who)),
        Err(lock::LockError::Other(m)) => return Err(Diagnostic::plain(m)),
    };
    let (orphans, killed_run_outputs) = exec::reap_orphans(&state_dir);
    if orphans > 0 {
        say!("qbuild: stopped {orphans} command(s) left running by a qbuild that was killed");
    }
    let mut db = db::Db::new(&state_dir);
    db.killed_run_outputs = killed_run_outputs;
    Ok(Ok((lock, db)))
}

enum BuildFailure {
    Corrupt(String),
    Other(Diagnostic),
}

/// Writes one JSON object per line to stdout when `--json` is on.
pub fn json_emitter(json: bool) -> impl FnMut(serde_json::Value) {
    move |v: serde_json::Value| {
        if json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        }
    }
}

/// `$PWD` (the current folder as the shell names it, through any symlink) and the current
/// folder, if `$PWD` is indeed that folder.
pub(crate) fn shell_pwd() -> Option<(String, PathBuf)> {
    let pwd = std::env::var("PWD").ok()?;
    let here = std::env::current_dir().ok()?;
    (Path::new(&pwd).canonicalize().ok()? == here.canonicalize().ok()?).then_some((pwd, here))
}

/// `$PWD/d` (or `d`), normalised, if `$PWD` is the current folder as named by the shell.
fn logical_dir(d: &Path) -> Option<String> {
    let base = if d.is_absolute() {
        String::new()
    } else {
        shell_pwd()?.0
    };
    Some(expand::normalize(&format!("{base}/{}", d.display())))
}

fn run_args(args: cli::Args) -> Result<i32, Diagnostic> {
    // -C first: like make and ninja, every other path is then relative to DIR.
    for d in &args.dir {
        let logical = logical_dir(d);
        std::env::set_current_dir(d)
            .map_err(|e| Diagnostic::plain(format!("-C {}: {e}", d.display())))?;
        // As a shell's `cd` does: the folder as named (through any symlink) stays known,
        // to qbuild (`expand::WorkRoots`) and to the commands.
        if let Some(l) = logical {
            std::env::set_var("PWD", l);
        }
    }
    let cwd = std::env::current_dir()
        .map_err(|e| Diagnostic::plain(format!("cannot read the current folder: {e}")))?;
    // Paths are text in the graph, the state and every command line: a folder whose name
    // is not UTF-8 would be read under another name (a "no such file" about a file that
    // is there).
    let joined = cwd.join(&args.file);
    if joined.to_str().is_none() {
        return Err(Diagnostic::plain(format!(
            "the path of the Qairtfile, {}, is not valid UTF-8",
            joined.display()
        ))
        .with_hint("qbuild needs UTF-8 paths for the work folder; rename the folder"));
    }
    let file = absolute(&args.file);
    let workdir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let session = Session {
        args,
        cwd,
        file,
        workdir,
        lock_free: std::cell::Cell::new(false),
    };
    if session.args.watch {
        install_signal_handlers();
        return watch::run(&session);
    }
    let a = &session.args;
    let builds = !(a.check || a.list || a.graph || a.clean || a.clean_dead);
    let fetching = builds.then(|| prefetch(session.workdir.clone())).flatten();
    // The graph can be big and the process ends after this function: never freed piece by
    // piece (that was 5% of a 90k `--check`).
    let loaded = std::mem::ManuallyDrop::new(session.load()?);
    let (graph, args) = (&loaded.graph, &session.args);
    if args.check {
        check_sources(graph, &session.workdir)?;
        if let Some(v) = graph.model.unused_vars.first() {
            return Err(graph
                .model
                .source
                .error(
                    v.span.clone(),
                    format!("variable `{}` is never used", v.text),
                )
                .with_hint("remove it, or use it"));
        }
        // Valid, but a rule that makes nothing is usually a matrix or exclude gone wrong.
        let mut has_jobs = vec![false; graph.model.rules.len()];
        for j in &graph.jobs {
            has_jobs[j.spec.rule as usize] = true;
        }
        // (Rules of `links` alone have link jobs, so they count as any other.)
        for (r, _) in graph.model.rules.iter().zip(has_jobs).filter(|(_, h)| !h) {
            say!(
                "qbuild: note: rule `{}` has no jobs (its matrix is empty, or `exclude` removes every combination)",
                r.name
            );
        }
        say!(
            "qbuild: {} is valid: {} rules, {} jobs, {} files",
            args.file.display(),
            graph.model.rules.len(),
            graph.jobs.len(),
            graph.files.len()
        );
        return Ok(EXIT_OK);
    }
    if args.list {
        // Every job; with targets, what building them involves (as --graph shows).
        let want = if args.targets.is_empty() {
            vec![true; graph.jobs.len()]
        } else {
            graph.closure(&loaded.jobs)
        };
        if args.json {
            list_json(graph, &want);
        } else {
            print_list(graph, &want);
        }
        return Ok(EXIT_OK);
    }
    if args.graph {
        print_dot(graph, &loaded.jobs);
        return Ok(EXIT_OK);
    }
    let t = std::time::Instant::now();
    let (_lock, db, pre) = match fetching.and_then(Fetch::join) {
        Some((mut lock, db, pre)) => {
            lock.stamp(&session.state_dir());
            (Some(lock), db, Some(pre))
        }
        None if session.read_only_dry_run() => {
            session.lock_free.set(true);
            (None, db::Db::reader(&session.state_dir()), None)
        }
        // A dry run does not wait out a build in progress (it may take hours): it answers
        // from the state as that build has recorded it so far, taking no lock, writing
        // nothing (the snapshot is replaced by rename; a torn journal tail is ignored).
        None if args.dry_run || args.status => {
            match open_state_unless_busy(&session.workdir, false)? {
                Ok((lock, db)) => (Some(lock), db, None),
                Err(who) => {
                    say!("qbuild: another qbuild{who} is building here; this is the state it has recorded so far");
                    session.lock_free.set(true);
                    (None, db::Db::reader(&session.state_dir()), None)
                }
            }
        }
        None => {
            let (lock, db) = session.open_state()?;
            (Some(lock), db, None)
        }
    };
    work::phase("lock and open state", t);
    let mut db = Some(db);
    install_signal_handlers();
    if args.clean || args.clean_dead {
        // Without targets, --clean means everything; --clean-dead only what jobs no longer
        // in the Qairtfile made.
        let jobs: Vec<graph::JobId> = if args.clean_dead {
            Vec::new()
        } else if args.targets.is_empty() {
            (0..graph.jobs.len())
                .map(|i| graph::JobId(i as u32))
                .collect()
        } else {
            loaded.jobs.clone()
        };
        let db = db
            .as_ref()
            .ok_or_else(|| Diagnostic::plain("internal: no state database"))?;
        let dry = args.dry_run || args.status;
        let dead = match (args.clean_dead, args.targets.is_empty()) {
            (true, _) => clean::Dead::Remove,
            (false, true) => clean::Dead::Count,
            (false, false) => clean::Dead::Leave,
        };
        let done = clean::clean(graph, &session.workdir, db, &jobs, dead, dry)
            .map_err(|e| Diagnostic::plain(e.to_string()))?;
        if !done.dead_left.is_empty() {
            let shown: Vec<&str> = done.dead_left.iter().take(3).map(String::as_str).collect();
            say!(
                "qbuild: {} file(s) made by jobs no longer in this Qairtfile were left ({}{}); `qbuild --clean-dead` removes them",
                done.dead_left.len(),
                shown.join(", "),
                if done.dead_left.len() > 3 { ", ..." } else { "" }
            );
        }
        for (p, why) in &done.kept {
            say!("qbuild: kept {p}: {why}");
        }
        if done.unknown > 0 {
            say!(
                "qbuild: {} job(s) no longer in the Qairtfile left outputs qbuild cannot name (their records in .qbuild/state.sled are gone); those files, if any, stay",
                done.unknown
            );
        }
        if dry {
            for p in &done.removed {
                say!("qbuild: would remove {p}");
            }
            say!("qbuild: would remove {} output(s)", done.removed.len());
        } else if done.removed_dirs.is_empty() {
            say!("qbuild: removed {} output(s)", done.removed.len());
        } else {
            say!(
                "qbuild: removed {} output(s) and {} folder(s) they left empty",
                done.removed.len(),
                done.removed_dirs.len()
            );
        }
        return Ok(EXIT_OK);
    }
    let (_, code) = session.build(&loaded, &mut db, pre)?;
    Ok(code)
}

/// `--check`: every input is either written by some rule or exists on disk.
fn check_sources(g: &Graph, workdir: &Path) -> Result<(), Diagnostic> {
    // A folder that holds outputs, or a file inside a folder output, is made by the build.
    let made: rustc_hash::FxHashSet<graph::FileId> =
        g.holders.values().flatten().copied().collect();
    let missing = |f: &graph::FileId| {
        let file = &g.files[f.idx()];
        file.producer.is_none()
            && !made.contains(f)
            && std::fs::symlink_metadata(workdir.join(&file.path)).is_err()
    };
    for job in &g.jobs {
        let rule = &g.model.rules[job.spec.rule as usize];
        for (i, f) in job.ins.iter().enumerate() {
            if missing(f) {
                let t = job.spec.input_template.get(i).copied().unwrap_or(0);
                return Err(g
                    .model
                    .source
                    .error(
                        rule.input_span(t),
                        format!(
                            "input `{}` of `{}` does not exist and no rule writes it",
                            g.files[f.idx()].path,
                            job.spec.label
                        ),
                    )
                    .with_hint("create it, fix the path, or add a rule whose outputs include it"));
            }
            if g.files[f.idx()].producer.is_none() {
                if let Some(why) = work::source_link_to_output(g, workdir, g.path(*f)) {
                    let t = job.spec.input_template.get(i).copied().unwrap_or(0);
                    return Err(g.model.source.error(
                        rule.input_span(t),
                        format!("input of `{}`: {why}", job.spec.label),
                    ));
                }
            }
        }
        for f in &job.order {
            if missing(f) {
                let span = job
                    .spec
                    .input_template
                    .first()
                    .and_then(|li| rule.links.get(*li as usize))
                    .map_or(rule.name_span.clone(), |(_, to)| to.span.clone());
                return Err(g
                    .model
                    .source
                    .error(
                        span,
                        format!(
                            "`{}` points at `{}`, which does not exist and no rule writes",
                            job.outs.first().map_or("", |o| g.path(*o)),
                            g.files[f.idx()].path
                        ),
                    )
                    .with_hint("a link must point at a file or folder that exists or is built"));
            }
        }
    }
    Ok(())
}

extern "C" fn on_signal(sig: libc::c_int) {
    work::INTERRUPT.store(sig, Ordering::SeqCst);
}

/// A big file is hashed through a memory map; if it shrinks meanwhile (a model export
/// rewritten during a build), reading the pages past its new end raises SIGBUS, which
/// killed qbuild with a bare "Bus error". Say what happened instead, then end: no
/// unfinished job is recorded, and the next run stops any command still running.
extern "C" fn on_bus_error(_: libc::c_int) {
    const MSG: &[u8] =
        b"\nqbuild: error: a file shrank or vanished while it was being hashed (SIGBUS); \
stopping. Nothing unfinished is recorded: run qbuild again (it stops any command left running).\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(EXIT_FAILED);
    }
}

/// Ctrl-C, SIGTERM and SIGHUP stop the build cleanly, unless qbuild was started with the
/// signal ignored: `nohup qbuild` must survive the hang-up, and a background job of a
/// non-interactive shell ignores Ctrl-C (make leaves such signals ignored too).
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction(2) with a null new action only reads the disposition into a
        // zeroed struct we own; the handler only stores into an atomic (async-signal-safe).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// A Chrome trace-event file (Perfetto, chrome://tracing): one complete event per job.
fn write_trace(mut file: std::fs::File, spans: &[work::Span]) -> std::io::Result<()> {
    let events: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.label,
                "cat": s.rule,
                "ph": "X",
                "ts": s.start_us,
                "dur": s.dur_us,
                "pid": 1,
                "tid": s.slot,
                "args": { "ok": s.ok },
            })
        })
        .collect();
    let doc = serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" });
    file.write_all(doc.to_string().as_bytes())
}

fn print_list(g: &Graph, want: &[bool]) {
    let mut out = std::io::stdout().lock();
    // With targets, rules none of whose jobs are involved are left out.
    let some = want.iter().any(|w| !w);
    for (ri, r) in g.model.rules.iter().enumerate() {
        let jobs: Vec<&graph::Job> = g
            .jobs
            .iter()
            .enumerate()
            .filter(|(i, j)| want[*i] && j.spec.rule as usize == ri)
            .map(|(_, j)| j)
            .collect();
        if jobs.is_empty() && some {
            continue;
        }
        let _ = writeln!(
            out,
            "{} ({} job{}{})",
            r.name,
            jobs.len(),
            if jobs.len() == 1 { "" } else { "s" },
            if r.manual {
                ", manual: not in `all`"
            } else {
                ""
            }
        );
        for j in jobs {
            let _ = writeln!(out, "  {}", j.spec.label);
            for o in &j.outs {
                let _ = writeln!(out, "    {}", g.path(*o));
            }
        }
    }
}

/// `--list --json`: one `target` event per job, in the Qairtfile's order, with the fields
/// `would_run` uses (`rule`, `job`, `outputs`) plus its `inputs`. A link's inputs are the
/// file it points at: it is not part of the link's key (`order`), but the link waits for
/// it, and a tool that rebuilds the graph from this list needs that edge as `--graph`
/// draws it.
fn list_json(g: &Graph, want: &[bool]) {
    let mut emit = json_emitter(true);
    for (j, _) in g.jobs.iter().zip(want).filter(|(_, w)| **w) {
        emit(serde_json::json!({
            "event": "target",
            "rule": g.model.rules[j.spec.rule as usize].name,
            "manual": g.model.rules[j.spec.rule as usize].manual,
            "job": j.spec.label,
            "outputs": j.outs.iter().map(|f| g.path(*f)).collect::<Vec<_>>(),
            "inputs": j.ins.iter().chain(&j.order).map(|f| g.path(*f)).collect::<Vec<_>>(),
        }));
    }
}

fn print_dot(g: &Graph, targets: &[graph::JobId]) {
    let want = g.closure(targets);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "digraph qbuild {{\n  rankdir=LR;\n  node [shape=box, fontsize=10];"
    );
    for (i, j) in g.jobs.iter().enumerate() {
        if want[i] {
            let _ = writeln!(out, "  j{i} [label={:?}];", j.spec.label);
        }
    }
    for (i, j) in g.jobs.iter().enumerate() {
        if want[i] {
            for d in &j.deps {
                let _ = writeln!(out, "  j{} -> j{i};", d.0);
            }
        }
    }
    let _ = writeln!(out, "}}");
}

/// The name of a signal that stops a build, for messages.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
