//! Run settings from the environment, output files, deterministic payloads, failure injection.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::formats::io_msg;
use crate::SimError;

/// Default payload size per output file when `QAIRT_SIM_SCALE` is unset.
pub const DEFAULT_PAYLOAD: u64 = 4096;
const MIB: f64 = 1024.0 * 1024.0;
/// Largest accepted `QAIRT_SIM_SCALE` (1 TiB per output).
const MAX_SCALE_MIB: f64 = 1024.0 * 1024.0;
/// Payload generation chunk (1 MiB).
const CHUNK: usize = 1 << 20;
/// Buffer of each open output (splits keep N outputs open at once).
const WRITE_BUF: usize = 64 * 1024;

/// Settings of one invocation.
pub struct Ctx {
    /// Payload bytes per output file.
    pub payload: u64,
    /// Milliseconds to sleep to emulate work.
    pub work_ms: u64,
    /// Failure injection substring.
    pub fail: Option<String>,
    /// Directory relative paths are resolved against (None: the process's current dir).
    pub base: Option<PathBuf>,
    /// Lines for stdout.
    pub report: Vec<String>,
    /// `LD_LIBRARY_PATH` and `ADSP_LIBRARY_PATH`, where the device-side tool looks for the
    /// libraries it loads.
    pub ld_library_path: Option<OsString>,
    pub adsp_library_path: Option<OsString>,
}

impl Default for Ctx {
    fn default() -> Ctx {
        Ctx {
            payload: DEFAULT_PAYLOAD,
            work_ms: 0,
            fail: None,
            base: None,
            report: Vec::new(),
            ld_library_path: None,
            adsp_library_path: None,
        }
    }
}

impl Ctx {
    /// Read `QAIRT_SIM_SCALE`, `QAIRT_SIM_WORK_MS`, `QAIRT_SIM_FAIL`.
    pub fn from_env() -> Result<Ctx, SimError> {
        let get = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let mut ctx = Ctx::default();
        if let Some(v) = get("QAIRT_SIM_SCALE") {
            ctx.payload = parse_scale(&v)?;
        }
        if let Some(v) = get("QAIRT_SIM_WORK_MS") {
            ctx.work_ms = v
                .to_str()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    SimError::Env(format!(
                        "invalid QAIRT_SIM_WORK_MS '{}' (expected milliseconds, a whole number)",
                        v.to_string_lossy()
                    ))
                })?;
        }
        if let Some(v) = get("QAIRT_SIM_FAIL") {
            ctx.fail = Some(v.to_string_lossy().into_owned());
        }
        ctx.ld_library_path = get("LD_LIBRARY_PATH");
        ctx.adsp_library_path = get("ADSP_LIBRARY_PATH");
        Ok(ctx)
    }

    /// Resolve a command-line path.
    pub fn resolve(&self, p: &OsStr) -> PathBuf {
        let p = Path::new(p);
        match &self.base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        }
    }
}

/// `QAIRT_SIM_SCALE` (MiB, float) to bytes.
pub fn parse_scale(v: &OsStr) -> Result<u64, SimError> {
    let bad = || {
        SimError::Env(format!(
            "invalid QAIRT_SIM_SCALE '{}' (expected MiB per output, a number from 0 to {MAX_SCALE_MIB})",
            v.to_string_lossy()
        ))
    };
    let mib: f64 = v
        .to_str()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(bad)?;
    if !mib.is_finite() || !(0.0..=MAX_SCALE_MIB).contains(&mib) {
        return Err(bad());
    }
    Ok((mib * MIB).round() as u64)
}

/// An output this invocation will write.
pub struct Planned {
    pub path: PathBuf,
    pub shown: String,
    /// First line of the file (used for the truncated output of an injected failure).
    pub magic: &'static str,
}

/// Before writing: refuse outputs that are also inputs, emulate work, inject failures.
pub fn begin(
    ctx: &Ctx,
    tool: &str,
    inputs: &[(PathBuf, String)],
    outputs: &[Planned],
) -> Result<(), SimError> {
    for o in outputs {
        let Ok(om) = fs::metadata(&o.path) else {
            continue;
        };
        for (ip, ishown) in inputs {
            if let Ok(im) = fs::metadata(ip) {
                if im.dev() == om.dev() && im.ino() == om.ino() {
                    return Err(SimError::Failed(format!(
                        "output '{}' is the same file as input '{ishown}'",
                        o.shown
                    )));
                }
            }
        }
    }
    if ctx.work_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ctx.work_ms));
    }
    if let Some(sub) = &ctx.fail {
        if let Some(hit) = outputs.iter().find(|o| o.shown.contains(sub.as_str())) {
            if let Some(first) = outputs.first() {
                // A truncated header: what a tool killed mid-write leaves behind.
                let partial = format!("{}\nproducer: {tool}\nfla", first.magic);
                if let Ok(mut out) = Out::create(first) {
                    let _ = out.write(partial.as_bytes());
                    let _ = out.w.flush();
                }
            }
            return Err(SimError::Injected(hit.shown.clone()));
        }
    }
    Ok(())
}

