//! The process runner: starts a job's command in its own process group with its output in a log file; knows nothing of the graph.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::expand::Action;

/// The environment variable that marks every process a build starts, with the run's token.
pub const RUN_ENV: &str = "QBUILD_RUN";

/// This qbuild process's token: its pid and start time, unique on the machine.
pub fn run_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{}.{nanos}", std::process::id())
    })
}

/// Put the token into qbuild's own environment, so every command inherits it without a
/// copy of the environment per spawn. Call before any thread starts.
pub fn mark_environment() {
    std::env::set_var(RUN_ENV, run_token());
}

/// Process groups of running commands, so a signal can stop all of them. With a state
/// folder, `.qbuild/running` names the run's token (written before the first command
/// starts, removed when the build ends with nothing running): if qbuild is killed outright,
/// the next run finds every process carrying the token and stops it before those commands
/// write anything more. Each command's outputs are listed there too as it starts (one
/// appended write per job, no sync: it is a `kill -9` of qbuild, not a power cut, that
/// leaves the list behind), so that a symlink a command made before qbuild was killed is
/// known as the command's, not taken for one a user put at the output path.
#[derive(Clone, Default)]
pub struct Running {
    groups: Arc<Mutex<HashSet<i32>>>,
    /// `.qbuild/running`, open for appending once the token is in it.
    file: Option<Arc<(PathBuf, Mutex<Option<fs::File>>)>>,
}

impl Running {
    pub fn persisted(state_dir: &Path) -> Running {
        Running {
            groups: Arc::default(),
            file: Some(Arc::new((state_dir.join("running"), Mutex::new(None)))),
        }
    }

    /// Before a command starts: make sure the list names this run's token, so a kill at
    /// any moment after the start leaves a way to find the command, and add the outputs
    /// (`rels`) the command is about to write. A command is not started if the list cannot
    /// be written (a full disk): after a crash, nothing could stop it from writing into an
    /// output the next run is making.
    pub fn prepare(&self, rels: &[String]) -> io::Result<Option<&'static str>> {
        let Some(file) = self.file.as_ref() else {
            return Ok(None);
        };
        let mut open = file
            .1
            .lock()
            .map_err(|_| io::Error::other("the list of running commands is poisoned"))?;
        let mut text = match *open {
            None => format!("run {}\n", run_token()),
            Some(_) => String::new(),
        };
        // (A name with a line break in it is not listed: such a link stays refused.)
        for r in rels.iter().filter(|r| !r.contains('\n')) {
            text.push_str("out ");
            text.push_str(r);
            text.push('\n');
        }
        // The file is kept open only once the token line is in it: a failed first write
        // (a full disk) is tried again, token and all, by the next command.
        let written = match open.as_mut() {
            Some(_) if text.is_empty() => Ok(()),
            Some(f) => f.write_all(text.as_bytes()),
            None => fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file.0)
                .and_then(|mut f| f.write_all(text.as_bytes()).map(|()| *open = Some(f))),
        };
        written.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "not started: cannot write {} ({e}), where qbuild names its commands so that a later run can stop them after a crash",
                    file.0.display()
                ),
            )
        })?;
        Ok(Some(run_token()))
    }

    fn add(&self, pgid: i32) {
        if let Ok(mut s) = self.groups.lock() {
            s.insert(pgid);
        }
    }
    fn remove(&self, pgid: i32) {
        if let Ok(mut s) = self.groups.lock() {
            s.remove(&pgid);
        }
    }

    /// At the end of a build with nothing left running: drop the list.
    pub fn finish(&self) {
        let Some(file) = &self.file else {
            return;
        };
        let idle = self.groups.lock().map(|s| s.is_empty()).unwrap_or(false);
        if let (true, Ok(mut open)) = (idle, file.1.lock()) {
            *open = None;
            let _ = fs::remove_file(&file.0);
        }
    }

    /// After a signal stopped the build, with no job left running: stop what its commands
    /// left behind outside their process groups (a `setsid` child, which the signal sent
    /// to each group never reached), found by this run's token as the next run would find
    /// them after a `kill -9`. Without this, such a process outlived the build and, with
    /// `.qbuild/running` gone, nothing would ever stop it. Returns how many process groups
    /// were stopped; none if no command was started.
    pub fn stop_strays(&self) -> usize {
        let started = self
            .file
            .as_ref()
            .is_some_and(|f| f.1.lock().map(|w| w.is_some()).unwrap_or(true));
        if !started {
            return 0;
        }
        stop_carriers(&[run_token().to_string()])
    }

    /// How many commands are running now.
    pub fn count(&self) -> usize {
        self.groups.lock().map(|s| s.len()).unwrap_or(0)
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

/// A live process's group from /proc/PID/stat (field 5); `None` for a zombie, which is
/// dead already and only waits to be reaped.
fn proc_group(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    if rest.first() == Some(&"Z") {
        return None;
    }
    rest.get(2)?.parse().ok()
}

/// Live processes: (pid, process group).
fn live_processes() -> Vec<(i32, i32)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| proc_group(pid).map(|g| (pid, g)))
        .collect()
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

