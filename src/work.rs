//! The scheduler: decides, in dependency order, which wanted jobs are stale, runs them in parallel within `-j` and pool limits, and records results.
//!
//! Job states and their transitions (all through [`Work::settle`] / [`Work::queue`]):
//! `Waiting` (some dependency unsettled) → `Ready` (all dependencies settled; prereq for the
//! staleness check) → either `UpToDate`, `WouldRun` (dry run), `Skipped` (a dependency failed),
//! or `Queued` (stale; waits for a slot and its pool) → `Running` → `Ran` or `Failed`.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde_json::json;

use crate::artifact::{link_identity, settle_racy, Art, Artifacts};
use crate::db::{job_id, Db, DbError, JobRecord};
use crate::exec::{self, Outcome, Running};
use crate::graph::{Graph, JobId};
use crate::hash::{hash_link, Hash, HashStats, StatEntry, StatKey};
use crate::progress::{End, Progress};
use crate::stale::{action_text, decide, KeyParts, OwnedKeyParts, Reason};

/// With `QBUILD_TIMING` set, print how long each phase of a run took (for profiling).
pub fn phase(what: &str, since: Instant) {
    if std::env::var_os("QBUILD_TIMING").is_some() {
        // Resident memory from /proc/self/statm (pages), to see which phase holds what.
        let rss_mb = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * 4096 / 1_000_000);
        say!(
            "qbuild: timing: {what}: {:.1} ms, rss {rss_mb} MB",
            since.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Set by the signal handler: the signal that asks the build to stop (0 = none).
pub static INTERRUPT: AtomicI32 = AtomicI32::new(0);

#[derive(Debug, Clone)]
pub struct Options {
    /// `-j`; `None`: one per CPU, which is asked only once a job runs (reading the cgroup
    /// quota costs a dozen syscalls, a no-op's largest single item after the stats).
    pub jobs: Option<usize>,
    pub keep_going: bool,
    pub dry_run: bool,
    /// A dry run without the lock (beside another build, or in a work folder qbuild cannot
    /// write): nothing is written at the end (refreshed stats are dropped).
    pub read_only: bool,
    pub explain: bool,
    pub verbose: bool,
    /// Keep a span per job for `--trace` (not kept otherwise: ~100 B a job).
    pub trace: bool,
    pub toolchain: Vec<(String, String)>,
}

impl Options {
    /// How many jobs may run at once.
    pub fn jobs(&self) -> usize {
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        self.jobs.unwrap_or_else(|| {
            *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        })
    }
}

/// One finished job for `--trace`: when (µs since the build started), how long, which slot.
#[derive(Debug, Clone)]
pub struct Span {
    pub label: String,
    pub rule: String,
    pub start_us: u64,
    pub dur_us: u64,
    pub slot: usize,
    pub ok: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub spans: Vec<Span>,
    pub ran: usize,
    pub up_to_date: usize,
    pub failed: usize,
    /// Jobs stopped by the interrupt (Ctrl-C, SIGTERM, SIGHUP) while they ran: not
    /// failures of their own, and their dependents count as not started.
    pub interrupted_jobs: usize,
    pub skipped: usize,
    /// Wanted jobs never started because the build stopped early (a failure without
    /// `-k`, or a signal), none downstream of a failure: those are `skipped`.
    pub stopped: usize,
    pub would_run: usize,
    pub hashed_bytes: u64,
    /// The signal that interrupted the build, if any.
    pub interrupted: Option<i32>,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.interrupted.is_none()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Io(String),
    #[error("the state database is unreadable: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Ready,
    Queued,
    Running,
    UpToDate,
    Ran,
    WouldRun,
    Failed,
    /// Stopped by the interrupt while it ran.
    Interrupted,
    Skipped,
}

/// What is known now of a file's content.
#[derive(Debug, Clone, PartialEq)]
enum Now {
    Unknown,
    Missing,
    Have(Art),
    /// Dry run: its producer would run, so its content is not known.
    WillRebuild,
    Error(String),
}

struct Done {
    job: JobId,
    /// False when a worker found the build stopping and never started the job.
    ran: bool,
    /// Which worker ran it (the job's track in `--trace`).
    slot: usize,
    result: io::Result<Outcome>,
    outputs: Vec<io::Result<Option<Art>>>,
    stats: Vec<(String, StatEntry)>,
    /// Each output's stat before the job ran, for cleaning up after a failure.
    before: Vec<Option<StatKey>>,
    started: Instant,
    /// The wall clock (the fine one: a timestamp may run ahead of the coarse clock by a
    /// tick) as the command started; 0 if it never started.
    started_ns: i64,
    took: Duration,
    /// The log on disk is an earlier run's: it could not be removed (a `logs` folder qbuild
    /// may not write), so it must not be shown as this run's.
    stale_log: bool,
}

struct Work<'a> {
    g: &'a Graph,
    workdir: PathBuf,
    db: &'a Db,
    opts: &'a Options,
    progress: &'a mut dyn Progress,
    events: &'a mut dyn FnMut(serde_json::Value),
    /// Database id of each wanted job (`db::job_id` of its outputs).
    ids: Vec<Hash>,
    /// The stat cache and job records as loaded, updated as jobs finish.
    db_state: crate::db::State,
    /// Whether the journal is to be folded into a new snapshot at the end: it held job
    /// records or grew large (`Db::compaction_due`), this run recorded a job, or it has
    /// `dead` entries to drop.
    compact: bool,
    /// Stat-cache paths to drop when the state is folded (sorted): gone and not in the graph.
    dead: Vec<String>,
    state: Vec<State>,
    pending: Vec<u32>,
    now: Vec<Now>,
    ready: VecDeque<JobId>,
    queued: VecDeque<JobId>,
    /// Key and readable key of each queued/running job, to record on success.
    keys: HashMap<JobId, (Hash, OwnedKeyParts)>,
    pool_used: Vec<usize>,
    running: usize,
    total: usize,
    stopping: bool,
    summary: Summary,
    stat_updates: Vec<(String, StatEntry)>,
    /// The stat of each file output written by this build, as recorded: a reader that
    /// finishes later checks the file still has it.
    written: rustc_hash::FxHashMap<String, StatKey>,
    procs: Running,
    stats: Arc<HashStats>,
    t0: Instant,
    /// See `Preloaded::began_ns`.
    began_ns: i64,
    /// Jobs decided up to date before the build started (see `decide_fresh`).
    fresh: Vec<bool>,
    /// Output folders created (or found) this build.
    made_dirs: std::collections::HashSet<PathBuf>,
    /// For explanations: each output of a recorded job no longer in the Qairtfile, with
    /// that job's outputs (read once, when a job first turns out never built).
    dead_outputs: Option<rustc_hash::FxHashMap<String, Vec<String>>>,
    /// Tells workers to hand queued jobs back unstarted.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Sum of the recorded durations of queued and running jobs, for the ETA.
    expected_ms: u64,
    expected_known: usize,
    expected_of: HashMap<JobId, u64>,
    /// Folders known to lie inside (or outside) the work folder.
    inside: crate::clean::Inside,
    /// Hands jobs to the worker threads.
    pool: Option<Pool>,
}

/// How long a map must be for [`map_range`] to run it on rayon's threads.
const PARALLEL_FROM: usize = 2048;

/// `(0..n).map(f)`, on rayon's threads when `n` is large enough to pay for them (a small
/// build never starts the pool, whose idle threads spin).
fn map_range<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if n < PARALLEL_FROM {
        (0..n).map(f).collect()
    } else {
        (0..n).into_par_iter().map(f).collect()
    }
}

fn scan_one(arts: &Artifacts, path: &str, hint: Option<Option<&StatEntry>>) -> Now {
    match arts.current_art_hinted(path, hint) {
        Ok(Some(a)) => Now::Have(a),
        Ok(None) => Now::Missing,
        Err(e) => Now::Error(e.to_string()),
    }
}

/// What the opening scan makes of a file the stat cache knows: its cached hash if its stat
/// says it is unchanged, else `Unknown`. A changed file is hashed later, and only if a job
/// the targets need reads or writes it (another variant's files sharing the state, a
/// dropped input, an artifact outside the targets: never read for nothing).
fn scan_stat(arts: &Artifacts, path: &str, entry: &StatEntry) -> Now {
    match fs::symlink_metadata(arts.fs_path(path)) {
        Ok(m) if m.is_file() && entry.trusted(&StatKey::from_meta(&m, 0)) => Now::Have(Art {
            content: entry.hash,
            ident: entry.hash,
        }),
        Ok(_) => Now::Unknown,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Now::Missing,
        Err(e) => Now::Error(e.to_string()),
    }
}

/// The state and a scan of every file it knows, read before the graph is needed (a no-op
/// runs this on a second thread while the Qairtfile is expanded).
pub struct Preloaded {
    state: Result<crate::db::State, WorkError>,
    /// What each path of the state's stat cache is now, in the cache's order.
    scan: Vec<Now>,
    /// Stat-cache entries the scan refreshed.
    updates: Vec<(String, StatEntry)>,
    stats: Arc<HashStats>,
    /// The coarse clock before any file was looked at: a source changed after it may not
    /// be what its hash says.
    began_ns: i64,
}

/// Load the state (a store that errors or panics while being read is corrupt: the caller
/// sets it aside and starts fresh) and, with `scan`, stat every file it knows.
pub fn preload(workdir: &Path, db: &Db, scan: bool) -> Preloaded {
    let t = Instant::now();
    let began_ns = crate::hash::coarse_now_ns();
    let stats = Arc::new(HashStats::default());
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| db.load()));
    let state = match loaded {
        Ok(Ok(st)) => Ok(st),
        Ok(Err(e)) if e.is_corruption() => Err(WorkError::Corrupt(e.to_string())),
        Ok(Err(e)) => Err(WorkError::Db(e)),
        Err(_) => Err(WorkError::Corrupt("reading it panicked".into())),
    };
    let (mut found, mut updates) = (Vec::new(), Vec::new());
    if let (true, Ok(st)) = (scan, &state) {
        let arts = Artifacts::new(workdir, &st.stat, &stats);
        // On rayon's threads: while the main thread expands the Qairtfile they share the
        // other core; once it is done, they have both.
        let entries = st.stat.entries();
        found = map_range(entries.len(), |i| {
            scan_stat(&arts, &entries[i].0, &entries[i].1)
        });
        updates = arts.take_updates();
        phase("preload state and scan", t);
    }
    Preloaded {
        state,
        scan: found,
        updates,
        began_ns,
        stats,
    }
}

