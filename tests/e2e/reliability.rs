//! Reliability and security (issue 5): what qbuild promises when things go wrong, tested
//! through the real binary. docs/reliability.md lists each promise and the test that proves it.
//!
//! - crash safety: SIGKILL at random moments (seeded), then a rebuild equal to a clean build;
//!   a damaged state database is set aside and everything rebuilds;
//! - signals: SIGINT / SIGTERM stop every process of every running job, remove partial
//!   outputs, record nothing, exit 130 / 143; a `kill -9`ed qbuild's leftovers are stopped;
//! - the work-folder lock;
//! - hostile Qairtfiles (generated and mutated), shell quoting, `argv`, escaping outputs;
//! - `--clean` and failure cleanup never delete what qbuild did not write;
//! - I/O errors: a read-only work folder, a full disk (tmpfs; skipped where mounting is not
//!   permitted, with the reason printed).
//!
//! `cargo test --test e2e reliability::`. `QBUILD_REL_SEED=N` reseeds the crash harness and the
//! Qairtfile generator; `QBUILD_KEEP=1` keeps the work folders.

#![allow(dead_code)]

use crate::support;
use crate::support::skip;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use support::{assert_same_files, Output, Snapshot, Space};

// ============================================================================ helpers

/// xorshift64*: a tiny seeded generator, so every trial is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The base seed: `QBUILD_REL_SEED` or a fixed default (CI is reproducible).
fn seed() -> u64 {
    std::env::var("QBUILD_REL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_126)
}

/// A qbuild started in the background, to be signalled or killed.
struct Bg {
    child: Child,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
    shown: String,
    started: Instant,
}

/// How a background qbuild ended.
struct Ended {
    /// Exit status, or None when killed by a signal.
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Ended {
    /// `--json` events; a line cut short by a kill is skipped.
    fn events(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// Labels of the jobs reported finished ok.
    fn ok_jobs(&self) -> BTreeSet<String> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "job_finished" && e["status"] == "ok")
            .filter_map(|e| e["job"].as_str().map(String::from))
            .collect()
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "--- exit {:?} signal {:?} after {:?}",
            self.code, self.signal, self.took
        )?;
        writeln!(f, "--- stdout:\n{}", self.stdout)?;
        write!(f, "--- stderr:\n{}", self.stderr)
    }
}

impl Bg {
    /// Start `qbuild ARGS` in `dir` with the bundled SDK and these extra variables.
    fn start(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Bg {
        let mut cmd = support::command(support::QBUILD, dir, args, env);
        let shown = format!("(cd {} && qbuild {})", dir.display(), args.join(" "));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", support::QBUILD));
        let (out, err) = support::read_outputs(&mut child);
        Bg {
            child,
            out: Some(out),
            err: Some(err),
            shown,
            started: Instant::now(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped yet.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Whether it is still running.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for it to end by itself; a hang past `timeout` is killed and fails the test.
    fn wait(mut self, timeout: Duration) -> Ended {
        use std::os::unix::process::ExitStatusExt;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            if self.started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not finish within {timeout:?}", self.shown);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = self.started.elapsed();
        let stdout = self.out.take().map(|h| h.join().unwrap_or_default());
        let stderr = self.err.take().map(|h| h.join().unwrap_or_default());
        Ended {
            code: status.code(),
            signal: status.signal(),
            stdout: String::from_utf8_lossy(&stdout.unwrap_or_default()).into_owned(),
            stderr: String::from_utf8_lossy(&stderr.unwrap_or_default()).into_owned(),
            took,
        }
    }

    /// SIGKILL it now (if still running) and collect what it printed.
    fn kill9(mut self) -> Ended {
        let _ = self.child.kill();
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Poll `cond` every 5 ms until it holds or `timeout` passes; returns whether it held.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Live (non-zombie) processes whose environment holds `REL_MARK=<token>`, as (pid, argv).
/// Jobs of the signal tests set that variable; their children inherit it.
fn marked_processes(token: &str) -> Vec<(i32, String)> {
    let needle = format!("REL_MARK={token}");
    let mut found = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("");
        if state == "Z" || state == "X" {
            continue;
        }
        let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let argv = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, argv));
        }
    }
    found
}

/// How many processes, zombies included, have `parent` as their parent.
fn children_of(parent: i32) -> usize {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // Field 4, the parent, follows the state after the command name's last ')'.
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok())
                == Some(parent)
        })
        .count()
}

/// Make this test process the reaper of the processes a killed qbuild leaves behind.
///
/// When qbuild is killed, its jobs' leftovers are re-parented to the nearest "child
/// subreaper", normally init. After the next qbuild kills them they stay zombies until
/// their new parent reaps them, and qbuild waits (up to a second per group) while a zombie
/// is left in the group. Init in this test VM reaps only every second or so, which would
/// cost the crash harness a second per trial, so the test process adopts them and reaps
/// them at once, as a prompt init would. It reaps only adopted processes (never a `qbuild`,
/// `mount`, `umount` or `cp` it started itself, whose statuses belong to their `Child`).
fn adopt_leftovers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        let ok = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0;
        if ok {
            std::thread::spawn(|| loop {
                reap_adopted();
                std::thread::sleep(Duration::from_millis(5));
            });
        }
    });
}

fn reap_adopted() {
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().unwrap_or("");
        let ppid: i32 = rest.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == me && state == "Z" && !["qbuild", "mount", "umount", "cp"].contains(&comm) {
            // SAFETY: reaping a zombie child by pid; no memory is passed.
            unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
    }
}

/// A token unique to this test run, for `REL_MARK`.
fn token(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{what}-{}-{t}", std::process::id())
}

