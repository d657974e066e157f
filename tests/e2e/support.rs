//! The test space: a temporary work folder, the real `qbuild` binary run in it, and the
//! `--json` events it prints, parsed (after n2's TestSpace and just's test builder).
//!
//! Set `QBUILD_KEEP=1` to keep every work folder for debugging (its path is printed).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

pub const QBUILD: &str = env!("CARGO_BIN_EXE_qbuild");
pub const QAIRT_SIM: &str = env!("CARGO_BIN_EXE_qairt-sim");
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// No qbuild run in these tests should come anywhere near this; it only turns a hang
/// (a deadlock, a lock never released) into a failure instead of a stuck test run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Environment variables that change how qbuild or the simulator behave; a test sets them
/// explicitly or not at all, whatever the calling shell has.
pub const SCRUBBED_ENV: &[&str] = &[
    "QAIRT_SIM_FAIL",
    "QAIRT_SIM_WORK_MS",
    "QAIRT_SIM_SCALE",
    "QBUILD_PLAIN",
    "QNN_SDK_ROOT",
    "QAIRT_SIM",
    "REL_SLEEP",
];

/// `program ARGS` in `dir` with piped output and the test environment: the scrubbed
/// variables removed, the bundled SDK and simulator set, then `env`.
pub fn command<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    program: &str,
    dir: &Path,
    args: &[impl AsRef<std::ffi::OsStr>],
    env: &[(K, V)],
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    cmd.env("QNN_SDK_ROOT", sdk_root())
        .env("QAIRT_SIM", QAIRT_SIM);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Read a child's stdout and stderr to the end, each on its own thread.
pub fn read_outputs(child: &mut Child) -> (JoinHandle<Vec<u8>>, JoinHandle<Vec<u8>>) {
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = pipe.read_to_end(&mut b);
            b
        })
    };
    (
        read_all(Box::new(child.stdout.take().expect("stdout"))),
        read_all(Box::new(child.stderr.take().expect("stderr"))),
    )
}

/// Print why a test is skipped (visible with `--nocapture`, and in the failure-free log).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// The bundled simulated SDK (`QNN_SDK_ROOT` for every run).
pub fn sdk_root() -> PathBuf {
    Path::new(REPO).join("sim-sdk")
}

/// A set of strings from anything string-like.
pub fn set<I, S>(items: I) -> BTreeSet<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    items.into_iter().map(Into::into).collect()
}

/// Every regular file and symlink under a work folder except `.qbuild/`, by relative path
/// (symlinks as `-> TARGET`), for "equals a clean build" comparisons.
pub type Snapshot = BTreeMap<String, Vec<u8>>;

/// A temporary work folder.
pub struct Space {
    _tmp: Option<tempfile::TempDir>,
    root: PathBuf,
}

impl Space {
    /// An empty work folder.
    pub fn new() -> Space {
        let tmp = tempfile::Builder::new()
            .prefix("qbuild-e2e-")
            .tempdir()
            .expect("create a temp dir");
        if std::env::var_os("QBUILD_KEEP").is_some() {
            let root = tmp.keep();
            eprintln!("QBUILD_KEEP: keeping work folder {}", root.display());
            Space { _tmp: None, root }
        } else {
            let root = tmp.path().to_path_buf();
            Space {
                _tmp: Some(tmp),
                root,
            }
        }
    }

    /// A work folder holding the demo: `Qairtfile.example` as `Qairtfile`, and `models/`.
    pub fn demo() -> Space {
        let s = Space::new();
        fs::copy(
            Path::new(REPO).join("Qairtfile.example"),
            s.join("Qairtfile"),
        )
        .expect("copy Qairtfile.example");
        copy_tree(&Path::new(REPO).join("models"), &s.join("models"));
        s
    }

    /// A fresh work folder holding copies of `rels` (files or folders) from this one.
    pub fn copy_of(&self, rels: &[&str]) -> Space {
        let s = Space::new();
        for r in rels {
            let from = self.join(r);
            let to = s.join(r);
            if from.is_dir() {
                copy_tree(&from, &to);
            } else {
                if let Some(p) = to.parent() {
                    fs::create_dir_all(p).expect("mkdir");
                }
                fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            }
        }
        s
    }

