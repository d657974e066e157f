//! The process runner: starts a job's command in its own process group with its output in a log file; knows nothing of the graph.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::expand::Action;

/// The environment variable that marks every process a build starts, with the build's token.
pub const RUN_ENV: &str = "QBUILD_RUN";

/// Process groups of running commands, so a signal can stop all of them. With a state
/// folder, the set is also kept in `.qbuild/running`, so that if qbuild is killed outright
/// the next run can stop what it left behind before those commands write anything more.
#[derive(Clone, Default)]
pub struct Running {
    groups: Arc<Mutex<HashSet<i32>>>,
    /// `.qbuild/running`, an append-only list: a `run TOKEN` line written before the first
    /// command starts, then `+ PGID START` / `- PGID` lines.
    file: Option<Arc<(PathBuf, Mutex<Option<fs::File>>)>>,
    /// This build's token, given to every command as `QBUILD_RUN`: a process carrying it
    /// is ours even if qbuild was killed before it could note the process's group.
    token: Option<Arc<str>>,
}

impl Running {
    pub fn persisted(state_dir: &Path) -> Running {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Running {
            groups: Arc::default(),
            file: Some(Arc::new((state_dir.join("running"), Mutex::new(None)))),
            token: Some(format!("{}.{nanos}", std::process::id()).into()),
        }
    }

    /// Before a command starts: make sure the list names this build's token, so a kill
    /// at any moment after the start leaves a way to find the command.
    fn prepare(&self) -> Option<&str> {
        let token = self.token.as_deref()?;
        self.note(String::new());
        Some(token)
    }

    /// Append one line (a single write, kept open: two per job, no rewrite of the file).
    fn note(&self, line: String) {
        let Some(file) = &self.file else {
            return;
        };
        let Ok(mut f) = file.1.lock() else {
            return;
        };
        if f.is_none() {
            *f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file.0)
                .ok();
            if let (Some(f), Some(token)) = (f.as_mut(), &self.token) {
                let _ = f.write_all(format!("run {token}\n").as_bytes());
            }
        }
        if let Some(f) = f.as_mut().filter(|_| !line.is_empty()) {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn add(&self, pgid: i32) {
        if let Ok(mut s) = self.groups.lock() {
            s.insert(pgid);
        }
        self.note(format!("+ {pgid} {}\n", start_time(pgid).unwrap_or(0)));
    }
    fn remove(&self, pgid: i32) {
        if let Ok(mut s) = self.groups.lock() {
            s.remove(&pgid);
        }
        self.note(format!("- {pgid}\n"));
    }

    /// At the end of a build with nothing left running: drop the list.
    pub fn finish(&self) {
        let Some(file) = &self.file else {
            return;
        };
        let idle = self.groups.lock().map(|s| s.is_empty()).unwrap_or(false);
        if let (true, Ok(mut f)) = (idle, file.1.lock()) {
            *f = None;
            let _ = fs::remove_file(&file.0);
        }
    }

    /// Send `sig` to every running command's whole process group.
    pub fn signal_all(&self, sig: i32) {
        if let Ok(s) = self.groups.lock() {
            for pgid in s.iter() {
                // SAFETY: kill(2) with a negative pid signals a process group; no memory involved.
                unsafe {
                    libc::kill(-*pgid, sig);
                }
            }
        }
    }
}

/// A live process's (process group, start time) from /proc/PID/stat (fields 5 and 22);
/// `None` for a zombie, which is dead already and only waits to be reaped.
fn proc_stat(pid: i32) -> Option<(i32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    if rest.first() == Some(&"Z") {
        return None;
    }
    Some((rest.get(2)?.parse().ok()?, rest.get(19)?.parse().ok()?))
}

fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// Live processes: (pid, process group, start time).
fn live_processes() -> Vec<(i32, i32, u64)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| proc_stat(pid).map(|(g, t)| (pid, g, t)))
        .collect()
}

/// Whether any live process is in group `pgid` and started no earlier than `start`
/// (the group's leader may be gone while its children live on).
fn group_alive(pgid: i32, start: u64) -> bool {
    live_processes()
        .iter()
        .any(|&(_, g, t)| g == pgid && t >= start)
}