/// A mount made by a test, unmounted (lazily) when dropped.
struct Mount {
    at: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn mount(args: &[&str], at: &Path) -> Result<Mount, String> {
    let out = Command::new("mount")
        .args(args)
        .arg(at)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(Mount {
            at: at.to_path_buf(),
        })
    } else {
        Err(format!(
            "mount {} {} failed: {}",
            args.join(" "),
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A tmpfs of `size` (e.g. "4m") at `at`, or why not.
fn mount_tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
    fs::create_dir_all(at).map_err(|e| e.to_string())?;
    mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"], at)
}

/// `src` seen read-only at `at` (a bind mount remounted ro), or why not.
fn bind_read_only(src: &Path, at: &Path) -> Result<Mount, String> {
    fs::create_dir_all(at).map_err(|e| e.to_string())?;
    let m = mount(&["--bind", &src.to_string_lossy()], at)?;
    // The remount changes the same mount: one guard (`m`) undoes both.
    let remount = mount(&["-o", "remount,bind,ro"], at)?;
    std::mem::forget(remount);
    Ok(m)
}

/// `src` seen writable at `at` (a bind mount).
fn bind(src: &Path, at: &Path) -> Result<Mount, String> {
    mount(&["--bind", &src.to_string_lossy()], at)
}

/// Whether permissions stop this process from writing (false for root: chmod is no guard).
fn permissions_bind_us() -> bool {
    let s = Space::new();
    let d = s.join("ro");
    fs::create_dir(&d).expect("mkdir");
    fs::set_permissions(&d, fs::Permissions::from_mode(0o555)).expect("chmod");
    let blocked = fs::write(d.join("probe"), "x").is_err();
    let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
    blocked
}

/// Every top-level entry of a work folder (including `.qbuild`), for `Space::copy_of`.
fn entries(s: &Space) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(s.path())
        .expect("read work folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A full copy of a work folder, state included.
fn clone_space(s: &Space) -> Space {
    let names = entries(s);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    s.copy_of(&refs)
}

/// The jobs of a build, label -> outputs, from its `job_finished` (or `would_run`) events.
type Jobs = BTreeMap<String, Vec<String>>;

fn jobs_of(out: &Output, event: &str) -> Jobs {
    out.events
        .iter()
        .filter(|e| e["event"] == event)
        .map(|e| {
            (
                e["job"].as_str().expect("job").to_string(),
                e["outputs"]
                    .as_array()
                    .expect("outputs")
                    .iter()
                    .map(|o| o.as_str().expect("path").to_string())
                    .collect(),
            )
        })
        .collect()
}

fn set_of(j: &Jobs) -> BTreeSet<String> {
    j.keys().cloned().collect()
}

/// A clean build of the demo (`Qairtfile.example`): its files and its jobs. Built once and
/// shared by every test that compares with it.
struct CleanDemo {
    snap: Snapshot,
    jobs: Jobs,
}

fn clean_demo() -> &'static CleanDemo {
    static CLEAN: OnceLock<CleanDemo> = OnceLock::new();
    CLEAN.get_or_init(|| {
        let s = Space::demo();
        let out = s.build_all();
        CleanDemo {
            snap: s.snapshot(),
            jobs: jobs_of(&out, "job_finished"),
        }
    })
}

/// Contains "panicked" or a Rust backtrace hint: qbuild must never show either.
#[track_caller]
fn assert_no_panic(stderr: &str, what: &str) {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{what}: qbuild panicked\n{stderr}"
    );
}

// ============================================================================ 1. crash safety

/// A build to crash: how to make its work folder (v1 sources, or v2 = after an edit), the
/// environment that slows it so kills land mid-build, and what a clean build gives.
struct Project {
    name: &'static str,
    make: fn() -> Space,
    edit: fn(&Space),
    env: Vec<(&'static str, String)>,
    /// label -> outputs of every job.
    jobs: Jobs,
    clean_v1: Snapshot,
    clean_v2: Snapshot,
    /// A built v1 work folder (state included), copied for the "edit" trials.
    built_v1: Space,
    /// What the edit makes stale (a dry run after the edit).
    stale_after_edit: BTreeSet<String>,
    /// label -> labels of the jobs that read its outputs (from the library's graph).
    dependents: BTreeMap<String, Vec<String>>,
    t_build: Duration,
    t_edit: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Trial {
    /// Kill the first build of a fresh folder.
    Fresh,
    /// Kill the first build, then kill the resumed build too.
    FreshTwice,
    /// From a built folder, edit a source, kill the incremental build (outputs with old
    /// records are being rewritten in place).
    Edit,
}

#[derive(Debug, Default)]
struct Tally {
    trials: usize,
    /// Trials whose (first) kill hit a running build.
    killed_mid_build: usize,
    with_damaged_outputs: usize,
    with_reaped_leftovers: usize,
    /// Kills after which the next run called the store unreadable and set it aside, losing
    /// every record (a bug on first builds; an Edit trial fails on it at once).
    state_set_aside: usize,
    /// Kills after which the next run set the explain store aside (it never decides what
    /// runs, so nothing else changes).
    explain_store_set_aside: usize,
    /// Jobs not reported finished, with intact outputs, that the dry run found up to date:
    /// qbuild was killed between writing a job's record and printing its event (at most
    /// one job per kill, asserted in each trial). The event follows the record at once, so
    /// this is rare; a slow step creeping in between would make it common.
    recorded_not_reported: Vec<String>,
    /// Kills after which the next run would rerun more than needed (what did not finish,
    /// what is damaged, and their dependents), other than by setting the store aside.
    over_rebuilds: Vec<String>,
}

fn timed_build(s: &Space, env: &[(&'static str, String)]) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut r = s.qbuild(["all"]);
    for (k, v) in env {
        r = r.env(k, v);
    }
    let out = r.run();
    out.assert_ok();
    (out, t0.elapsed())
}

impl Project {
    fn setup(
        name: &'static str,
        make: fn() -> Space,
        edit: fn(&Space),
        env: Vec<(&'static str, String)>,
    ) -> Project {
        let built_v1 = make();
        let (out, t_build) = timed_build(&built_v1, &env);
        let jobs = jobs_of(&out, "job_finished");
        let g = qbuild::load_graph(&built_v1.join("Qairtfile"), Path::new("Qairtfile"))
            .expect("the library loads the Qairtfile");
        let label = |j: &qbuild::graph::JobId| g.jobs[j.idx()].spec.label.clone();
        // What `all` builds: not the jobs of `manual` rules (the demo's device run).
        let in_all = |i: usize| !g.model.rules[g.jobs[i].spec.rule as usize].manual;
        let dependents: BTreeMap<String, Vec<String>> = g
            .jobs
            .iter()
            .enumerate()
            .filter(|(i, _)| in_all(*i))
            .map(|(i, j)| {
                (
                    j.spec.label.clone(),
                    g.dependents[i]
                        .iter()
                        .filter(|d| in_all(d.idx()))
                        .map(label)
                        .collect(),
                )
            })
            .collect();
        assert_eq!(set_of(&jobs), dependents.keys().cloned().collect());
        let clean_v1 = built_v1.snapshot();
        // The edit's stale set and duration, on a copy.
        let e = clone_space(&built_v1);
        edit(&e);
        let dry = e.run(["-n", "all"]);
        dry.assert_ok();
        let stale_after_edit = dry.would_run();
        let (_, t_edit) = timed_build(&e, &env);
        // The reference for v2: a clean build of the edited sources in a fresh folder.
        let fresh = make();
        edit(&fresh);
        fresh.build_all();
        let clean_v2 = fresh.snapshot();
        assert_same_files(&e.snapshot(), &clean_v2, "incremental v2 vs clean v2");
        eprintln!(
            "{name}: {} jobs, clean build {t_build:?}, edit rebuild {t_edit:?} ({} jobs)",
            jobs.len(),
            stale_after_edit.len()
        );
        Project {
            name,
            make,
            edit,
            env,
            jobs,
            clean_v1,
            clean_v2,
            built_v1,
            stale_after_edit,
            dependents,
            t_build,
            t_edit,
        }
    }

    /// `seeds` and every job downstream of them.
    fn downstream(&self, seeds: &BTreeSet<String>) -> BTreeSet<String> {
        let mut out = seeds.clone();
        let mut todo: Vec<String> = seeds.iter().cloned().collect();
        while let Some(j) = todo.pop() {
            for d in self.dependents.get(&j).into_iter().flatten() {
                if out.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        out
    }

    /// One trial: kill qbuild with SIGKILL after `frac` of a build's duration, check that
    /// nothing unfinished is considered up to date, rebuild, compare with a clean build.
    fn trial(&self, kind: Trial, frac: f64, rng: &mut Rng, tally: &mut Tally, what: &str) {
        let (s, expect, mut must_run, t) = match kind {
            Trial::Fresh | Trial::FreshTwice => (
                (self.make)(),
                &self.clean_v1,
                set_of(&self.jobs),
                self.t_build,
            ),
            Trial::Edit => {
                let s = clone_space(&self.built_v1);
                (self.edit)(&s);
                (
                    s,
                    &self.clean_v2,
                    self.stale_after_edit.clone(),
                    self.t_edit,
                )
            }
        };
        tally.trials += 1;
        let kills = if kind == Trial::FreshTwice { 2 } else { 1 };
        let mut last_would = BTreeSet::new();
        let mut damaged_seen = false;
        for k in 0..kills {
            let f = if k == 0 { frac } else { rng.unit() * 0.8 };
            let delay = t.mul_f64(f);
            let bg = Bg::start(
                s.path(),
                &["-j", "2", "--json", "all"],
                &self
                    .env
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect::<Vec<_>>(),
            );
            std::thread::sleep(delay);
            let mut bg = bg;
            let was_running = bg.running();
            let ended = bg.kill9();
            if was_running && ended.signal == Some(libc::SIGKILL) {
                if k == 0 {
                    tally.killed_mid_build += 1;
                }
            } else {
                assert_eq!(ended.code, Some(0), "{what}: the build failed\n{ended}");
            }
            assert_no_panic(&ended.stderr, what);
            // Jobs reported finished may be up to date; every other job that had to run
            // must still have to run.
            for j in ended.ok_jobs() {
                must_run.remove(&j);
            }
            // The dry run also stops whatever the killed qbuild left running.
            let dry = s.run(["-n", "all"]);
            dry.assert_ok();
            assert_no_panic(&dry.stderr, what);
            if dry
                .stderr
                .contains("left running by a qbuild that was killed")
            {
                tally.with_reaped_leftovers += 1;
            }
            let set_aside = says_state_unreadable(&dry.stderr);
            if dry.stderr.contains("the explain store") {
                // Only explanations are lost (reliability.rs' damage table: same runs).
                tally.explain_store_set_aside += 1;
            }
            if set_aside {
                // A store that held records before this build must survive the kill. (On a
                // first build see crash_the_state_database_survives_a_kill_before_the_first_job_finishes.)
                assert_ne!(
                    kind,
                    Trial::Edit,
                    "{what}: the kill damaged the state\n{dry}"
                );
                tally.state_set_aside += 1;
            }
            let would = dry.would_run();
            let snap = s.snapshot();
            let mut needed = BTreeSet::new();
            let mut unreported = Vec::new();
            for (label, outs) in &self.jobs {
                let damaged: Vec<&String> = outs
                    .iter()
                    .filter(|o| snap.get(*o) != expect.get(*o))
                    .collect();
                if !damaged.is_empty() {
                    damaged_seen = true;
                    needed.insert(label.clone());
                    assert!(
                        would.contains(label),
                        "{what}: `{label}` has missing or partial outputs {damaged:?} but a dry run does not list it\n{dry}\nkilled run:\n{ended}"
                    );
                }
                if must_run.contains(label) {
                    needed.insert(label.clone());
                    if !would.contains(label) {
                        // Outputs intact (else the check above failed): see the field's doc.
                        unreported.push(label.clone());
                    }
                }
            }
            // qbuild handles one finished job at a time and flushes its event right after
            // the record: one kill can catch at most one job between the two.
            assert!(
                unreported.len() <= 1,
                "{what}: {} jobs not reported finished were found up to date: {unreported:?}\n{dry}\nkilled run:\n{ended}",
                unreported.len()
            );
            for label in unreported {
                // Up to date now: a later build of this trial neither runs nor reports it,
                // so it is counted once.
                must_run.remove(&label);
                tally.recorded_not_reported.push(format!("{what}: {label}"));
            }
            // No needless rerun: only what is needed and what depends on it.
            let excess: BTreeSet<String> = would
                .difference(&self.downstream(&needed))
                .cloned()
                .collect();
            // A store set aside after a kill loses every record: that bug is pinned by
            // crash_the_state_database_survives_a_kill_during_the_first_build and counted
            // here; any other needless rerun fails this harness.
            if !excess.is_empty() && !set_aside {
                tally.over_rebuilds.push(format!(
                    "{what}: {} job(s) would rerun needlessly, e.g. {:?}\n{dry}",
                    excess.len(),
                    excess.iter().take(3).collect::<Vec<_>>(),
                ));
            }
            last_would = would;
            if set_aside {
                // Every record is gone (reported above): from here on, everything not yet
                // rebuilt is needed.
                must_run = set_of(&self.jobs);
            }
        }
        if damaged_seen {
            tally.with_damaged_outputs += 1;
        }
        let fin = s.run(["all"]);
        fin.assert_ok();
        assert_no_panic(&fin.stderr, what);
        let extra: Vec<String> = fin.ran().difference(&last_would).cloned().collect();
        assert!(
            extra.is_empty(),
            "{what}: the rebuild ran jobs the dry run did not predict: {extra:?}\n{fin}"
        );
        assert_same_files(
            &s.snapshot(),
            expect,
            &format!("{what}: rebuild after SIGKILL vs clean build"),
        );
    }

    /// `n` trials with kill moments spread evenly over the build (one random moment in each
    /// of `n` slices of [0, duration]), kinds rotating. The duration was measured once; under
    /// a varying load some late kills land after the build ended, which is fine (the trial
    /// then checks a finished build).
    fn run_trials(&self, n: usize, seed: u64) -> Tally {
        adopt_leftovers();
        let mut rng = Rng::new(seed);
        let mut tally = Tally::default();
        let kinds = [Trial::Fresh, Trial::Edit, Trial::FreshTwice];
        let t0 = Instant::now();
        for i in 0..n {
            let kind = kinds[i % kinds.len()];
            let frac = (i as f64 + rng.unit()) / n as f64;
            let what = format!(
                "{} trial {i} ({kind:?}, kill at {:.0}% of the build, seed {seed})",
                self.name,
                frac * 100.0
            );
            self.trial(kind, frac, &mut rng, &mut tally, &what);
        }
        eprintln!(
            "{}: {} trials in {:?}: {} killed mid-build, {} left damaged outputs, {} left processes to stop, {} saw the store set aside, {} recorded-not-reported, {} over-rebuilds",
            self.name,
            tally.trials,
            t0.elapsed(),
            tally.killed_mid_build,
            tally.with_damaged_outputs,
            tally.with_reaped_leftovers,
            tally.state_set_aside,
            tally.recorded_not_reported.len(),
            tally.over_rebuilds.len()
        );
        tally
    }
}

/// Whether qbuild said the state database (not merely the explain store) was unreadable.
fn says_state_unreadable(stderr: &str) -> bool {
    stderr
        .lines()
        .any(|l| l.contains("the state database") && l.contains("is unreadable"))
}

/// What every crash harness asserts once all its trials ran (each trial already checked
/// that nothing unfinished is trusted and that the rebuild equals a clean build).
fn check_tally(t: &Tally, n: usize) {
    assert_eq!(t.trials, n);
    assert!(
        t.killed_mid_build * 10 >= n * 6,
        "most trials must kill qbuild mid-build: {t:?}"
    );
    assert!(
        t.recorded_not_reported.len() * 5 <= n,
        "jobs not reported finished were found up to date too often:\n{}",
        t.recorded_not_reported.join("\n")
    );
    assert!(
        t.over_rebuilds.is_empty(),
        "after a kill -9 the next run must rebuild exactly what is needed; {} of {n} trials rerun more:\n{}",
        t.over_rebuilds.len(),
        t.over_rebuilds.join("\n")
    );
}

/// A lighter pipeline of shell commands: every command writes its outputs in several
/// steps with pauses (`REL_SLEEP`), so a kill leaves partial files; `split` writes four
/// outputs; `stage2` waits for a background child (which a killed qbuild leaves behind).
const SHELL_PIPELINE: &str = r#"
[vars]
ids = [1, 2, 3, 4]

[rule.stage1]
matrix = { i = "${ids}" }
inputs = ["src/a.txt"]
outputs = ["gen/s1_${i}.txt"]
command = "printf 'stage1 ${i}\\n' > ${outputs}; sleep $${REL_SLEEP:-0}; cat ${inputs} >> ${outputs}; sleep $${REL_SLEEP:-0}; echo end >> ${outputs}"

[rule.split]
inputs = ["gen/s1_1.txt", "src/b.txt"]
outputs = ["gen/part_${ids}.txt"]
command = "for i in 1 2 3 4; do echo part $i > gen/part_$i.txt; sleep $${REL_SLEEP:-0}; cat ${inputs} >> gen/part_$i.txt; done"
links = [{ link = "gen/b_link.txt", to = "src/b.txt" }]

[rule.stage2]
matrix = { i = "${ids}" }
inputs = ["gen/s1_${i}.txt", "gen/part_${i}.txt", "gen/b_link.txt"]
outputs = ["gen/s2_${i}.txt"]
command = "echo stage2 > ${outputs}; (sleep $${REL_SLEEP:-0}; cat ${inputs} >> ${outputs}) & wait; echo end >> ${outputs}"

[rule.config]
outputs = ["gen/config.json"]
content = '{"ids": ${ids|json}}'

[rule.final]
inputs = ["gen/s2_${ids}.txt", "gen/config.json"]
outputs = ["gen/final.txt"]
command = "cat ${inputs} > ${outputs}; sleep $${REL_SLEEP:-0}; wc -c ${inputs} >> ${outputs}"
"#;

fn shell_pipeline() -> Space {
    let s = Space::new();
    s.write("Qairtfile", SHELL_PIPELINE)
        .write("src/a.txt", "alpha\n")
        .write("src/b.txt", "beta\n");
    s
}

fn shell_pipeline_edit(s: &Space) {
    s.write("src/a.txt", "alpha, edited\n");
}

fn demo_edit(s: &Space) {
    s.replace("Qairtfile", "--act_bitwidth 16", "--act_bitwidth 8");
}

/// Issue 5.1 on the demo pipeline (qairt-sim slowed by QAIRT_SIM_WORK_MS).
#[test]
fn crash_demo_sigkill_at_random_moments_then_rebuild_equals_clean() {
    let p = Project::setup(
        "demo",
        Space::demo,
        demo_edit,
        vec![("QAIRT_SIM_WORK_MS", "12".to_string())],
    );
    assert_same_files(
        &p.clean_v1,
        &clean_demo().snap,
        "demo under WORK_MS vs clean",
    );
    let n = 30;
    let t = p.run_trials(n, seed());
    check_tally(&t, n);
}

/// Issue 5.1 on a pipeline of shell commands that leave partial outputs and children.
#[test]
fn crash_shell_sigkill_at_random_moments_then_rebuild_equals_clean() {
    let p = Project::setup(
        "shell",
        shell_pipeline,
        shell_pipeline_edit,
        vec![("REL_SLEEP", "0.03".to_string())],
    );
    let n = 36;
    let t = p.run_trials(n, seed() ^ 0x5eed);
    assert!(
        t.with_damaged_outputs > 0,
        "some kills must leave partial outputs, or the harness proves little: {t:?}"
    );
    check_tally(&t, n);
}

/// What a damaged state database must lead to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A warning that it is unreadable, the state moved aside, every job rerun.
    SetAside,
    /// The explain store (sled) is damaged: it never decides staleness, so exactly the
    /// jobs an undamaged state would rerun do; a warning is optional.
    SameRuns,
    /// Whatever qbuild notices: it must still end with a correct tree.
    Correct,
}

fn state_db(s: &Space) -> PathBuf {
    s.join(".qbuild/state.sled")
}

fn snapshot_file(s: &Space) -> PathBuf {
    s.join(".qbuild/snapshot")
}

/// The folders a damaged state was moved to (`.qbuild/broken-PID`).
fn set_aside_stores(s: &Space) -> Vec<String> {
    fs::read_dir(s.join(".qbuild"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("broken-"))
                .collect()
        })
        .unwrap_or_default()
}

fn truncate(path: &Path, len: u64) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .set_len(len)
        .expect("truncate");
}

fn garble(path: &Path, from: usize, len: usize, rng: &mut Rng) {
    let mut b = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let end = from.saturating_add(len).min(b.len());
    for x in &mut b[from.min(end)..end] {
        *x = rng.next() as u8;
    }
    fs::write(path, b).expect("write garbled");
}

/// The length of a file up to its last non-zero byte (sled preallocates zeros).
fn used_len(path: &Path) -> usize {
    let b = fs::read(path).unwrap_or_default();
    b.iter().rposition(|x| *x != 0).map_or(0, |i| i + 1)
}

/// Open the (closed) explain store with sled itself and rewrite part of it.
fn with_sled(s: &Space, f: impl FnOnce(&sled::Db)) {
    let db = sled::open(state_db(s)).expect("open the state with sled");
    f(&db);
    db.flush().expect("flush");
}

type Damage = Box<dyn Fn(&Space, &mut Rng)>;

/// Outputs changed behind qbuild's back, so a run after damage has work to do.
fn disturb(s: &Space) {
    s.append("artifacts/serialized_binaries/split_2.bin", "garbage");
    s.remove("compiled_model/ar1-cl4096_3_of_4_quantized.dlc");
}

/// Issue 5.1: a state that is unreadable (truncated, garbled, foreign) is never trusted:
/// qbuild says so, moves it aside, rebuilds everything, never panics, and the result equals
/// a clean build. The snapshot (which decides staleness) is checksummed, so any damage to
/// it sets the state aside; damage to the sled store of readable keys (which only
/// explains) changes nothing about what runs.
#[test]
fn crash_a_damaged_state_database_is_set_aside_and_everything_rebuilds() {
    let clean = clean_demo();
    let all = set_of(&clean.jobs);
    let base = Space::demo();
    base.build_all();
    base.run(["all"]).assert_nothing_ran(all.len() as u64);
    // Reopened, sled writes its own snapshot file (`snap.*`), damaged below.
    with_sled(&base, |_| {});
    // What an undamaged state reruns after the disturbance.
    let undamaged = clone_space(&base);
    disturb(&undamaged);
    let same_runs = undamaged.build_all().ran();
    assert!(!same_runs.is_empty() && same_runs.len() < all.len());
    let snap = |s: &Space| snapshot_file(s);
    let db = |s: &Space| state_db(s).join("db");
    let mut cases: Vec<(String, Expect, Damage)> = vec![
        (
            "snapshot truncated to 0 bytes".into(),
            Expect::SetAside,
            Box::new(move |s, _| truncate(&snap(s), 0)),
        ),
        (
            "first 64 bytes of the snapshot garbled".into(),
            Expect::SetAside,
            Box::new(move |s, rng| garble(&snap(s), 0, 64, rng)),
        ),
        (
            "the whole snapshot replaced by random bytes".into(),
            Expect::SetAside,
            Box::new(move |s, rng| garble(&snap(s), 0, usize::MAX, rng)),
        ),
        (
            "a foreign format header (an older qbuild)".into(),
            Expect::SetAside,
            Box::new(move |s, _| {
                let mut b = fs::read(snap(s)).expect("read snapshot");
                b[..15].copy_from_slice(b"qbuild-state-v2");
                fs::write(snap(s), b).expect("write");
            }),
        ),
        (
            "snapshot cut short at a random point".into(),
            Expect::SetAside,
            Box::new(move |s, rng| {
                let n = fs::metadata(snap(s)).map(|m| m.len()).unwrap_or(1);
                truncate(&snap(s), rng.below(n));
            }),
        ),
        (
            "explain store: db file truncated to 0 bytes".into(),
            Expect::SameRuns,
            Box::new(move |s, _| truncate(&db(s), 0)),
        ),
        (
            "explain store: first 4 KiB of the db file garbled".into(),
            Expect::SameRuns,
            Box::new(move |s, rng| garble(&db(s), 0, 4096, rng)),
        ),
        (
            "explain store: every sled snapshot file garbled".into(),
            Expect::SameRuns,
            Box::new(move |s, rng| {
                let mut n = 0;
                for e in fs::read_dir(state_db(s)).expect("read state").flatten() {
                    if e.file_name().to_string_lossy().starts_with("snap.") {
                        garble(&e.path(), 0, usize::MAX, rng);
                        n += 1;
                    }
                }
                assert!(n > 0, "sled wrote no snapshot file");
            }),
        ),
        (
            "explain store: a foreign format header".into(),
            Expect::SameRuns,
            Box::new(|s, _| {
                with_sled(s, |db| {
                    db.insert(b"format", &b"qbuild-state-v0"[..])
                        .expect("insert");
                })
            }),
        ),
        (
            "explain store: every value replaced by garbage".into(),
            Expect::SameRuns,
            Box::new(|s, _| {
                with_sled(s, |db| {
                    let mut n = 0;
                    for name in db.tree_names() {
                        let t = db.open_tree(&name).expect("tree");
                        let keys: Vec<_> = t.iter().keys().map(|k| k.expect("key")).collect();
                        for k in keys {
                            if k.as_ref() != b"format" {
                                t.insert(k, vec![0xAB; 40]).expect("insert");
                                n += 1;
                            }
                        }
                    }
                    assert!(n > 0, "the store holds nothing to garble");
                })
            }),
        ),
        (
            "explain store: values swapped between keys in every tree".into(),
            Expect::SameRuns,
            Box::new(|s, _| {
                with_sled(s, |db| {
                    for name in db.tree_names() {
                        let t = db.open_tree(&name).expect("tree");
                        let kvs: Vec<_> = t.iter().map(|kv| kv.expect("record")).collect();
                        for (i, (k, _)) in kvs.iter().enumerate() {
                            let v = &kvs[(i + 1) % kvs.len()].1;
                            t.insert(k, v.clone()).expect("insert");
                        }
                    }
                })
            }),
        ),
        (
            "every file of the state truncated at a random point".into(),
            Expect::Correct,
            Box::new(|s, rng| {
                let dirs = [s.join(".qbuild"), state_db(s)];
                for e in dirs
                    .iter()
                    .flat_map(|d| fs::read_dir(d).expect("read state").flatten())
                {
                    if e.path().is_file() && e.file_name() != "lock" {
                        let n = used_len(&e.path()) as u64;
                        truncate(&e.path(), rng.below(n + 1));
                    }
                }
            }),
        ),
    ];
    for i in 0..4 {
        cases.push((
            format!("random bytes garbled in the snapshot (#{i})"),
            Expect::SetAside,
            Box::new(move |s, rng| {
                let used = fs::metadata(snap(s)).map(|m| m.len()).unwrap_or(1).max(1);
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(used) as usize;
                    garble(&snap(s), at, 1 + rng.below(64) as usize, rng);
                }
                // Garbling may by chance write the same bytes: insist on a change.
                let mut b = fs::read(snap(s)).expect("read");
                let at = rng.below(used) as usize;
                b[at] ^= 0x5a;
                fs::write(snap(s), b).expect("write");
            }),
        ));
        cases.push((
            format!("random bytes garbled in the used part of the explain store (#{i})"),
            Expect::Correct,
            Box::new(move |s, rng| {
                let used = used_len(&db(s)).max(1);
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(used as u64) as usize;
                    let len = 1 + rng.below(64) as usize;
                    garble(&db(s), at, len, rng);
                }
            }),
        ));
    }
    let mut rng = Rng::new(seed() ^ 0xdb);
    for (what, expect, damage) in &cases {
        let s = clone_space(&base);
        damage(&s, &mut rng);
        disturb(&s);
        let ended =
            Bg::start(s.path(), &["-j", "2", "--json", "all"], &[]).wait(Duration::from_secs(60));
        assert_eq!(
            ended.code,
            Some(0),
            "{what}: the build must succeed\n{ended}"
        );
        assert_no_panic(&ended.stderr, what);
        let warned = ended.stderr.contains("is unreadable");
        let aside = set_aside_stores(&s);
        match expect {
            Expect::SetAside => {
                assert!(
                    warned
                        && ended.stderr.contains("moved it to")
                        && ended.stderr.contains("everything will rebuild"),
                    "{what}: qbuild must say the state is unreadable and set it aside\n{ended}"
                );
                assert_eq!(
                    aside.len(),
                    1,
                    "{what}: the damaged store is kept aside: {aside:?}"
                );
                assert_eq!(ended.ok_jobs(), all, "{what}: everything reruns\n{ended}");
            }
            Expect::SameRuns => {
                assert_eq!(
                    ended.ok_jobs(),
                    same_runs,
                    "{what}: the explain store must not change what runs\n{ended}"
                );
                assert!(
                    !ended.stderr.contains("everything will rebuild"),
                    "{what}\n{ended}"
                );
            }
            Expect::Correct => {
                if ended.stderr.contains("everything will rebuild") {
                    assert_eq!(aside.len(), 1, "{what}: {aside:?}");
                    assert_eq!(ended.ok_jobs(), all, "{what}\n{ended}");
                }
            }
        }
        assert_same_files(
            &s.snapshot(),
            &clean.snap,
            &format!("{what}: rebuild vs clean build"),
        );
        // The fresh state works: the next run is a no-op, and explaining never panics.
        s.run(["all"]).assert_nothing_ran(all.len() as u64);
        let explained = s.run(["-n", "--explain", "all"]);
        explained.assert_ok();
        assert_no_panic(&explained.stderr, what);
    }
}

/// Issue 5.1, "the state database survives the kill" and PRODUCT "a kill -9 at any moment
/// leaves a state from which the next run rebuilds exactly what is needed": after a
/// `kill -9` during a first build, the store is not called damaged, and the jobs that
/// finished before the kill are not rerun.
///
/// Regression (was a bug): the `format` header of a new store is inserted but only flushed when
/// the run ends (its records wait in the journal). Killed before that, the store is on disk
/// without its header: the next run prints "the state database ... is unreadable (its header
/// record is gone (the store was damaged))", moves it aside together with the journal, and
/// reruns everything. A first compile killed at hour 5 of 6 starts over.
#[test]
fn crash_the_state_database_survives_a_kill_during_the_first_build() {
    adopt_leftovers();
    // Killed during its first job.
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.slow]\noutputs = [\"out/slow.txt\"]\ncommand = \"touch started; sleep 20; echo done > out/slow.txt\"\n",
    );
    let bg = Bg::start(s.path(), &["-j", "2", "--json", "all"], &[]);
    assert!(
        wait_until(Duration::from_secs(20), || s.exists("started")),
        "the job never started"
    );
    let ended = bg.kill9();
    assert_eq!(ended.signal, Some(libc::SIGKILL), "{ended}");
    let first = s.run(["-n", "all"]);
    first.assert_ok();
    assert_eq!(first.would_run(), support::set(["slow"]), "{first}");

    // Killed after several jobs finished.
    let s = shell_pipeline();
    let bg = Bg::start(
        s.path(),
        &["-j", "2", "--json", "all"],
        &[("REL_SLEEP", "0.05".to_string())],
    );
    assert!(
        wait_until(Duration::from_secs(20), || s.exists("gen/part_4.txt")),
        "the build did not get far enough"
    );
    let ended = bg.kill9();
    let finished = ended.ok_jobs();
    assert!(finished.len() >= 4, "{ended}");
    let next = s.run(["-n", "all"]);
    next.assert_ok();
    let again: BTreeSet<String> = next.would_run().intersection(&finished).cloned().collect();
    for out in [&first, &next] {
        assert!(
            !out.stderr.contains("unreadable"),
            "a kill -9 must not damage the state database\n{out}"
        );
    }
    assert!(set_aside_stores(&s).is_empty());
    assert!(
        again.is_empty(),
        "jobs that finished before the kill would rerun: {again:?}\n{next}"
    );
}

/// Issue 5.1: the records of a killed build that are on disk but not yet folded into the
/// store (the journal, `.qbuild/journal`) are checksummed: a torn or garbled tail is
/// ignored, never trusted, and the rebuild still equals a clean build.
#[test]
fn crash_a_damaged_journal_of_a_killed_build_is_never_trusted() {
    adopt_leftovers();
    let clean = shell_pipeline();
    let jobs = clean.build_all().ran().len() as u64;
    let clean_snap = clean.snapshot();
    let env = [("REL_SLEEP", "0.05".to_string())];
    // A build killed after some jobs finished, so the journal holds records.
    let killed = shell_pipeline();
    let bg = Bg::start(killed.path(), &["-j", "2", "--json", "all"], &env);
    assert!(
        wait_until(Duration::from_secs(20), || killed.exists("gen/part_4.txt")),
        "the build did not get far enough"
    );
    let ended = bg.kill9();
    assert!(!ended.ok_jobs().is_empty(), "{ended}");
    let journal = killed.join(".qbuild/journal");
    let len = fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    if len < 16 {
        skip(
            "crash_a_damaged_journal_of_a_killed_build_is_never_trusted",
            &format!(
                "no journal with records at {} ({len} bytes): the state keeps no journal",
                journal.display()
            ),
        );
        return;
    }
    let mut rng = Rng::new(seed() ^ 0x10);
    type JDamage = Box<dyn Fn(&Path, &mut Rng)>;
    let cases: Vec<(&str, JDamage)> = vec![
        (
            "truncated inside its last record",
            Box::new(|p, _| {
                let n = fs::metadata(p).expect("meta").len();
                fs::File::options()
                    .write(true)
                    .open(p)
                    .expect("open")
                    .set_len(n - 3)
                    .expect("truncate");
            }),
        ),
        (
            "garbled in the middle",
            Box::new(|p, rng| {
                let n = fs::metadata(p).expect("meta").len() as usize;
                garble(p, n / 2, 8, rng);
            }),
        ),
        ("garbled header", Box::new(|p, rng| garble(p, 0, 8, rng))),
        (
            "random bytes appended",
            Box::new(|p, rng| {
                let mut b = fs::read(p).expect("read");
                b.extend((0..100).map(|_| rng.next() as u8));
                fs::write(p, b).expect("write");
            }),
        ),
        (
            "every byte after the header garbled",
            Box::new(|p, rng| garble(p, 8, usize::MAX, rng)),
        ),
    ];
    for (what, damage) in &cases {
        let s = clone_space(&killed);
        damage(&s.join(".qbuild/journal"), &mut rng);
        let out = s.run(["all"]);
        out.assert_ok();
        assert_no_panic(&out.stderr, what);
        assert_same_files(
            &s.snapshot(),
            &clean_snap,
            &format!("journal {what}: rebuild vs clean"),
        );
        s.run(["all"]).assert_nothing_ran(jobs);
    }
}

// ============================================================================ 2. signals

/// `quick` finishes first; `slow` writes a partial output, then waits on a shell that waits
/// on two children. Every process of `slow` carries `REL_MARK` in its environment.
fn signal_qairtfile(token: &str, ignore_term: bool) -> String {
    let trap = if ignore_term { "trap '' TERM; " } else { "" };
    format!(
        r#"
[rule.quick]
outputs = ["out/quick.txt"]
command = "echo quick > out/quick.txt"

[rule.slow]
inputs = ["out/quick.txt"]
outputs = ["out/slow.txt", "out/slow_2.txt"]
env = {{ REL_MARK = "{token}" }}
command = "{trap}echo partial > out/slow.txt; sh -c 'sleep 30 & sleep 30 & wait'; echo done >> out/slow.txt; echo done > out/slow_2.txt"

[rule.after]
inputs = ["out/slow_2.txt"]
outputs = ["out/after.txt"]
command = "cat out/slow_2.txt > out/after.txt"
"#
    )
}

/// Send `sig` to qbuild while `slow` runs: it exits `code`, no process of the job is left,
/// the partial output is gone, `quick` stays recorded and `slow` is not.
fn interrupt(sig: i32, code: i32, ignore_term: bool) {
    adopt_leftovers();
    let tok = token("sig");
    let s = Space::new();
    s.write("Qairtfile", signal_qairtfile(&tok, ignore_term));
    // `quick` built first: the interrupted build finishes nothing (which its summary line
    // once reported as "nothing to do").
    s.run(["out/quick.txt"]).assert_ok();
    let bg = Bg::start(s.path(), &["-j", "2", "--json", "all"], &[]);
    // The leader, the inner shell and both sleeps are up, and the partial output is there.
    let up = wait_until(Duration::from_secs(20), || {
        s.exists("out/slow.txt") && marked_processes(&tok).len() >= 4
    });
    assert!(up, "the job never got going: {:?}", marked_processes(&tok));
    let t0 = Instant::now();
    bg.signal(sig);
    let ended = bg.wait(Duration::from_secs(30));
    let took = t0.elapsed();
    assert_eq!(
        ended.code,
        Some(code),
        "exit status after signal {sig}\n{ended}"
    );
    assert_no_panic(&ended.stderr, "interrupt");
    assert!(ended.stderr.contains("interrupted"), "{ended}");
    let name = if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    assert!(
        ended.stderr.contains(&format!("; stopped by {name}")),
        "{ended}"
    );
    let last: Value = ended
        .stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    assert_eq!(last["event"], "build_finished", "{ended}");
    assert_eq!(last["status"], "interrupted", "{ended}");
    // `slow` was stopped, not failed; `after` was never started, not skipped for a failure.
    assert_eq!(
        (
            &last["failed"],
            &last["interrupted"],
            &last["skipped"],
            &last["not_started"]
        ),
        (
            &Value::from(0),
            &Value::from(1),
            &Value::from(0),
            &Value::from(1)
        ),
        "{ended}"
    );
    let slow = ended
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "job_finished" && e["job"] == "slow")
        .unwrap_or_default();
    assert_eq!(slow["status"], "interrupted", "{ended}");
    assert!(
        ended
            .stderr
            .contains("qbuild: ran 0, 1 up to date, 1 interrupted, 1 not started")
            && !ended.stderr.contains("failed"),
        "{ended}"
    );
    if ignore_term {
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_secs(15),
            "a job ignoring SIGTERM is SIGKILLed about 3 s later (took {took:?})\n{ended}"
        );
    } else {
        assert!(took < Duration::from_secs(3), "took {took:?}\n{ended}");
    }
    // No process of the job survives qbuild.
    let gone = wait_until(Duration::from_secs(1), || marked_processes(&tok).is_empty());
    assert!(
        gone,
        "processes of the interrupted job survived qbuild: {:?}",
        marked_processes(&tok)
    );
    assert!(
        !s.exists("out/slow.txt"),
        "the partial output must be removed\n{ended}"
    );
    assert!(!s.exists("out/slow_2.txt"));
    assert_eq!(s.read_string("out/quick.txt"), "quick\n");
    assert!(!ended.ok_jobs().contains("slow"), "{ended}");
    // Nothing recorded for `slow`; `quick` (finished before the signal) is.
    let dry = s.run(["-n", "all"]);
    dry.assert_ok();
    assert_eq!(dry.would_run(), support::set(["slow", "after"]), "{dry}");
}

#[test]
fn signals_sigint_stops_the_whole_job_removes_partial_outputs_records_nothing_exits_130() {
    interrupt(libc::SIGINT, 130, false);
}

#[test]
fn signals_sigterm_stops_the_whole_job_removes_partial_outputs_records_nothing_exits_143() {
    interrupt(libc::SIGTERM, 143, false);
}

#[test]
fn signals_a_job_ignoring_sigterm_is_killed_3_s_later() {
    interrupt(libc::SIGTERM, 143, true);
}

/// `qbuild ARGS` in `s`, sent SIGINT once its job has made `flag`.
fn interrupt_once_up(s: &Space, args: &[&str], flag: &str) -> Ended {
    let bg = Bg::start(s.path(), args, &[]);
    let up = wait_until(Duration::from_secs(20), || s.exists(flag));
    assert!(up, "the job never got going");
    bg.signal(libc::SIGINT);
    bg.wait(Duration::from_secs(30))
}

/// Started with SIGHUP ignored (`nohup qbuild`), a hang-up does not stop the build: the
/// ignored disposition is kept, as make keeps it (qbuild used to install its handler over
/// it and stop at the first SIGHUP).
#[test]
fn signals_a_build_started_under_nohup_survives_a_hangup() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.t]\noutputs = [\"t.txt\"]\ncommand = \"touch started.flag; sleep 1; echo ok > t.txt\"\n",
    );
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("trap '' HUP; exec {} all", support::QBUILD))
        .current_dir(s.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sh");
    let up = wait_until(Duration::from_secs(20), || s.exists("started.flag"));
    assert!(up, "the job never got going");
    // SAFETY: kill(2) on the pid of a child we started and have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(s.read_string("t.txt"), "ok\n");
}

