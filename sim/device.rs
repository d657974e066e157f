//! The on-device stage: `genie-t2t-run` (runs the context binaries) and an `adb` whose device is a folder.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::cli::{self, Args, Flag};
use crate::emit::Ctx;
use crate::formats::{hash_file, io_msg, open_sim, read_json, Key, CTXBIN_MAGIC};
use crate::SimError;

// ---------------------------------------------------------------- genie-t2t-run

pub const GENIE_FLAGS: &[Flag] = &[
    Flag::path(
        "--config",
        "CONFIG.json",
        "Genie dialog config (names the context binaries)",
    )
    .aliases(&["-c"]),
    Flag::value("--prompt", "TEXT", "the prompt")
        .aliases(&["-p"])
        .optional(),
    Flag::path("--prompt_file", "FILE", "read the prompt from FILE").optional(),
];

/// Libraries the device binary loads; `true`: found through `ADSP_LIBRARY_PATH` (the DSP
/// side), else `LD_LIBRARY_PATH`.
const DEVICE_LIBS: &[(bool, &str)] = &[
    (false, "libGenie.so"),
    (false, "libQnnHtp.so"),
    (false, "libQnnSystem.so"),
    (false, "libQnnHtpV79Stub.so"),
    (true, "libQnnHtpV79Skel.so"),
];

/// Words the simulated model answers with (picked by the run's key: same inputs, same text).
const WORDS: &[&str] = &[
    "the", "capital", "of", "France", "is", "Paris", "a", "city", "on", "Seine", "river", "with",
    "about", "two", "million", "people", "and", "it", "has", "been", "since", "century", "known",
    "for", "art", "food", "light", "history", "museums", "bridges", "streets", "cafes",
];

/// A field of the config, by path, or a clear error naming it.
fn field<'a>(v: &'a Value, shown: &str, path: &[&str]) -> Result<&'a Value, SimError> {
    let mut at = v;
    for (i, k) in path.iter().enumerate() {
        at = at.get(k).ok_or_else(|| {
            SimError::Failed(format!(
                "'{shown}': missing \"{}\" (a Genie dialog config needs dialog.context, \
                 dialog.tokenizer and dialog.engine)",
                path[..=i].join(".")
            ))
        })?;
    }
    Ok(at)
}

/// Whether some folder of the search path `path` holds `lib`.
fn lib_found(path: Option<&OsStr>, lib: &str) -> bool {
    let Some(v) = path else {
        return false;
    };
    v.to_string_lossy()
        .split([':', ';'])
        .filter(|d| !d.is_empty())
        .any(|d| Path::new(d).join(lib).is_file())
}

/// The `_I_of_N` and `-clCL` parts of a graph name such as `ar128-cl4096_2_of_4`.
fn graph_place(g: &str) -> Option<(u64, u64, u64)> {
    let (head, n) = g.rsplit_once("_of_")?;
    let (head, i) = head.rsplit_once('_')?;
    let cl = head.rsplit_once("-cl")?.1;
    Some((i.parse().ok()?, n.parse().ok()?, cl.parse().ok()?))
}