/// The readable key of job `j` from its inputs' contents.
fn key_parts<'a>(
    g: &'a Graph,
    j: JobId,
    inputs: Vec<(Cow<'a, str>, Hash)>,
    toolchain: &'a [(String, String)],
) -> KeyParts<'a> {
    let job = &g.jobs[j.idx()];
    // What judges the result is part of it: a stricter `check`, or `allow_empty` dropped,
    // must fail where a clean build would (appended only when set, so that other jobs'
    // keys stay as they were).
    let mut action = action_text(&job.spec.action);
    if !matches!(job.spec.action, crate::expand::Action::Link(_)) {
        if let Some(c) = &job.spec.check {
            action = Cow::Owned(format!("{action}\n# check: {c}"));
        }
        if job.spec.allow_empty {
            action = Cow::Owned(format!("{action}\n# allow_empty"));
        }
    }
    KeyParts {
        action,
        env: Cow::Borrowed(&job.spec.env),
        toolchain: Cow::Borrowed(if job.spec.toolchain { toolchain } else { &[] }),
        inputs,
        outputs: job.outs.iter().map(|f| Cow::Borrowed(g.path(*f))).collect(),
    }
}

/// Each output's identity now (`None`: missing or unreadable).
fn outputs_now(job: &crate::graph::Job, now: &[Now]) -> Vec<Option<Hash>> {
    job.outs
        .iter()
        .map(|f| match &now[f.idx()] {
            Now::Have(a) => Some(a.ident),
            _ => None,
        })
        .collect()
}

/// Which wanted jobs are up to date as the files are now, decided for all jobs in parallel
/// before the build starts, by the same `decide` the scheduler uses. The scheduler trusts
/// such a decision only while none of the job's dependencies has run (then its inputs are
/// still what was decided on). Jobs reading a link's output are left to the scheduler, which
/// recomputes a link's content from its target.
fn decide_fresh(
    g: &Graph,
    want: &[bool],
    now: &[Now],
    ids: &[Hash],
    records: &rustc_hash::FxHashMap<Hash, crate::db::JobRecord>,
    toolchain: &[(String, String)],
) -> Vec<bool> {
    map_range(g.jobs.len(), |i| {
        let job = &g.jobs[i];
        if !want[i] {
            return false;
        }
        let Some(record) = records.get(&ids[i]) else {
            return false;
        };
        let mut inputs = Vec::with_capacity(job.ins.len());
        for f in &job.ins {
            let from_link = g.files[f.idx()]
                .producer
                .is_some_and(|p| matches!(g.jobs[p.idx()].spec.action, Action::Link(_)));
            match &now[f.idx()] {
                Now::Have(a) if !from_link => inputs.push((Cow::Borrowed(g.path(*f)), a.content)),
                _ => return false,
            }
        }
        let parts = key_parts(g, JobId(i as u32), inputs, toolchain);
        let d = decide(
            &parts,
            &parts.key(),
            Some(record),
            &mut || outputs_now(job, now),
            &mut || None,
            false,
        );
        !d.stale
    })
}

/// If the source `rel` is a symlink to a path some job writes (or into a folder a job
/// writes), directly or through more links, why that cannot work.
pub fn source_link_to_output(g: &Graph, workdir: &Path, rel: &str) -> Option<String> {
    let mut link = workdir.join(rel);
    // Most sources are no link: one readlink answers for them (`--check` asks for each).
    let mut text = fs::read_link(&link).ok()?;
    let root = workdir.canonicalize().ok()?;
    // A chain of links, as the kernel follows it (at most 40 hops).
    for _ in 0..40 {
        // From the link's real folder: a `..` in the text leaves the folder the link is
        // really in, whatever links led to it.
        let target = link.parent()?.canonicalize().ok()?.join(&text);
        let normal = PathBuf::from(crate::expand::normalize(&target.to_string_lossy()));
        // A hop outside the work folder (shared storage) may lead back in: follow on. The
        // text may name the work folder another way (a link to it): its folder's real path.
        let inside = normal
            .strip_prefix(&root)
            .ok()
            .map(Path::to_path_buf)
            .or_else(|| {
                let real = crate::clean::real_path(&normal)?;
                real.strip_prefix(&root).ok().map(Path::to_path_buf)
            });
        if let Some(inside) = inside.as_deref() {
            let key = inside.to_string_lossy().into_owned();
            let mut at = Some(inside);
            while let Some(p) = at.filter(|p| !p.as_os_str().is_empty()) {
                let f = g.by_path.get(&g.files, &p.to_string_lossy());
                if let Some(j) = f.and_then(|f| g.files[f.idx()].producer) {
                    return Some(format!(
                        "{rel} is a symlink to {key}, which `{}` writes; jobs are ordered by the paths they declare, so make the link with `links = [...]` on that rule, or read {key} directly",
                        g.jobs[j.idx()].spec.label
                    ));
                }
                at = p.parent();
            }
        }
        text = fs::read_link(&normal).ok()?;
        link = normal;
    }
    None
}

/// Build the given targets. Returns what happened; errors are only for qbuild's own state.
#[allow(clippy::too_many_arguments)]
pub fn build(
    g: &Graph,
    workdir: &Path,
    db: &Db,
    targets: &[JobId],
    opts: &Options,
    progress: &mut dyn Progress,
    events: &mut dyn FnMut(serde_json::Value),
    pre: Option<Preloaded>,
) -> Result<Summary, WorkError> {
    let t = Instant::now();
    let want = g.closure(targets);
    let total = want.iter().filter(|w| **w).count();
    let pre = match pre {
        Some(p) => p,
        None => preload(workdir, db, false),
    };
    let Preloaded {
        state: state_db,
        scan,
        updates: scan_updates,
        stats,
        began_ns,
    } = pre;
    let state_db = state_db?;
    let compact = db.compaction_due();
    phase("load state", t);
    let t = Instant::now();
    // Every file a wanted job touches, hashed (through the stat cache) in parallel.
    let mut touched = vec![false; g.files.len()];
    for (j, job) in g.jobs.iter().enumerate() {
        if want[j] {
            for f in job.ins.iter().chain(&job.outs).chain(&job.order) {
                touched[f.idx()] = true;
            }
        }
    }
    let scanned = |key: &str| match state_db.stat.position(key).and_then(|k| scan.get(k)) {
        Some(Now::Have(a)) => Some(a.content),
        _ => None,
    };
    let arts = Artifacts::new(workdir, &state_db.stat, &stats).before_build(&scanned);
    let look = |i: usize| {
        if !touched[i] {
            return Now::Unknown;
        }
        let path = &g.files[i].path;
        // One search of the cache: its position finds the scan's result, or tells the
        // hashing which entry to trust.
        let at = state_db.stat.position(path);
        match at.and_then(|k| scan.get(k)) {
            Some(s) if !matches!(s, Now::Unknown) => s.clone(),
            _ => scan_one(&arts, path, Some(at.map(|k| &state_db.stat.entries()[k].1))),
        }
    };
    // A short map that will hash a big file again (one this build may need, that the scan
    // found changed and that was big when last hashed: a touched model) runs in order on
    // one of rayon's threads, as b3sum does, so that each file's hash splits across the
    // pool from inside it. From this thread, each file was handed to the pool, which went
    // idle between files: 64 touched files of 8 MiB took 1.2x b3sum's time, with 20x its
    // context switches. A no-op, or a touch of small files only, never starts the pool.
    // (Files never hashed, in a first build, are not looked for: which of them are big
    // files, not folders or links, would take a stat of each on every run.)
    let n = g.files.len();
    let big_hash_likely = || {
        scan.iter().zip(state_db.stat.entries()).any(|(s, (p, e))| {
            // (A path the graph does not name is a file inside a folder input, or a
            // link's target: counted too.)
            matches!(s, Now::Unknown)
                && e.stat.size >= crate::hash::MMAP_THRESHOLD
                && g.by_path.get(&g.files, p).is_none_or(|f| touched[f.idx()])
        })
    };
    let mut now: Vec<Now> = if n < PARALLEL_FROM && big_hash_likely() {
        rayon::scope(|_| (0..n).map(look).collect())
    } else {
        map_range(n, look)
    };
    // A source that is a symlink (a link's identity is not its content) to what a job
    // writes would need that job to run first, but jobs are ordered by the paths they
    // declare: its readers fail, naming the link, instead of reading a stale target.
    for (i, f) in g.files.iter().enumerate() {
        let link = match &now[i] {
            Now::Have(a) => a.ident != a.content,
            Now::Error(_) => true,
            _ => false,
        };
        if link && f.producer.is_none() {
            if let Some(why) = source_link_to_output(g, workdir, &f.path) {
                now[i] = Now::Error(why);
            }
        }
    }
    // Cache entries of files that are gone and no longer in the graph (a renamed job's old
    // outputs, once deleted): each would cost every later run a stat. Dropped at this run's
    // end, as ninja's log recompaction drops dead paths; entries of files still on disk stay.
    let dead: Vec<String> = scan
        .iter()
        .zip(state_db.stat.entries())
        .filter(|(s, (p, _))| matches!(s, Now::Missing) && g.by_path.get(&g.files, p).is_none())
        .map(|(_, (p, _))| p.clone())
        .collect();
    let mut stat_updates = scan_updates;
    stat_updates.extend(arts.take_updates());
    drop(arts);
    drop(scan);
    phase("stat and hash", t);

    let mut state = vec![State::Skipped; g.jobs.len()];
    let mut pending = vec![0u32; g.jobs.len()];
    let mut ready = VecDeque::new();
    // Jobs with no dependencies start ready, in declaration order.
    for j in (0..g.jobs.len()).map(|i| JobId(i as u32)) {
        if !want[j.idx()] {
            continue;
        }
        let n = g.jobs[j.idx()].deps.len() as u32;
        pending[j.idx()] = n;
        state[j.idx()] = if n == 0 { State::Ready } else { State::Waiting };
        if n == 0 {
            ready.push_back(j);
        }
    }
    // Each wanted job's database id, computed once (they are looked up again and again).
    let ids: Vec<Hash> = map_range(g.jobs.len(), |i| {
        if want[i] {
            // Straight from the file table: no vector of paths per job.
            job_id(g.jobs[i].outs.iter().map(|f| g.path(*f)))
        } else {
            [0; 32]
        }
    });
    let fresh = decide_fresh(g, &want, &now, &ids, &state_db.jobs, &opts.toolchain);
    let mut w = Work {
        began_ns,
        fresh,
        ids,
        g,
        workdir: workdir.to_path_buf(),
        db,
        opts,
        progress,
        events,
        db_state: state_db,
        compact: compact || !dead.is_empty(),
        dead,
        state,
        pending,
        now,
        ready,
        queued: VecDeque::new(),
        keys: HashMap::new(),
        pool_used: vec![0; g.model.pools.len()],
        running: 0,
        total,
        stopping: false,
        summary: Summary::default(),
        stat_updates,
        written: Default::default(),
        procs: Running::persisted(&crate::state_dir(workdir)),
        stats,
        t0: Instant::now(),
        stop: Arc::default(),
        made_dirs: Default::default(),
        dead_outputs: None,
        inside: crate::clean::Inside::default(),
        pool: None,
        expected_ms: 0,
        expected_known: 0,
        expected_of: HashMap::new(),
    };
    let t = Instant::now();
    w.run()?;
    phase("schedule", t);
    Ok(w.summary)
}

