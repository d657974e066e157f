//! Reading and validating the sim file formats, and hashing inputs (always streaming).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek};
use std::path::Path;

use crate::SimError;

pub const ONNX_MAGIC: &str = "QSIM-ONNX v1";
pub const DLC_MAGIC: &str = "QSIM-DLC v1";
pub const QDLC_MAGIC: &str = "QSIM-QDLC v1";
pub const CTXBIN_MAGIC: &str = "QSIM-CTXBIN v1";

/// Longest header line accepted (header lines are short `key: value` text).
const HEADER_LINE_LIMIT: usize = 64 * 1024;
/// Most header lines accepted.
const HEADER_LINES_LIMIT: usize = 4096;
/// Largest JSON file (encodings, configs) read into memory.
pub const JSON_LIMIT: u64 = 256 * 1024 * 1024;
/// Bytes of each payload line kept to label the derived line.
const PREFIX_CAP: usize = 256;
/// Longest label copied from an input payload line.
const LABEL_CAP: usize = 120;

/// `io::Error` text without the "(os error N)" suffix.
pub fn io_msg(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn read_err(shown: &str, e: &io::Error) -> SimError {
    SimError::Failed(format!("cannot read '{shown}': {}", io_msg(e)))
}

/// Open an input that must be a regular file (or a link to one).
pub fn open_input(path: &Path, shown: &str) -> Result<File, SimError> {
    let meta = fs::metadata(path)
        .map_err(|e| SimError::Failed(format!("cannot open input '{shown}': {}", io_msg(&e))))?;
    if meta.is_dir() {
        return Err(SimError::Failed(format!(
            "input '{shown}' is a directory, expected a file"
        )));
    }
    File::open(path)
        .map_err(|e| SimError::Failed(format!("cannot open input '{shown}': {}", io_msg(&e))))
}

/// blake3 of a file's bytes, read streaming.
pub fn hash_file(path: &Path, shown: &str) -> Result<blake3::Hash, SimError> {
    let f = open_input(path, shown)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f).map_err(|e| read_err(shown, &e))?;
    Ok(h.finalize())
}

/// Hash of a file or a directory tree (names in byte order, file contents; links followed).
pub fn hash_tree(path: &Path, shown: &str) -> Result<blake3::Hash, SimError> {
    hash_tree_at(path, shown, 0)
}

fn hash_tree_at(path: &Path, shown: &str, depth: usize) -> Result<blake3::Hash, SimError> {
    if depth > 64 {
        return Err(SimError::Failed(format!(
            "'{shown}': directories nested too deeply (a symlink loop?)"
        )));
    }
    let meta = fs::metadata(path)
        .map_err(|e| SimError::Failed(format!("cannot open input '{shown}': {}", io_msg(&e))))?;
    let mut key = Key::new("tree");
    if meta.is_dir() {
        let rd = fs::read_dir(path).map_err(|e| read_err(shown, &e))?;
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| read_err(shown, &e))?;
            names.push(entry.file_name());
        }
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        key.str("dir").u64(names.len() as u64);
        for name in names {
            let child = path.join(&name);
            let child_shown = format!("{shown}/{}", name.to_string_lossy());
            let h = hash_tree_at(&child, &child_shown, depth + 1)?;
            key.bytes(name.as_encoded_bytes()).hash(&h);
        }
    } else {
        let h = hash_file(path, shown)?;
        key.str("file").hash(&h);
    }
    Ok(key.finish())
}

/// Length-prefixed hashing of the parts that make up an output's identity.
pub struct Key(blake3::Hasher);

impl Key {
    pub fn new(domain: &str) -> Key {
        let mut k = Key(blake3::Hasher::new());
        k.bytes(b"qairt-sim/1").str(domain);
        k
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Key {
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Key {
        self.bytes(s.as_bytes())
    }
    pub fn u64(&mut self, n: u64) -> &mut Key {
        self.bytes(&n.to_le_bytes())
    }
    pub fn hash(&mut self, h: &blake3::Hash) -> &mut Key {
        self.bytes(h.as_bytes())
    }
    pub fn flags(&mut self, flags: &[(String, Vec<String>)]) -> &mut Key {
        self.u64(flags.len() as u64);
        for (name, values) in flags {
            self.str(name).u64(values.len() as u64);
            for v in values {
                self.str(v);
            }
        }
        self
    }
    pub fn finish(&self) -> blake3::Hash {
        self.0.finalize()
    }
}

/// The parsed header of a sim file.
pub struct Header {
    pub magic: &'static str,
    pub fields: Vec<(String, String)>,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// The graph name recorded by the producer ("model" when absent).
    pub fn graph(&self) -> String {
        match self.get("graph") {
            Some(g) if !g.is_empty() => g.to_string(),
            _ => "model".to_string(),
        }
    }
}

/// Read one line (without `\n`, `\r\n`), at most `limit` bytes. `Ok(None)` at end of file.
fn read_line_limited<R: BufRead>(
    r: &mut R,
    limit: usize,
) -> io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut line = Vec::new();
    let mut seen_any = false;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            if !seen_any {
                return Ok(None);
            }
            break;
        }
        seen_any = true;
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if line.len() + i > limit {
                    return Ok(Some(Err(())));
                }
                line.extend_from_slice(&buf[..i]);
                r.consume(i + 1);
                break;
            }
            None => {
                let n = buf.len();
                if line.len() + n > limit {
                    return Ok(Some(Err(())));
                }
                line.extend_from_slice(buf);
                r.consume(n);
            }
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(Ok(line)))
}