    /// A space over an existing folder, which it does not own or remove.
    pub fn at(root: &Path) -> Space {
        Space {
            _tmp: None,
            root: root.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> &Space {
        let p = self.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).expect("mkdir");
        }
        fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    pub fn mkdir(&self, rel: &str) -> &Space {
        fs::create_dir_all(self.join(rel)).expect("mkdir");
        self
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        fs::read(self.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn read_string(&self, rel: &str) -> String {
        String::from_utf8(self.read(rel)).unwrap_or_else(|_| panic!("{rel} is not UTF-8"))
    }

    pub fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.join(rel)).is_ok()
    }

    pub fn is_symlink(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.join(rel)).is_ok_and(|m| m.file_type().is_symlink())
    }

    pub fn remove(&self, rel: &str) -> &Space {
        fs::remove_file(self.join(rel)).unwrap_or_else(|e| panic!("remove {rel}: {e}"));
        self
    }

    pub fn append(&self, rel: &str, bytes: impl AsRef<[u8]>) -> &Space {
        let mut b = if self.exists(rel) {
            self.read(rel)
        } else {
            Vec::new()
        };
        b.extend_from_slice(bytes.as_ref());
        self.write(rel, b)
    }

    /// Replace `from` by `to` in a text file; panics unless `from` occurs exactly once.
    pub fn replace(&self, rel: &str, from: &str, to: &str) -> &Space {
        let text = self.read_string(rel);
        assert_eq!(
            text.matches(from).count(),
            1,
            "`{from}` should occur once in {rel}"
        );
        self.write(rel, text.replacen(from, to, 1))
    }

    /// Make a file look modified without changing its bytes: its mtime moves `secs` seconds
    /// into the future (a real `touch` would only move it to now).
    pub fn touch(&self, rel: &str, secs: u64) -> &Space {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(self.join(rel))
            .unwrap_or_else(|e| panic!("open {rel}: {e}"));
        f.set_modified(SystemTime::now() + Duration::from_secs(secs))
            .expect("set mtime");
        self
    }

    /// Every file (and symlink) under the work folder except `.qbuild/`, relative paths.
    pub fn files(&self) -> Vec<String> {
        self.snapshot().into_keys().collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::new();
        walk(&self.root, &self.root, &mut out);
        out
    }

    /// A qbuild command in this work folder, with `-j 2 --json`.
    pub fn qbuild<I, S>(&self, args: I) -> Run<'_>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Run {
            space: self,
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            json: true,
        }
    }

    /// Run qbuild with `-j 2 --json` and these arguments.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qbuild(args).run()
    }

    /// Build everything with `-j 2 --json all` and insist it succeeds.
    pub fn build_all(&self) -> Output {
        let out = self.run(["all"]);
        out.assert_ok();
        out
    }
}

impl Default for Space {
    fn default() -> Self {
        Space::new()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let rel = p
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        if rel == ".qbuild" {
            continue;
        }
        let m = fs::symlink_metadata(&p).expect("stat");
        if m.file_type().is_symlink() {
            let t = fs::read_link(&p).expect("readlink");
            out.insert(rel, format!("-> {}", t.display()).into_bytes());
        } else if m.is_dir() {
            walk(root, &p, out);
        } else {
            out.insert(rel, fs::read(&p).expect("read"));
        }
    }
}

/// Copy a folder tree, keeping symlinks as symlinks.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let e = e.expect("dir entry");
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().expect("file type");
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).expect("readlink"), &dst)
                .expect("symlink");
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// Assert two snapshots are equal, naming the paths that differ (not dumping bytes).
#[track_caller]
pub fn assert_same_files(actual: &Snapshot, expected: &Snapshot, what: &str) {
    if actual == expected {
        return;
    }
    let mut msg = format!("{what}: the files differ\n");
    for (k, v) in actual {
        match expected.get(k) {
            None => msg.push_str(&format!("  only in the incremental build: {k}\n")),
            Some(w) if w != v => msg.push_str(&format!(
                "  differs: {k} ({} vs {} bytes)\n",
                v.len(),
                w.len()
            )),
            _ => {}
        }
    }
    for k in expected.keys() {
        if !actual.contains_key(k) {
            msg.push_str(&format!("  only in the clean build: {k}\n"));
        }
    }
    panic!("{msg}");
}

/// Assert two sets of job labels (or paths) are equal, listing what is missing and extra.
#[track_caller]
pub fn assert_set(
    actual: &BTreeSet<String>,
    expected: &BTreeSet<String>,
    what: &str,
    out: &Output,
) {
    if actual == expected {
        return;
    }
    let extra: Vec<_> = actual.difference(expected).collect();
    let missing: Vec<_> = expected.difference(actual).collect();
    panic!("{what}: not the expected set\n  unexpected: {extra:?}\n  missing: {missing:?}\n{out}");
}

/// One qbuild invocation being prepared.
pub struct Run<'a> {
    space: &'a Space,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    json: bool,
}