impl Work<'_> {
    fn run(&mut self) -> Result<(), WorkError> {
        let (tx, rx) = mpsc::channel::<Msg>();
        loop {
            while let Some(j) = self.ready.pop_front() {
                self.check(j);
            }
            self.start_some(&tx);
            if self.running == 0 {
                break;
            }
            // Wait for a job, waking now and then to notice a signal.
            let first = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(d) => Some(d),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            self.poll_interrupt();
            let mut batch: Vec<Msg> = first.into_iter().collect();
            batch.extend(rx.try_iter());
            // Each finished job is appended to the journal as it is handled: a crash loses
            // at most the job being recorded.
            for m in batch {
                match m {
                    Msg::Started(j) => {
                        let expected = self.expected(j);
                        let g = self.g;
                        let (done, total) = self.counts(0);
                        let eta = self.eta();
                        self.progress.counts(done, total, eta);
                        self.progress.started(&g.jobs[j.idx()].spec.label, expected);
                    }
                    Msg::Done(d) if !d.ran => self.unstart(d.job),
                    Msg::Done(d) => {
                        self.finish(d)?;
                    }
                }
            }
        }
        self.skip_what_failures_block();
        // Jobs never started (stopped early) stay unsettled; nothing is recorded for them.
        let s = &self.summary;
        let settled =
            s.ran + s.up_to_date + s.failed + s.interrupted_jobs + s.skipped + s.would_run;
        self.summary.stopped = self.total.saturating_sub(settled);
        if !self.opts.read_only {
            self.save()?;
        }
        self.summary.hashed_bytes = self.stats.bytes();
        if self.summary.interrupted.is_none() {
            let sig = INTERRUPT.load(Ordering::SeqCst);
            if sig != 0 {
                self.summary.interrupted = Some(sig);
            }
        }
        // Before `.qbuild/running` goes: it is what lets a later run find them otherwise.
        if self.summary.interrupted.is_some() {
            let n = self.procs.stop_strays();
            if n > 0 {
                self.progress.message(&format!(
                    "qbuild: stopped {n} command(s) left running by the interrupted jobs"
                ));
            }
        }
        self.procs.finish();
        Ok(())
    }

    /// A build that stopped early (a failure without `-k`, or a signal) leaves jobs that
    /// never became ready. Those downstream of a failure would not have run whatever else
    /// they waited for, so they count as skipped, as `-k` counts them: "not started" is
    /// then only what the stop itself prevented, and the split does not depend on whether
    /// an unrelated input was still pending when the failure came.
    fn skip_what_failures_block(&mut self) {
        let g = self.g;
        let mut seen = vec![false; g.jobs.len()];
        let mut stack: Vec<JobId> = (0..g.jobs.len())
            .filter(|&i| self.state[i] == State::Failed)
            .map(|i| JobId(i as u32))
            .collect();
        while let Some(j) = stack.pop() {
            for &d in &g.dependents[j.idx()] {
                if std::mem::replace(&mut seen[d.idx()], true) {
                    continue;
                }
                match self.state[d.idx()] {
                    // (Ready: checked, but left waiting for a job the signal stopped.)
                    State::Waiting | State::Ready => {
                        self.state[d.idx()] = State::Skipped;
                        self.summary.skipped += 1;
                        stack.push(d);
                    }
                    State::Skipped => stack.push(d),
                    _ => {}
                }
            }
        }
    }

    /// The end of a run that writes: what the last clock tick made racy is hashed again,
    /// then the journal is folded into a new snapshot, or refreshed stats are appended.
    fn save(&mut self) -> Result<(), WorkError> {
        let mut updates = std::mem::take(&mut self.stat_updates);
        let t = Instant::now();
        // The explain store's half of the compaction needs no stat entry: it runs on a
        // second thread while this one re-hashes what was written in the last clock tick.
        let (db, workdir, stats) = (self.db, &self.workdir, &self.stats);
        let explained = std::thread::scope(|sc| {
            let fold = self.compact.then(|| sc.spawn(|| db.fold_explain()));
            settle_racy(workdir, &mut updates, stats);
            // A panic in the fold goes on as if it had run on this thread.
            fold.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        phase("rehash files written in the last clock tick (and fold)", t);
        if let Some(explained) = explained {
            let t = Instant::now();
            self.db_state.stat.remove(&self.dead);
            self.db_state.stat.extend(updates);
            // The journal already holds every record durably: a snapshot that cannot be
            // written now (a full disk) is written by a later run; nothing is lost.
            match explained.and_then(|()| self.db.commit_snapshot(&self.db_state)) {
                Err(e) if !e.is_corruption() => {
                    say!("qbuild: warning: {e}; the journal keeps this run's records")
                }
                other => other?,
            }
            phase("fold the journal into the snapshot", t);
        } else if !updates.is_empty() {
            // Only refreshed stat entries (a `touch`): appended, not worth an fsync'd
            // snapshot; if they are lost, the next run hashes those files again.
            if let Err(e) = self.db.record_stats(updates) {
                say!("qbuild: warning: {e}; the files touched will be hashed again");
            }
        }
        Ok(())
    }

    fn poll_interrupt(&mut self) {
        let sig = INTERRUPT.load(Ordering::SeqCst);
        if sig != 0 && !self.stopping {
            self.begin_stopping();
            self.summary.interrupted = Some(sig);
            self.progress.message(&format!(
                "qbuild: interrupted; stopping {} running job(s)",
                self.procs.count()
            ));
            self.procs.signal_all(libc::SIGTERM);
            let procs = self.procs.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                procs.signal_all(libc::SIGKILL);
            });
        }
    }

    fn label(&self, j: JobId) -> &str {
        &self.g.jobs[j.idx()].spec.label
    }

    fn rule_name(&self, j: JobId) -> &str {
        &self.g.model.rules[self.g.jobs[j.idx()].spec.rule as usize].name
    }

    /// Prereq: `j` is Ready. Decides it: up to date, stale (queued / would run), or skipped.
    fn check(&mut self, j: JobId) {
        self.rescan_dangling_link(j);
        let job = &self.g.jobs[j.idx()];
        // After an interrupt, what waited for a stopped job is "not started" (unsettled).
        if job
            .deps
            .iter()
            .any(|d| self.state[d.idx()] == State::Interrupted)
        {
            return;
        }
        if job
            .deps
            .iter()
            .any(|d| matches!(self.state[d.idx()], State::Failed | State::Skipped))
        {
            return self.settle(j, State::Skipped);
        }
        // Decided up to date before the build started, and nothing it depends on ran since.
        if self.fresh[j.idx()]
            && job
                .deps
                .iter()
                .all(|d| self.state[d.idx()] == State::UpToDate)
        {
            self.refresh_link(j);
            return self.settle(j, State::UpToDate);
        }
        let mut inputs = Vec::with_capacity(job.ins.len());
        let mut reasons = Vec::new();
        for f in &job.ins {
            let path = &self.g.files[f.idx()].path;
            match &self.now[f.idx()] {
                Now::Have(a) => inputs.push((Cow::Borrowed(path.as_str()), a.content)),
                Now::WillRebuild => reasons.push(Reason::InputWillRebuild(path.clone())),
                Now::Missing | Now::Unknown => {
                    let why = if self.g.files[f.idx()].producer.is_some() {
                        format!("input {path} was not produced")
                    } else {
                        format!("input {path} does not exist and no rule writes it")
                    };
                    return self.fail_before_start(j, &why);
                }
                Now::Error(e) => {
                    let why = format!("cannot read input {path}: {e}");
                    return self.fail_before_start(j, &why);
                }
            }
        }
        if !reasons.is_empty() {
            // Dry run only: an input would be rebuilt first. The job's own changes (its
            // command, env, toolchain, the other inputs) are said too: after an early
            // cutoff they would be the only reason it runs.
            match self.db_state.jobs.get(&self.ids[j.idx()]) {
                None => reasons.insert(0, Reason::NeverBuilt),
                Some(rec) if self.opts.explain => {
                    let rebuilt: Vec<String> = reasons
                        .iter()
                        .filter_map(|r| match r {
                            Reason::InputWillRebuild(p) => Some(p.clone()),
                            _ => None,
                        })
                        .collect();
                    let known = key_parts(self.g, j, inputs, &self.opts.toolchain);
                    if let Some(old) = self
                        .db
                        .explain::<OwnedKeyParts>(&self.ids[j.idx()])
                        .filter(|o| o.key() == rec.key)
                    {
                        let own = crate::stale::diff_parts(&old, &known).into_iter().filter(
                            |r| !matches!(r, Reason::InputRemoved(p) if rebuilt.contains(p)),
                        );
                        reasons.splice(0..0, own);
                    }
                }
                Some(_) => {}
            }
            return self.stale(j, None, reasons);
        }
        let parts = key_parts(self.g, j, inputs, &self.opts.toolchain);
        let key = parts.key();
        let id = self.ids[j.idx()];
        let explain = self.opts.explain || self.opts.dry_run;
        let db = self.db;
        let now = &self.now;
        let d = decide(
            &parts,
            &key,
            self.db_state.jobs.get(&id),
            &mut || outputs_now(job, now),
            &mut || db.explain::<OwnedKeyParts>(&id),
            explain,
        );
        if d.stale {
            self.stale(j, Some((key, parts.into_owned())), d.reasons);
        } else {
            // Outputs are as recorded; their content hashes from the scan stand, except a
            // link's, which follows its target (possibly rebuilt this run).
            self.refresh_link(j);
            self.refresh_made_links(j);
            self.settle(j, State::UpToDate);
        }
    }

    /// A job is keyed by its outputs, so one whose output list was edited has no record:
    /// when a job no longer in the Qairtfile made one of its outputs, say that rather than
    /// "never built".
    fn why_new(&mut self, j: JobId, mut reasons: Vec<Reason>) -> Vec<Reason> {
        let (g, db, records) = (self.g, self.db, &self.db_state.jobs);
        let dead = self.dead_outputs.get_or_insert_with(|| {
            let mut map = rustc_hash::FxHashMap::default();
            for (_, was) in crate::clean::dead_jobs(g, db, records).known {
                for o in &was {
                    map.insert(o.clone(), was.clone());
                }
            }
            map
        });
        let now = g.outputs(j);
        if let Some(was) = now.iter().find_map(|o| dead.get(*o)) {
            reasons[0] = Reason::OutputsEdited {
                was: was.clone(),
                now: now.iter().map(|o| o.to_string()).collect(),
            };
        }
        reasons
    }

    /// The folders that hold `j`'s outputs, and the files read inside its folder outputs
    /// (see `Graph::holders`), have new content once it ran: hash them again for the jobs
    /// that read them, which waited for `j`.
    fn rehash_holders(&mut self, j: JobId) {
        let g = self.g;
        if g.holders.is_empty() {
            return; // the usual graph: no output lies in a folder that is read
        }
        let folders: Vec<crate::graph::FileId> = g.jobs[j.idx()]
            .outs
            .iter()
            .filter_map(|f| g.holders.get(f))
            .flatten()
            .copied()
            .collect();
        if folders.is_empty() {
            return;
        }
        let arts = Artifacts::new(&self.workdir, &self.db_state.stat, &self.stats);
        for f in folders {
            self.now[f.idx()] = scan_one(&arts, g.path(f), None);
        }
        self.stat_updates.extend(arts.take_updates());
    }

    /// For a link qbuild makes: the opening scan found it dangling, perhaps because its
    /// target was removed and its job was about to make it again. The target has settled by
    /// now (the link job waits for it): look at the link again, or a target rebuilt with the
    /// same bytes would remake a link that is as it was (and `--explain` would call it
    /// dangling).
    fn rescan_dangling_link(&mut self, j: JobId) {
        let g = self.g;
        let job = &g.jobs[j.idx()];
        if !matches!(job.spec.action, Action::Link(_)) {
            return;
        }
        let Some(&out) = job.outs.first() else {
            return;
        };
        if !matches!(self.now[out.idx()], Now::Error(_)) {
            return;
        }
        let arts = Artifacts::new(&self.workdir, &self.db_state.stat, &self.stats);
        self.now[out.idx()] = scan_one(&arts, g.path(out), None);
        self.stat_updates.extend(arts.take_updates());
    }

    /// For a link job: its output's content is what its target holds now.
    fn refresh_link(&mut self, j: JobId) {
        let job = &self.g.jobs[j.idx()];
        let Action::Link(text) = &job.spec.action else {
            return;
        };
        let (Some(out), Some(target)) = (job.outs.first(), job.order.first()) else {
            return;
        };
        let target_content = match &self.now[target.idx()] {
            Now::Have(a) => Some(a.content),
            // A dry run: what the link leads to is not known until its producer runs.
            Now::WillRebuild => {
                self.now[out.idx()] = Now::WillRebuild;
                return;
            }
            _ => None,
        };
        let text = Path::new(text);
        self.now[out.idx()] = Now::Have(Art {
            content: hash_link(text, target_content.as_ref()),
            ident: link_identity(text),
        });
    }

    /// For a job found up to date after a job it depends on ran: a symlink its command made
    /// among its outputs leads to a file of the graph that may have been rewritten since the
    /// scan hashed the link (the same bytes again: an early cutoff). Its content follows the
    /// target as it is now, or its readers would be keyed by the bytes the scan saw.
    fn refresh_made_links(&mut self, j: JobId) {
        let g = self.g;
        for &f in &g.jobs[j.idx()].outs {
            let Now::Have(a) = &self.now[f.idx()] else {
                continue;
            };
            if a.ident == a.content {
                continue; // a file, or a folder with no link in it
            }
            let rel = g.path(f);
            // (A folder holding links has no text to read.)
            let Ok(text) = fs::read_link(self.workdir.join(rel)) else {
                continue;
            };
            // Where the kernel leads it (a `..` after a linked folder is not textual).
            let arts = Artifacts::new(&self.workdir, &self.db_state.stat, &self.stats);
            let target = arts.link_target_key(rel, &text);
            let Some(t) = g.by_path.get(&g.files, &target) else {
                continue;
            };
            if let Now::Have(t) = &self.now[t.idx()] {
                let content = hash_link(&text, Some(&t.content));
                self.now[f.idx()] = Now::Have(Art {
                    content,
                    ident: a.ident,
                });
            }
        }
    }

    fn stale(&mut self, j: JobId, key: Option<(Hash, OwnedKeyParts)>, reasons: Vec<Reason>) {
        // The reasons are shown only by --explain and dry runs: only they need the details.
        let shown = self.opts.explain || self.opts.dry_run;
        let mut reasons = match reasons.first() {
            Some(Reason::NeverBuilt) if shown => self.why_new(j, reasons),
            _ => reasons,
        };
        // "Missing" for an output that is there would send the user looking for the wrong
        // file: a link that leads nowhere says so, and an output that could not be taken
        // as built (an absolute link to an existing target, put where qbuild made a
        // relative one) says why, as the scan found it.
        for r in reasons.iter_mut().filter(|_| shown) {
            if let Reason::OutputMissing(p) = r {
                let path = self.workdir.join(&*p);
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    continue;
                };
                let target_gone =
                    || fs::metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
                let scanned = self
                    .g
                    .by_path
                    .get(&self.g.files, p)
                    .map(|f| &self.now[f.idx()]);
                if meta.file_type().is_symlink() && target_gone() {
                    *r = Reason::OutputDangling(std::mem::take(p));
                } else if let Some(Now::Error(why)) = scanned {
                    *r = Reason::OutputUnusable {
                        path: std::mem::take(p),
                        why: why.clone(),
                    };
                }
            }
        }
        if self.opts.explain {
            let mut text = format!("explain: {} is stale:", self.label(j));
            for r in &reasons {
                text.push_str(&format!("\n  - {r}"));
            }
            self.progress.message(&text);
        }
        if self.opts.dry_run {
            if !self.opts.explain {
                let label = self.label(j).to_string();
                self.progress.would_run(&label);
            }
            let ev = json!({
                "event": "would_run",
                "rule": self.rule_name(j),
                "job": self.label(j),
                "outputs": self.g.outputs(j),
                "reasons": reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            });
            (self.events)(ev);
            let g = self.g;
            for f in &g.jobs[j.idx()].outs {
                self.now[f.idx()] = Now::WillRebuild;
                for h in g.holders.get(f).map_or(&[][..], Vec::as_slice) {
                    self.now[h.idx()] = Now::WillRebuild;
                }
            }
            self.settle(j, State::WouldRun);
            return;
        }
        if let Some(k) = key {
            self.keys.insert(j, k);
        }
        self.state[j.idx()] = State::Queued;
        self.count_expected(j);
        self.queued.push_back(j);
    }

    /// A queued job that a worker handed back unstarted (the build is stopping): it stays
    /// unsettled, like the jobs never queued; nothing ran, nothing is recorded.
    fn unstart(&mut self, j: JobId) {
        self.release(j);
        self.state[j.idx()] = State::Queued;
        self.keys.remove(&j);
        self.forget_expected(j);
    }

    /// A job handed to the workers came back (run or not): its slot and pool place free up.
    fn release(&mut self, j: JobId) {
        self.running -= 1;
        if let Some(p) = self.g.jobs[j.idx()].spec.pool {
            self.pool_used[p as usize] -= 1;
        }
    }

    /// Take `j` out of the ETA.
    fn forget_expected(&mut self, j: JobId) {
        if let Some(ms) = self.expected_of.remove(&j) {
            self.expected_ms = self.expected_ms.saturating_sub(ms);
            if self.expected(j).is_some() {
                self.expected_known = self.expected_known.saturating_sub(1);
            }
        }
    }

    /// Start no more jobs: the scheduler stops queueing, and workers hand back what is
    /// queued unstarted.
    fn begin_stopping(&mut self) {
        self.stopping = true;
        self.stop.store(true, Ordering::SeqCst);
    }

    fn fail_before_start(&mut self, j: JobId, why: &str) {
        self.progress
            .message(&format!("FAILED: {}\n  {why}", self.label(j)));
        let ev = json!({
            "event": "job_finished",
            "rule": self.rule_name(j),
            "job": self.label(j),
            "outputs": self.g.outputs(j),
            "status": "failed",
            "duration_ms": 0,
            "error": why,
        });
        (self.events)(ev);
        self.settle(j, State::Failed);
    }

    /// The one place a job reaches a final state; releases its dependents.
    fn settle(&mut self, j: JobId, st: State) {
        self.state[j.idx()] = st;
        self.forget_expected(j);
        match st {
            State::UpToDate => self.summary.up_to_date += 1,
            State::Ran => self.summary.ran += 1,
            State::WouldRun => self.summary.would_run += 1,
            State::Failed => {
                self.summary.failed += 1;
                if !self.opts.keep_going {
                    self.begin_stopping();
                }
            }
            State::Interrupted => self.summary.interrupted_jobs += 1,
            State::Skipped => self.summary.skipped += 1,
            _ => {}
        }
        for &d in &self.g.dependents[j.idx()] {
            if self.state[d.idx()] == State::Waiting {
                self.pending[d.idx()] -= 1;
                if self.pending[d.idx()] == 0 {
                    self.state[d.idx()] = State::Ready;
                    self.ready.push_back(d);
                }
            }
        }
    }

    fn start_some(&mut self, tx: &mpsc::Sender<Msg>) {
        if self.stopping {
            self.queued.clear();
            return;
        }
        // Up to `-j` jobs wait in the workers' queue beyond the `-j` running (see `Pool`).
        let mut i = 0;
        while i < self.queued.len() && self.running < self.opts.jobs().max(1).saturating_mul(2) {
            let j = self.queued[i];
            let pool = self.g.jobs[j.idx()].spec.pool.map(|p| p as usize);
            if let Some(p) = pool {
                if self.pool_used[p] >= self.g.model.pools[p].depth {
                    i += 1;
                    continue;
                }
            }
            self.queued.remove(i);
            self.start(j, tx.clone());
            // A job that failed before it started (a link at its output, say) takes no
            // place in its pool: with -k, the pool's other jobs still run.
            if let (Some(p), State::Running) = (pool, self.state[j.idx()]) {
                self.pool_used[p] += 1;
            }
        }
    }

    fn start(&mut self, j: JobId, tx: mpsc::Sender<Msg>) {
        let job = &self.g.jobs[j.idx()];
        let rels = self.g.outputs(j);
        let outputs: Vec<PathBuf> = rels.iter().map(|o| self.workdir.join(o)).collect();
        let mut metas: Vec<Option<fs::Metadata>> = outputs
            .iter()
            .map(|p| fs::symlink_metadata(p).ok())
            .collect();
        let record = self.db_state.jobs.get(&self.ids[j.idx()]);
        // A `links` job replaces its own link (exec.rs); for the others, see `clear_output`.
        let makes_link = matches!(job.spec.action, Action::Link(_));
        for (i, &rel) in rels.iter().enumerate() {
            match self.inside.check(&self.workdir, rel) {
                None => {}
                Some(d) if d.outside => {
                    let why = format!("output {rel} would be written outside the work folder (a folder on its path is a symlink leading out); refusing to run");
                    return self.fail_before_start(j, &why);
                }
                Some(d) => {
                    let why = format!(
                        "output {rel} would be written to {} (a folder on its path is a symlink); refusing to write through it",
                        d.to.display()
                    );
                    return self.fail_before_start(j, &why);
                }
            }
            // Only once the path is known to lie where it says: nothing is removed elsewhere.
            if !makes_link {
                let recorded = record.and_then(|r| r.outputs.get(i));
                match self.clear_output(rel, &outputs[i], metas[i].as_ref(), recorded) {
                    Ok(true) => metas[i] = None,
                    Ok(false) => {}
                    Err(why) => return self.fail_before_start(j, &why),
                }
            }
        }
        // A folder output's whole tree, to see whether the command wrote anything in it.
        let before_tree: Vec<Option<Hash>> = outputs
            .iter()
            .zip(&metas)
            .map(|(p, m)| {
                m.as_ref()
                    .filter(|m| m.is_dir())
                    .and_then(|_| tree_stamp(p))
            })
            .collect();
        for (o, rel) in outputs.iter().zip(&rels) {
            let Some(dir) = o.parent() else {
                continue;
            };
            // A folder made (or found) once this build is not made again for every job.
            if self.made_dirs.contains(dir) {
                continue;
            }
            if let Err(e) = fs::create_dir_all(dir) {
                let why = format!("cannot create the folder of output {rel}: {e}");
                return self.fail_before_start(j, &why);
            }
            self.made_dirs.insert(dir.to_path_buf());
        }
        // The workers start with the first job that runs (a no-op starts no thread).
        let pool = self.pool.get_or_insert_with(|| {
            let crew = Crew {
                workdir: self.workdir.clone(),
                procs: self.procs.clone(),
                stats: self.stats.clone(),
                verbose: self.opts.verbose,
                stop: self.stop.clone(),
                notify: self.progress.shows_running(),
                keep_going: self.opts.keep_going,
            };
            Pool::new(self.opts.jobs(), tx.clone(), Arc::new(crew))
        });
        if let Err(why) = pool.grow_to(self.running + 1) {
            return self.fail_before_start(j, &why);
        }
        self.state[j.idx()] = State::Running;
        self.running += 1;
        let task = Task {
            j,
            action: job.spec.action.clone(),
            outputs,
            env: job.spec.env.clone(),
            log: log_path(&self.workdir, rels[0]),
            rels: rels.iter().map(|r| r.to_string()).collect(),
            post: Post {
                allow_empty: job.spec.allow_empty,
                check: job.spec.check.clone(),
                // Taken as the command starts (`run_task`).
                before: Vec::new(),
                before_tree,
                is_command: matches!(job.spec.action, Action::Shell(_) | Action::Argv(_)),
                started_ns: 0,
            },
        };
        if let Some(pool) = &self.pool {
            let _ = pool.tx.send(task);
        }
    }

    /// Before a job (not a `links` one) runs: make its output path `rel` safe to write,
    /// without ever losing bytes qbuild did not write. Returns whether something was
    /// removed.
    /// - A symlink qbuild recorded as this job's output (still as recorded) goes: a command
    ///   that makes no link now must not pass the old one off as new. One leading out of
    ///   the work folder, or one qbuild did not make, is refused: writing through it would
    ///   overwrite its target (a source, say).
    /// - A folder put where a file output was is refused (the command would write into it
    ///   and pass it off as the file).
    ///
    /// A file with other hard links is unlinked later, as the command starts
    /// (`unlink_shared_outputs`); one inside a folder output gets a copy of its own then
    /// (`unshare_folder_outputs`).
    fn clear_output(
        &self,
        rel: &str,
        path: &Path,
        meta: Option<&fs::Metadata>,
        recorded: Option<&Hash>,
    ) -> Result<bool, String> {
        let Some(m) = meta else {
            return Ok(false);
        };
        let ft = m.file_type();
        let ours = || {
            let arts = Artifacts::new(&self.workdir, &self.db_state.stat, &self.stats);
            recorded.is_some() && arts.identity(rel).ok().flatten().as_ref() == recorded
        };
        if ft.is_dir() {
            // The stat cache holds files only: with a record, this path was a file this
            // job wrote. (A folder output is never removed: files a user keeps in it
            // would go; `Post::before_tree` catches a command that writes nothing.)
            if recorded.is_some() && !ours() && self.db_state.stat.get(rel).is_some() {
                return Err(format!(
                    "output {rel} was a file and is now a folder that qbuild did not make; refusing to run into it (remove it to rebuild)"
                ));
            }
            return Ok(false);
        }
        if !ft.is_symlink() {
            return Ok(false);
        }
        // A link this job made last time (as recorded) goes, wherever it leads: removing a
        // link never touches its target. So does one its command made in a run that was
        // killed outright (the output was listed as the command started; no user link was
        // there then, or the job would not have started).
        let mine = ours() || self.db.killed_run_outputs.contains(rel);
        if let Some(to) = crate::clean::link_leading_out(&self.workdir, rel).filter(|_| !mine) {
            return Err(format!(
                "output {rel} is a symlink to {}, outside the work folder; refusing to write through it",
                to.display()
            ));
        }
        if !mine {
            let to = fs::read_link(path).unwrap_or_default();
            return Err(format!(
                "output {rel} is a symlink to {} that qbuild did not make; refusing to write through it (remove it to rebuild)",
                to.display()
            ));
        }
        fs::remove_file(path)
            .map(|()| true)
            .map_err(|e| format!("cannot remove the old output {rel} before the run: {e}"))
    }

    /// A file input whose content is no longer what the job's key says: the command may
    /// have read either. For a source (a file no job writes), one whose stat changed after
    /// the build began; for another job's output, one whose stat is no longer the one
    /// recorded when it was written (a hand edit while its reader ran). Checked when a job
    /// finishes, so an edit saved while the build ran (and perhaps undone later) cannot
    /// leave a record that claims the old content. One stat per file input; a file is read
    /// again only if it changed. A file written while the command ran (its mtime after
    /// `started_ns`) counts whatever it holds now: the command may have read an edit undone
    /// since.
    /// (Files inside a folder input are not looked at.)
    fn input_changed_during_build(
        &self,
        j: JobId,
        parts: &OwnedKeyParts,
        started_ns: i64,
    ) -> Option<String> {
        let g = self.g;
        let arts = || Artifacts::new(&self.workdir, &self.db_state.stat, &self.stats);
        // Written while the command ran: a time between its start and now. (A time ahead of
        // now is a clock's skew, a file from another machine or a `touch -d` to come: no
        // proof of a write during the job; its bytes still are compared.)
        let now_ns = crate::hash::wall_now_ns();
        let during = |t: i64| t > started_ns && t <= now_ns;
        // The key's inputs are the job's, in order (a key is only taken when all are known).
        for (f, (path, hash)) in g.jobs[j.idx()].ins.iter().zip(&parts.inputs) {
            if g.files[f.idx()].producer.is_some() {
                let was = self
                    .written
                    .get(path.as_ref())
                    .or_else(|| self.db_state.stat.get(path).map(|e| &e.stat));
                let now = fs::symlink_metadata(self.workdir.join(path.as_ref()));
                let now = match (was, now) {
                    (Some(was), Ok(m)) if m.is_file() => {
                        Some(StatKey::from_meta(&m, 0)).filter(|now| now != was)
                    }
                    (_, Ok(_)) => None, // unchanged, or a link or a folder: not looked at
                    (_, Err(_)) => return Some(path.to_string()),
                };
                if now.is_some_and(|now| {
                    during(now.mtime_ns)
                        || arts().current(path).ok().flatten().as_ref() != Some(hash)
                }) {
                    return Some(path.to_string());
                }
                continue;
            }
            let at = self.workdir.join(path.as_ref());
            // A source link re-pointed while the command ran (and perhaps back since).
            if fs::symlink_metadata(&at).is_ok_and(|l| {
                l.file_type().is_symlink() && during(StatKey::from_meta(&l, 0).mtime_ns)
            }) {
                return Some(path.to_string());
            }
            let Ok(m) = fs::metadata(&at) else {
                return Some(path.to_string());
            };
            if m.is_dir() {
                continue;
            }
            // (Rarely past here: then, is it a file this build writes into a folder?)
            let made = || g.holders.values().any(|v| v.contains(f));
            let stamp = StatKey::from_meta(&m, 0);
            if stamp.changed_by_ns() <= self.began_ns || made() {
                continue;
            }
            // Written while the command ran: its mtime (a `chmod`, a new hard link or a
            // `cp -al` changes only the ctime), not the whole-second margin (a file saved
            // just before would count too).
            if during(stamp.mtime_ns) {
                return Some(path.to_string());
            }
            if arts().current(path).ok().flatten().as_ref() != Some(hash) {
                return Some(path.to_string());
            }
        }
        None
    }

    /// Handle a finished job; returns whether a record was written.
    fn finish(&mut self, d: Done) -> Result<bool, WorkError> {
        let j = d.job;
        self.release(j);
        if self.opts.trace {
            self.summary.spans.push(Span {
                label: self.g.jobs[j.idx()].spec.label.clone(),
                rule: self.rule_name(j).to_string(),
                start_us: d.started.saturating_duration_since(self.t0).as_micros() as u64,
                dur_us: d.took.as_micros() as u64,
                slot: d.slot,
                ok: matches!(d.result, Ok(Outcome::Success)),
            });
        }
        let job = &self.g.jobs[j.idx()];
        let rels = self.g.outputs(j);
        let log = log_path(&self.workdir, rels[0]);
        let mut failure: Option<String> = match &d.result {
            Err(e) => Some(e.to_string()),
            Ok(Outcome::Success) => None,
            Ok(o) => Some(format!("command {o}")),
        };
        let mut hashes = Vec::new();
        if failure.is_none() {
            for (path, h) in rels.iter().zip(&d.outputs) {
                match h {
                    Ok(Some(a)) => hashes.push(*a),
                    Ok(None) => {
                        failure = Some(format!(
                            "the command succeeded but did not write the declared output {path}"
                        ));
                        break;
                    }
                    Err(e) => {
                        failure = Some(format!("cannot hash output {path}: {e}"));
                        break;
                    }
                }
            }
        }
        let took_ms = d.took.as_millis() as u64;
        let mut recorded = false;
        // Record the job (one journal append) before calling it done. A record that cannot
        // be written (a full disk) fails the job: it will run again, never count as built.
        let mut record = None;
        // An input changed while the build ran: the result stands, but no key says what
        // the command read.
        let mut unrecorded = false;
        if failure.is_none() {
            let (key, parts) = self
                .keys
                .remove(&j)
                .ok_or_else(|| WorkError::Io("internal: ran a job without a key".into()))?;
            let rec = JobRecord {
                key,
                outputs: hashes.iter().map(|a| a.ident).collect(),
                duration_ms: took_ms,
            };
            let id = self.ids[j.idx()];
            if let Some(path) = self.input_changed_during_build(j, &parts, d.started_ns) {
                self.progress.message(&format!(
                    "qbuild: warning: input {path} of {} changed while the build ran; its result is kept but not recorded, so it runs again next time",
                    job.spec.label
                ));
                unrecorded = true;
            }
            let written = if unrecorded {
                Ok(())
            } else {
                self.db.record_job(&id, &rec, &parts, &d.stats)
            };
            match written {
                Ok(()) => record = Some((id, rec)),
                Err(e) if !e.is_corruption() => {
                    failure = Some(format!(
                        "its result could not be recorded ({e}); it will run again"
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
        // The ETA is what is left once this job is out of it.
        self.forget_expected(j);
        if let Some(why) = &failure {
            let removed = self.remove_partial_outputs(j, &d.before);
            let mut text = format!("FAILED: {}\n  {why}", job.spec.label);
            if let Action::Shell(cmd) = &job.spec.action {
                // Whole, to copy and rerun; but not a flood (a rule over 40k inputs).
                const SHOWN: usize = 4096;
                let mut end = cmd.len().min(SHOWN);
                while !cmd.is_char_boundary(end) {
                    end -= 1;
                }
                text.push_str(&format!("\n  command: {}", &cmd[..end]));
                if end < cmd.len() {
                    text.push_str(&format!(" … ({} more bytes)", cmd.len() - end));
                }
            }
            if !removed.is_empty() {
                text.push_str(&format!(
                    "\n  removed partial output(s): {}",
                    removed.join(", ")
                ));
            }
            let mut tail = if d.stale_log {
                String::new()
            } else {
                exec::tail(&log, 20)
            };
            if let Ok(Outcome::Failed { tail: mem, .. }) = &d.result {
                if tail.is_empty() && !mem.is_empty() {
                    // The log could not be written (a full disk?): show what was kept.
                    let text = String::from_utf8_lossy(mem);
                    let lines: Vec<&str> = text.lines().collect();
                    tail = lines[lines.len().saturating_sub(20)..].join("\n");
                }
            }
            if !tail.is_empty() {
                text.push_str("\n  last lines of its log:\n");
                for l in tail.lines() {
                    text.push_str(&format!("    {}\n", printable(l)));
                }
            }
            // A command that printed nothing (or never started) leaves no log to point at.
            if log.exists() && !d.stale_log {
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&format!("  log: {}", log.display()));
            }
            let text = text.trim_end_matches('\n');
            let (done, total) = self.counts(1);
            let eta = self.eta();
            // A job that ends badly once the build is interrupted was stopped by it (or
            // could not finish cleanly meanwhile): not a failure of its own.
            let stopped = self.summary.interrupted.is_some();
            let (end, status, state) = if stopped {
                (End::Interrupted, "interrupted", State::Interrupted)
            } else {
                (End::Failed, "failed", State::Failed)
            };
            self.progress
                .finished(done, total, &job.spec.label, end, d.took, eta);
            if !stopped {
                self.progress.message(text);
            }
            let ev = json!({
                "event": "job_finished",
                "rule": self.rule_name(j),
                "job": job.spec.label,
                "outputs": rels,
                "status": status,
                "duration_ms": took_ms,
                "error": why,
            });
            (self.events)(ev);
            self.keys.remove(&j);
            self.settle(j, state);
        } else if let Some((id, rec)) = record {
            // The event first: the record is in the journal, so a kill from here on leaves
            // a job that is up to date; reporting it at once keeps "recorded but never
            // reported" to the few microseconds between the two writes.
            let ev = json!({
                "event": "job_finished",
                "rule": self.rule_name(j),
                "job": job.spec.label,
                "outputs": rels,
                "status": "ok",
                "duration_ms": took_ms,
            });
            (self.events)(ev);
            if !unrecorded {
                self.db_state.jobs.insert(id, rec);
                self.compact = true;
                recorded = true;
            }
            for (key, e) in &d.stats {
                if rels.contains(&key.as_str()) {
                    self.written.insert(key.clone(), e.stat);
                }
            }
            self.stat_updates.extend(d.stats);
            for (f, a) in job.outs.iter().zip(&hashes) {
                self.now[f.idx()] = Now::Have(*a);
            }
            self.rehash_holders(j);
            self.refresh_link(j);
            let (done, total) = self.counts(1);
            let eta = self.eta();
            self.progress
                .finished(done, total, &job.spec.label, End::Ok, d.took, eta);
            self.settle(j, State::Ran);
        }
        Ok(recorded)
    }

    /// How long `j` took the last time it ran, from its record.
    fn expected(&self, j: JobId) -> Option<Duration> {
        let id = self.ids[j.idx()];
        self.db_state
            .jobs
            .get(&id)
            .map(|r| Duration::from_millis(r.duration_ms))
    }

    /// Add `j` and every unsettled job downstream of it to the ETA: a stale job's
    /// dependents will most likely run too (early cutoff can only make the ETA pessimistic).
    fn count_expected(&mut self, j: JobId) {
        let mut stack = vec![j];
        while let Some(k) = stack.pop() {
            if self.expected_of.contains_key(&k) {
                continue;
            }
            let ms = self.expected(k).map(|e| e.as_millis() as u64);
            self.expected_of.insert(k, ms.unwrap_or(0));
            if let Some(ms) = ms {
                self.expected_ms += ms;
                self.expected_known += 1;
            }
            for &d in &self.g.dependents[k.idx()] {
                if matches!(self.state[d.idx()], State::Waiting | State::Ready) {
                    stack.push(d);
                }
            }
        }
    }

    /// Time left: the past durations of the jobs still queued or running (kept as a running
    /// sum as jobs are queued and finish), spread over the job slots.
    fn eta(&self) -> Option<Duration> {
        (self.expected_known > 0).then(|| {
            Duration::from_millis(self.expected_ms)
                / self.opts.jobs().clamp(1, u32::MAX as usize) as u32
        })
    }

    /// Progress numbers: jobs run so far (plus `extra` about to settle) of the jobs that need
    /// to run as far as known (wanted jobs minus those found up to date or skipped).
    fn counts(&self, extra: usize) -> (usize, usize) {
        let s = &self.summary;
        let done = s.ran + s.failed + s.interrupted_jobs + extra;
        let total = self
            .total
            .saturating_sub(s.up_to_date + s.skipped + s.would_run)
            .max(done);
        (done, total)
    }

    /// Remove outputs the failed job created or changed; leave untouched files alone.
    fn remove_partial_outputs(&mut self, j: JobId, before: &[Option<StatKey>]) -> Vec<String> {
        let mut removed = Vec::new();
        for (i, rel) in self.g.outputs(j).into_iter().enumerate() {
            let p = self.workdir.join(rel);
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let now = StatKey::from_meta(&m, 0);
            let prev = before.get(i).copied().flatten();
            if prev == Some(now) {
                continue;
            }
            let res = if m.is_dir() {
                if prev.is_none() {
                    fs::remove_dir_all(&p)
                } else {
                    continue;
                }
            } else {
                fs::remove_file(&p)
            };
            if res.is_ok() {
                removed.push(rel.to_string());
            }
        }
        removed
    }
}

use crate::expand::Action;

/// What a worker needs to run one job.
struct Task {
    j: JobId,
    action: Action,
    outputs: Vec<PathBuf>,
    env: Vec<(String, String)>,
    log: PathBuf,
    rels: Vec<String>,
    post: Post,
}

/// What the workers share for the whole build.
struct Crew {
    workdir: PathBuf,
    procs: Running,
    stats: Arc<HashStats>,
    /// `-v`: stream each command's output.
    verbose: bool,
    /// Set: hand queued jobs back unstarted.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Report each start (progress shows running jobs).
    notify: bool,
    keep_going: bool,
}

/// What workers tell the scheduler.
enum Msg {
    /// A job's command is starting now (sent only when progress shows running jobs).
    Started(JobId),
    Done(Done),
}

/// Up to `-j` worker threads, each running one job at a time, started as jobs are handed
/// out (so `-j 100000` on a small build starts only the threads it uses). The scheduler
/// queues up to `-j` jobs more than run, so a worker that finishes one takes the next at
/// once instead of idling while the scheduler wakes up; `stop` makes workers hand queued
/// jobs back unstarted (a failure without `-k`, or a signal).
struct Pool {
    tx: mpsc::Sender<Task>,
    rx: Arc<std::sync::Mutex<mpsc::Receiver<Task>>>,
    done: mpsc::Sender<Msg>,
    crew: Arc<Crew>,
    threads: usize,
    max: usize,
}

impl Pool {
    fn new(max: usize, done: mpsc::Sender<Msg>, crew: Arc<Crew>) -> Pool {
        let (tx, rx) = mpsc::channel::<Task>();
        Pool {
            tx,
            rx: Arc::new(std::sync::Mutex::new(rx)),
            done,
            crew,
            threads: 0,
            max: max.max(1),
        }
    }

    /// Start workers until there is one for each of `handed_out` jobs (at most `-j`). A
    /// thread the system refuses is an error only if no worker is left to run the job.
    fn grow_to(&mut self, handed_out: usize) -> Result<(), String> {
        while self.threads < handed_out.min(self.max) {
            if let Err(e) = start_worker(self.threads, &self.rx, &self.done, &self.crew) {
                if self.threads == 0 {
                    return Err(format!("cannot start a thread to run it: {e}"));
                }
                if std::mem::replace(&mut self.max, self.threads) > self.threads {
                    say!(
                        "qbuild: warning: the system refused worker thread {} ({e}); running at most {} jobs at once",
                        self.threads + 1,
                        self.threads
                    );
                }
                break;
            }
            self.threads += 1;
        }
        Ok(())
    }
}

/// One worker, taking jobs from `rx` until the channel closes.
fn start_worker(
    slot: usize,
    rx: &Arc<std::sync::Mutex<mpsc::Receiver<Task>>>,
    done: &mpsc::Sender<Msg>,
    crew: &Arc<Crew>,
) -> io::Result<()> {
    let (rx, done, crew) = (rx.clone(), done.clone(), crew.clone());
    std::thread::Builder::new()
        .spawn(move || loop {
            let task = match rx.lock() {
                Ok(r) => r.recv(),
                Err(_) => return,
            };
            let Ok(t) = task else {
                return;
            };
            let stopping =
                crew.stop.load(Ordering::SeqCst) || INTERRUPT.load(Ordering::SeqCst) != 0;
            let msg = if stopping {
                Done {
                    job: t.j,
                    ran: false,
                    slot,
                    result: Err(io::Error::other("not started: the build is stopping")),
                    outputs: Vec::new(),
                    stats: Vec::new(),
                    before: Vec::new(),
                    started: Instant::now(),
                    started_ns: 0,
                    took: Duration::ZERO,
                    stale_log: false,
                }
            } else {
                if crew.notify && done.send(Msg::Started(t.j)).is_err() {
                    return;
                }
                let d = run_task(t, &crew, slot);
                // Without -k a failure stops the build: no queued job starts after it.
                if !crew.keep_going && !matches!(d.result, Ok(Outcome::Success)) {
                    crew.stop.store(true, Ordering::SeqCst);
                }
                d
            };
            if done.send(Msg::Done(msg)).is_err() {
                return;
            }
        })
        .map(drop)
}

/// Run one job: its command, the post-step checks, then hash its outputs (here, off the
/// scheduler's thread).
fn run_task(t: Task, crew: &Crew, slot: usize) -> Done {
    let Task {
        j,
        action,
        outputs,
        env,
        log,
        rels,
        post,
    } = t;
    let (workdir, procs) = (&crew.workdir, &crew.procs);
    let mut post = post;
    // An earlier run's log is not this one's: a job that fails before its command starts
    // (its outputs cannot be unshared, `running` cannot be written) must not show it.
    let stale_log = fs::remove_file(&log).is_err_and(|e| e.kind() != io::ErrorKind::NotFound);
    post.started_ns = crate::hash::coarse_now_ns();
    // Taken as the command starts, after qbuild's own changes to the files around it (an
    // unshared hard link changes its other name's ctime too).
    let mut fine_start = 0;
    let t0 = Instant::now();
    let mode = exec::LogMode {
        append: false,
        tee: crew.verbose,
    };
    // Every output's stat as the command starts, not as the job was queued (perhaps a whole
    // job's time earlier): a file put at an output path meanwhile is not the command's, and
    // a failure must not remove it as a partial output. All are taken before anything is
    // unlinked, so a failure to unlink one leaves the others known as they were.
    let mut metas: Vec<Option<fs::Metadata>> = outputs
        .iter()
        .map(|o| fs::symlink_metadata(o).ok())
        .collect();
    let unlinked = unlink_shared_outputs(&outputs, &rels, &mut metas);
    post.before = metas
        .iter()
        .map(|m| m.as_ref().map(|m| StatKey::from_meta(m, 0)))
        .collect();
    let mut result = unlinked
        .and_then(|()| unshare_folder_outputs(&outputs, &rels))
        .and_then(|unshared| {
            // A file given a copy of its own is no write by the command: stamp the tree again.
            for i in unshared {
                if let Some(t @ Some(_)) = post.before_tree.get_mut(i) {
                    *t = tree_stamp(&outputs[i]);
                }
            }
            // The outputs are listed before the command starts: after a `kill -9` of
            // qbuild, a link found at one of them is the command's.
            if matches!(action, Action::Shell(_) | Action::Argv(_)) {
                procs.prepare(&rels)?;
            }
            fine_start = crate::hash::wall_now_ns();
            exec::run(&action, &outputs, workdir, &env, &log, mode, procs)
        });
    let mut hashes = Vec::new();
    let mut entries = Vec::new();
    if matches!(result, Ok(Outcome::Success)) {
        result = sanity_check(&outputs, &rels, &post, workdir, &env, &log, mode, procs);
    }
    if matches!(result, Ok(Outcome::Success)) {
        // Outputs are new: hash them without the cache. A link's content is derived from
        // its target on the main thread instead.
        let empty = crate::hash::StatCache::default();
        let arts = Artifacts::new(workdir, &empty, &crew.stats);
        hashes = rels
            .iter()
            .map(|r| match action {
                Action::Link(ref t) => Ok(Some(Art {
                    content: [0; 32],
                    ident: link_identity(Path::new(t)),
                })),
                _ => arts.current_art(r),
            })
            .collect();
        entries = arts.take_updates();
    }
    Done {
        job: j,
        ran: true,
        slot,
        result,
        outputs: hashes,
        stats: entries,
        before: post.before,
        started: t0,
        started_ns: fine_start,
        took: t0.elapsed(),
        stale_log,
    }
}

/// Just before the command starts (not when the job was queued, perhaps a whole job's time
/// earlier: a `cp -al` of the work folder may come in between), unlink each output file
/// that has other hard links (`metas`: each output's stat then), so that writing it cannot
/// change them; its stat becomes `None`, as for an output absent before the run.
fn unlink_shared_outputs(
    outputs: &[PathBuf],
    rels: &[String],
    metas: &mut [Option<fs::Metadata>],
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for ((o, rel), m) in outputs.iter().zip(rels).zip(metas) {
        if m.as_ref().is_some_and(|m| m.is_file() && m.nlink() > 1) {
            fs::remove_file(o).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot remove the old output {rel} before the run: {e}"),
                )
            })?;
            *m = None;
        }
    }
    Ok(())
}