/// Printable form of (the start of) a line, for error messages.
fn show_bytes(b: &[u8], cap: usize) -> String {
    let mut s: String = b
        .iter()
        .take(cap)
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    if b.len() > cap {
        s.push_str("...");
    }
    s
}

/// Read and validate a header: the magic line (one of `accepted`), `key: value` lines,
/// a blank line. The reader is left at the first payload byte.
pub fn read_header<R: BufRead>(
    r: &mut R,
    shown: &str,
    accepted: &[&'static str],
) -> Result<Header, SimError> {
    let expected = accepted.first().copied().unwrap_or(ONNX_MAGIC);
    let first = match read_line_limited(r, HEADER_LINE_LIMIT).map_err(|e| read_err(shown, &e))? {
        None => {
            return Err(SimError::Failed(format!(
                "'{shown}' is empty, expected a {expected} file"
            )))
        }
        Some(Err(())) => {
            return Err(SimError::Failed(format!(
                "'{shown}' is not a {expected} file (its first line is not a sim header)"
            )))
        }
        Some(Ok(l)) => l,
    };
    let Some(magic) = accepted.iter().copied().find(|m| m.as_bytes() == first) else {
        let firsts = show_bytes(&first, 40);
        return Err(SimError::Failed(if first.starts_with(b"QSIM-") {
            format!("'{shown}' is a {firsts} file, expected {expected}")
        } else {
            format!("'{shown}' is not a {expected} file (first line: '{firsts}')")
        }));
    };
    let mut fields = Vec::new();
    let mut lineno = 1usize;
    loop {
        lineno += 1;
        if lineno > HEADER_LINES_LIMIT {
            return Err(SimError::Failed(format!(
                "{shown}:{lineno}: header too long (no blank line after {HEADER_LINES_LIMIT} lines)"
            )));
        }
        let line = match read_line_limited(r, HEADER_LINE_LIMIT).map_err(|e| read_err(shown, &e))? {
            None => {
                return Err(SimError::Failed(format!(
                    "{shown}:{lineno}: unexpected end of file in the header \
                     (expected a blank line before the payload)"
                )))
            }
            Some(Err(())) => {
                return Err(SimError::Failed(format!(
                    "{shown}:{lineno}: header line longer than {HEADER_LINE_LIMIT} bytes"
                )))
            }
            Some(Ok(l)) => l,
        };
        if line.is_empty() {
            break;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            return Err(SimError::Failed(format!(
                "{shown}:{lineno}: header line is not valid UTF-8"
            )));
        };
        let parsed = text.split_once(':').and_then(|(k, v)| {
            let k = k.trim();
            let ok = !k.is_empty()
                && k.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
            ok.then(|| (k.to_string(), v.trim().to_string()))
        });
        match parsed {
            Some(kv) => fields.push(kv),
            None => {
                // A line cut off by the end of the file is a truncated header.
                let at_eof = r.fill_buf().map_err(|e| read_err(shown, &e))?.is_empty();
                return Err(SimError::Failed(if at_eof {
                    format!(
                        "{shown}:{lineno}: unexpected end of file in the header \
                         (the file is truncated)"
                    )
                } else {
                    format!(
                        "{shown}:{lineno}: malformed header line '{}' (expected 'key: value')",
                        show_bytes(&line, 60)
                    )
                }));
            }
        }
    }
    Ok(Header { magic, fields })
}

/// Open a sim file, check its header, and return the header and a reader at the payload.
pub fn open_sim(
    path: &Path,
    shown: &str,
    accepted: &[&'static str],
) -> Result<(Header, BufReader<File>), SimError> {
    let f = open_input(path, shown)?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let h = read_header(&mut r, shown, accepted)?;
    Ok((h, r))
}

/// Bytes left from the reader's position (the first payload byte after `open_sim`) to the
/// end of the file. Regular files use their size; anything else is read through.
pub fn remaining_bytes(r: &mut BufReader<File>, shown: &str) -> Result<u64, SimError> {
    let meta = r.get_ref().metadata().map_err(|e| read_err(shown, &e))?;
    if meta.is_file() {
        let pos = r.stream_position().map_err(|e| read_err(shown, &e))?;
        return Ok(meta.len().saturating_sub(pos));
    }
    io::copy(r, &mut io::sink()).map_err(|e| read_err(shown, &e))
}

/// Number of payload lines (a final line without `\n` counts) and blake3 of the payload.
pub fn count_lines<R: BufRead>(r: &mut R, shown: &str) -> Result<(u64, blake3::Hash), SimError> {
    let mut hasher = blake3::Hasher::new();
    let mut n = 0u64;
    let mut pending = false;
    loop {
        let buf = r.fill_buf().map_err(|e| read_err(shown, &e))?;
        if buf.is_empty() {
            break;
        }
        let nl = buf.iter().filter(|&&b| b == b'\n').count() as u64;
        n += nl;
        hasher.update(buf);
        pending = buf.last() != Some(&b'\n');
        let len = buf.len();
        r.consume(len);
    }
    if pending {
        n += 1;
    }
    Ok((n, hasher.finalize()))
}

/// One payload line as seen by `scan_lines`.
pub struct Line<'a> {
    pub index: u64,
    /// The first bytes of the line (up to 256).
    pub prefix: &'a [u8],
    /// blake3 of the whole line (without its `\n`).
    pub hash: blake3::Hash,
}

/// Stream the payload lines, calling `f` once per line, never holding a whole line.
pub fn scan_lines<R: BufRead>(
    r: &mut R,
    shown: &str,
    mut f: impl FnMut(Line<'_>) -> Result<(), SimError>,
) -> Result<u64, SimError> {
    let mut hasher = blake3::Hasher::new();
    let mut prefix: Vec<u8> = Vec::with_capacity(PREFIX_CAP);
    let mut in_line = false;
    let mut index = 0u64;
    loop {
        let buf = r.fill_buf().map_err(|e| read_err(shown, &e))?;
        if buf.is_empty() {
            break;
        }
        let len = buf.len();
        let mut start = 0;
        while start < len {
            let rest = &buf[start..];
            let (part, ends) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            hasher.update(part);
            if prefix.len() < PREFIX_CAP {
                let take = (PREFIX_CAP - prefix.len()).min(part.len());
                prefix.extend_from_slice(&part[..take]);
            }
            in_line = true;
            start += part.len();
            if ends {
                start += 1;
                f(Line {
                    index,
                    prefix: &prefix,
                    hash: hasher.finalize(),
                })?;
                index += 1;
                hasher.reset();
                prefix.clear();
                in_line = false;
            }
        }
        r.consume(len);
    }
    if in_line {
        f(Line {
            index,
            prefix: &prefix,
            hash: hasher.finalize(),
        })?;
        index += 1;
    }
    Ok(index)
}

/// The human-readable label of a payload line: its text before ` w=`, printable ASCII only.
pub fn line_label(prefix: &[u8]) -> String {
    let cut = prefix
        .windows(3)
        .position(|w| w == b" w=")
        .unwrap_or(prefix.len());
    let s: String = prefix[..cut]
        .iter()
        .take(LABEL_CAP)
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    let s = s.trim();
    if s.is_empty() {
        "_".to_string()
    } else {
        s.to_string()
    }
}

/// Read a JSON file (bounded size), returning the value and the blake3 of its bytes.
/// Syntax errors name the file, line and column.
pub fn read_json(path: &Path, shown: &str) -> Result<(serde_json::Value, blake3::Hash), SimError> {
    let f = open_input(path, shown)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > JSON_LIMIT {
        return Err(SimError::Failed(format!(
            "'{shown}' is too large for a JSON file ({len} bytes, limit {JSON_LIMIT})"
        )));
    }
    let mut bytes = Vec::new();
    f.take(JSON_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read_err(shown, &e))?;
    let hash = blake3::hash(&bytes);
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let msg = full.strip_suffix(&suffix).unwrap_or(&full);
        SimError::Failed(format!(
            "{shown}:{}:{}: invalid JSON: {msg}",
            e.line(),
            e.column()
        ))
    })?;
    Ok((value, hash))
}

/// Read an encodings file: JSON whose top level is an object.
pub fn read_encodings(
    path: &Path,
    shown: &str,
) -> Result<(serde_json::Map<String, serde_json::Value>, blake3::Hash), SimError> {
    let (value, hash) = read_json(path, shown)?;
    match value {
        serde_json::Value::Object(map) => {
            for key in ["activation_encodings", "param_encodings"] {
                match map.get(key) {
                    None
                    | Some(serde_json::Value::Object(_))
                    | Some(serde_json::Value::Array(_)) => {}
                    Some(_) => {
                        return Err(SimError::Failed(format!(
                            "'{shown}': \"{key}\" must be an object or an array"
                        )))
                    }
                }
            }
            Ok((map, hash))
        }
        other => Err(SimError::Failed(format!(
            "'{shown}': encodings must be a JSON object, found {}",
            json_kind(&other)
        ))),
    }
}

pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