impl Run<'_> {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Run from this folder (relative to the work folder) instead of the work folder.
    pub fn cwd(mut self, rel: &str) -> Self {
        self.cwd = Some(self.space.join(rel));
        self
    }

    /// Without `--json` (human output only).
    pub fn no_json(mut self) -> Self {
        self.json = false;
        self
    }

    pub fn run(self) -> Output {
        let mut args: Vec<String> = vec!["-j".into(), "2".into()];
        if self.json {
            args.push("--json".into());
        }
        args.extend(self.args.iter().cloned());
        let cwd = self.cwd.clone().unwrap_or_else(|| self.space.root.clone());
        let mut cmd = command(QBUILD, &cwd, &args, &self.env);
        let shown = format!(
            "(cd {} && {}qbuild {})",
            cwd.display(),
            self.env
                .iter()
                .map(|(k, v)| format!("{k}={v} "))
                .collect::<String>(),
            args.join(" ")
        );
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {QBUILD}: {e}"));
        let (t_out, t_err) = read_outputs(&mut child);
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if t0.elapsed() > RUN_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{shown} did not finish within {RUN_TIMEOUT:?}");
            }
            // Polling the child (not waiting for any file timestamp): a plain wait() could not time out.
            std::thread::sleep(Duration::from_millis(5));
        };
        let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout reader")).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned();
        let code = status
            .code()
            .unwrap_or_else(|| panic!("{shown} was killed by a signal\nstderr:\n{stderr}"));
        let mut out = Output {
            cmdline: shown,
            code,
            stdout,
            stderr,
            events: Vec::new(),
        };
        if self.json {
            out.events = out.parse_events();
        }
        out
    }
}

/// What one qbuild run did.
pub struct Output {
    pub cmdline: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// `--json` events, one per stdout line.
    pub events: Vec<Value>,
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- {} exited {}", self.cmdline, self.code)?;
        writeln!(f, "--- stdout:\n{}", self.stdout)?;
        write!(f, "--- stderr:\n{}", self.stderr)
    }
}

impl Output {
    /// Every stdout line must be one JSON object with an `event`.
    fn parse_events(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("--json stdout line is not JSON ({e}): {l:?}\n{self}")
                });
                assert!(
                    v.get("event").and_then(Value::as_str).is_some(),
                    "event without a name: {l}\n{self}"
                );
                v
            })
            .collect()
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Output {
        assert_eq!(self.code, code, "unexpected exit status\n{self}");
        self
    }

    /// A run refused before anything ran: its only `--json` event is the `error`, with the
    /// message and position stderr shows.
    #[track_caller]
    pub fn assert_error_event(&self) -> &Output {
        assert_eq!(self.events.len(), 1, "one event for a refused run\n{self}");
        let e = &self.events[0];
        assert_eq!(e["event"], "error", "{self}");
        assert_eq!(e["exit"], 2, "{self}");
        let first = self.stderr.lines().next().unwrap_or_default();
        assert_eq!(
            Some(first),
            e["error"]
                .as_str()
                .map(|m| format!("error: {m}"))
                .as_deref(),
            "{self}"
        );
        let at = self
            .stderr
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("--> "))
            .unwrap_or_default();
        assert_eq!(e["at"].as_str(), Some(at), "{self}");
        self
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Output {
        self.assert_code(0)
    }

    /// The final `build_finished` event, which must be the last line.
    #[track_caller]
    pub fn finished(&self) -> &Value {
        let last = self
            .events
            .last()
            .unwrap_or_else(|| panic!("no --json events\n{self}"));
        assert_eq!(
            last["event"], "build_finished",
            "the last event is not build_finished\n{self}"
        );
        assert_eq!(
            self.events
                .iter()
                .filter(|e| e["event"] == "build_finished")
                .count(),
            1,
            "more than one build_finished\n{self}"
        );
        last
    }

    /// A counter of the `build_finished` event.
    #[track_caller]
    pub fn count(&self, field: &str) -> u64 {
        self.finished()[field]
            .as_u64()
            .unwrap_or_else(|| panic!("build_finished has no numeric `{field}`\n{self}"))
    }

    fn jobs(&self, event: &str, status: Option<&str>) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["event"] == event && status.is_none_or(|s| e["status"] == s))
            .collect()
    }

    fn labels(&self, event: &str, status: Option<&str>) -> BTreeSet<String> {
        let evs = self.jobs(event, status);
        let labels: BTreeSet<String> = evs
            .iter()
            .map(|e| {
                e["job"]
                    .as_str()
                    .unwrap_or_else(|| panic!("event without job: {e}"))
                    .to_string()
            })
            .collect();
        assert_eq!(
            labels.len(),
            evs.len(),
            "a job reported twice for {event}\n{self}"
        );
        labels
    }

    fn outputs_of(&self, event: &str, status: Option<&str>) -> BTreeSet<String> {
        self.jobs(event, status)
            .iter()
            .flat_map(|e| e["outputs"].as_array().cloned().unwrap_or_default())
            .map(|o| o.as_str().expect("output path").to_string())
            .collect()
    }

    /// Labels of the jobs that ran and succeeded.
    pub fn ran(&self) -> BTreeSet<String> {
        self.labels("job_finished", Some("ok"))
    }

    /// Labels of the jobs that failed.
    pub fn failed(&self) -> BTreeSet<String> {
        self.labels("job_finished", Some("failed"))
    }

    /// Labels of every job that started or was decided to fail (ok or failed).
    pub fn touched(&self) -> BTreeSet<String> {
        self.labels("job_finished", None)
    }

    /// Labels of the jobs a dry run would run.
    pub fn would_run(&self) -> BTreeSet<String> {
        self.labels("would_run", None)
    }

    /// Outputs of the jobs that ran and succeeded.
    pub fn ran_outputs(&self) -> BTreeSet<String> {
        self.outputs_of("job_finished", Some("ok"))
    }

    /// The `would_run` events.
    pub fn would_run_events(&self) -> Vec<&Value> {
        self.jobs("would_run", None)
    }

    /// Check the summary agrees with the events, and that `ran` jobs ran.
    #[track_caller]
    pub fn assert_ran(&self, expected: &BTreeSet<String>) -> &Output {
        assert_set(&self.ran(), expected, "jobs that ran", self);
        assert_eq!(
            self.count("ran"),
            expected.len() as u64,
            "build_finished.ran\n{self}"
        );
        self
    }

    /// Nothing ran, nothing failed, and `up_to_date` jobs were checked.
    #[track_caller]
    pub fn assert_nothing_ran(&self, up_to_date: u64) -> &Output {
        self.assert_ok();
        assert_set(&self.touched(), &BTreeSet::new(), "jobs that ran", self);
        assert_eq!(self.count("ran"), 0, "{self}");
        assert_eq!(self.count("failed"), 0, "{self}");
        assert_eq!(self.count("up_to_date"), up_to_date, "{self}");
        self
    }
}