/// Just before the command starts (as `unlink_shared_outputs` does for file outputs): each
/// regular file inside a folder output that has hard links elsewhere (a `cp -al` copy of the
/// work folder, a link made by hand to a source) gets an inode of its own, so that a command
/// writing it in place cannot change the other names' bytes. A folder output is never
/// emptied (files kept in it by hand would go, and a command may read its old outputs), so
/// the file is copied beside itself (bytes, mode, times) and the copy renamed over it; the
/// other names keep the old inode. Files with one link are not touched, nor are files whose
/// every link lies in this job's own folder outputs (a tool's own links); those keep sharing
/// their new inode. The trees are walked without following symlinks; a copy left by a killed
/// run is removed. Returns the indexes of the outputs whose tree changed here.
fn unshare_folder_outputs(outputs: &[PathBuf], rels: &[String]) -> io::Result<Vec<usize>> {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    let cannot = |i: usize, p: &Path, what: &str, e: io::Error| {
        let inner = p.strip_prefix(&outputs[i]).unwrap_or(p);
        let rel = Path::new(&rels[i]).join(inner);
        io::Error::new(
            e.kind(),
            format!("cannot {what} {} before the run: {e}", rel.display()),
        )
    };
    // (device, inode) -> its link count and its names inside the folder outputs.
    let mut shared = BTreeMap::new();
    // The outputs whose tree changed here.
    let mut unshared = Vec::new();
    for (i, o) in outputs.iter().enumerate() {
        if !fs::symlink_metadata(o).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let mut stack = vec![o.clone()];
        while let Some(dir) = stack.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| cannot(i, &dir, "read the folder", e))?;
            for e in entries {
                let e = e.map_err(|e| cannot(i, &dir, "read the folder", e))?;
                let p = e.path();
                // (Not followed: the entry's own type, as `lstat` gives it.)
                let ft = match e.file_type() {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(cannot(i, &p, "stat", e)),
                };
                if ft.is_dir() {
                    stack.push(p);
                    continue;
                }
                if !ft.is_file() {
                    continue;
                }
                if stale_unshare_copy(&e.file_name()) {
                    if fs::remove_file(&p).is_ok() {
                        unshared.push(i);
                    }
                    continue;
                }
                let m = match fs::symlink_metadata(&p) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(cannot(i, &p, "stat", e)),
                };
                if m.is_file() && m.nlink() > 1 {
                    let names = shared
                        .entry((m.dev(), m.ino()))
                        .or_insert_with(|| (m.nlink(), Vec::new()));
                    names.1.push((i, p));
                }
            }
        }
    }
    for (nlink, names) in shared.into_values() {
        if names.len() as u64 >= nlink {
            continue;
        }
        let Some(((i, first), rest)) = names.split_first() else {
            continue;
        };
        let what = "give a copy of its own (it has other hard links, which keep their bytes) to";
        let tmp = copy_beside(first).map_err(|e| cannot(*i, first, what, e))?;
        // The names in these folders share the copy, as they shared the file.
        for (k, p) in rest {
            let linked = beside(p, |t| fs::hard_link(&tmp, t)).and_then(|(t, ())| {
                fs::rename(&t, p).inspect_err(|_| {
                    let _ = fs::remove_file(&t);
                })
            });
            if let Err(e) = linked {
                let _ = fs::remove_file(&tmp);
                return Err(cannot(*k, p, what, e));
            }
            unshared.push(*k);
        }
        if let Err(e) = fs::rename(&tmp, first) {
            let _ = fs::remove_file(&tmp);
            return Err(cannot(*i, first, what, e));
        }
        unshared.push(*i);
    }
    unshared.sort_unstable();
    unshared.dedup();
    Ok(unshared)
}