/// Stop what a killed qbuild left running: every live process carrying a token named in
/// `.qbuild/running`, and the whole group of each such process that leads one (a job's
/// shell, while it lives). Returns how many process groups were stopped.
///
/// Also returns the outputs (work-folder keys) of the commands that run started: a symlink
/// at one of them that no record holds was made by a command qbuild never saw end.
pub fn reap_orphans(state_dir: &Path) -> (usize, HashSet<String>) {
    let path = state_dir.join("running");
    let Ok(bytes) = fs::read(&path) else {
        return (0, HashSet::new());
    };
    // (A line cut short by the kill is a name the job did not have, and matches nothing.)
    let text = String::from_utf8_lossy(&bytes);
    let (mut tokens, mut outputs) = (Vec::new(), HashSet::new());
    for l in text.lines() {
        if let Some(t) = l
            .strip_prefix("run ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            tokens.push(t.to_string());
        } else if let Some(o) = l.strip_prefix("out ") {
            outputs.insert(o.to_string());
        }
    }
    let stopped = stop_carriers(&tokens);
    let _ = fs::remove_file(&path);
    (stopped, outputs)
}

/// Kill every live process (but this one) carrying `QBUILD_RUN=` one of `tokens`, and the
/// whole group of each such process that leads one. Returns how many process groups were
/// stopped.
fn stop_carriers(tokens: &[String]) -> usize {
    if tokens.is_empty() {
        return 0;
    }
    let me = std::process::id() as i32;
    let mut stopped: HashSet<i32> = HashSet::new();
    // Again until none is left: a process may fork while its relatives are being killed.
    for _ in 0..200 {
        let marked: Vec<(i32, i32)> = live_processes()
            .into_iter()
            .filter(|&(pid, _)| pid != me && carries_token(pid, tokens))
            .collect();
        if marked.is_empty() {
            break;
        }
        for (pid, g) in marked {
            // SAFETY: kill(2) of a process carrying a stopped run's token, and of the group
            // it leads; no memory involved.
            unsafe {
                if g == pid {
                    libc::kill(-pid, libc::SIGKILL);
                }
                libc::kill(pid, libc::SIGKILL);
            }
            stopped.insert(g);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
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
            fs::write(out, content.as_bytes()).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot write {}: {e}", out.display()))
            })?;
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
    // A chdir in the child only when the work folder is not already qbuild's own folder
    // (it is after `-C`, or when qbuild runs where the Qairtfile is).
    if crate::current_dir() != Some(workdir) {
        cmd.current_dir(workdir);
    }
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .process_group(0);
    if let Some(token) = running.prepare(&[])? {
        // Inherited when `mark_environment` ran (no copy of the environment per spawn).
        if std::env::var_os(RUN_ENV).is_none_or(|v| v != token) {
            cmd.env(RUN_ENV, token);
        }
    }
    // No pre_exec hook (it would force fork over posix_spawn): a qbuild killed outright
    // leaves its token in `.qbuild/running`, and the next run stops what carries it first.
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
    // A command still running when Ctrl-C or SIGTERM came was signalled with its process
    // group: whatever it did then (a tool that saves a partial result and exits 0 on
    // SIGTERM) is no result to record. Judged here, as the command is reaped and leaves
    // the running set the signal is sent to: a signal that comes later, while the job's
    // outputs are checked or hashed (a multi-GB output), finds it ended, and it is kept.
    let sig = crate::work::INTERRUPT.load(std::sync::atomic::Ordering::SeqCst);
    if sig != 0 && status.success() {
        return Err(io::Error::other(format!(
            "it was running when the build was stopped by {}; its result is not recorded",
            crate::signal_name(sig)
        )));
    }
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
/// leader anyway), which ends the output. The leader is looked at every 50 ms even while
/// output flows (a helper printing without pause kept the job running forever), and a
/// holder outside the group (`setsid`, a daemon) is given 1 s, then no longer listened to.
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
    // With tee: output read but not shown yet, short of a whole line.
    let mut unshown: Vec<u8> = Vec::new();
    // A log missing some of the output (a write failed) would show a failure's last lines
    // wrong; it is removed, and the failure shows the in-memory tail instead.
    let mut why: Option<io::Error> = None;
    let tick = std::time::Duration::from_millis(50);
    let mut looked = std::time::Instant::now();
    let mut leader_gone: Option<std::time::Instant> = None;
    loop {
        let mut pfd = libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor we own, for at most 50 ms.
        let ready = unsafe { libc::poll(&mut pfd, 1, 50) };
        if ready == 0 || looked.elapsed() >= tick {
            looked = std::time::Instant::now();
            match leader_gone {
                Some(t) if t.elapsed() > std::time::Duration::from_secs(1) => break,
                Some(_) => {}
                None => {
                    if let Ok(Some(_)) = child.try_wait() {
                        leader_gone = Some(looked);
                        // SAFETY: kill(2) on the job's own process group; no memory involved.
                        unsafe {
                            libc::kill(-pgid, libc::SIGKILL);
                        }
                    }
                }
            }
            if ready == 0 {
                continue;
            }
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
                if file.is_none() && why.is_none() {
                    let made = log.parent().map_or(Ok(()), fs::create_dir_all);
                    match made.and_then(|()| {
                        fs::OpenOptions::new()
                            .create(true)
                            .write(true)
                            .append(mode.append)
                            .truncate(!mode.append)
                            .open(log)
                    }) {
                        Ok(f) => file = Some(f),
                        Err(e) => why = Some(e),
                    }
                }
                if let Some(f) = file.as_mut() {
                    if let Err(e) = f.write_all(&buf[..n]) {
                        file = None;
                        why = Some(e);
                    }
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * TAIL_BYTES {
                    tail.drain(..tail.len() - TAIL_BYTES);
                }
                if mode.tee {
                    // Whole lines, one write each: parallel jobs' output then interleaves
                    // by lines, not mid-line. (A line past 64 KiB goes out as it is.)
                    unshown.extend_from_slice(&buf[..n]);
                    let end = match unshown.iter().rposition(|b| *b == b'\n') {
                        Some(i) => i + 1,
                        None if unshown.len() > 64 << 10 => unshown.len(),
                        None => 0,
                    };
                    if end > 0 {
                        let _ = io::stderr().write_all(&unshown[..end]);
                        unshown.drain(..end);
                    }
                }
            }
        }
    }
    // The last line, ended, so qbuild's own next line does not run on from it.
    if !unshown.is_empty() {
        unshown.push(b'\n');
        let _ = io::stderr().write_all(&unshown);
    }
    if why.is_some() || (file.is_none() && !mode.append) {
        let _ = fs::remove_file(log);
    }
    // A log that could not be kept (a full disk) is said, not silently missing; the
    // output's end is still kept in memory for a failure report.
    if let Some(e) = why {
        say!(
            "qbuild: warning: cannot write the log {} ({e}); this command's output is not kept",
            log.display()
        );
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