/// Whether process `pid` carries `QBUILD_RUN=` one of `tokens` in its environment.
fn carries_token(pid: i32, tokens: &[String]) -> bool {
    let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    env.split(|b| *b == 0).any(|kv| {
        kv.strip_prefix(RUN_ENV.as_bytes())
            .and_then(|r| r.strip_prefix(b"="))
            .is_some_and(|v| tokens.iter().any(|t| t.as_bytes() == v))
    })
}

/// Stop the process groups a killed qbuild left running (recorded in `.qbuild/running`),
/// checking each leader's start time so a reused pid is never hit. Returns how many.
pub fn reap_orphans(state_dir: &Path) -> usize {
    let path = state_dir.join("running");
    let Ok(text) = fs::read_to_string(&path) else {
        return 0;
    };
    // Replay the list: what was started and never noted as ended may still be running.
    let mut live: Vec<(i32, u64)> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["run", t] => tokens.push(t.to_string()),
            ["+", g, t] => {
                if let (Ok(g), Ok(t)) = (g.parse::<i32>(), t.parse::<u64>()) {
                    live.push((g, t));
                }
            }
            ["-", g] => {
                if let Ok(g) = g.parse::<i32>() {
                    live.retain(|(x, _)| *x != g);
                }
            }
            _ => {}
        }
    }
    let pause = || std::thread::sleep(std::time::Duration::from_millis(5));
    let mut stopped: HashSet<i32> = HashSet::new();
    live.retain(|&(pgid, start)| pgid > 1 && start > 0 && group_alive(pgid, start));
    for &(pgid, _) in &live {
        // SAFETY: signalling a process group we started, identified by pgid and start time.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        stopped.insert(pgid);
    }
    // Processes carrying a killed build's token: those whose group was never noted (the
    // kill came between their start and the note) and those that left their group.
    let me = std::process::id() as i32;
    for _ in 0..200 {
        if tokens.is_empty() {
            break;
        }
        let marked: Vec<(i32, i32)> = live_processes()
            .into_iter()
            .filter(|&(pid, _, _)| pid != me && carries_token(pid, &tokens))
            .map(|(pid, g, _)| (pid, g))
            .collect();
        if marked.is_empty() {
            break;
        }
        for (pid, g) in marked {
            // SAFETY: kill(2) of one process that carries our token; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            stopped.insert(g);
        }
        pause();
    }
    for (pgid, start) in live {
        for _ in 0..200 {
            if !group_alive(pgid, start) {
                break;
            }
            pause();
        }
    }
    let _ = fs::remove_file(&path);
    stopped.len()
}

/// How a command ended.
#[derive(Debug)]
pub enum Outcome {
    Success,
    /// Exit code, or `None` with the signal when killed; the last of its output, kept in
    /// memory in case the log could not be written.
    Failed {
        code: Option<i32>,
        signal: Option<i32>,
        tail: Vec<u8>,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Success => write!(f, "succeeded"),
            Outcome::Failed { code: Some(c), .. } => write!(f, "exited with status {c}"),
            Outcome::Failed {
                signal: Some(s), ..
            } => write!(f, "was killed by signal {s}"),
            Outcome::Failed { .. } => write!(f, "failed"),
        }
    }
}

/// Where a command's output goes: always its log; with `tee`, our stderr too, live.
#[derive(Debug, Clone, Copy)]
pub struct LogMode {
    pub append: bool,
    pub tee: bool,
}