/// The interrupt message counts the commands running, not the jobs handed to the workers
/// (with `-j1` and five jobs it said "stopping 2" while one ran).
#[test]
fn signals_the_interrupt_message_counts_running_commands() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.t]
matrix = { i = [1, 2, 3, 4, 5] }
outputs = ["t${i}.txt"]
command = "touch started${i}.flag; sleep 30; echo > ${outputs}"
"#,
    );
    let ended = interrupt_once_up(&s, &["-j", "1", "all"], "started1.flag");
    assert_eq!(ended.code, Some(130), "{ended}");
    assert!(
        ended
            .stderr
            .contains("qbuild: interrupted; stopping 1 running job(s)"),
        "{ended}"
    );
}

/// A tool that catches SIGTERM, saves what it has and exits 0 is still a job stopped by the
/// interrupt: nothing is recorded for it, its output goes, and the next run reruns it (it
/// used to be recorded as built, so `-n` then said everything was up to date).
#[test]
fn signals_a_job_that_exits_0_on_sigterm_is_not_recorded() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.t]
outputs = ["t.txt"]
command = "trap 'echo caught > t.txt; exit 0' TERM; echo started > started.flag; sleep 30 & wait"
"#,
    );
    let ended = interrupt_once_up(&s, &["--json", "all"], "started.flag");
    assert_eq!(ended.code, Some(130), "{ended}");
    assert_no_panic(&ended.stderr, "interrupt");
    assert!(!ended.ok_jobs().contains("t"), "{ended}");
    assert!(
        ended.stdout.contains("its result is not recorded"),
        "{ended}"
    );
    assert!(
        !s.exists("t.txt"),
        "the saved partial output is removed\n{ended}"
    );
    let dry = s.run(["-n", "all"]);
    dry.assert_ok();
    assert_eq!(dry.would_run(), support::set(["t"]), "{dry}");
}

/// Start `qbuild --json all` in `s` and send it SIGINT once the command carrying `tok` has
/// ended (it touches `ended.flag`) and been reaped. Ended and reaped: a signal between the
/// shell's exit and qbuild's wait for it still finds the command running, as it should.
/// Returns when the signal was sent and how qbuild ended; `None` (once qbuild is seen to
/// have succeeded) when it was done before the signal could be sent.
fn interrupt_after_the_command_ended(s: &Space, tok: &str) -> Option<(SystemTime, Ended)> {
    let mut bg = Bg::start(s.path(), &["--json", "all"], &[]);
    let ended = wait_until(Duration::from_secs(60), || {
        s.exists("ended.flag") && marked_processes(tok).is_empty() && children_of(bg.pid()) == 0
    });
    assert!(ended, "the command never ended");
    if !bg.running() {
        let e = bg.wait(Duration::from_secs(30));
        assert_eq!(e.code, Some(0), "{e}");
        return None;
    }
    let at = SystemTime::now();
    bg.signal(libc::SIGINT);
    let e = bg.wait(Duration::from_secs(120));
    assert_no_panic(&e.stderr, "an interrupt after a command ended");
    assert!(
        e.code == Some(130) || e.code == Some(0),
        "interrupted, or done first\n{e}"
    );
    Some((at, e))
}

/// Regression: Ctrl-C while qbuild hashed the output of a job whose command had already
/// ended (a multi-GB artifact, after perhaps an hour of quantizing) threw the finished
/// output away as "it was running when the build was stopped", though no command was
/// running ("stopping 0 running job(s)"). Only a command (or check) still running when
/// the signal came is stopped by it; a finished one is recorded and its output kept.
#[test]
fn signals_a_job_whose_command_had_ended_is_kept_when_the_signal_comes_while_hashing() {
    let tok = token("hashing");
    let s = Space::new();
    // A sparse file costs no disk, but hashing its 2 GiB still takes about a second (the
    // signal comes within milliseconds of the command's end).
    s.write(
        "Qairtfile",
        format!(
            "[rule.big]\noutputs = [\"big.bin\"]\nenv = {{ REL_MARK = \"{tok}\" }}\ncommand = \"truncate -s 2G big.bin && echo end >> big.bin && touch ended.flag\"\n"
        ),
    );
    let Some((_, e)) = interrupt_after_the_command_ended(&s, &tok) else {
        return skip(
            "signals_a_job_whose_command_had_ended_is_kept_when_the_signal_comes_while_hashing",
            "the output was hashed before the signal could be sent",
        );
    };
    assert!(
        e.ok_jobs().contains("big"),
        "the finished job is recorded\n{e}"
    );
    assert!(s.exists("big.bin"), "its output is kept\n{e}");
    let dry = s.run(["-n", "all"]);
    dry.assert_ok();
    assert!(dry.would_run().is_empty(), "{dry}");
}

/// A work folder whose job `vec` (its processes carry `tok`) fills the folder output `vec`
/// with 30,000 files, copies `seed.txt` into it, then touches `ended.flag`; built once, then
/// `seed.txt` changed, so that the next run reruns `vec` into a folder that is there
/// already. Checking such an output (a walk of the folder, to see the command wrote into
/// it) and hashing it take long enough for a signal to land in. `check` is the rule's.
fn folder_job_to_rerun(tok: &str, check: Option<&str>) -> Space {
    let s = Space::new();
    let check = check.map_or(String::new(), |c| format!("check = \"{c}\"\n"));
    s.write(
        "Qairtfile",
        format!(
            "[rule.vec]\ninputs = [\"seed.txt\"]\noutputs = [\"vec\"]\nenv = {{ REL_MARK = \"{tok}\" }}\ncommand = \"mkdir -p vec && (cd vec && seq -f f%g 30000 | xargs touch) && cat seed.txt > vec/seed && touch ended.flag\"\n{check}"
        ),
    )
    .write("seed.txt", "1\n");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&support::set(["vec"]));
    s.remove("ended.flag").write("seed.txt", "2\n");
    s
}

/// Regression (CI): a Ctrl-C that came after a job's command had ended and been reaped,
/// while qbuild still checked its outputs, threw the finished job away.
#[test]
fn signals_a_job_whose_command_had_ended_is_kept_when_the_signal_comes_while_its_outputs_are_checked(
) {
    let tok = token("checking");
    let s = folder_job_to_rerun(&tok, None);
    let Some((_, e)) = interrupt_after_the_command_ended(&s, &tok) else {
        return skip(
            "signals_a_job_whose_command_had_ended_is_kept_when_the_signal_comes_while_its_outputs_are_checked",
            "the outputs were checked and hashed before the signal could be sent",
        );
    };
    assert!(
        e.ok_jobs().contains("vec"),
        "the finished job is recorded\n{e}"
    );
    assert_eq!(s.read_string("vec/seed"), "2\n", "{e}");
    let dry = s.run(["-n", "all"]);
    dry.assert_ok();
    assert!(dry.would_run().is_empty(), "{dry}");
}

/// A rule's `check` is not started once the build is stopping: it would not be among the
/// commands the signal reached, and could run on after the stop. The folder output holds
/// the signal in the output checks that come before the `check`.
#[test]
fn signals_a_check_is_not_started_after_the_signal() {
    let tok = token("nocheck");
    let s = folder_job_to_rerun(&tok, Some("touch checked.flag"));
    s.remove("checked.flag");
    let done_first = "the job was done before the signal could be sent";
    let Some((signalled, e)) = interrupt_after_the_command_ended(&s, &tok) else {
        return skip(
            "signals_a_check_is_not_started_after_the_signal",
            done_first,
        );
    };
    if e.code == Some(0) {
        return skip(
            "signals_a_check_is_not_started_after_the_signal",
            done_first,
        );
    }
    assert!(!e.ok_jobs().contains("vec"), "{e}");
    let checked = fs::metadata(s.join("checked.flag")).and_then(|m| m.modified());
    if !e
        .stdout
        .contains("its check was not started: the build was stopped by SIGINT")
    {
        // The check started before the signal: its flag is written a shell's start-up
        // later. One written well after the signal came from a check started after it.
        let late = checked
            .ok()
            .and_then(|t| t.duration_since(signalled).ok())
            .filter(|d| *d > Duration::from_millis(20));
        assert!(
            late.is_none(),
            "the check was started {late:?} after the signal\n{e}"
        );
        return skip(
            "signals_a_check_is_not_started_after_the_signal",
            "the check had started before the signal could be sent",
        );
    }
    assert!(checked.is_err(), "the check ran\n{e}");
    let dry = s.run(["-n", "all"]);
    dry.assert_ok();
    assert_eq!(dry.would_run(), support::set(["vec"]), "{dry}");
}

/// A work folder whose one job, `slow`, writes "partial" to `out/slow.txt`, runs `wait`
/// (its processes carry `tok`) while `slow.flag` exists, then appends "done"; qbuild
/// started on it in the background, returned once `procs` marked processes are up.
fn start_slow_job(tok: &str, wait: &str, procs: usize) -> (Space, Bg) {
    let s = Space::new();
    s.write(
        "Qairtfile",
        format!(
            r#"
[rule.slow]
outputs = ["out/slow.txt"]
env = {{ REL_MARK = "{tok}" }}
command = "echo partial > out/slow.txt; if [ -e slow.flag ]; then {wait}; fi; echo done >> out/slow.txt"
"#
        ),
    )
    .write("slow.flag", "");
    let bg = Bg::start(s.path(), &["-j", "2", "--json", "all"], &[]);
    let up = wait_until(Duration::from_secs(20), || {
        marked_processes(tok).len() >= procs
    });
    assert!(up, "the job never got going: {:?}", marked_processes(tok));
    (s, bg)
}