pub fn genie_t2t_run(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    for (dsp, lib) in DEVICE_LIBS {
        let (var, path) = if *dsp {
            ("ADSP_LIBRARY_PATH", &ctx.adsp_library_path)
        } else {
            ("LD_LIBRARY_PATH", &ctx.ld_library_path)
        };
        if !lib_found(path.as_deref(), lib) {
            return Err(SimError::Failed(format!(
                "library \"{lib}\" not found: no folder of {var} holds it \
                 (push it from the SDK's lib/ to the device and set {var})"
            )));
        }
    }
    let prompt = match (a.text("--prompt")?, a.os("--prompt_file")) {
        (Some(p), None) => p,
        (None, Some(f)) => {
            let shown = f.to_string_lossy().into_owned();
            let bytes = fs::read(ctx.resolve(f))
                .map_err(|e| SimError::Failed(format!("cannot read '{shown}': {}", io_msg(&e))))?;
            String::from_utf8_lossy(&bytes).trim_end().to_string()
        }
        _ => {
            return Err(SimError::Usage(
                "give the prompt with exactly one of --prompt and --prompt_file".to_string(),
            ))
        }
    };
    let cfg_os = a.path("--config")?;
    let cfg_shown = cfg_os.to_string_lossy().into_owned();
    let (cfg, cfg_hash) = read_json(&ctx.resolve(cfg_os), &cfg_shown)?;
    let size = field(&cfg, &cfg_shown, &["dialog", "context", "size"])?
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            SimError::Failed(format!(
                "'{cfg_shown}': dialog.context.size must be a positive integer"
            ))
        })?;
    let tok = field(&cfg, &cfg_shown, &["dialog", "tokenizer", "path"])?
        .as_str()
        .ok_or_else(|| {
            SimError::Failed(format!(
                "'{cfg_shown}': dialog.tokenizer.path must be a string"
            ))
        })?;
    let tok_hash = hash_file(&ctx.resolve(OsStr::new(tok)), tok)?;
    let backend = field(&cfg, &cfg_shown, &["dialog", "engine", "backend", "type"])?;
    if backend.as_str() != Some("QnnHtp") {
        return Err(SimError::Failed(format!(
            "'{cfg_shown}': dialog.engine.backend.type is {backend}; this device runs \"QnnHtp\""
        )));
    }
    let bins = field(
        &cfg,
        &cfg_shown,
        &["dialog", "engine", "model", "binary", "ctx-bins"],
    )?
    .as_array()
    .filter(|b| !b.is_empty())
    .ok_or_else(|| {
        SimError::Failed(format!(
            "'{cfg_shown}': dialog.engine.model.binary.ctx-bins must be a non-empty list"
        ))
    })?;
    let mut k = Key::new("genie-t2t-run");
    k.hash(&cfg_hash).hash(&tok_hash).str(&prompt);
    let n = bins.len() as u64;
    for (i, b) in bins.iter().enumerate() {
        let Some(b) = b.as_str() else {
            return Err(SimError::Failed(format!(
                "'{cfg_shown}': ctx-bins[{i}] is not a string"
            )));
        };
        let p = ctx.resolve(OsStr::new(b));
        let (hdr, r) = open_sim(&p, b, &[CTXBIN_MAGIC])?;
        drop(r);
        let (b, graphs) = (
            cli::sanitize(b),
            cli::sanitize(hdr.get("graphs").unwrap_or_default()),
        );
        // The binaries are the splits of one model, in order, built for this context size.
        for g in graphs.split(", ") {
            match graph_place(g) {
                Some((gi, gn, _)) if gi != i as u64 + 1 || gn != n => {
                    return Err(SimError::Failed(format!(
                        "'{b}' holds graph '{g}' (split {gi} of {gn}), but it is ctx-bins[{i}] \
                         of {n}: list the binaries of every split, in split order"
                    )))
                }
                Some((_, _, cl)) if cl != size => {
                    return Err(SimError::Failed(format!(
                        "'{b}' holds graph '{g}', built for context length {cl}, but \
                         dialog.context.size is {size}"
                    )))
                }
                Some(_) => {}
                None => {
                    return Err(SimError::Failed(format!(
                        "'{b}': graph '{g}' is not named <name>-cl<CL>_<i>_of_<N>"
                    )))
                }
            }
        }
        k.hash(&hash_file(&p, &b)?);
    }
    let key = k.finish();
    let mut xof = key.as_bytes().iter().copied().cycle();
    let answer: Vec<&str> = (0..12)
        .map(|_| WORDS[xof.next().unwrap_or(0) as usize % WORDS.len()])
        .collect();
    ctx.report.push(format!(
        "Using libGenie.so version 1.2.0 (qairt-sim {})",
        crate::SIM_VERSION
    ));
    ctx.report.push(String::new());
    ctx.report
        .push(format!("[PROMPT]: {}", cli::sanitize(&prompt)));
    ctx.report.push(String::new());
    ctx.report
        .push(format!("[BEGIN]: {}.[END]", answer.join(" ")));
    Ok(())
}

// ---------------------------------------------------------------- adb

const ADB_USAGE: &str = "usage: adb [-s SERIAL] COMMAND
  devices               list the (one, simulated) device
  wait-for-device       return at once
  push SRC... DST       copy host files or folders to the device
  pull SRC... DST       copy device files or folders to the host
  shell COMMAND...      run COMMAND with sh, in the device folder