/// One job as the events describe it.
#[derive(Debug, Clone)]
pub struct Job {
    pub rule: String,
    pub label: String,
    pub outputs: Vec<String>,
    /// Of a `manual` rule (`--list --json` says; other events leave it false).
    pub manual: bool,
}

/// The jobs of a build, from its `job_finished` (or `would_run`) events. Test modules add
/// their own views of it (`impl Catalog` in demo.rs and iteration.rs).
pub struct Catalog {
    pub jobs: Vec<Job>,
}

impl Catalog {
    /// From `out`'s events of this kind; there must be some.
    pub fn from_events(out: &Output, event: &str) -> Catalog {
        let cat = Catalog::from_values(&out.events, event);
        assert!(!cat.jobs.is_empty(), "no {event} events\n{out}");
        cat
    }

    pub fn from_values(events: &[serde_json::Value], event: &str) -> Catalog {
        Catalog {
            jobs: events
                .iter()
                .filter(|e| e["event"] == event)
                .map(|e| Job {
                    rule: e["rule"].as_str().expect("rule").into(),
                    label: e["job"].as_str().expect("job").into(),
                    outputs: e["outputs"]
                        .as_array()
                        .expect("outputs")
                        .iter()
                        .map(|o| o.as_str().expect("path").into())
                        .collect(),
                    manual: e["manual"].as_bool().unwrap_or(false),
                })
                .collect(),
        }
    }

    pub fn all(&self) -> BTreeSet<String> {
        self.select(|_| true)
    }

    /// What target `all` runs: every job but those of `manual` rules.
    pub fn in_all(&self) -> BTreeSet<String> {
        self.select(|j| !j.manual)
    }

    pub fn select(&self, f: impl Fn(&Job) -> bool) -> BTreeSet<String> {
        self.jobs
            .iter()
            .filter(|j| f(j))
            .map(|j| j.label.clone())
            .collect()
    }

    pub fn job(&self, label: &str) -> &Job {
        self.jobs
            .iter()
            .find(|j| j.label == label)
            .unwrap_or_else(|| panic!("no job `{label}`"))
    }
}