/// `kill -9` of qbuild: the job's whole process group lives on and would write into the
/// output later. The next run stops it before building.
/// A command starts only once `.qbuild/running` names the run: if that cannot be written
/// (a full disk; here a folder stands in the way), a crash would leave the command running
/// with no way for the next run to find and stop it, so the job fails before it starts,
/// naming the file, and nothing is recorded.
#[test]
fn signals_a_command_is_not_started_when_its_run_cannot_be_noted() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\noutputs = [\"o\"]\ncommand = \"echo hi > o\"\n",
    );
    s.mkdir(".qbuild/running");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(
        out.stderr.contains("not started: cannot write") && out.stderr.contains(".qbuild/running"),
        "{out}"
    );
    assert!(!s.exists("o"), "{out}");
    std::fs::remove_dir(s.join(".qbuild/running")).expect("rmdir");
    s.run(["all"]).assert_ran(&support::set(["a"]));
}

/// A symlink a command made at its own output before qbuild was killed outright is the
/// command's: the next run replaces it (it failed every run, "a symlink qbuild did not
/// make", until removed by hand). A link a finished job made in that run is kept, and a
/// link a user puts at an output is still refused.
#[test]
fn crash_a_link_a_command_made_before_a_kill_9_is_replaced_by_the_next_run() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.quick]
outputs = ["q"]
command = "echo quick > q.txt; ln -sf q.txt q"
[rule.lk]
inputs = ["q"]
outputs = ["lk"]
command = "echo data > target.txt; ln -sf target.txt lk; [ -e go ] || sleep 30"
[rule.user]
outputs = ["u"]
command = "echo u > u"
"#,
    );
    let bg = Bg::start(s.path(), &["-j", "1", "q", "lk"], &[]);
    assert!(
        wait_until(Duration::from_secs(20), || s.is_symlink("lk")),
        "the command never made its link"
    );
    let ended = bg.kill9();
    assert_eq!(ended.signal, Some(libc::SIGKILL), "{ended}");
    s.write("go", "");
    s.run(["q", "lk"])
        .assert_ok()
        .assert_ran(&support::set(["lk"]));
    assert_eq!(s.read_string("lk"), "data\n");
    s.run(["q", "lk"]).assert_nothing_ran(2);
    // A user's link at an output path is still refused, killed run or not.
    std::os::unix::fs::symlink("q.txt", s.join("u")).expect("symlink");
    let out = s.run(["u"]);
    out.assert_code(1);
    assert!(out.stderr.contains("that qbuild did not make"), "{out}");
}

#[test]
fn signals_leftovers_of_a_killed_qbuild_are_stopped_by_the_next_run() {
    adopt_leftovers();
    let tok = token("kill9");
    let (s, bg) = start_slow_job(&tok, "(sleep 1.5; echo LATE >> out/slow.txt) & sleep 30", 4);
    let started = Instant::now();
    let ended = bg.kill9();
    assert_eq!(ended.signal, Some(libc::SIGKILL), "{ended}");
    // The leader is gone; its background children are not.
    std::thread::sleep(Duration::from_millis(100));
    let left = marked_processes(&tok);
    assert!(
        !left.is_empty(),
        "nothing was left behind; the test proves nothing"
    );
    s.remove("slow.flag");
    let out = s.run(["all"]);
    out.assert_ok().assert_ran(&support::set(["slow"]));
    assert!(
        out.stderr
            .contains("stopped 1 command(s) left running by a qbuild that was killed"),
        "{out}"
    );
    assert!(
        wait_until(Duration::from_secs(1), || marked_processes(&tok).is_empty()),
        "leftovers survived the next run: {:?}",
        marked_processes(&tok)
    );
    // Past the moment the leftover would have appended to the output: it did not.
    let rest = Duration::from_millis(2000).saturating_sub(started.elapsed());
    std::thread::sleep(rest);
    assert_eq!(s.read_string("out/slow.txt"), "partial\ndone\n");
    s.run(["all"]).assert_nothing_ran(1);
}

/// Regression: a job's `setsid` child left the job's process group, so the SIGTERM sent
/// to the group missed it; qbuild then removed `.qbuild/running`, and nothing would ever
/// stop the child, which wrote into the output later. Before that file goes, the signal
/// path now stops every process carrying the run's token, as the next run does after a
/// `kill -9`.
#[test]
fn signals_a_setsid_child_of_an_interrupted_job_is_stopped_too() {
    adopt_leftovers();
    let tok = token("setsid");
    let s = Space::new();
    s.write(
        "Qairtfile",
        format!(
            r#"
[rule.a]
outputs = ["a.txt"]
env = {{ REL_MARK = "{tok}" }}
command = "setsid sh -c 'sleep 3; echo late >> a.txt' & echo a > a.txt; sleep 30"
"#
        ),
    );
    let bg = Bg::start(s.path(), &["-j", "2", "--json", "all"], &[]);
    // The job's shell and its sleep, the setsid'd shell and its sleep.
    let up = wait_until(Duration::from_secs(20), || {
        s.exists("a.txt") && marked_processes(&tok).len() >= 4
    });
    assert!(up, "the job never got going: {:?}", marked_processes(&tok));
    let started = Instant::now();
    bg.signal(libc::SIGTERM);
    let ended = bg.wait(Duration::from_secs(30));
    assert_eq!(ended.code, Some(143), "{ended}");
    assert_no_panic(&ended.stderr, "setsid");
    assert!(
        ended
            .stderr
            .contains("qbuild: stopped 1 command(s) left running by the interrupted jobs"),
        "{ended}"
    );
    assert!(!s.exists(".qbuild/running"), "{ended}");
    assert!(
        wait_until(Duration::from_secs(1), || marked_processes(&tok).is_empty()),
        "a process of the interrupted job outlived qbuild: {:?}",
        marked_processes(&tok)
    );
    // Past the moment the setsid'd child would have written: it did not.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(started.elapsed()));
    assert!(!s.exists("a.txt"), "{ended}");
}

/// A SIGBUS (what reading a memory-mapped file raises when the file shrinks under it: a
/// model rewritten while qbuild hashes it) ends qbuild with a message and exit 1, not a
/// bare "Bus error"; the next run stops what was left running and builds as usual.
/// (The truncation race itself was reproduced by hand: 2 GB input, cold cache, `truncate`
/// 0.3 s into the run; same message, exit 1.)
#[test]
fn signals_a_bus_error_says_what_happened_and_the_next_run_recovers() {
    adopt_leftovers();
    let tok = token("sigbus");
    let (s, bg) = start_slow_job(&tok, "sleep 30", 1);
    bg.signal(libc::SIGBUS);
    let ended = bg.wait(Duration::from_secs(10));
    assert_eq!(ended.code, Some(1), "{ended}");
    assert!(
        ended
            .stderr
            .contains("a file shrank or vanished while it was being hashed (SIGBUS)"),
        "{ended}"
    );
    assert_no_panic(&ended.stderr, "sigbus");
    s.remove("slow.flag");
    let out = s.run(["all"]);
    out.assert_ok().assert_ran(&support::set(["slow"]));
    assert!(
        wait_until(Duration::from_secs(1), || marked_processes(&tok).is_empty()),
        "leftovers survived the next run: {:?}",
        marked_processes(&tok)
    );
    assert_eq!(s.read_string("out/slow.txt"), "partial\ndone\n");
}

/// qbuild killed between starting a command and noting its process group: the list holds
/// only the build's token, which every command carries in `QBUILD_RUN`. The next run finds
/// the command by that token, wherever it moved, and stops it; a process with another
/// token is left alone.
#[test]
fn signals_a_command_whose_group_was_never_noted_is_found_by_its_token() {
    use std::os::unix::process::CommandExt;
    adopt_leftovers();
    let tok = token("unnoted");
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\noutputs = [\"out/a.txt\"]\ncommand = \"echo a > out/a.txt\"\n",
    )
    .write(".qbuild/running", "run 4242.17\n");
    let spawn = |run: &str| {
        Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30"])
            .env("QBUILD_RUN", run)
            .env("REL_MARK", &tok)
            .process_group(0)
            .spawn()
            .expect("sh")
    };
    let mut ours = spawn("4242.17");
    let mut other = spawn("4242.18");
    let (ours_pid, other_pid) = (ours.id() as i32, other.id() as i32);
    let group_of = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                let rest = st.get(st.rfind(')')? + 2..)?.to_string();
                rest.split_whitespace().nth(2)?.parse::<i32>().ok()
            })
    };
    let groups = || -> Vec<Option<i32>> {
        marked_processes(&tok)
            .iter()
            .map(|(pid, _)| group_of(*pid))
            .collect()
    };
    // Each shell and its background sleep are up.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let g = groups();
            [ours_pid, other_pid]
                .iter()
                .all(|p| g.iter().filter(|x| **x == Some(*p)).count() >= 2)
        }),
        "the commands never got going: {:?}",
        marked_processes(&tok)
    );
    let out = s.run(["all"]);
    out.assert_ok().assert_ran(&support::set(["a"]));
    assert!(
        out.stderr
            .contains("stopped 1 command(s) left running by a qbuild that was killed"),
        "{out}"
    );
    let _ = ours.wait();
    let left = groups();
    assert!(
        !left.contains(&Some(ours_pid)),
        "a process with the killed build's token lives on: {:?}",
        marked_processes(&tok)
    );
    assert!(
        left.iter().filter(|g| **g == Some(other_pid)).count() >= 2,
        "a process with another token was stopped: {:?}",
        marked_processes(&tok)
    );
    assert!(!s.join(".qbuild/running").exists(), "the list is dropped");
    // SAFETY: kill(2) of the test's own process group; no memory involved.
    unsafe {
        libc::kill(-other_pid, libc::SIGKILL);
    }
    let _ = other.wait();
}

// ============================================================================ 3. locking

const LOCK_QAIRTFILE: &str = r#"
[rule.w]
matrix = { i = [1, 2, 3, 4] }
outputs = ["out/w${i}.txt"]
command = "sleep 0.5; echo w${i} > ${outputs}"
"#;

/// Wait until `bg` holds the work-folder lock (it writes its pid into `.qbuild/lock`).
fn holds_lock(s: &Space, bg: &Bg) -> bool {
    let pid = bg.pid().to_string();
    wait_until(Duration::from_secs(20), || {
        fs::read_to_string(s.join(".qbuild/lock"))
            .is_ok_and(|t| t.split_whitespace().next() == Some(pid.as_str()))
    })
}

/// A hard link made to an output while its job waits in the queue (a `cp -al` of the work
/// folder mid-build) is not written through either: the file is unlinked when the command
/// starts, not only when the job was queued. (It was checked only then.)
#[test]
fn lock_a_hard_link_made_while_a_job_is_queued_keeps_its_bytes() {
    let s = Space::new();
    s.write("Qairtfile", LOCK_QAIRTFILE);
    s.run(["all"]).assert_ok();
    s.write(
        "Qairtfile",
        LOCK_QAIRTFILE.replace("echo w${i}", "echo v2-w${i}"),
    );
    let bg = Bg::start(s.path(), &["-j", "1", "--json", "all"], &[]);
    assert!(holds_lock(&s, &bg), "the build never took the lock");
    // The first job runs for 0.5 s; the second waits in the workers' queue meanwhile.
    fs::hard_link(s.join("out/w2.txt"), s.join("keep.txt")).expect("hard link");
    let done = bg.wait(Duration::from_secs(60));
    assert_eq!(done.code, Some(0), "{done}");
    assert_eq!(s.read_string("out/w2.txt"), "v2-w2\n");
    assert_eq!(s.read_string("keep.txt"), "w2\n", "{done}");
}

/// `cp -al FROM/. TO`: every file of `to` a hard link to `from`'s.
fn cp_al(from: &Space, to: &Space) {
    let copied = Command::new("cp")
        .arg("-al")
        .arg(from.path().join("."))
        .arg(to.path())
        .status()
        .expect("cp -al");
    assert!(copied.success());
}

/// A work folder branched with hard links (`cp -al`, cheap for GB of artifacts) shares
/// its `.qbuild/` files with the original: the first build in the copy gives it files of
/// its own, so the two folders never wait for each other's lock, and the copy's builds
/// change nothing in the original's state, explain store or logs.
#[test]
fn lock_a_hard_linked_copy_of_a_work_folder_gets_a_state_of_its_own() {
    let a = Space::new();
    a.write("Qairtfile", LOCK_QAIRTFILE);
    a.run(["all"]).assert_ok();
    let b = Space::new();
    cp_al(&a, &b);
    let state_of = |s: &Space| -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![s.join(".qbuild")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(p.clone(), fs::read(&p).expect("read"));
                }
            }
        }
        out
    };
    let before = state_of(&a);
    // (A new file: the copy's Qairtfile is the original's too.)
    b.remove("Qairtfile")
        .write("Qairtfile", LOCK_QAIRTFILE.replace("sleep 0.5", "echo v2"));
    b.run(["all"]).assert_ok();
    assert_eq!(
        state_of(&a),
        before,
        "the copy's build changed the original's state"
    );
    use std::os::unix::fs::MetadataExt;
    for f in ["lock", "snapshot"] {
        let m = fs::metadata(a.join(&format!(".qbuild/{f}"))).expect("meta");
        assert_eq!(m.nlink(), 1, "{f}");
    }
    // A slow build in the copy: the original answers at once meanwhile.
    b.remove("Qairtfile").write(
        "Qairtfile",
        LOCK_QAIRTFILE.replace("sleep 0.5", "sleep 1; echo v3"),
    );
    let bg = Bg::start(b.path(), &["-j", "1", "--json", "all"], &[]);
    assert!(holds_lock(&b, &bg), "the copy's build never took its lock");
    a.run(["--no-wait", "all"]).assert_nothing_ran(4);
    let done = bg.wait(Duration::from_secs(60));
    assert_eq!(done.code, Some(0), "{done}");
    b.run(["all"]).assert_nothing_ran(4);

    // A copy made while the original builds (for hours, on the real pipeline) waits for
    // no one: the original's lock, and its commands, are not the copy's.
    a.remove("Qairtfile").write(
        "Qairtfile",
        LOCK_QAIRTFILE.replace("sleep 0.5", "sleep 1; echo v4"),
    );
    let bg = Bg::start(a.path(), &["-j", "1", "--json", "all"], &[]);
    assert!(
        holds_lock(&a, &bg),
        "the original's build never took its lock"
    );
    let c = Space::new();
    cp_al(&a, &c);
    c.remove("Qairtfile").write("Qairtfile", LOCK_QAIRTFILE);
    let out = c.run(["--no-wait", "all"]);
    out.assert_ok();
    assert!(!out.stderr.contains("another qbuild"), "{out}");
    assert!(!out.stderr.contains("stopped"), "{out}");
    let done = bg.wait(Duration::from_secs(60));
    assert_eq!(done.code, Some(0), "{done}");
    assert_eq!(done.ok_jobs().len(), 4, "{done}");
    a.run(["all"]).assert_nothing_ran(4);
    c.run(["all"]).assert_nothing_ran(4);
    for i in 1..=4 {
        assert_eq!(c.read_string(&format!("out/w{i}.txt")), format!("w{i}\n"));
    }

    // The folder a build holds, under another name (renamed mid-build; a bind mount does
    // the same) while its lock has other links: still the same folder, so a second run
    // waits. (Its stamp named its path; the new name read as another folder's, and the
    // second run unshared the held lock and built beside the first.)
    a.remove("Qairtfile").write(
        "Qairtfile",
        LOCK_QAIRTFILE.replace("sleep 0.5", "sleep 1; echo v5"),
    );
    let bg = Bg::start(a.path(), &["-j", "1", "--json", "all"], &[]);
    assert!(
        holds_lock(&a, &bg),
        "the original's build never took its lock"
    );
    // Renamed once its first command has started (its outputs are listed as it does): a
    // build between taking the lock and that moment opens its state files by the old name,
    // and a rename then fails them (the lock freed, the second run would build).
    assert!(
        wait_until(Duration::from_secs(20), || {
            fs::read_to_string(a.join(".qbuild/running")).is_ok_and(|t| t.contains("\nout "))
        }),
        "the original's build never started a command"
    );
    let d = Space::new();
    cp_al(&a, &d);
    let renamed = a.path().with_extension("renamed");
    fs::rename(a.path(), &renamed).expect("rename");
    let second = support::command(
        support::QBUILD,
        &renamed,
        &["--no-wait", "all"],
        &[] as &[(&str, &str)],
    )
    .output()
    .expect("run qbuild");
    fs::rename(&renamed, a.path()).expect("rename back");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains("another qbuild"), "{err}");
    let done = bg.wait(Duration::from_secs(60));
    assert_eq!(done.code, Some(0), "{done}");

    // A copy of a folder with no lock file: the lock tells nothing, the other state files
    // do; after one run no file of the copy's state is the original's.
    fs::remove_file(a.join(".qbuild/lock")).expect("rm lock");
    let e = Space::new();
    cp_al(&a, &e);
    e.run(["all"]).assert_nothing_ran(4);
    let mut stack = vec![e.join(".qbuild")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir").flatten() {
            let m = fs::symlink_metadata(entry.path()).expect("meta");
            if m.is_dir() {
                stack.push(entry.path());
            } else {
                assert_eq!(m.nlink(), 1, "{} is still shared", entry.path().display());
            }
        }
    }
}

/// Files inside a folder output of a `cp -al` copy keep their bytes when the original
/// rebuilds: a folder output is never removed (files kept in it by hand would go), so before
/// the command starts each file in it with other hard links gets a copy of its own (same
/// bytes and mode), and the command writes that. (Only file outputs were unlinked: the
/// command wrote `out/x` in place, through the link, into the copy.)
#[test]
fn a_hard_linked_copy_keeps_the_files_inside_its_folder_outputs() {
    use std::os::unix::fs::MetadataExt;
    const QAIRTFILE: &str = r#"
[rule.r]
inputs = ["src.txt"]
outputs = ["out", "f.txt"]
command = "mkdir -p out/sub; cat src.txt > out/x; cat src.txt > out/sub/y; cat src.txt > f.txt; cat out/kept.txt >> out/sub/y"
"#;
    let a = Space::new();
    a.write("Qairtfile", QAIRTFILE)
        .write("src.txt", "v1\n")
        .write("out/kept.txt", "kept\n");
    a.run(["all"]).assert_ran(&support::set(["r"]));
    fs::set_permissions(a.join("out/x"), fs::Permissions::from_mode(0o750)).expect("chmod");
    let b = Space::new();
    cp_al(&a, &b);
    // A new inode: the copy's source stays v1.
    a.remove("src.txt").write("src.txt", "v2\n");
    a.run(["all"]).assert_ran(&support::set(["r"]));

    for (rel, bytes) in [
        ("f.txt", "v1\n"),
        ("out/x", "v1\n"),
        ("out/sub/y", "v1\nkept\n"),
        ("out/kept.txt", "kept\n"),
    ] {
        assert_eq!(b.read_string(rel), bytes, "the copy's {rel}");
    }
    for (rel, bytes) in [
        ("f.txt", "v2\n"),
        ("out/x", "v2\n"),
        ("out/sub/y", "v2\nkept\n"),
        ("out/kept.txt", "kept\n"),
    ] {
        assert_eq!(a.read_string(rel), bytes, "the original's {rel}");
    }
    // The original's copy of a file has its mode; no file of the folder is shared any more.
    let m = fs::metadata(a.join("out/x")).expect("stat");
    assert_eq!(m.mode() & 0o7777, 0o750);
    for rel in ["out/x", "out/sub/y", "out/kept.txt"] {
        assert_eq!(fs::metadata(a.join(rel)).expect("stat").nlink(), 1, "{rel}");
    }
    // Both folders are up to date, and the original equals a clean build.
    a.run(["all"]).assert_nothing_ran(1);
    b.run(["all"]).assert_nothing_ran(1);
    let clean = Space::new();
    clean
        .write("Qairtfile", QAIRTFILE)
        .write("src.txt", "v2\n")
        .write("out/kept.txt", "kept\n");
    clean.run(["all"]).assert_ran(&support::set(["r"]));
    assert_same_files(&a.snapshot(), &clean.snapshot(), "after the rebuild");
}