The device is the folder $QAIRT_SIM_DEVICE (default: <temp dir>/qairt-sim-device-$USER,
yours only); device paths under /data and /sdcard lead into it. The shell is the host's:
nothing keeps a command inside the folder.";

/// The folder standing in for the device's file system.
fn device_root() -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let (root, shared) = match std::env::var_os("QAIRT_SIM_DEVICE").filter(|v| !v.is_empty()) {
        Some(v) => (
            std::path::absolute(PathBuf::from(v)).map_err(|e| io_msg(&e))?,
            false,
        ),
        None => {
            let user = std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty() && !u.contains('/'))
                .unwrap_or_else(|| "default".to_string());
            let dir = std::env::temp_dir().join(format!("qairt-sim-device-{user}"));
            (dir, true)
        }
    };
    // `shell` puts the folder into a shell line: a plain path only.
    let text = root.to_string_lossy();
    if !text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+@%,:=".contains(c))
    {
        return Err(format!(
            "the device folder {} holds characters a shell line would read (set QAIRT_SIM_DEVICE \
             to a path of letters, digits and /._-+@%,:=)",
            cli::sanitize(&text)
        ));
    }
    let made = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root);
    made.map_err(|e| {
        format!(
            "cannot make the device folder {}: {}",
            root.display(),
            io_msg(&e)
        )
    })?;
    // In a shared temp folder, a device folder someone else made could hand us their
    // genie-t2t-run to run.
    if shared {
        let owner = fs::metadata(&root).map(|m| m.uid()).ok();
        let me = fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if owner.is_none() || owner != me {
            return Err(format!(
                "the device folder {} belongs to another user (set QAIRT_SIM_DEVICE to a folder of yours)",
                root.display()
            ));
        }
    }
    Ok(root)
}

/// A device path (absolute, no `..` above `/`) inside the device folder.
pub fn on_device(root: &Path, p: &str) -> Result<PathBuf, String> {
    if !p.starts_with('/') {
        return Err(format!("device path '{p}' is not absolute"));
    }
    let mut out = root.to_path_buf();
    let mut depth = 0usize;
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => {
                out.push(s);
                depth += 1;
            }
            Component::ParentDir if depth > 0 => {
                out.pop();
                depth -= 1;
            }
            Component::ParentDir => return Err(format!("device path '{p}' leaves /")),
            _ => {}
        }
    }
    Ok(out)
}

/// Copy a file or a folder (recursively, following links as adb does; `depth` stops a
/// link loop).
fn copy_any(from: &Path, to: &Path, depth: usize) -> Result<u64, String> {
    let meta = fs::metadata(from).map_err(|e| format!("{}: {}", from.display(), io_msg(&e)))?;
    if meta.is_dir() {
        if depth > 64 {
            return Err(format!(
                "{}: folders nested too deep (a link loop?)",
                from.display()
            ));
        }
        fs::create_dir_all(to).map_err(|e| format!("{}: {}", to.display(), io_msg(&e)))?;
        let mut n = 0;
        let entries =
            fs::read_dir(from).map_err(|e| format!("{}: {}", from.display(), io_msg(&e)))?;
        for e in entries {
            let e = e.map_err(|e| format!("{}: {}", from.display(), io_msg(&e)))?;
            n += copy_any(&e.path(), &to.join(e.file_name()), depth + 1)?;
        }
        return Ok(n);
    }
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {}", parent.display(), io_msg(&e)))?;
    }
    // The same file at both ends: nothing to copy (removing `to` would lose it).
    if let (Ok(a), Ok(b)) = (fs::canonicalize(from), fs::canonicalize(to)) {
        if a == b {
            return Ok(1);
        }
    }
    // Replace, never write through: the destination may be a link or a hard link.
    let _ = fs::remove_file(to);
    fs::copy(from, to)
        .map_err(|e| format!("{} -> {}: {}", from.display(), to.display(), io_msg(&e)))?;
    Ok(1)
}