/// The prefix of the copies `unshare_folder_outputs` makes, then `<pid>-<n>`.
const UNSHARE_PREFIX: &str = ".qbuild-unshare-";

/// A new file beside `p` (in its folder, under a name of `UNSHARE_PREFIX`) made by `make`,
/// which must fail with `AlreadyExists` if the name is taken.
fn beside<T>(p: &Path, mut make: impl FnMut(&Path) -> io::Result<T>) -> io::Result<(PathBuf, T)> {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = p.parent().unwrap_or(Path::new("."));
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let t = dir.join(format!("{UNSHARE_PREFIX}{}-{n}", std::process::id()));
        match make(&t) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            r => return r.map(|v| (t, v)),
        }
    }
}

/// A copy of the file `p` beside it: same bytes, mode and times.
fn copy_beside(p: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut from = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?;
    let m = from.metadata()?;
    let (tmp, mut to) = beside(p, |t| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(t)
    })?;
    let copied = io::copy(&mut from, &mut to)
        .and_then(|_| to.set_permissions(m.permissions()))
        .and_then(|()| {
            let times = fs::FileTimes::new()
                .set_accessed(m.accessed()?)
                .set_modified(m.modified()?);
            to.set_times(times)
        });
    match copied {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A copy `unshare_folder_outputs` left behind when its run was killed (its process is gone).
fn stale_unshare_copy(name: &std::ffi::OsStr) -> bool {
    let pid = name
        .to_str()
        .and_then(|n| n.strip_prefix(UNSHARE_PREFIX))
        .and_then(|n| n.split_once('-'))
        .filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|(p, _)| p.parse::<i32>().ok())
        .filter(|&p| p > 0 && p as u32 != std::process::id());
    // SAFETY: kill(2) with signal 0 only asks whether the process exists.
    pid.is_some_and(|p| {
        let gone = unsafe { libc::kill(p, 0) } != 0;
        gone && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    })
}