/// A file inside a folder output hard-linked by hand to a source: the rerun writes a copy
/// of its own, never the source. (`tr < src.txt > out/a.txt` truncated the shared inode:
/// the source became empty, and the next run recorded the empty result as up to date.) A
/// file of the folder with no other link is left as it is.
#[test]
fn a_file_in_a_folder_output_hard_linked_to_a_source_never_changes_the_source() {
    use std::os::unix::fs::MetadataExt;
    const QAIRTFILE: &str = r#"
[rule.up]
inputs = ["src.txt"]
outputs = ["out"]
command = "mkdir -p out; tr a-z A-Z < src.txt > out/a.txt"
"#;
    let s = Space::new();
    s.write("Qairtfile", QAIRTFILE).write("src.txt", "abc\n");
    s.run(["all"]).assert_ran(&support::set(["up"]));
    s.write("out/kept.txt", "kept\n");
    let kept = fs::metadata(s.join("out/kept.txt")).expect("stat").ino();
    s.remove("out/a.txt");
    fs::hard_link(s.join("src.txt"), s.join("out/a.txt")).expect("hard link");
    let out = s.run(["all"]);
    out.assert_ran(&support::set(["up"]));
    assert!(!out.stderr.contains("changed while the build ran"), "{out}");
    assert_eq!(s.read_string("src.txt"), "abc\n");
    assert_eq!(s.read_string("out/a.txt"), "ABC\n");
    assert_eq!(fs::metadata(s.join("src.txt")).expect("stat").nlink(), 1);
    let m = fs::metadata(s.join("out/kept.txt")).expect("stat");
    assert_eq!((m.ino(), m.nlink()), (kept, 1), "out/kept.txt was replaced");
    s.run(["all"]).assert_nothing_ran(1);
    let clean = Space::new();
    clean
        .write("Qairtfile", QAIRTFILE)
        .write("src.txt", "abc\n")
        .write("out/kept.txt", "kept\n");
    clean.run(["all"]).assert_ran(&support::set(["up"]));
    assert_same_files(&s.snapshot(), &clean.snapshot(), "after the rerun");
}

/// A dry run beside a build in progress does not wait for it (it may take hours): `-n`,
/// `--status` and `-n --explain` answer at once from what the build has recorded so far,
/// say so, take no lock and write nothing; the build ends as if they had not run.
///
/// Regression (found by hand): `qbuild --status` in a second terminal waited for the
/// whole build. And the reasons it gave were "no readable record" for every job whose
/// last record was an earlier run's: it did not open the explain store.
#[test]
fn lock_a_dry_run_beside_a_build_answers_at_once_and_disturbs_nothing() {
    let s = Space::new();
    s.write("Qairtfile", LOCK_QAIRTFILE.replace("sleep 0.5", "true"));
    s.run(["all"]).assert_ok();
    // Four jobs of a second each, one at a time: the last is still to come meanwhile.
    s.write("Qairtfile", LOCK_QAIRTFILE.replace("sleep 0.5", "sleep 1"));
    let a = Bg::start(s.path(), &["-j", "1", "--json", "all"], &[]);
    assert!(holds_lock(&s, &a), "the first build never took the lock");
    for args in [
        vec!["-n", "all"],
        vec!["--status"],
        vec!["-n", "--explain", "all"],
    ] {
        let out = s.run(args.clone());
        out.assert_ok();
        assert!(!out.stderr.contains("waiting"), "{args:?}\n{out}");
        assert!(
            out.stderr.contains(&format!(
                "another qbuild (pid {}) is building here; this is the state it has recorded so far",
                a.pid()
            )),
            "{out}"
        );
        assert!(out.would_run().contains("w i=4"), "{args:?}\n{out}");
        if args.len() != 2 {
            assert!(out.stderr.contains("command changed"), "{args:?}\n{out}");
            assert!(
                !out.stderr.contains("no readable record"),
                "{args:?}\n{out}"
            );
        }
    }
    let a = a.wait(Duration::from_secs(60));
    assert_eq!(a.code, Some(0), "{a}");
    assert_eq!(a.ok_jobs().len(), 4, "{a}");
    s.run(["all"]).assert_nothing_ran(4);
}

/// Issue 5.3: the second build waits, saying so; `--no-wait` fails at once, clearly; both
/// builds end well and the state is consistent (a third run is a no-op).
#[test]
fn lock_a_second_build_waits_and_no_wait_fails_clearly() {
    let s = Space::new();
    s.write("Qairtfile", LOCK_QAIRTFILE);
    let a = Bg::start(s.path(), &["-j", "2", "--json", "all"], &[]);
    assert!(holds_lock(&s, &a), "the first build never took the lock");
    let b = Bg::start(s.path(), &["-j", "2", "--json", "all"], &[]);
    let c = s.run(["--no-wait", "all"]);
    assert_ne!(
        c.code, 0,
        "--no-wait while another build holds the lock\n{c}"
    );
    assert!(
        c.stderr
            .contains(&format!("another qbuild (pid {})", a.pid()))
            && c.stderr.contains("--no-wait"),
        "the message names the holder and the flag\n{c}"
    );
    c.assert_error_event();
    let a = a.wait(Duration::from_secs(60));
    let b = b.wait(Duration::from_secs(60));
    assert_eq!(a.code, Some(0), "{a}");
    assert_eq!(b.code, Some(0), "{b}");
    assert!(!a.stderr.contains("waiting"), "{a}");
    assert!(
        b.stderr.contains("waiting for another qbuild"),
        "the second build says it waits\n{b}"
    );
    assert_eq!(a.ok_jobs().len(), 4, "{a}");
    assert!(
        b.ok_jobs().is_empty(),
        "the first build did everything\n{b}"
    );
    s.run(["all"]).assert_nothing_ran(4);
    for i in 1..=4 {
        assert_eq!(s.read_string(&format!("out/w{i}.txt")), format!("w{i}\n"));
    }
}

/// Issue 5.3 on the demo: two concurrent builds in one folder end consistent (equal to a
/// clean build, then a no-op); a lock holder killed with SIGKILL releases the lock to the
/// waiting build, which finishes the job.
#[test]
fn lock_concurrent_demo_builds_and_a_killed_holder_leave_a_consistent_state() {
    adopt_leftovers();
    let clean = clean_demo();
    let n = clean.jobs.len() as u64;
    let env = [("QAIRT_SIM_WORK_MS", "10".to_string())];
    let s = Space::demo();
    let a = Bg::start(s.path(), &["-j", "2", "--json", "all"], &env);
    assert!(holds_lock(&s, &a));
    let b = Bg::start(s.path(), &["-j", "2", "--json", "all"], &env);
    let (a, b) = (
        a.wait(Duration::from_secs(60)),
        b.wait(Duration::from_secs(60)),
    );
    assert_eq!((a.code, b.code), (Some(0), Some(0)), "{a}\n{b}");
    assert!(b.stderr.contains("waiting for another qbuild"), "{b}");
    assert_eq!(a.ok_jobs().len() as u64, n, "{a}");
    assert!(b.ok_jobs().is_empty(), "{b}");
    assert_same_files(&s.snapshot(), &clean.snap, "after two concurrent builds");
    s.run(["all"]).assert_nothing_ran(n);

    let s = Space::demo();
    let a = Bg::start(s.path(), &["-j", "2", "--json", "all"], &env);
    assert!(holds_lock(&s, &a));
    let b = Bg::start(s.path(), &["-j", "2", "--json", "all"], &env);
    std::thread::sleep(Duration::from_millis(300));
    let a = a.kill9();
    assert_eq!(a.signal, Some(libc::SIGKILL), "{a}");
    let b = b.wait(Duration::from_secs(60));
    assert_eq!(b.code, Some(0), "{b}");
    assert!(b.stderr.contains("waiting for another qbuild"), "{b}");
    assert_same_files(&s.snapshot(), &clean.snap, "after a killed lock holder");
    s.run(["all"]).assert_nothing_ran(n);
}

// ============================================================================ 4. hostile Qairtfiles

mod hostile {
    //! Generated and mutated Qairtfiles: random byte and line mutations of
    //! `Qairtfile.example`, and small random documents built from Qairtfile fragments (valid
    //! and invalid). Generation uses proptest strategies with a fixed seed (no shrinking:
    //! every failure is collected, grouped and saved).