/// `push`/`pull`: many sources into a folder, or one source to a path.
fn transfer(
    srcs: &[PathBuf],
    shown: &[String],
    dst: &Path,
    dst_is_dir: bool,
) -> Result<Vec<String>, String> {
    let into = dst_is_dir || srcs.len() > 1 || dst.is_dir();
    let mut report = Vec::new();
    for (s, shown) in srcs.iter().zip(shown) {
        let to = if into {
            let name = s
                .file_name()
                .ok_or_else(|| format!("'{shown}' names no file"))?;
            dst.join(name)
        } else {
            dst.to_path_buf()
        };
        let n = copy_any(s, &to, 0)?;
        report.push(format!(
            "{shown}: {n} file{} transferred.",
            if n == 1 { "" } else { "s" }
        ));
    }
    Ok(report)
}

/// Put the device folder in front of device paths in a shell command (`/data/...`).
pub fn map_paths(root: &Path, cmd: &str) -> String {
    let root = root.to_string_lossy();
    let mut out = String::with_capacity(cmd.len() + 64);
    let mut prev: Option<char> = None;
    for (i, c) in cmd.char_indices() {
        let at_word = prev.is_none_or(|p| p.is_whitespace() || "'\"=:;(&|<>".contains(p));
        if at_word && starts_device_path(&cmd[i..]) {
            out.push_str(&root);
        }
        out.push(c);
        prev = Some(c);
    }
    out
}

/// Whether `s` starts with `/data` or `/sdcard` as a whole path component.
fn starts_device_path(s: &str) -> bool {
    ["/data", "/sdcard"].iter().any(|d| {
        s.strip_prefix(d).is_some_and(|after| {
            after
                .chars()
                .next()
                .is_none_or(|c| c == '/' || c.is_whitespace() || "'\";&|):".contains(c))
        })
    })
}

/// `adb ARGS...`: returns the exit code.
pub fn adb_main(argv: &[OsString]) -> i32 {
    let mut args: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.first().is_some_and(|a| a == "-s") {
        if args.len() < 2 {
            eprintln!("adb: error: -s needs a serial\n{ADB_USAGE}");
            return 1;
        }
        args.drain(..2);
    }
    let Some(cmd) = args.first().cloned() else {
        eprintln!("{ADB_USAGE}");
        return 1;
    };
    let rest = &args[1..];
    if matches!(cmd.as_str(), "help" | "--help" | "-h") {
        println!("{ADB_USAGE}");
        return 0;
    }
    if cmd == "version" || cmd == "--version" {
        println!("Android Debug Bridge (qairt-sim {})", crate::SIM_VERSION);
        return 0;
    }
    let root = match device_root() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("adb: error: {e}");
            return 1;
        }
    };
    let result: Result<i32, String> = match cmd.as_str() {
        "devices" => {
            println!("List of devices attached\nqairt-sim\tdevice\n");
            Ok(0)
        }
        "wait-for-device" => Ok(0),
        "push" | "pull" if rest.len() < 2 => {
            Err(format!("{cmd} needs at least one source and a destination"))
        }
        "push" | "pull" => {
            let (dst, srcs) = (&rest[rest.len() - 1], &rest[..rest.len() - 1]);
            let moved = if cmd == "push" {
                on_device(&root, dst).and_then(|d| {
                    let hosts: Vec<PathBuf> = srcs.iter().map(PathBuf::from).collect();
                    transfer(&hosts, srcs, &d, dst.ends_with('/'))
                })
            } else {
                srcs.iter()
                    .map(|s| on_device(&root, s))
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(|devs| transfer(&devs, srcs, Path::new(dst), dst.ends_with('/')))
            };
            moved.map(|lines| {
                lines.iter().for_each(|l| println!("{l}"));
                0
            })
        }
        "shell" if rest.is_empty() => {
            Err("shell: an interactive shell is not simulated; give a command".to_string())
        }
        "shell" => {
            let line = map_paths(&root, &rest.join(" "));
            let mut c = std::process::Command::new("sh");
            c.arg("-c").arg(&line).current_dir(&root);
            // Pushed tool wrappers find this binary through QAIRT_SIM.
            if let Ok(exe) = std::env::current_exe() {
                c.env("QAIRT_SIM", exe);
            }
            c.status()
                .map_err(|e| format!("shell: cannot run sh: {}", io_msg(&e)))
                .map(|s| s.code().unwrap_or(1))
        }
        other => Err(format!(
            "unknown command '{}'\n{ADB_USAGE}",
            cli::sanitize(other)
        )),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("adb: error: {e}");
            1
        }
    }
}