/// Run one action to completion in `workdir`, its stdout and stderr written to `log`.
pub fn run(
    action: &Action,
    outputs: &[PathBuf],
    workdir: &Path,
    env: &[(String, String)],
    log: &Path,
    mode: LogMode,
    running: &Running,
) -> io::Result<Outcome> {
    let mut cmd = match action {
        Action::Write(content) => {
            // qbuild writes the file itself; still a job, with the same bookkeeping.
            let out = outputs
                .first()
                .ok_or_else(|| io::Error::other("a content rule needs one output"))?;
            fs::write(out, content.as_bytes())?;
            return Ok(Outcome::Success);
        }
        Action::Link(text) => {
            let out = outputs
                .first()
                .ok_or_else(|| io::Error::other("a link job needs one output"))?;
            match fs::symlink_metadata(out) {
                Ok(m) if m.file_type().is_symlink() => fs::remove_file(out)?,
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "{} exists and is not a symlink; qbuild will not replace it",
                        out.display()
                    )))
                }
                Err(_) => {}
            }
            std::os::unix::fs::symlink(text, out)?;
            // A link that points at nothing is an error, named with its target.
            if fs::metadata(out).is_err() {
                let _ = fs::remove_file(out);
                return Err(io::Error::other(format!(
                    "dangling symlink: {} -> {text} (the target does not exist)",
                    out.display()
                )));
            }
            return Ok(Outcome::Success);
        }
        Action::Shell(s) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
        Action::Argv(v) => {
            let Some((prog, args)) = v.split_first() else {
                return Err(io::Error::other("empty argv"));
            };
            let mut c = Command::new(prog);
            c.args(args);
            c
        }
    };
    // The command writes into a pipe, which this thread copies to the log (created only
    // when there is output, so quiet commands cost no file) and, with tee, to stderr.
    let (reader, writer) = io::pipe()?;
    cmd.current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .process_group(0);
    if let Some(token) = running.prepare() {
        cmd.env(RUN_ENV, token);
    }
    // No pre_exec hook (it would force fork over posix_spawn): a qbuild killed outright
    // leaves its groups in `.qbuild/running`, and the next run stops them first.
    let mut child = cmd.spawn().map_err(|e| {
        let what = match action {
            Action::Argv(v) => v.first().cloned().unwrap_or_default(),
            _ => "/bin/sh".to_string(),
        };
        io::Error::new(e.kind(), format!("cannot start {what}: {e}"))
    })?;
    // Close our ends of the pipe so reading sees end-of-file when the command is done.
    drop(cmd);
    let pgid = child.id() as i32;
    running.add(pgid);
    let tail = copy_output(reader, &mut child, pgid, log, mode);
    let status = child.wait();
    // Whatever the leader did, leave no stragglers of this job behind.
    // SAFETY: kill(2) on the job's own process group; no memory involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    running.remove(pgid);
    let status = status?;
    Ok(if status.success() {
        Outcome::Success
    } else {
        Outcome::Failed {
            code: status.code(),
            signal: status.signal(),
            tail,
        }
    })
}

/// Copy a command's output to its log, creating the log on the first byte. Without output
/// the log is removed (a stale one from an earlier run would mislead), unless appending.
///
/// Reads until end-of-file. If the command's leader has exited but something it left in
/// the background still holds the pipe, the whole group is killed (as it would be after the
/// leader anyway), which ends the output.
fn copy_output(
    mut reader: io::PipeReader,
    child: &mut std::process::Child,
    pgid: i32,
    log: &Path,
    mode: LogMode,
) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 8192];
    let mut file: Option<fs::File> = None;
    // The last bytes stay in memory too: if the log cannot be written (a full disk), a
    // failure can still show what the command said.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let mut pfd = libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor we own, for at most 50 ms.
        let ready = unsafe { libc::poll(&mut pfd, 1, 50) };
        if ready == 0 {
            if let Ok(Some(_)) = child.try_wait() {
                // SAFETY: kill(2) on the job's own process group; no memory involved.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            continue;
        }
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if file.is_none() {
                    if let Some(dir) = log.parent() {
                        let _ = fs::create_dir_all(dir);
                    }
                    file = fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .append(mode.append)
                        .truncate(!mode.append)
                        .open(log)
                        .ok();
                }
                if let Some(f) = file.as_mut() {
                    let _ = f.write_all(&buf[..n]);
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * TAIL_BYTES {
                    tail.drain(..tail.len() - TAIL_BYTES);
                }
                if mode.tee {
                    let _ = io::stderr().write_all(&buf[..n]);
                }
            }
        }
    }
    if file.is_none() && !mode.append {
        let _ = fs::remove_file(log);
    }
    if tail.len() > TAIL_BYTES {
        tail.drain(..tail.len() - TAIL_BYTES);
    }
    tail
}

/// How much of a command's latest output is kept in memory.
const TAIL_BYTES: usize = 8192;

/// The last `n` lines of a log file (reads at most the last 64 KiB).
pub fn tail(log: &Path, n: usize) -> String {
    let Ok(mut f) = fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