    use proptest::prelude::*;
    use proptest::sample::{select, Index};
    use proptest::strategy::{BoxedStrategy, Strategy};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    /// Text that tends to break parsers and templates.
    const NASTY: &[&str] = &[
        "${",
        "}",
        "$",
        "$$",
        "${}",
        "${x}",
        "${ars[99]}",
        "${ars[-9]}",
        "${ars[x]}",
        "${splits|json}",
        "${splits|nope}",
        "${splits|join:}",
        "${env:QBUILD_REL_UNSET}",
        "${env:HOME:-${cl}}",
        "${${cl}}",
        "${num_splits",
        "\"",
        "'",
        "'''",
        "\"\"\"",
        "[",
        "]",
        "[[",
        "]]",
        "{",
        "}",
        "=",
        ",",
        "#",
        "\\",
        "\\u0000",
        "\\uD800",
        "\n",
        "\r\n",
        "\t",
        "\0",
        "é",
        "\u{feff}",
        "\u{202e}",
        "[rule.export]\n",
        "[vars]\n",
        "[rule.x]\noutputs = [\"x\"]\n",
        "\nmatrix = { ar = \"${ars}\" }\n",
        "../",
        "/abs/",
        ".qbuild/",
        "inputs",
        "outputs",
        "all",
        "range",
        "{ range = [1, 99999999999] }",
        "{ range = [\"${num_splits}\", 1] }",
        "-9223372036854775808",
        "1e400",
        "nan",
        "true",
        "toolchain = true\n",
        "pool = \"quantize\"\n",
        "exclude = [{ split = 9 }]\n",
        "links = [{ link = \"l\", to = \"models\" }]\n",
        "default = [\"nope\"]\n",
    ];
    const BAD_UTF8: &[&[u8]] = &[b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf0\x9f"];

    #[derive(Debug, Clone)]
    pub enum Mutation {
        Flip(Index, u8),
        Delete(Index, usize),
        Insert(Index, Vec<u8>),
        DeleteLine(Index),
        DupLine(Index),
        SwapLines(Index, Index),
        Truncate(Index),
        ReplaceLine(Index, Vec<u8>),
        /// Change the n-th digit of the file (keeps the TOML valid, reshapes the graph).
        Digit(Index, u8),
        /// Replace the n-th identifier-like word by another name (often a valid file).
        Word(Index, &'static str),
    }

    const WORDS: &[&str] = &[
        "ar",
        "ars",
        "cl",
        "split",
        "splits",
        "num_splits",
        "name",
        "model",
        "sdk",
        "bin",
        "inputs",
        "outputs",
        "quantize",
        "context_binary",
        "binaries",
        "export",
        "dlcs",
        "config",
        "list",
        "nope",
        "all",
        "env",
        "rule",
        "vars",
        "pool",
        "alias",
        "default",
    ];

    fn snippet() -> BoxedStrategy<Vec<u8>> {
        prop_oneof![
            6 => select(NASTY).prop_map(|s| s.as_bytes().to_vec()),
            1 => select(BAD_UTF8).prop_map(|b| b.to_vec()),
            1 => prop::collection::vec(any::<u8>(), 1..6),
            2 => "[a-z_]{1,12}".prop_map(String::into_bytes),
        ]
        .boxed()
    }

    fn mutation() -> BoxedStrategy<Mutation> {
        prop_oneof![
            1 => any::<(Index, u8)>().prop_map(|(i, b)| Mutation::Flip(i, b)),
            1 => (any::<Index>(), 1usize..40).prop_map(|(i, n)| Mutation::Delete(i, n)),
            3 => (any::<Index>(), snippet()).prop_map(|(i, s)| Mutation::Insert(i, s)),
            1 => any::<Index>().prop_map(Mutation::DeleteLine),
            1 => any::<Index>().prop_map(Mutation::DupLine),
            1 => any::<(Index, Index)>().prop_map(|(a, b)| Mutation::SwapLines(a, b)),
            1 => any::<Index>().prop_map(Mutation::Truncate),
            2 => (any::<Index>(), snippet()).prop_map(|(i, s)| Mutation::ReplaceLine(i, s)),
            3 => (any::<Index>(), 0u8..10).prop_map(|(i, d)| Mutation::Digit(i, d)),
            3 => (any::<Index>(), select(WORDS)).prop_map(|(i, w)| Mutation::Word(i, w)),
        ]
        .boxed()
    }

    fn lines(t: &[u8]) -> Vec<Vec<u8>> {
        t.split_inclusive(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    pub fn apply(text: &[u8], m: &Mutation) -> Vec<u8> {
        let mut t = text.to_vec();
        let mut ls = lines(&t);
        match m {
            Mutation::Flip(i, b) if !t.is_empty() => {
                let k = i.index(t.len());
                t[k] = *b;
            }
            Mutation::Delete(i, n) if !t.is_empty() => {
                let k = i.index(t.len());
                let e = (k + n).min(t.len());
                t.drain(k..e);
            }
            Mutation::Insert(i, s) => {
                let k = i.index(t.len() + 1);
                t.splice(k..k, s.iter().copied());
            }
            Mutation::Truncate(i) => t.truncate(i.index(t.len() + 1)),
            Mutation::DeleteLine(i) if !ls.is_empty() => {
                ls.remove(i.index(ls.len()));
                t = ls.concat();
            }
            Mutation::DupLine(i) if !ls.is_empty() => {
                let k = i.index(ls.len());
                let l = ls[k].clone();
                ls.insert(k, l);
                t = ls.concat();
            }
            Mutation::SwapLines(a, b) if !ls.is_empty() => {
                let (a, b) = (a.index(ls.len()), b.index(ls.len()));
                ls.swap(a, b);
                t = ls.concat();
            }
            Mutation::ReplaceLine(i, s) if !ls.is_empty() => {
                let k = i.index(ls.len());
                let mut l = s.clone();
                l.push(b'\n');
                ls[k] = l;
                t = ls.concat();
            }
            Mutation::Digit(i, d) => {
                let at: Vec<usize> = (0..t.len()).filter(|k| t[*k].is_ascii_digit()).collect();
                if !at.is_empty() {
                    t[at[i.index(at.len())]] = b'0' + d;
                }
            }
            Mutation::Word(i, w) => {
                // Words: maximal runs of [A-Za-z_] of length >= 2.
                let mut words = Vec::new();
                let mut k = 0;
                while k < t.len() {
                    let is = |b: u8| b.is_ascii_alphabetic() || b == b'_';
                    if is(t[k]) {
                        let st = k;
                        while k < t.len() && is(t[k]) {
                            k += 1;
                        }
                        if k - st >= 2 {
                            words.push((st, k));
                        }
                    } else {
                        k += 1;
                    }
                }
                if !words.is_empty() {
                    let (a, b) = words[i.index(words.len())];
                    t.splice(a..b, w.bytes());
                }
            }
            _ => {}
        }
        t
    }

    /// `Qairtfile.example` with one to four mutations.
    pub fn mutated(base: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
        prop::collection::vec(mutation(), 1..5)
            .prop_map(move |ms| ms.iter().fold(base.clone(), |t, m| apply(&t, m)))
            .boxed()
    }

    const NAMES: &[&str] = &[
        "a", "b", "n", "x", "splits", "all", "inputs", "bad name", "", "é", "a-b",
    ];
    const VALUES: &[&str] = &[
        "1",
        "\"s\"",
        "[1, 2]",
        "[\"p\", \"q\"]",
        "{ range = [1, 3] }",
        "{ range = [1, \"${n}\"] }",
        "{ range = [3, 1] }",
        "{ range = [0, 99999999999] }",
        "{ range = [1, 40] }",
        "\"${a}\"",
        "\"${b}-${a}\"",
        "\"${a[5]}\"",
        "\"${env:QBUILD_REL_UNSET}\"",
        "\"${env:QBUILD_REL_UNSET:-d}\"",
        "\"${a|join:,}\"",
        "\"${a|json}\"",
        "\"${a|nope}\"",
        "\"${x}\"",
        "\"${n}${n}\"",
        "[]",
        "true",
        "1.5",
        "{}",
        "[[1]]",
        "\"$${a}\"",
        "{ range = [1] }",
        "{ range = \"x\" }",
        "\"${\"",
        "\"${a\"",
        "\"${inputs}\"",
        "\"../up\"",
        "[\"${a}\", \"${b}\"]",
    ];
    const PATHS: &[&str] = &[
        "out/${x}.txt",
        "out/${a}",
        "out/f.txt",
        "in.txt",
        "../escape.txt",
        "/abs/x",
        ".qbuild/x",
        "out/../../x",
        "out/a b.txt",
        "${inputs}",
        "",
        "out/${n}_${x}",
        "out/${a}/${b}",
        "out/${nope}",
        "models/llama3.onnx",
        "out",
    ];
    const ACTIONS: &[&str] = &[
        "command = \"touch ${outputs}\"",
        "command = \"cat ${inputs} > ${outputs}\"",
        "command = \"echo ${a} > ${outputs[0]}\"",
        "command = \"${nope}\"",
        "command = 1",
        "command = \"\"",
        "argv = [\"touch\", \"${outputs}\"]",
        "argv = []",
        "argv = \"touch\"",
        "content = \"${a|json}\"",
        "content = \"x\"\ncommand = \"y\"",
    ];
    const MATRICES: &[&str] = &[
        "matrix = { x = \"${a}\" }",
        "matrix = { x = [1, 2], n = { range = [1, 3] } }",
        "matrix = { x = { range = [1, 40] }, n = { range = [1, 40] } }",
        "matrix = { x = [] }",
        "matrix = { x = \"${nope}\" }",
        "matrix = {}",
        "matrix = [1]",
        "matrix = { x = { range = [1, 3000000] }, n = { range = [1, 3] } }",
        "matrix = { a = [1, 2] }",
    ];
    const EXTRAS: &[&str] = &[
        "pool = \"p\"",
        "pool = \"nope\"",
        "env = { K = \"${a}\" }",
        "exclude = [{ x = 1 }]",
        "exclude = [{ zz = 1 }]",
        "let = { a = \"${x}\" }",
        "let = { y = \"${y}\" }",
        "case = [{ when = { x = 1 }, let = { q = \"1\" } }]",
        "case = [{ when = 1 }]",
        "description = \"${x}\"",
        "toolchain = true",
        "check = \"true\"",
        "links = [{ link = \"l/${x}\", to = \"in.txt\" }]",
        "links = [{ link = \"l\" }]",
        "allow_empty = true",
        "comand = \"x\"",
        "inputs = \"notalist\"",
        "default = 1",
    ];
    const TABLES: &[&str] = &[
        "[pool]\np = 1\n",
        "[pool]\np = 0\n",
        "[pool]\np = -1\n",
        "[alias]\nal = [\"r\"]\n",
        "[alias]\nal = [\"al\"]\n",
        "[alias]\nal = [\"nope\"]\n",
        "default = [\"r\"]\n",
        "default = [\"nope\"]\n",
        "default = [\"in.txt\"]\n",
        "[toolchain]\nname = \"q\"\nroot = \"${env:QNN_SDK_ROOT}\"\n",
        "[toolchain]\nroot = \"/nonexistent\"\n",
        "[unknown]\n",
        "[rule]\n",
        "[rule.r.sub]\n",
        "x = 1\n",
        "[[rule]]\n",
        "[vars]\n[vars]\n",
    ];

    fn key(k: &str) -> String {
        if !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            k.to_string()
        } else {
            format!("{k:?}")
        }
    }

    fn vars_table() -> BoxedStrategy<String> {
        prop::collection::vec((select(NAMES), select(VALUES)), 0..5)
            .prop_map(|kvs| {
                let mut s = String::from("[vars]\n");
                for (k, v) in kvs {
                    s.push_str(&format!("{} = {v}\n", key(k)));
                }
                s
            })
            .boxed()
    }

    fn path_list(ps: Vec<&str>) -> String {
        let items: Vec<String> = ps.iter().map(|p| format!("{p:?}")).collect();
        format!("[{}]", items.join(", "))
    }

    fn rule_table() -> BoxedStrategy<String> {
        (
            select(&["r", "s", "all", "x", "bad name", "p"][..]),
            prop::option::of(select(MATRICES)),
            prop::option::of(prop::collection::vec(select(PATHS), 0..3)),
            prop::option::of(prop::collection::vec(select(PATHS), 0..3)),
            prop::option::of(select(ACTIONS)),
            prop::collection::vec(select(EXTRAS), 0..3),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(name, matrix, ins, outs, action, extras, dup)| {
                // Sometimes one job names the same output twice.
                let outs = outs.map(|mut o| {
                    if dup && !o.is_empty() {
                        o.push(o[0]);
                    }
                    o
                });
                let mut s = format!("[rule.{}]\n", key(name));
                if let Some(m) = matrix {
                    s.push_str(&format!("{m}\n"));
                }
                if let Some(i) = ins {
                    s.push_str(&format!("inputs = {}\n", path_list(i)));
                }
                if let Some(o) = outs {
                    s.push_str(&format!("outputs = {}\n", path_list(o)));
                }
                if let Some(a) = action {
                    s.push_str(&format!("{a}\n"));
                }
                for e in extras {
                    s.push_str(&format!("{e}\n"));
                }
                s
            })
            .boxed()
    }

    /// A small random document of Qairtfile fragments.
    pub fn generated() -> BoxedStrategy<Vec<u8>> {
        let fragment = prop_oneof![
            2 => vars_table(),
            4 => rule_table(),
            2 => select(TABLES).prop_map(String::from),
        ];
        prop::collection::vec(fragment, 1..7)
            .prop_map(|fs| fs.concat().into_bytes())
            .boxed()
    }

    /// Any hostile Qairtfile: mutated example or generated.
    pub fn any_qairtfile(base: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
        prop_oneof![mutated(base), generated()].boxed()
    }

    /// A deterministic runner (fixed seed, no persistence, no shrinking needed).
    pub fn runner(cases: u32, seed: u64) -> TestRunner {
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = (seed >> ((i % 8) * 8)) as u8 ^ i as u8;
        }
        TestRunner::new_with_rng(
            Config {
                cases,
                failure_persistence: None,
                max_shrink_iters: 0,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &key),
        )
    }
}

/// The `file:line:col` of a diagnostic in qbuild's stderr: `--> Qairtfile:L:C`, or (for a
/// file that is not UTF-8) `error: Qairtfile:L:C: ...`. Returns (line, col).
fn position_in(stderr: &str) -> Option<(usize, usize)> {
    let i = stderr.find("Qairtfile:")?;
    let mut it = stderr[i + "Qairtfile:".len()..].splitn(3, ':');
    let line = it.next()?.parse().ok()?;
    let col = it
        .next()?
        .trim_end()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((line, col))
}

/// One hostile Qairtfile through `qbuild --check` (which also resolves the default targets
/// and checks the toolchain and sources): no panic, no hang, exit 0 or 2, and a rejection
/// is `error: ...` with a `Qairtfile:LINE:COL` that lies inside the file.
fn check_hostile(dir: &Path, bytes: &[u8]) -> Result<bool, (String, String)> {
    fs::write(dir.join("Qairtfile"), bytes).expect("write Qairtfile");
    let bg = Bg::start(dir, &["--check"], &[]);
    let t0 = Instant::now();
    let mut bg = bg;
    while bg.running() {
        if t0.elapsed() > Duration::from_secs(20) {
            let e = bg.kill9();
            return Err(("hang: --check ran over 20 s".into(), e.to_string()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let e = bg.wait(Duration::from_secs(5));
    let first = e.stderr.lines().next().unwrap_or("").to_string();
    let kind = |k: &str| (k.to_string(), e.to_string());
    if e.stderr.contains("panicked") || e.code == Some(101) {
        return Err(kind("panic"));
    }
    match e.code {
        Some(0) => Ok(true),
        Some(2) => {
            if !first.starts_with("error: ") {
                return Err(kind("a rejection without `error: `"));
            }
            let lines = bytes.split(|b| *b == b'\n').count();
            match position_in(&e.stderr) {
                Some((l, c)) if l >= 1 && l <= lines && c >= 1 => Ok(false),
                Some(_) => Err(kind("a position outside the file")),
                None => {
                    // Group by message shape (digits and quoted names blanked).
                    let shape: String = first
                        .split('`')
                        .enumerate()
                        .map(|(i, p)| if i % 2 == 1 { "…" } else { p })
                        .collect::<Vec<_>>()
                        .join("`");
                    Err((format!("no file:line:col: {shape}"), e.to_string()))
                }
            }
        }
        other => Err(kind(&format!(
            "exit status {other:?}, signal {:?}",
            e.signal
        ))),
    }
}

/// Save failing cases (under the target dir) and panic with one line per kind of failure.
fn report_failures(what: &str, failures: Vec<(String, String, Vec<u8>)>, cases: usize) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reliability-{what}"));
    let _ = fs::remove_dir_all(&dir);
    if failures.is_empty() {
        return;
    }
    fs::create_dir_all(&dir).expect("mkdir failures dir");
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, (kind, detail, bytes)) in failures.iter().enumerate() {
        fs::write(dir.join(format!("case-{i}.Qairtfile")), bytes).expect("save case");
        fs::write(
            dir.join(format!("case-{i}.out")),
            format!("{kind}\n{detail}"),
        )
        .expect("save");
        groups.entry(kind.clone()).or_default().push(i);
    }
    let mut msg = format!(
        "{} of {cases} hostile Qairtfiles broke a promise (cases saved in {}):\n",
        failures.len(),
        dir.display()
    );
    for (kind, ids) in &groups {
        let first = &failures[ids[0]];
        msg.push_str(&format!(
            "- {kind}: {} case(s), e.g. case-{}.Qairtfile\n{}\n",
            ids.len(),
            ids[0],
            first.1.lines().take(12).collect::<Vec<_>>().join("\n")
        ));
    }
    panic!("{msg}");
}

/// Issue 5.4: ~250 generated and mutated Qairtfiles through the binary.
#[test]
fn hostile_qairtfiles_never_panic_or_hang_and_every_rejection_has_a_position() {
    let s = Space::demo();
    let base = fs::read(s.join("Qairtfile")).expect("example");
    let cases = std::env::var("QBUILD_REL_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(250);
    let mut runner = hostile::runner(cases, seed());
    let failures = std::cell::RefCell::new(Vec::new());
    let accepted = std::cell::Cell::new(0);
    let t0 = Instant::now();
    runner
        .run(&hostile::any_qairtfile(base), |bytes| {
            match check_hostile(s.path(), &bytes) {
                Ok(ok) => accepted.set(accepted.get() + usize::from(ok)),
                Err((kind, detail)) => failures.borrow_mut().push((kind, detail, bytes)),
            }
            Ok(())
        })
        .expect("the runner itself");
    eprintln!(
        "hostile: {cases} cases through the binary in {:?}, {} accepted",
        t0.elapsed(),
        accepted.get()
    );
    report_failures("binary", failures.into_inner(), cases as usize);
}

/// Issue 5.4, in process: many more cases through the library (parse, expand, graph):
/// no panic, no hang, every error located (a `Diagnostic` with a location), and located
/// inside the file: a line that exists, shown with its own text, a column on that line.
#[test]
fn hostile_qairtfiles_through_the_library_are_always_located() {
    use qbuild::diag::Source;
    let base = fs::read(Path::new(support::REPO).join("Qairtfile.example")).expect("example");
    let cases = std::env::var("QBUILD_REL_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1500);
    let mut runner = hostile::runner(cases, seed() ^ 0x11b);
    let failures = std::cell::RefCell::new(Vec::new());
    let t0 = Instant::now();
    runner
        .run(&hostile::any_qairtfile(base), |bytes| {
            let Ok(text) = String::from_utf8(bytes.clone()) else {
                return Ok(()); // the binary test covers files that are not UTF-8
            };
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let r = qbuild::qairtfile::parse(Source::new(Path::new("Qairtfile"), text.clone()))
                    .and_then(|q| qbuild::expand::expand(&q))
                    .and_then(qbuild::graph::Graph::build)
                    .map(|_| ());
                let _ = tx.send(r.map_err(|d| {
                    // Some(true): the line exists, its text is the one shown, the column is on it.
                    let inside = d.location.as_ref().map(|l| {
                        let line = text.split('\n').nth(l.line.wrapping_sub(1));
                        line.is_some_and(|t| {
                            let t = t.trim_end_matches('\r');
                            l.line_text == t && l.column <= t.chars().count() + 1
                        })
                    });
                    (inside, d.to_string())
                }));
            });
            let fail = match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(Ok(())) | Ok(Err((Some(true), _))) => None,
                Ok(Err((inside, msg))) => Some((
                    format!(
                        "{}: {}",
                        if inside.is_none() {
                            "no location"
                        } else {
                            "a location outside the file"
                        },
                        msg.lines().next().unwrap_or("")
                    ),
                    msg,
                )),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    Some(("hang (over 20 s)".into(), String::new()))
                }
                Err(_) => Some(("panic".into(), String::new())),
            };
            if let Some((kind, detail)) = fail {
                failures.borrow_mut().push((kind, detail, bytes));
            }
            Ok(())
        })
        .expect("the runner itself");
    eprintln!(
        "hostile: {cases} cases through the library in {:?}",
        t0.elapsed()
    );
    report_failures("library", failures.into_inner(), cases as usize);
}

/// Alias graphs that used to hang every run once aliases were checked by every run: a
/// diamond 30 levels deep (each level naming both aliases of the next: 2^30 paths), a
/// fan of 3,000 aliases naming one alias that names 3,000 more, and a cycle through 3,000
/// aliases. Each run must answer well inside the limit (it takes milliseconds).
#[test]
fn pathological_alias_graphs_do_not_hang() {
    const RULE: &str = "[rule.r]\noutputs = [\"r.out\"]\ncommand = \"echo r > r.out\"\n";
    let mut diamond = String::from("[alias]\n");
    for i in 0..30 {
        let j = i + 1;
        diamond += &format!("d{i} = [\"d{j}\", \"e{j}\"]\ne{i} = [\"d{j}\", \"e{j}\"]\n");
    }
    diamond += &format!("d30 = [\"r\"]\ne30 = [\"r\"]\n{RULE}");
    let n = 3000;
    let mut fan = String::from("[alias]\n");
    for i in 0..n {
        fan += &format!("g{i} = [\"big\"]\nb{i} = [\"r\"]\n");
    }
    let items: Vec<String> = (0..n).map(|i| format!("\"b{i}\"")).collect();
    fan += &format!("big = [{}]\n{RULE}", items.join(", "));
    let mut cycle = String::from("[alias]\n");
    for i in 0..n {
        cycle += &format!("c{i} = [\"c{}\"]\n", (i + 1) % n);
    }
    cycle += RULE;
    let cases: [(&str, &String, &[&str], i32); 3] = [
        ("diamond", &diamond, &["-n", "d0"], 0),
        ("fan", &fan, &["-n", "g7"], 0),
        ("cycle", &cycle, &["-n"], 2),
    ];
    for (what, q, args, code) in cases {
        let s = Space::new();
        s.write("Qairtfile", q);
        let e = Bg::start(s.path(), args, &[]).wait(Duration::from_secs(60));
        assert_eq!(e.code, Some(code), "{what}: {}", e.stderr);
        if what == "cycle" {
            assert!(
                e.stderr.starts_with("error: alias cycle: c0 -> c1 -> "),
                "{}",
                e.stderr
            );
        }
    }
}

/// Issue 5.4 / PRODUCT "Bad input": specific hostile Qairtfiles, each refused with exit 2,
/// `error:` and a `Qairtfile:LINE:COL`, before anything runs.
///
/// Regressions (were bugs):
/// - one job naming the same output twice panics (`src/graph.rs`: index out of bounds);
/// - an unknown name in `default` or in an `[alias]`, an alias cycle, and a `default`
///   naming a missing source are reported without a position (and `--check` accepts an
///   alias naming nothing).
#[test]
fn hostile_known_cases_are_refused_with_a_position() {
    const HARMLESS: &str = "[rule.ok]\noutputs = [\"ran.txt\"]\ncommand = \"echo ran > ran.txt\"\n";
    // (what, Qairtfile, whether `qbuild all` must refuse it too: every run checks the
    // aliases and `default`, used or not).
    let cases: &[(&str, String, bool)] = &[
        (
            "one job names an output twice",
            format!("{HARMLESS}[rule.x]\noutputs = [\"a.txt\", \"./a.txt\"]\ncommand = \"touch a.txt\"\n"),
            true,
        ),
        ("an unknown name in `default`", format!("default = [\"nope\"]\n{HARMLESS}"), true),
        (
            "an alias naming nothing",
            format!("default = [\"al\"]\n[alias]\nal = [\"nope\"]\n{HARMLESS}"),
            true,
        ),
        ("an alias cycle", format!("default = [\"al\"]\n[alias]\nal = [\"al\"]\n{HARMLESS}"), true),
        (
            "`default` names a source that does not exist",
            format!("default = [\"missing.txt\"]\n{HARMLESS}"),
            true,
        ),
        (
            "an alias with a rule's name",
            format!("[alias]\nok = [\"ran.txt\"]\n{HARMLESS}"),
            true,
        ),
        ("an output escaping with ..", format!("{HARMLESS}[rule.x]\noutputs = [\"../escape.txt\"]\ncommand = \"touch ../escape.txt\"\n"), true),
    ];
    let mut broken = Vec::new();
    for (what, q, with_all) in cases {
        let runs: &[&[&str]] = if *with_all {
            &[&["--check"], &["all"], &[]]
        } else {
            &[&["--check"], &[]]
        };
        for args in runs {
            let s = Space::new();
            s.write("Qairtfile", q);
            let mut argv = vec!["--json"];
            argv.extend_from_slice(args);
            let e = Bg::start(s.path(), &argv, &[]).wait(Duration::from_secs(30));
            let ok = e.code == Some(2)
                && e.stderr.starts_with("error: ")
                && position_in(&e.stderr).is_some()
                && !e.stderr.contains("panicked")
                && !s.exists("ran.txt");
            if !ok {
                broken.push(format!("{what} (qbuild {}):\n{e}", args.join(" ")));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} refusal(s) broke a promise:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// Issue 5.4, quoting: values interpolated into `command` are shell-quoted: each arrives as
/// one argument, and `;`, `$(...)`, backquotes, `&&`, globs, quotes, spaces, newlines never
/// act. `argv = [...]` runs without a shell. `|raw` opts out (a positive control: it runs).
#[test]
fn quoting_interpolated_values_arrive_as_one_argument_and_never_run() {
    let s = Space::new();
    // Writes each argument as `[ARG]` on its own line.
    s.write(
        "argv.sh",
        "out=$1; shift; : > \"$out\"; for a in \"$@\"; do printf '[%s]\\n' \"$a\" >> \"$out\"; done\n",
    );
    s.write(
        "Qairtfile",
        r#"
[vars]
semi = "; touch pwned_semi"
subst = "$(touch pwned_subst)"
tick = "`touch pwned_tick`"
amp = "x && touch pwned_amp"
spaces = "a  b   c"
quotes = "it's \"quoted\""
glob = "*"
dollar = "$HOME"
newline = "line1\nline2"
empty = ""
list = ["one two", "; touch pwned_list", "three"]
raw_semi = "; touch pwned_raw"

[rule.shell]
outputs = ["out/shell.txt"]
command = "sh argv.sh ${outputs} ${semi} ${subst} ${tick} ${amp} ${spaces} ${quotes} ${glob} ${dollar} ${newline} ${empty} --flag=${semi} ${list} ${list|join:,} ${env:REL_EVIL} pre${semi}post"

[rule.argv]
outputs = ["out/argv.txt"]
argv = ["sh", "argv.sh", "${outputs}", "${semi}", "${subst}", "; touch pwned_literal", "$(touch pwned_literal2)", "a b", "${list}", "${empty}"]

[rule.raw]
outputs = ["out/raw.txt"]
command = "sh argv.sh ${outputs} x${raw_semi|raw}"
"#,
    );
    let out = s
        .qbuild(["all"])
        .env("REL_EVIL", "$(touch pwned_env); x")
        .run();
    out.assert_ok();
    assert_eq!(
        s.read_string("out/shell.txt"),
        "[; touch pwned_semi]\n[$(touch pwned_subst)]\n[`touch pwned_tick`]\n[x && touch pwned_amp]\n\
         [a  b   c]\n[it's \"quoted\"]\n[*]\n[$HOME]\n[line1\nline2]\n[]\n[--flag=; touch pwned_semi]\n\
         [one two]\n[; touch pwned_list]\n[three]\n[one two,; touch pwned_list,three]\n\
         [$(touch pwned_env); x]\n[pre; touch pwned_semipost]\n"
    );
    assert_eq!(
        s.read_string("out/argv.txt"),
        "[; touch pwned_semi]\n[$(touch pwned_subst)]\n[; touch pwned_literal]\n[$(touch pwned_literal2)]\n\
         [a b]\n[one two]\n[; touch pwned_list]\n[three]\n[]\n"
    );
    // The positive control: `|raw` reaches the shell as written.
    assert_eq!(s.read_string("out/raw.txt"), "[x]\n");
    assert!(
        s.exists("pwned_raw"),
        "the |raw control did not run: the test proves nothing"
    );
    let pwned: Vec<String> = s
        .files()
        .into_iter()
        .filter(|f| f.starts_with("pwned") && f != "pwned_raw")
        .collect();
    assert!(
        pwned.is_empty(),
        "an interpolated value ran as shell code: {pwned:?}"
    );
}

/// Issue 5.4: outputs that escape the work folder (`..`, absolute, through a variable, into
/// `.qbuild/`, links out) are refused with a position before anything runs.
#[test]
fn escaping_outputs_are_refused_before_anything_runs() {
    const HARMLESS: &str = "[rule.ok]\noutputs = [\"ran.txt\"]\ncommand = \"echo ran > ran.txt\"\n";
    let bad = [
        "outputs = [\"../escape.txt\"]\ncommand = \"touch ../escape.txt\"",
        "outputs = [\"/tmp/qbuild-rel-abs.txt\"]\ncommand = \"touch /tmp/qbuild-rel-abs.txt\"",
        "outputs = [\"out/../../escape.txt\"]\ncommand = \"touch ../escape.txt\"",
        "outputs = [\"${up}/escape.txt\"]\ncommand = \"touch ../escape.txt\"",
        "outputs = [\".qbuild/x\"]\ncommand = \"touch .qbuild/x\"",
        "links = [{ link = \"../l\", to = \"ran.txt\" }]",
        "links = [{ link = \"l\", to = \"/etc/passwd\" }]",
        "links = [{ link = \"l\", to = \"../outside\" }]",
    ];
    for b in bad {
        let parent = Space::new();
        parent.mkdir("w");
        let s = Space::at(&parent.join("w"));
        s.write(
            "Qairtfile",
            format!("[vars]\nup = \"..\"\n{HARMLESS}[rule.bad]\n{b}\n"),
        );
        let out = s.run(["all"]);
        out.assert_code(2);
        assert!(
            out.stderr.starts_with("error: ") && position_in(&out.stderr).is_some(),
            "{out}"
        );
        assert!(
            !s.exists("ran.txt") && !s.exists(".qbuild"),
            "something ran\n{out}"
        );
        assert_eq!(parent.files(), vec!["w/Qairtfile".to_string()], "{out}");
        assert!(!Path::new("/tmp/qbuild-rel-abs.txt").exists());
    }
}

/// Issue 5.4: an output whose folder is a symlink leading out of the work folder: that job
/// fails before it starts (the rest builds with -k), nothing is written outside, and the
/// job is not recorded.
#[test]
fn escaping_through_a_symlinked_folder_fails_that_job_before_it_starts() {
    let parent = Space::new();
    parent.mkdir("outside").mkdir("w");
    let s = Space::at(&parent.join("w"));
    s.write(
        "Qairtfile",
        "[rule.a]\noutputs = [\"gen/a.txt\"]\ncommand = \"echo a > gen/a.txt\"\n[rule.b]\noutputs = [\"b.txt\"]\ncommand = \"echo b > b.txt\"\n",
    );
    std::os::unix::fs::symlink("../outside", s.join("gen")).expect("symlink");
    let out = s.run(["-k", "all"]);
    out.assert_code(1);
    assert_eq!(out.failed(), support::set(["a"]), "{out}");
    assert!(out.stderr.contains("outside the work folder"), "{out}");
    assert_eq!(out.ran(), support::set(["b"]));
    assert!(
        fs::read_dir(parent.join("outside"))
            .expect("outside")
            .next()
            .is_none(),
        "something was written outside the work folder"
    );
    let dry = s.run(["-n", "all"]);
    assert_eq!(dry.would_run(), support::set(["a"]), "{dry}");
}

/// Issue 5.4: an output path that is itself a symlink leading out of the work folder (left
/// there by a user, or by a tool) must not be written through.
///
/// Regression (was a bug): only the output's folders are checked; `echo a > gen/a.txt` follows
/// the link and overwrites the file outside the work folder, and the build reports success.
#[test]
fn escaping_through_an_output_that_is_a_symlink_is_refused() {
    let parent = Space::new();
    parent.write("outside/a.txt", "precious\n").mkdir("w/gen");
    let s = Space::at(&parent.join("w"));
    s.write(
        "Qairtfile",
        "[rule.a]\noutputs = [\"gen/a.txt\"]\ncommand = \"echo a > gen/a.txt\"\n",
    );
    std::os::unix::fs::symlink("../../outside/a.txt", s.join("gen/a.txt")).expect("symlink");
    let out = s.run(["all"]);
    assert_eq!(
        parent.read_string("outside/a.txt"),
        "precious\n",
        "a file outside the work folder was overwritten through a symlink at an output path\n{out}"
    );
}

// ============================================================================ 5. --clean and failure cleanup

/// Issue 5.5: a source planted where an output used to be, and a hand-edited output, are
/// kept by `--clean`; everything else qbuild made is removed, and nothing else.
#[test]
fn clean_keeps_a_file_planted_where_an_output_was_and_removes_only_what_qbuild_made() {
    let s = Space::demo();
    let sources = s.snapshot();
    s.build_all();
    let planted = "compiled_model/ar1-cl4096_3_of_4_quantized.dlc";
    let edited = "artifacts/serialized_binaries/split_2.bin";
    s.remove(planted)
        .write(planted, "my own calibration notes, not a DLC\n");
    s.append(edited, "hand edit");
    let edited_bytes = s.read(edited);
    // A file in an output folder that no rule declares.
    s.write("compiled_model/README.txt", "mine\n");
    let out = s.qbuild(["--clean"]).no_json().run();
    out.assert_ok();
    assert!(
        out.stderr
            .contains(&format!("kept {planted}: it changed since qbuild wrote it")),
        "{out}"
    );
    assert!(out.stderr.contains(&format!("kept {edited}")), "{out}");
    let mut expected = sources.clone();
    expected.insert(
        planted.into(),
        b"my own calibration notes, not a DLC\n".to_vec(),
    );
    expected.insert(edited.into(), edited_bytes);
    expected.insert("compiled_model/README.txt".into(), b"mine\n".to_vec());
    assert_same_files(&s.snapshot(), &expected, "after --clean");
    // Cleaning again removes nothing more; the kept files are still not qbuild's.
    s.qbuild(["--clean"]).no_json().run().assert_ok();
    assert_same_files(&s.snapshot(), &expected, "after a second --clean");
}

/// Issue 5.5: a file at an output path of a job that never succeeded is not qbuild's:
/// `--clean` keeps it.
#[test]
fn clean_keeps_files_at_output_paths_of_jobs_never_built() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\noutputs = [\"out/a.txt\"]\ncommand = \"echo a > out/a.txt\"\n[rule.b]\noutputs = [\"out/b.txt\"]\ncommand = \"echo b > out/b.txt\"\n",
    );
    s.run(["out/a.txt"]).assert_ok();
    s.write("out/b.txt", "user data\n");
    s.qbuild(["--clean"]).no_json().run().assert_ok();
    assert!(!s.exists("out/a.txt"));
    assert_eq!(s.read_string("out/b.txt"), "user data\n");
}

/// Issue 5.5: `--clean` never follows a symlink out of the work folder: an output folder
/// replaced by a link to a folder outside holding the very bytes qbuild recorded is left
/// alone; a symlink output is removed as a link, its target untouched.
#[test]
fn clean_never_follows_a_symlink_out_of_the_work_folder() {
    let parent = Space::new();
    parent.mkdir("w").mkdir("outside/dir");
    parent.write("outside/dir/keep.txt", "precious\n");
    let s = Space::at(&parent.join("w"));
    s.write(
        "Qairtfile",
        r#"
[rule.a]
outputs = ["gen/a.txt"]
command = "echo a > gen/a.txt"

[rule.link]
outputs = ["links/out"]
command = "ln -s ../../outside/dir links/out"
"#,
    );
    s.build_all();
    assert!(s.is_symlink("links/out"));
    // The folder of gen/a.txt becomes a link to a folder outside with the same bytes.
    parent.write("outside/a.txt", s.read("gen/a.txt"));
    fs::remove_dir_all(s.join("gen")).expect("rm gen");
    std::os::unix::fs::symlink("../outside", s.join("gen")).expect("symlink");
    let out = s.qbuild(["--clean"]).no_json().run();
    out.assert_ok();
    assert!(
        out.stderr
            .contains("kept gen/a.txt: it lies outside the work folder"),
        "{out}"
    );
    assert_eq!(
        parent.read_string("outside/a.txt"),
        "a\n",
        "a file outside was deleted"
    );
    assert_eq!(parent.read_string("outside/dir/keep.txt"), "precious\n");
    assert!(
        !s.exists("links/out"),
        "the symlink output itself is removed\n{out}"
    );
    assert!(
        s.is_symlink("gen"),
        "a link qbuild did not make is left alone"
    );
}

/// Issue 5.5: a failed job removes the outputs it created or changed, never a file it did
/// not write: a pre-existing file at another of its output paths survives.
#[test]
fn failure_never_deletes_a_file_the_job_did_not_write() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.two]\noutputs = [\"out/written.txt\", \"out/untouched.txt\"]\ncommand = \"echo partial > out/written.txt; exit 1\"\n",
    );
    s.write("out/untouched.txt", "user data\n");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(
        !s.exists("out/written.txt"),
        "the partial output is removed\n{out}"
    );
    assert_eq!(s.read_string("out/untouched.txt"), "user data\n", "{out}");
    assert!(
        out.stderr
            .contains("removed partial output(s): out/written.txt"),
        "{out}"
    );
    assert!(!out.stderr.contains("out/untouched.txt"), "{out}");
    // A job failing before it touches its output leaves a user's file there alone.
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.one]\noutputs = [\"out/a.txt\"]\ncommand = \"echo failing; exit 3\"\n",
    );
    s.write("out/a.txt", "user data\n");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert_eq!(s.read_string("out/a.txt"), "user data\n", "{out}");
    assert_eq!(s.run(["-n", "all"]).would_run(), support::set(["one"]));
}

/// Regression: a job's outputs were looked at when it was handed to the workers, which
/// queue up to `-j` jobs beyond those running; a file put at its output path while it
/// waited there (a copy restored by hand during a long build) was then "a partial output"
/// of the failing command, which never wrote it, and was removed.
#[test]
fn failure_never_deletes_a_file_put_at_its_output_while_the_job_was_queued() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\noutputs = [\"a.txt\"]\ncommand = \"touch a.flag; sleep 1; echo a > a.txt\"\n\n[rule.b]\noutputs = [\"b.txt\"]\ncommand = \"echo failing; exit 1\"\n",
    );
    let bg = Bg::start(s.path(), &["-j", "1", "-k", "--json", "all"], &[]);
    let up = wait_until(Duration::from_secs(20), || s.exists("a.flag"));
    assert!(up, "the first job never got going");
    s.write("b.txt", "user data\n");
    let e = bg.wait(Duration::from_secs(30));
    assert_eq!(e.code, Some(1), "{e}");
    assert_eq!(s.read_string("b.txt"), "user data\n", "{e}");
    assert!(!e.stderr.contains("removed partial output"), "{e}");
}