/// An output file being written (in place, buffered, flushed at the end).
pub struct Out {
    w: BufWriter<File>,
    written: u64,
    shown: String,
}

impl Out {
    pub fn create(p: &Planned) -> Result<Out, SimError> {
        if let Some(parent) = p.path.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|e| {
                    SimError::Failed(format!(
                        "cannot create the directory of output '{}': {}",
                        p.shown,
                        io_msg(&e)
                    ))
                })?;
            }
        }
        // Never write through a symlink left at an output path (it may point at a source).
        if let Ok(m) = fs::symlink_metadata(&p.path) {
            if m.file_type().is_symlink() {
                fs::remove_file(&p.path).map_err(|e| {
                    SimError::Failed(format!(
                        "cannot replace symlink at output '{}': {}",
                        p.shown,
                        io_msg(&e)
                    ))
                })?;
            }
        }
        let f = File::create(&p.path).map_err(|e| {
            SimError::Failed(format!("cannot write output '{}': {}", p.shown, io_msg(&e)))
        })?;
        Ok(Out {
            w: BufWriter::with_capacity(WRITE_BUF, f),
            written: 0,
            shown: p.shown.clone(),
        })
    }

    fn fail(&self, e: std::io::Error) -> SimError {
        SimError::Failed(format!(
            "cannot write output '{}': {}",
            self.shown,
            io_msg(&e)
        ))
    }

    pub fn write(&mut self, b: &[u8]) -> Result<(), SimError> {
        self.w.write_all(b).map_err(|e| self.fail(e))?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// The magic line, `key: value` lines, and the blank line that ends a header.
    pub fn header(&mut self, magic: &str, fields: &[(&str, String)]) -> Result<(), SimError> {
        let mut s = format!("{magic}\n");
        for (k, v) in fields {
            let v: String = v
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            s.push_str(&format!("{k}: {v}\n"));
        }
        s.push('\n');
        self.write(s.as_bytes())
    }

    /// `n` bytes of the XOF stream seeded by `seed`.
    pub fn xof_raw(&mut self, seed: &blake3::Hash, n: u64) -> Result<(), SimError> {
        let mut xof = xof_reader(seed);
        let mut buf = vec![0u8; n.min(CHUNK as u64) as usize];
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            xof.fill(&mut buf[..k]);
            self.write(&buf[..k])?;
            left -= k as u64;
        }
        Ok(())
    }

    /// `nhex` lowercase hex digits of the XOF stream seeded by `seed`.
    pub fn xof_hex(&mut self, seed: &blake3::Hash, nhex: u64) -> Result<(), SimError> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut xof = xof_reader(seed);
        let cap = nhex.min(CHUNK as u64) as usize;
        let mut raw = vec![0u8; cap.div_ceil(2)];
        let mut hex = vec![0u8; 2 * raw.len()];
        let mut left = nhex;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            let nraw = k.div_ceil(2);
            xof.fill(&mut raw[..nraw]);
            for (i, b) in raw[..nraw].iter().enumerate() {
                hex[2 * i] = HEX[(b >> 4) as usize];
                hex[2 * i + 1] = HEX[(b & 15) as usize];
            }
            self.write(&hex[..k])?;
            left -= k as u64;
        }
        Ok(())
    }

    /// Flush and report.
    pub fn finish(mut self, ctx: &mut Ctx) -> Result<(), SimError> {
        self.w.flush().map_err(|e| self.fail(e))?;
        ctx.report
            .push(format!("wrote {} ({} bytes)", self.shown, self.written));
        Ok(())
    }
}

fn xof_reader(seed: &blake3::Hash) -> blake3::OutputReader {
    let mut h = blake3::Hasher::new();
    h.update(b"qairt-sim/payload");
    h.update(seed.as_bytes());
    h.finalize_xof()
}