/// The stats of every entry under the folder `path` (names, kinds, sizes, times, inodes),
/// hashed: equal before and after a command iff it changed nothing in the tree. `None`
/// if the tree cannot be read.
fn tree_stamp(path: &Path) -> Option<Hash> {
    fn walk(dir: &Path, h: &mut blake3::Hasher, depth: usize) -> Option<()> {
        if depth > 64 {
            return None;
        }
        let mut names: Vec<_> = fs::read_dir(dir)
            .ok()?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .ok()?;
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let m = fs::symlink_metadata(&p).ok()?;
            let st = StatKey::from_meta(&m, 0);
            h.update(n.as_encoded_bytes());
            h.update(&[0, m.is_dir() as u8, m.file_type().is_symlink() as u8]);
            for v in [st.dev, st.ino, st.size] {
                h.update(&v.to_le_bytes());
            }
            // Not the ctime: a chmod or a new hard link is no write.
            h.update(&st.mtime_ns.to_le_bytes());
            if m.is_dir() {
                walk(&p, h, depth + 1)?;
            }
        }
        Some(())
    }
    let mut h = blake3::Hasher::new();
    walk(path, &mut h, 0)?;
    Some(*h.finalize().as_bytes())
}

/// The same file with the same bytes as far as its stat tells: a command that only changed
/// its mode or its links (`cp` failing on a read-only output, then `chmod`) did not write it.
/// Only if `a` was last changed before `started`: on a filesystem that keeps whole seconds,
/// a rewrite in the second the command started leaves the same stamp, so such a file is
/// taken as written. (One second, not the two of `changed_by_ns`: this only words a
/// failure, and a rebuild a second later is the usual case to catch.)
fn same_content_stamp(a: &StatKey, b: &StatKey, started_ns: i64) -> bool {
    let last = if a.whole_seconds() {
        a.ctime_ns.saturating_add(999_999_999)
    } else {
        a.ctime_ns
    };
    (a.dev, a.ino, a.size, a.mtime_ns) == (b.dev, b.ino, b.size, b.mtime_ns) && last < started_ns
}