/// A failing rerun leaves the previous output (qbuild did not change it) but takes away
/// its "up to date": the next run still lists the job.
#[test]
fn failure_keeps_an_untouched_previous_output_but_never_calls_it_up_to_date() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.gen]\ninputs = [\"src.txt\"]\noutputs = [\"out.txt\"]\ncommand = \"grep -q good src.txt && cp src.txt out.txt\"\n",
    );
    s.write("src.txt", "good 1\n");
    s.build_all();
    s.write("src.txt", "broken\n");
    s.run(["all"]).assert_code(1);
    assert_eq!(
        s.read_string("out.txt"),
        "good 1\n",
        "an untouched output survives"
    );
    let dry = s.run(["-n", "all"]);
    assert_eq!(dry.would_run(), support::set(["gen"]), "{dry}");
    s.write("src.txt", "good 2\n");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&support::set(["gen"]));
    assert_eq!(s.read_string("out.txt"), "good 2\n");
}

/// Regression: a job of a `[pool]` that failed before its command started (here, a link
/// qbuild did not make at its output) kept its place in the pool, so with `-k` the pool's
/// other jobs never started ("2 not started") although nothing blocked them.
#[test]
fn failure_before_start_frees_its_pool_place_so_keep_going_runs_the_rest() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[pool]\np = 1\n\n[rule.a]\npool = \"p\"\noutputs = [\"a.out\"]\ncommand = \"echo a > a.out\"\n\n[rule.b]\npool = \"p\"\noutputs = [\"b.out\"]\ncommand = \"echo b > b.out\"\n\n[rule.c]\npool = \"p\"\noutputs = [\"c.out\"]\ncommand = \"echo c > c.out\"\n",
    );
    s.write("target.txt", "user data\n");
    std::os::unix::fs::symlink("target.txt", s.join("a.out")).expect("symlink");
    let out = s.run(["-k", "all"]);
    out.assert_code(1);
    assert_eq!(out.failed(), support::set(["a"]), "{out}");
    out.assert_ran(&support::set(["b", "c"]));
    assert_eq!(out.count("not_started"), 0, "{out}");
    assert_eq!(s.read_string("target.txt"), "user data\n", "{out}");
}

// ============================================================================ 6. I/O errors

const IO_QAIRTFILE: &str = r#"
[vars]
ids = [1, 2, 3]

[rule.gen]
matrix = { i = "${ids}" }
inputs = ["src/in_${i}.txt"]
outputs = ["out/g${i}.txt"]
command = "cat ${inputs} > ${outputs}"

[rule.sum]
inputs = ["out/g${ids}.txt"]
outputs = ["out/sum.txt"]
command = "cat ${inputs} > ${outputs}"
"#;

fn io_space(s: &Space) {
    s.write("Qairtfile", IO_QAIRTFILE);
    for i in 1..=3 {
        s.write(&format!("src/in_{i}.txt"), format!("input {i}\n"));
    }
}

/// Undoes a read-only view: mounts (innermost last, so popped first) or chmods.
struct ReadOnly {
    mounts: Vec<Mount>,
    modes: Vec<(PathBuf, u32)>,
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        while let Some(m) = self.mounts.pop() {
            drop(m);
        }
        for (p, mode) in self.modes.drain(..).rev() {
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
        }
    }
}

fn chmod_tree(dir: &Path, skip: Option<&Path>, modes: &mut Vec<(PathBuf, u32)>) {
    let m = fs::symlink_metadata(dir).expect("stat");
    modes.push((dir.to_path_buf(), m.permissions().mode()));
    for e in fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if Some(p.as_path()) == skip {
            continue;
        }
        let m = fs::symlink_metadata(&p).expect("stat");
        if m.is_dir() {
            chmod_tree(&p, skip, modes);
        } else if m.is_file() {
            modes.push((p.clone(), m.permissions().mode()));
            fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).expect("chmod");
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o555)).expect("chmod");
}

/// `s` made read-only, its `.qbuild` writable or not: the folder to run qbuild in, and a
/// guard that undoes it. Permissions do not stop root, so as root this is a read-only bind
/// mount at `mountpoint` (with `.qbuild` bound writable over it); otherwise chmod.
fn read_only_view(
    s: &Space,
    mountpoint: &Path,
    state_writable: bool,
) -> Result<(PathBuf, ReadOnly), String> {
    let mut guard = ReadOnly {
        mounts: Vec::new(),
        modes: Vec::new(),
    };
    if permissions_bind_us() {
        let state = s.join(".qbuild");
        let skip = state_writable.then_some(state.as_path());
        chmod_tree(s.path(), skip, &mut guard.modes);
        return Ok((s.path().to_path_buf(), guard));
    }
    guard.mounts.push(bind_read_only(s.path(), mountpoint)?);
    if state_writable {
        guard
            .mounts
            .push(bind(&s.join(".qbuild"), &mountpoint.join(".qbuild"))?);
    }
    Ok((mountpoint.to_path_buf(), guard))
}

/// The words a clear read-only error carries.
fn says_read_only(stderr: &str) -> bool {
    stderr.contains("Read-only file system") || stderr.contains("Permission denied")
}

/// Issue 5.6: in a read-only work folder the stale jobs fail with a clear error, nothing
/// is recorded for them, the next run (read-only or not) still runs them; with the state
/// folder read-only too, qbuild stops at once with a clear error and no panic.
#[test]
fn io_read_only_work_folder_fails_clearly_and_claims_nothing() {
    let name = "io_read_only_work_folder_fails_clearly_and_claims_nothing";
    let s = Space::new();
    io_space(&s);
    s.build_all();
    s.write("src/in_2.txt", "input 2, edited\n");
    let mp = Space::new();
    let stale = support::set(["gen i=2", "sum"]);
    {
        let (view, _guard) = match read_only_view(&s, &mp.join("view"), true) {
            Ok(v) => v,
            Err(why) => return skip(name, &why),
        };
        let v = Space::at(&view);
        let out = v.run(["-k", "all"]);
        out.assert_code(1);
        assert_no_panic(&out.stderr, name);
        assert_eq!(out.failed(), support::set(["gen i=2"]), "{out}");
        assert!(
            out.stderr.contains("FAILED: gen i=2") && says_read_only(&out.stderr),
            "{out}"
        );
        let dry = v.run(["-n", "all"]);
        dry.assert_ok();
        assert_eq!(dry.would_run(), stale, "no false up to date\n{dry}");
    }
    {
        // The state folder read-only too.
        let (view, _guard) = match read_only_view(&s, &mp.join("view2"), false) {
            Ok(v) => v,
            Err(why) => return skip(name, &why),
        };
        let out = Space::at(&view).run(["all"]);
        assert_ne!(out.code, 0, "{out}");
        assert_no_panic(&out.stderr, name);
        assert!(
            out.stderr.starts_with("error: ") && says_read_only(&out.stderr),
            "{out}"
        );
    }
    assert!(set_aside_stores(&s).is_empty(), "the state was set aside");
    let out = s.run(["all"]);
    out.assert_ok().assert_ran(&stale);
    assert_eq!(
        s.read_string("out/sum.txt"),
        "input 1\ninput 2, edited\ninput 3\n"
    );
}

/// A dry run only reads: in a work folder qbuild cannot write (state folder included, as
/// on a read-only mount of a colleague's build), `-n`, `--status` and `--clean -n` answer
/// without the lock, exactly as in a writable folder, and write nothing. A real build
/// there still stops with a clear error.
///
/// Regression (found by hand): all three failed with "cannot open the lock".
#[test]
fn io_a_dry_run_in_a_read_only_work_folder_answers_and_writes_nothing() {
    let name = "io_a_dry_run_in_a_read_only_work_folder_answers_and_writes_nothing";
    let s = Space::new();
    io_space(&s);
    s.build_all();
    s.write("src/in_2.txt", "input 2, edited\n");
    let stale = support::set(["gen i=2", "sum"]);
    let expected = s.run(["-n", "all"]).would_run();
    assert_eq!(expected, stale);
    let state_before = fs::read(s.join(".qbuild/snapshot")).expect("snapshot");
    let mp = Space::new();
    {
        let (view, _guard) = match read_only_view(&s, &mp.join("view"), false) {
            Ok(v) => v,
            Err(why) => return skip(name, &why),
        };
        let v = Space::at(&view);
        for args in [
            vec!["-n", "all"],
            vec!["--status"],
            vec!["-n", "--explain", "all"],
        ] {
            let out = v.run(args.clone());
            out.assert_ok();
            assert_no_panic(&out.stderr, name);
            assert_eq!(out.would_run(), stale, "{args:?}\n{out}");
        }
        let clean = v.run(["--clean", "-n"]);
        clean.assert_ok();
        assert!(
            clean.stderr.contains("qbuild: would remove 4 output(s)"),
            "{clean}"
        );
        let build = v.run(["all"]);
        assert_ne!(build.code, 0, "{build}");
        assert!(says_read_only(&build.stderr), "{build}");
    }
    assert_eq!(
        fs::read(s.join(".qbuild/snapshot")).expect("snapshot"),
        state_before
    );
    s.run(["all"]).assert_ok().assert_ran(&stale);

    // An unreadable state in a read-only folder: left as it is, everything would run.
    s.write(".qbuild/snapshot", "garbage");
    {
        let (view, _guard) = match read_only_view(&s, &mp.join("view2"), false) {
            Ok(v) => v,
            Err(why) => return skip(name, &why),
        };
        let out = Space::at(&view).run(["-n", "all"]);
        out.assert_ok();
        assert_eq!(out.would_run().len(), 4, "{out}");
        assert!(out.stderr.contains("as if nothing had been built"), "{out}");
    }
    assert_eq!(s.read_string(".qbuild/snapshot"), "garbage");
}

/// Issue 5.6, "a clear error": when an output folder must be created in a read-only work
/// folder, the error names the cause.
///
/// Regression (was a bug): qbuild ignores the error creating the output's folder
/// (`let _ = fs::create_dir_all(dir)` in `work.rs`), so the user sees only the shell's
/// "cannot create out/g1.txt: Directory nonexistent".
#[test]
fn io_read_only_work_folder_error_names_the_cause_when_a_folder_is_missing() {
    let name = "io_read_only_work_folder_error_names_the_cause_when_a_folder_is_missing";
    let s = Space::new();
    io_space(&s);
    s.mkdir(".qbuild");
    let mp = Space::new();
    let (view, _guard) = match read_only_view(&s, &mp.join("view"), true) {
        Ok(v) => v,
        Err(why) => return skip(name, &why),
    };
    let out = Space::at(&view).run(["all"]);
    out.assert_code(1);
    assert!(
        says_read_only(&out.stderr),
        "the error does not say the folder is read-only\n{out}"
    );
}

/// A work folder on a small tmpfs. None (after printing why) where mounting is not allowed.
fn small_disk(name: &str, size: &str) -> Option<(Space, Mount, Space)> {
    let parent = Space::new();
    match mount_tmpfs(&parent.join("w"), size) {
        Ok(m) => {
            let s = Space::at(&parent.join("w"));
            Some((parent, m, s))
        }
        Err(why) => {
            skip(name, &why);
            None
        }
    }
}

/// Fill the disk holding `s` with 64 KiB files under `fill/`, then free `keep` KiB (in 64
/// KiB steps). Returns how many files remain.
fn fill_disk(s: &Space, keep_kib: usize) -> usize {
    s.mkdir("fill");
    let chunk = vec![7u8; 64 << 10];
    let mut n = 0;
    while fs::write(s.join(&format!("fill/f{n}")), &chunk).is_ok() {
        n += 1;
        assert!(n < 100_000, "the disk never filled");
    }
    let _ = fs::remove_file(s.join(&format!("fill/f{n}")));
    let free = keep_kib.div_ceil(64);
    for k in 0..free.min(n) {
        fs::remove_file(s.join(&format!("fill/f{k}"))).expect("free");
    }
    n - free.min(n)
}

const DISK_QAIRTFILE: &str = r#"
[vars]
ids = [1, 2, 3, 4]

[rule.gen]
matrix = { i = "${ids}" }
inputs = ["src/size_${i}.txt"]
outputs = ["out/g${i}.bin"]
command = "head -c $(cat ${inputs}) /dev/zero | tr '\\0' '${i}' > ${outputs}"

[rule.sum]
inputs = ["out/g${ids}.bin"]
outputs = ["out/sum.txt"]
command = "wc -c ${inputs} > ${outputs}"
"#;

fn disk_space(s: &Space) {
    s.write("Qairtfile", DISK_QAIRTFILE);
    for i in 1..=4 {
        s.write(&format!("src/size_{i}.txt"), "1000\n");
    }
}

/// Build on a small disk, fill it leaving ~900 KiB, and make two jobs write 500 KB each.
fn full_disk_build(s: &Space) -> Output {
    disk_space(s);
    s.build_all();
    fill_disk(s, 900);
    s.write("src/size_3.txt", "500000\n")
        .write("src/size_4.txt", "500000\n");
    s.run(["-k", "all"])
}

/// Issue 5.6: a full disk ends the build with an error (exit 1, the failed jobs named, their
/// partial outputs removed); once there is room again, exactly the jobs that did not finish
/// run (no false "up to date", no needless rerun).
#[test]
fn io_full_disk_fails_clearly_and_claims_nothing() {
    let name = "io_full_disk_fails_clearly_and_claims_nothing";
    let Some((_parent, _mount, s)) = small_disk(name, "8m") else {
        return;
    };
    let out = full_disk_build(&s);
    out.assert_code(1);
    assert_no_panic(&out.stderr, name);
    let failed = out.failed();
    assert!(
        !failed.is_empty() && failed.is_subset(&support::set(["gen i=3", "gen i=4"])),
        "{out}"
    );
    for f in &failed {
        assert!(out.stderr.contains(&format!("FAILED: {f}")), "{out}");
        let i = &f[f.len() - 1..];
        assert!(
            !s.exists(&format!("out/g{i}.bin")),
            "a partial output is left\n{out}"
        );
    }
    fs::remove_dir_all(s.join("fill")).expect("free the disk");
    let dry = s.run(["-n", "all"]);
    dry.assert_ok();
    let mut expected = failed.clone();
    expected.insert("sum".into());
    assert_eq!(dry.would_run(), expected, "{dry}");
    s.run(["all"]).assert_ok().assert_ran(&expected);
    for i in 1..=4u64 {
        let len = fs::metadata(s.join(&format!("out/g{i}.bin")))
            .expect("output")
            .len();
        assert_eq!(len, if i >= 3 { 500_000 } else { 1000 });
    }
}

/// Issue 5.6, "a clear error": a job that fails because the disk is full is reported with
/// the cause.
///
/// Regression (was a bug): the command's own error ("No space left on device") goes to its log
/// in `.qbuild/logs/`, on the same full disk, so it is lost; qbuild prints only "command
/// exited with status 1" with an empty log tail.
#[test]
fn io_full_disk_error_names_the_cause() {
    let name = "io_full_disk_error_names_the_cause";
    let Some((_parent, _mount, s)) = small_disk(name, "8m") else {
        return;
    };
    let out = full_disk_build(&s);
    out.assert_code(1);
    // Every failure report (from `FAILED: job` to the next one) names the cause.
    let failed = out.failed();
    assert!(!failed.is_empty(), "{out}");
    for f in &failed {
        let block = out
            .stderr
            .split("FAILED: ")
            .find(|b| b.starts_with(f.as_str()))
            .unwrap_or_else(|| panic!("no report for {f}\n{out}"));
        assert!(
            block.contains("No space left on device") || block.contains("disk is full"),
            "the report of `{f}` does not say the disk is full:\nFAILED: {block}\n{out}"
        );
    }
}

/// Issue 5.6 / 5.1: a nearly full disk is an I/O error, not a damaged state: qbuild must not
/// throw away its records because it could not open the store for writing.
///
/// Regression (was a bug): with less free space than sled wants to preallocate, opening the store
/// fails with ENOSPC; qbuild calls the store "unreadable", moves it aside (losing every
/// record), fails to create a fresh one, and exits 2. Once there is room again everything
/// reruns — on the real pipeline, hours of work.
#[test]
fn io_a_nearly_full_disk_does_not_discard_the_state() {
    let name = "io_a_nearly_full_disk_does_not_discard_the_state";
    let Some((_parent, _mount, s)) = small_disk(name, "8m") else {
        return;
    };
    disk_space(&s);
    s.build_all();
    fill_disk(&s, 128);
    let out = s.run(["-n", "all"]);
    assert_no_panic(&out.stderr, name);
    let aside = set_aside_stores(&s);
    fs::remove_dir_all(s.join("fill")).expect("free the disk");
    assert!(
        aside.is_empty() && !out.stderr.contains("unreadable"),
        "a full disk made qbuild set its state aside: {aside:?}\n{out}"
    );
    s.run(["all"]).assert_nothing_ran(5);
}

/// Run qbuild in `s` as `qbuild ARGS 2>&1 | head -0` would: its stdout and stderr are pipes
/// whose reader has already gone, so every write fails with EPIPE. Returns its exit code
/// (`None` if a signal ended it).
fn run_with_reader_gone(s: &Space, args: &[&str]) -> Option<i32> {
    let mut child = support::command(support::QBUILD, s.path(), args, &[] as &[(&str, &str)])
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", support::QBUILD));
    drop(child.stdout.take());
    drop(child.stderr.take());
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st.code();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qbuild {} did not finish within 60 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `qbuild 2>&1 | head -1`: once the reader is gone, a build neither panics (exit 101)
/// nor stops halfway; it finishes, records its work and exits with its usual status. The
/// same for a dry run with `--explain`, `--json` on stdout, and a failing build.
#[test]
fn io_a_reader_that_goes_away_neither_stops_nor_crashes_a_build() {
    let s = Space::new();
    io_space(&s);
    let build = ["-j2", "--explain", "--json", "all"];
    assert_eq!(run_with_reader_gone(&s, &build), Some(0));
    for i in 1..=3 {
        assert_eq!(
            s.read_string(&format!("out/g{i}.txt")),
            format!("input {i}\n")
        );
    }
    s.run(["all"]).assert_nothing_ran(4);

    s.write("src/in_2.txt", "input 2, edited\n");
    assert_eq!(
        run_with_reader_gone(&s, &["-n", "--explain", "all"]),
        Some(0)
    );
    assert_eq!(
        s.run(["-n", "all"]).would_run(),
        support::set(["gen i=2", "sum"])
    );
    assert_eq!(run_with_reader_gone(&s, &build), Some(0));
    assert!(s.read_string("out/sum.txt").contains("input 2, edited"));
    s.run(["all"]).assert_nothing_ran(4);

    s.replace(
        "Qairtfile",
        "cat ${inputs} > ${outputs}\"\n\n[rule.sum]",
        "false\"\n\n[rule.sum]",
    );
    assert_eq!(run_with_reader_gone(&s, &build), Some(1));
    assert_eq!(run_with_reader_gone(&s, &["--bogus"]), Some(2));
}

/// A job whose command exits leaving a helper that keeps the output pipe open ends with
/// its leader: a helper printing without pause (it kept the job running forever, since
/// the leader was only looked at when the pipe was quiet) is stopped with the job's group,
/// and one that left the group (`setsid`) is no longer listened to after a second (Ctrl-C
/// could not stop the build until it closed the pipe).
#[test]
fn a_job_ends_with_its_leader_even_when_a_helper_holds_the_output_pipe() {
    for (what, cmd) in [
        (
            "chatty helper",
            "(while :; do echo progress; sleep 0.01; done) & echo done > out.txt",
        ),
        ("escaped helper", "setsid sleep 31.7 & echo done > out.txt"),
    ] {
        let s = Space::new();
        s.write(
            "Qairtfile",
            format!("[rule.a]\noutputs = [\"out.txt\"]\ncommand = \"{cmd}\"\n"),
        );
        let e = Bg::start(s.path(), &[], &[]).wait(Duration::from_secs(20));
        assert_eq!(e.code, Some(0), "{what}: {}", e.stderr);
        assert!(e.took < Duration::from_secs(10), "{what} took {:?}", e.took);
        assert_eq!(s.read_string("out.txt"), "done\n", "{what}");
    }
    // The escaped sleep is the user's own: stop it so it outlives no test.
    let _ = std::process::Command::new("pkill")
        .args(["-f", "^sleep 31.7$"])
        .status();
}

/// Parts of the state that are the wrong kind of file (the explain store a file, the
/// snapshot or the journal a folder) are set aside like damaged bytes, and the run goes
/// on: they used to fail every run ("Is a directory"), or (the explain store) leave the
/// journal growing forever, never folded. A log that cannot be written is warned about.
#[test]
fn misshapen_state_parts_are_set_aside_and_a_lost_log_is_said() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\ninputs = [\"v\"]\noutputs = [\"a.txt\"]\ncommand = \"cat v > a.txt; echo said\"\n",
    )
    .write("v", "1\n");
    s.run(["all"]).assert_ok();

    fs::remove_dir_all(s.join(".qbuild/state.sled")).expect("rm sled");
    s.write(".qbuild/state.sled", "x");
    s.write("v", "2\n");
    let out = s.run(["all"]);
    out.assert_ok().assert_ran(&support::set(["a"]));
    assert!(out.stderr.contains("the explain store"), "{out}");
    assert!(
        s.join(".qbuild/state.sled").is_dir(),
        "a fresh store\n{out}"
    );
    assert!(
        !s.exists(".qbuild/journal"),
        "the journal was folded\n{out}"
    );

    for part in ["snapshot", "journal"] {
        let p = s.join(".qbuild").join(part);
        let _ = fs::remove_file(&p);
        fs::create_dir(&p).expect("mkdir");
        let out = s.run(["all"]);
        out.assert_ok();
        assert!(out.stderr.contains("moved it to"), "{part}\n{out}");
        s.run(["all"]).assert_nothing_ran(1);
    }

    fs::remove_dir_all(s.join(".qbuild/logs")).expect("rm logs");
    s.write(".qbuild/logs", "not a folder");
    s.write("v", "3\n");
    let out = s.run(["all"]);
    out.assert_ok();
    assert!(out.stderr.contains("cannot write the log"), "{out}");
}

/// Regression (was a bug): a job that fails before its command starts (here `.qbuild/running`
/// cannot be written) printed the previous run's log as "last lines of its log" and pointed
/// at that stale log, as if this run's command had said it.
#[test]
fn state_a_job_not_started_shows_no_log_of_an_earlier_run() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\ninputs = [\"v\"]\noutputs = [\"a.txt\"]\ncommand = \"cat v > a.txt; echo said-by-run-$(cat v)\"\n",
    )
    .write("v", "1\n");
    s.run(["all"]).assert_ok();
    assert!(s.exists(".qbuild/logs/a.txt.log"));

    fs::create_dir(s.join(".qbuild/running")).expect("mkdir running");
    s.write("v", "2\n");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(out.stderr.contains("not started"), "{out}");
    assert!(
        !out.stderr.contains("said-by-run-1"),
        "the earlier run's log is not this run's\n{out}"
    );
    assert!(!out.stderr.contains("log:"), "no log to point at\n{out}");
    assert!(!s.exists(".qbuild/logs/a.txt.log"), "{out}");
}

/// Regression (was a bug): when a job's log could neither be removed nor written (a
/// read-only `.qbuild/logs`), a failure printed the earlier run's log as this run's
/// "last lines" and pointed at it; now it shows what this run's command printed.
#[test]
fn state_a_log_that_cannot_be_replaced_is_not_shown_as_this_runs() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\ninputs = [\"v\"]\noutputs = [\"a.txt\"]\ncommand = \"echo said-by-run-$(cat v); exit 1\"\n",
    )
    .write("v", "1\n");
    s.run(["all"]).assert_code(1);
    let logs = s.join(".qbuild/logs");
    let _ro = match bind_read_only(&logs, &logs) {
        Ok(m) => m,
        Err(why) => return skip("state_a_log_that_cannot_be_replaced", &why),
    };
    s.write("v", "2\n");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(out.stderr.contains("cannot write the log"), "{out}");
    assert!(
        !out.stderr.contains("said-by-run-1"),
        "the earlier run's log is not this run's\n{out}"
    );
    assert!(out.stderr.contains("said-by-run-2"), "{out}");
}

/// Regression (was a bug): `-n --explain` on a state folder it may not write (a read-only
/// `.qbuild`) could not open the explain store and said only "no readable record to
/// compare", without naming the store or why.
#[test]
fn state_an_unreadable_explain_store_is_named_by_a_dry_run() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.a]\ninputs = [\"v\"]\noutputs = [\"a.txt\"]\ncommand = \"cat v > a.txt\"\n",
    )
    .write("v", "1\n");
    s.run(["all"]).assert_ok();
    s.write("v", "2\n");
    let state = s.join(".qbuild");
    let _ro = match bind_read_only(&state, &state) {
        Ok(m) => m,
        Err(why) => return skip("state_an_unreadable_explain_store", &why),
    };
    let out = s.run(["-n", "--explain", "all"]);
    out.assert_ok();
    assert!(
        out.stderr.contains("input v changed") || out.stderr.contains("explain store"),
        "the explanation, or why there is none\n{out}"
    );
}