/// A line of a command's output as qbuild shows it in a failure report: escape sequences
/// and other control characters (a tool's colours, a terminal title, a switch to the
/// alternate screen) shown as `^[`-style text, not sent to the terminal; at most 1,000
/// characters (the log holds the rest).
fn printable(line: &str) -> String {
    let mut out = String::new();
    for (i, c) in line.chars().enumerate() {
        if i == 1000 {
            out.push_str(" …");
            break;
        }
        match c {
            '\t' => out.push(c),
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            '\u{7f}' => out.push_str("^?"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// What the post-step checks need to know about a job.
struct Post {
    allow_empty: bool,
    check: Option<String>,
    /// Each output's stat before the job ran (to see whether the command wrote it).
    before: Vec<Option<StatKey>>,
    /// The same for a folder output's whole tree (`tree_stamp`).
    before_tree: Vec<Option<Hash>>,
    /// False for qbuild's own actions (content, links), which need no such check.
    is_command: bool,
    /// When the command started (the coarse clock, as file times are).
    started_ns: i64,
}

/// After a command succeeded: every declared output exists, files and folders are
/// non-empty (unless allowed), and the rule's `check` command passes.
#[allow(clippy::too_many_arguments)]
fn sanity_check(
    outputs: &[PathBuf],
    rels: &[String],
    post: &Post,
    workdir: &Path,
    env: &[(String, String)],
    log: &Path,
    mode: exec::LogMode,
    procs: &Running,
) -> io::Result<Outcome> {
    for (i, (p, rel)) in outputs.iter().zip(rels).enumerate() {
        match fs::symlink_metadata(p) {
            Err(_) => {
                return Err(io::Error::other(format!(
                    "the command succeeded but did not write the declared output {rel}"
                )))
            }
            // A file left exactly as it was before the run was not written by this run: a
            // stale copy must not pass for the new result.
            Ok(m) if post.is_command && m.is_file() && post.before.get(i).copied().flatten().is_some_and(|b| same_content_stamp(&b, &StatKey::from_meta(&m, 0), post.started_ns)) => {
                return Err(io::Error::other(format!(
                    "the command succeeded but did not write the declared output {rel} (the file there is left from before)"
                )))
            }
            Ok(m) if post.is_command && m.is_dir() && post.before_tree.get(i).copied().flatten().is_some_and(|t| tree_stamp(p) == Some(t)) => {
                return Err(io::Error::other(format!(
                    "the command succeeded but did not write the declared output {rel} (the folder there is left from before: nothing in it changed)"
                )))
            }
            Ok(m) if m.is_file() && m.len() == 0 && !post.allow_empty => {
                return Err(io::Error::other(format!(
                    "the declared output {rel} is empty (set `allow_empty = true` on the rule if that is right)"
                )))
            }
            // A folder with nothing in it is as suspect as an empty file (a tool that made
            // its output folder, then wrote no test vectors into it).
            Ok(m) if m.is_dir() && !post.allow_empty && fs::read_dir(p).is_ok_and(|mut d| d.next().is_none()) => {
                return Err(io::Error::other(format!(
                    "the declared output folder {rel} is empty (set `allow_empty = true` on the rule if that is right)"
                )))
            }
            Ok(_) => {}
        }
    }
    // A check is not started once the build is stopping: it would not be among the
    // commands the signal reached, and could run on after the stop.
    let sig = INTERRUPT.load(Ordering::SeqCst);
    if post.check.is_some() && sig != 0 {
        return Err(io::Error::other(format!(
            "its check was not started: the build was stopped by {}; its result is not recorded",
            crate::signal_name(sig)
        )));
    }
    match &post.check {
        None => Ok(Outcome::Success),
        Some(c) => match exec::run(
            &Action::Shell(c.to_string()),
            outputs,
            workdir,
            // The rule's `env` too: a check runs the same tools (LD_LIBRARY_PATH).
            env,
            log,
            exec::LogMode {
                append: true,
                ..mode
            },
            procs,
        )? {
            Outcome::Success => Ok(Outcome::Success),
            o => Err(io::Error::other(format!("its check `{c}` {o}"))),
        },
    }
}

/// Where a job's log goes: `.qbuild/logs/<first output>.log`. An output whose name leaves
/// no room for `.log` (255 bytes a name) gets its name's first 200 bytes and a hash of it.
pub fn log_path(workdir: &Path, first_output: &str) -> PathBuf {
    let logs = crate::state_dir(workdir).join("logs");
    let (dir, name) = match first_output.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, first_output),
    };
    let file = if name.len() + ".log".len() <= 255 {
        format!("{name}.log")
    } else {
        let mut cut = 200;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let h = blake3::hash(name.as_bytes()).to_hex();
        format!("{}-{}.log", &name[..cut], &h.as_str()[..16])
    };
    match dir {
        Some(d) => logs.join(d).join(file),
        None => logs.join(file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "The command did not write this output" is only said when the stamps can tell: an
    /// output last changed before the command started, on any filesystem.
    #[test]
    fn an_unchanged_stamp_means_unwritten_only_if_it_predates_the_start() {
        const S: i64 = 1_000_000_000;
        let key = |ctime_ns| StatKey {
            ino: 7,
            size: 3,
            mtime_ns: ctime_ns,
            ctime_ns,
            ..Default::default()
        };
        // Nanosecond stamps: written an hour ago, started now.
        assert!(same_content_stamp(
            &key(10 * S + 5),
            &key(10 * S + 5),
            3600 * S
        ));
        // Whole seconds: an hour ago is still before the start...
        assert!(same_content_stamp(&key(10 * S), &key(10 * S), 3600 * S));
        // ...and so is the second before the one the command started in...
        assert!(same_content_stamp(
            &key(10 * S),
            &key(10 * S),
            11 * S + S / 5
        ));
        // ...but the second the command started in cannot tell a rewrite.
        assert!(!same_content_stamp(
            &key(10 * S),
            &key(10 * S),
            10 * S + S / 2
        ));
        // Different stamps: written, whatever the times.
        assert!(!same_content_stamp(&key(10 * S), &key(11 * S), 3600 * S));
    }

    /// A failing tool's escape sequences are shown, not obeyed, and a huge line is cut.
    #[test]
    fn a_log_tail_is_shown_without_control_characters() {
        assert_eq!(
            printable("\u{1b}[31merror\u{1b}[0m\tbell\u{7}"),
            "^[[31merror^[[0m\tbell^G"
        );
        assert_eq!(printable(&"x".repeat(5000)).chars().count(), 1002);
        assert_eq!(printable("ünïcode"), "ünïcode");
    }
}
