//! The state under `.qbuild/`: a checksummed snapshot of the stat cache and each job's record of its last successful run, the journal in front of it, and a sled store of readable keys for `--explain`.

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::hash::{Hash, StatCache, StatEntry};
use crate::journal::{Entry, JobEntry, Journal};

/// Bumped whenever the on-disk encoding changes; an older database is set aside, not trusted.
pub const FORMAT: &[u8] = b"qbuild-state-v3";

/// Everything a run loads: the stat cache and the job records.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub stat: StatCache,
    pub jobs: FxHashMap<Hash, JobRecord>,
}

/// What qbuild remembers about a job's last successful run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The staleness key the job ran with (see `stale::Key`).
    pub key: Hash,
    /// Hash of each declared output, in declared order, right after the run.
    pub outputs: Vec<Hash>,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("state database {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("state database {path}: {msg}")]
    Io { path: PathBuf, msg: String },
    #[error("state database {path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },
}

impl DbError {
    /// Whether the store's bytes are bad (set it aside) rather than the disk refusing
    /// service (full, read-only: report it and keep the store).
    pub fn is_corruption(&self) -> bool {
        match self {
            DbError::Corrupt { .. } => true,
            DbError::Sled { source, .. } => !matches!(source, sled::Error::Io(_)),
            DbError::Io { .. } => false,
        }
    }
}

/// Why a store could not be opened.
enum OpenError {
    /// The disk refused (full, read-only, permissions): not the store's fault.
    Io(String),
    Corrupt(String),
}

impl From<sled::Error> for OpenError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if misshapen(&io) => OpenError::Corrupt(io.to_string()),
            sled::Error::Io(io) => OpenError::Io(io.to_string()),
            other => OpenError::Corrupt(other.to_string()),
        }
    }
}

/// A part of the state that is the wrong kind of file (a file where a folder belongs, or
/// the reverse): damage to set aside, not the disk refusing service. Left as it is, it
/// failed every run (the journal then grew without end, never folded).
fn misshapen(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{IsADirectory, NotADirectory};
    matches!(e.kind(), IsADirectory | NotADirectory)
}

/// An error reading the state file `path`: damage if it is the wrong kind of file, else the
/// disk's (reported, the state kept).
fn read_error(path: &Path, e: std::io::Error) -> DbError {
    let (path, msg) = (path.to_path_buf(), e.to_string());
    if misshapen(&e) {
        DbError::Corrupt { path, msg }
    } else {
        DbError::Io { path, msg }
    }
}

/// The state under `.qbuild/`: the snapshot (`snapshot`, one checksummed file: the stat
/// cache and every job record, read whole by every run), the journal in front of it (jobs
/// finished since), and the sled database `state.sled` holding each job's readable key for
/// `--explain`. sled is opened only when a run needs an explanation or has records to
/// fold in, so a no-op reads one file and never pays for opening sled.
pub struct Db {
    dir: PathBuf,
    journal: Journal,
    sled: std::sync::OnceLock<Result<(sled::Db, sled::Tree), String>>,
    /// Readable keys of jobs still in the journal, by job id.
    pending_explain: std::sync::Mutex<FxHashMap<Hash, Vec<u8>>>,
    /// Bytes of the snapshot and of the journal, as `load` found them.
    sizes: std::sync::Mutex<(u64, u64)>,
    /// A run that writes nothing: the explain store is read if it exists, never created,
    /// folded into or set aside.
    reader: bool,
    /// The outputs of the commands a qbuild killed outright had started (from
    /// `.qbuild/running`, read as this run took the lock): a symlink at one of them that
    /// no record holds is the command's, not a user's.
    pub killed_run_outputs: std::collections::HashSet<String>,
}

fn cfg() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(v, &mut buf);
    buf
}

/// `encode`, appended to `buf` (a key is encoded into a buffer reused per thread).
pub fn encode_into<T: Serialize>(v: &T, buf: &mut Vec<u8>) {
    let _ = bincode::serde::encode_into_std_write(v, buf, cfg());
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(b, cfg())
        .ok()
        .map(|(v, _)| v)
}

/// Write the snapshot, `[FORMAT][payload length u64][blake3 of payload][payload]`,
/// durably and atomically (see `write_atomic`). The payload is encoded straight into the
/// file through a hashing writer, then the header is filled in: no copy of the payload is
/// ever in memory (25 MB at 90k jobs).
fn write_snapshot(path: &Path, state: &State) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    struct Hashing<W> {
        inner: W,
        hasher: blake3::Hasher,
        len: u64,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hasher.update(&buf[..n]);
            self.len += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    write_atomic(path, |f| {
        f.write_all(FORMAT)?;
        f.write_all(&[0u8; 40])?;
        let mut w = Hashing {
            inner: std::io::BufWriter::with_capacity(1 << 16, &mut *f),
            hasher: blake3::Hasher::new(),
            len: 0,
        };
        bincode::serde::encode_into_std_write(state, &mut w, cfg())
            .map_err(std::io::Error::other)?;
        w.flush()?;
        let (len, hash) = (w.len, w.hasher.finalize());
        drop(w);
        f.seek(std::io::SeekFrom::Start(FORMAT.len() as u64))?;
        f.write_all(&len.to_le_bytes())?;
        f.write_all(hash.as_bytes())
    })
}

/// Read the snapshot file whole, check its header, length and checksum, and decode it.
/// `Ok(None)` when there is no snapshot; `Err(Ok(why))` when it cannot be trusted; with
/// the state, the file's length.
fn read_snapshot(path: &Path) -> Result<Option<(State, u64)>, Result<String, std::io::Error>> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Err(e)),
    };
    let head_len = FORMAT.len() + 40;
    let mut head = Vec::with_capacity(head_len);
    (&mut f)
        .take(head_len as u64)
        .read_to_end(&mut head)
        .map_err(Err)?;
    if head.len() < head_len || &head[..FORMAT.len()] != FORMAT {
        let seen = &head[..FORMAT.len().min(head.len())];
        return Err(Ok(format!(
            "its snapshot has format {:?}, expected {:?}",
            String::from_utf8_lossy(seen),
            String::from_utf8_lossy(FORMAT)
        )));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[FORMAT.len()..FORMAT.len() + 8]);
    let len = u64::from_le_bytes(len);
    // Read whole (at most what the file holds), check, decode from memory: decoding from a
    // slice is several times faster than through a reader, and the buffer is gone before
    // the graph and the scan grow.
    let mut payload = Vec::with_capacity(len.min(f.metadata().map_err(Err)?.len()) as usize);
    f.read_to_end(&mut payload).map_err(Err)?;
    if payload.len() as u64 != len {
        return Err(Ok(format!(
            "its snapshot is {} bytes long, expected {len} (cut short or grown)",
            payload.len()
        )));
    }
    if blake3::hash(&payload).as_bytes() != &head[FORMAT.len() + 8..] {
        return Err(Ok("its snapshot fails its checksum".into()));
    }
    decode::<State>(&payload)
        .map(|state| Some((state, head_len as u64 + len)))
        .ok_or_else(|| Ok("its snapshot does not decode".into()))
}

/// Write `path` durably and atomically: `fill` writes a temporary file, then fsync,
/// rename, fsync of the folder. A crash leaves either the old file or the new one.
fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    fill(&mut f)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Db {
    /// The state in `state_dir` (created on first use). Nothing is read here: `load`
    /// reads and checks the snapshot and the journal; a store that proves unreadable is
    /// set aside by `reset`, and qbuild rebuilds rather than trust bytes it cannot read.
    pub fn new(state_dir: &Path) -> Db {
        Db {
            dir: state_dir.to_path_buf(),
            journal: Journal::new(&state_dir.join("journal")),
            sled: std::sync::OnceLock::new(),
            pending_explain: Default::default(),
            sizes: Default::default(),
            reader: false,
            killed_run_outputs: Default::default(),
        }
    }

    /// The state in `state_dir` for a run that writes nothing (a dry run beside another
    /// qbuild's build, or in a folder it cannot write): `load` reads it as usual. The
    /// explain store is opened only if it exists, and one that cannot be read is left as
    /// it is. (sled locks the store for one process at a time: a build that wants it at
    /// its end waits for this run, as this run waits for a build folding its journal in.)
    pub fn reader(state_dir: &Path) -> Db {
        Db {
            reader: true,
            ..Db::new(state_dir)
        }
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot")
    }

    fn sled_path(&self) -> PathBuf {
        self.dir.join("state.sled")
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Set this state (after it proved unreadable) aside and start a fresh one.
    pub fn reset(self, why: &str, warn: &mut dyn FnMut(String)) -> Result<Db, DbError> {
        let state_dir = self.dir.clone();
        drop(self);
        let aside = set_aside(&state_dir, &["snapshot", "journal", "state.sled"]).map_err(
            |(path, msg)| DbError::Io {
                path,
                msg: format!("cannot move it aside: {msg}"),
            },
        )?;
        warn(format!(
            "the state database {} is unreadable ({why}); moved it to {} and starting fresh: everything will rebuild",
            state_dir.display(),
            aside.display()
        ));
        Ok(Self::new(&state_dir))
    }

    /// The explain store, opened on first use. One that cannot be read is set aside with a
    /// warning and replaced by a fresh one: it only ever explains, it never decides, so
    /// losing it costs explanations of earlier runs and nothing else.
    fn sled(&self) -> Result<&(sled::Db, sled::Tree), DbError> {
        let path = self.sled_path();
        let opened = self.sled.get_or_init(|| {
            // A reader looks once, before opening would create a store (the answer is
            // kept, as an open store is).
            if self.reader && !path.join("db").exists() {
                return Err("no explain store yet".to_string());
            }
            match open_when_free(&path) {
                Ok(t) => Ok(t),
                Err(OpenError::Io(msg) | OpenError::Corrupt(msg)) if self.reader => {
                    // Said, not silent: every explanation below loses its detail.
                    say!(
                        "qbuild: warning: cannot read the explain store {} ({msg}): earlier runs cannot be explained",
                        path.display()
                    );
                    Err(msg)
                }
                Err(OpenError::Io(msg)) => Err(msg),
                Err(OpenError::Corrupt(why)) => {
                    let aside = set_aside(&self.dir, &["state.sled"]).map_err(|(_, m)| m)?;
                    say!(
                        "qbuild: warning: the explain store {} is unreadable ({why}); moved it to {}: earlier runs cannot be explained",
                        path.display(),
                        aside.display()
                    );
                    try_open(&path).map_err(|(OpenError::Io(m) | OpenError::Corrupt(m))| m)
                }
            }
        });
        opened.as_ref().map_err(|msg| DbError::Io {
            path,
            msg: msg.clone(),
        })
    }

    /// Load the stat cache and every job record: the snapshot (one file, checked, decoded
    /// in one go) overlaid with the journal (jobs finished since).
    pub fn load(&self) -> Result<State, DbError> {
        let path = self.snapshot_path();
        let (mut state, snapshot_len) = match read_snapshot(&path) {
            Ok(state) => state.unwrap_or_default(),
            Err(Ok(msg)) => return Err(DbError::Corrupt { path, msg }),
            Err(Err(e)) => return Err(read_error(&path, e)),
        };
        let mut pending = FxHashMap::default();
        // One merge into the stat cache for the whole journal (later entries win): a
        // merge per entry moved every cached stat once per entry.
        let mut stats = Vec::new();
        let journal_len = self
            .journal
            .for_each(|e| {
                stats.extend(e.stats);
                if let Some(j) = e.job {
                    state.jobs.insert(j.id, j.record);
                    pending.insert(j.id, j.explain);
                }
            })
            .map_err(|e| read_error(&self.journal_path(), e))?;
        state.stat.extend(stats);
        if let Ok(mut p) = self.pending_explain.lock() {
            *p = pending;
        }
        if let Ok(mut s) = self.sizes.lock() {
            *s = (snapshot_len, journal_len);
        }
        Ok(state)
    }

    /// Whether the journal (as `load` found it) should be folded into a new snapshot at
    /// the end of this run: it holds job records (their readable keys belong in the
    /// explain store), or enough stat entries to slow the next load (over a quarter of the
    /// snapshot's size, and over 4 KiB). Stat entries alone are not worth a durable rewrite
    /// of the snapshot: losing them only costs a rehash.
    pub fn compaction_due(&self) -> bool {
        let jobs = self.pending_explain.lock().map_or(true, |p| !p.is_empty());
        let (snapshot, journal) = self.sizes.lock().map_or((0, u64::MAX), |s| *s);
        jobs || journal > (snapshot / 4).max(4 << 10)
    }

    /// Record stat entries refreshed by a run that recorded no job (files whose times
    /// changed, bytes not): one journal append, no fsync, no snapshot rewrite.
    pub fn record_stats(&self, stats: Vec<(String, StatEntry)>) -> Result<(), DbError> {
        self.journal
            .append(Entry { job: None, stats })
            .map_err(|e| self.io_at(&self.journal_path(), e))
    }

    /// Make `state` (which must already hold every journal entry) the new snapshot, move
    /// the journal's readable keys into the explain store, then empty the journal. A crash
    /// in between leaves journal entries that repeat the snapshot: harmless.
    pub fn compact(&self, state: &State) -> Result<(), DbError> {
        self.fold_explain()?;
        self.commit_snapshot(state)
    }

    /// The first half of `compact`: move the journal's readable keys into the explain
    /// store. It needs no state, so a build runs it beside its last re-hash.
    pub fn fold_explain(&self) -> Result<(), DbError> {
        let err = |source| DbError::Sled {
            path: self.sled_path(),
            source,
        };
        // Streamed from the journal, in batches of 64: sled keeps every version of a node
        // a batch rewrote until the batch ends, so one batch of 10k keys peaked ~40 MB
        // higher (84 MB against 49 MB for a build of 10k trivial commands), and reading
        // the whole journal first held every readable key of a full build at once.
        const BATCH: usize = 64;
        let apply = |jobs: &mut Vec<JobEntry>| -> Result<(), DbError> {
            if jobs.is_empty() {
                return Ok(());
            }
            let (_, explain) = self.sled()?;
            let mut batch = sled::Batch::default();
            for j in jobs.drain(..) {
                batch.insert(&j.id, j.explain);
            }
            explain.apply_batch(batch).map_err(err)
        };
        let mut jobs = Vec::with_capacity(BATCH);
        // After a failure, the rest of the journal is still read (`for_each` does not stop)
        // but no longer written.
        let mut explained = Ok(());
        self.journal
            .for_each(|e| {
                if let (Some(j), Ok(())) = (e.job, &explained) {
                    jobs.push(j);
                    if jobs.len() == BATCH {
                        explained = apply(&mut jobs);
                    }
                }
            })
            .map_err(|e| self.io_at(&self.journal_path(), e))?;
        // The store is open iff something was written to it (or read for an explanation:
        // flushing it then is a no-op).
        let flush = || match self.sled.get() {
            Some(Ok((db, _))) => db.flush().map(drop).map_err(err),
            _ => Ok(()),
        };
        let explained = explained
            .and_then(|()| apply(&mut jobs))
            .and_then(|()| flush());
        match explained {
            // The explain store never decides what runs: one that fails for any reason but
            // the disk's is set aside (the next run starts a new one), and the snapshot is
            // written all the same. Only this run's jobs lose their explanations.
            Err(e) if e.is_corruption() => {
                let aside = set_aside(&self.dir, &["state.sled"]).map_or_else(
                    |(_, m)| format!("could not move it: {m}"),
                    |p| format!("moved it to {}", p.display()),
                );
                say!(
                    "qbuild: warning: the explain store failed ({e}); {aside}: the jobs of this run cannot be explained"
                );
            }
            other => other?,
        }
        Ok(())
    }

    /// The second half of `compact`: `state` becomes the snapshot; the journal is emptied.
    pub fn commit_snapshot(&self, state: &State) -> Result<(), DbError> {
        write_snapshot(&self.snapshot_path(), state)
            .map_err(|e| self.io_at(&self.snapshot_path(), e))?;
        self.journal
            .clear()
            .map_err(|e| self.io_at(&self.journal_path(), e))
    }

    /// An I/O error naming the file at fault.
    fn io_at(&self, path: &Path, e: std::io::Error) -> DbError {
        DbError::Io {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }

    /// The readable twin of a job's key, for explanations (the journal's first, then the
    /// explain store's).
    pub fn explain<T: DeserializeOwned>(&self, id: &Hash) -> Option<T> {
        if let Some(b) = self.pending_explain.lock().ok()?.get(id) {
            return decode(b);
        }
        let (_, explain) = self.sled().ok()?;
        explain.get(id).ok().flatten().and_then(|v| decode(&v))
    }

    /// Record a finished job: one journal append (record, readable key, outputs' stats).
    pub fn record_job<T: Serialize>(
        &self,
        id: &Hash,
        rec: &JobRecord,
        explain: &T,
        stats: &[(String, StatEntry)],
    ) -> Result<(), DbError> {
        let e = Entry {
            job: Some(JobEntry {
                id: *id,
                record: rec.clone(),
                explain: encode(explain),
            }),
            stats: stats.to_vec(),
        };
        self.journal
            .append(e)
            .map_err(|e| self.io_at(&self.journal_path(), e))
    }
}

/// Move the named parts of the state (those that exist) into a new `.qbuild/broken-PID/`
/// (`broken-PID-N` if that exists: in a container qbuild may be PID 1 every time).
fn set_aside(state_dir: &Path, parts: &[&str]) -> Result<PathBuf, (PathBuf, String)> {
    let pid = std::process::id();
    let mut n = 0;
    let aside = loop {
        let name = match n {
            0 => format!("broken-{pid}"),
            _ => format!("broken-{pid}-{n}"),
        };
        let at = state_dir.join(name);
        match std::fs::create_dir(&at) {
            Ok(()) => break at,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err((at, e.to_string())),
        }
    };
    for part in parts {
        let from = state_dir.join(part);
        if from.symlink_metadata().is_ok() {
            std::fs::rename(&from, aside.join(part)).map_err(|e| (from.clone(), e.to_string()))?;
        }
    }
    Ok(aside)
}

/// `try_open`, waiting up to 5 s while another qbuild has the store open: sled locks it
/// for one process at a time, and a `--status` or dry run beside another one (or beside a
/// build folding its journal in) would otherwise lose every explanation, and a build its
/// fold, to a moment's overlap. Each holds it for one short pass.
fn open_when_free(path: &Path) -> Result<(sled::Db, sled::Tree), OpenError> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match try_open(path) {
            Err(OpenError::Io(m))
                if m.contains("could not acquire lock")
                    && start.elapsed() < std::time::Duration::from_secs(5) =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Open the explain store, checking its format header (written durably on creation).
fn try_open(path: &Path) -> Result<(sled::Db, sled::Tree), OpenError> {
    let existed = path.join("db").exists();
    // sled can panic on some corrupt files; treat a panic as unreadable.
    let opened = std::panic::catch_unwind(|| {
        sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .cache_capacity(16 << 20)
            .open()
    });
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            return Err(OpenError::Corrupt(
                "the sled store panicked while opening".into(),
            ))
        }
    };
    match db.get(b"format") {
        Ok(Some(v)) if v.as_ref() == FORMAT => {}
        // No header and nothing else: a new store (or one killed before its first
        // flush). Write the header durably now.
        Ok(None) if db.is_empty() && db.tree_names().len() <= 1 => {
            db.insert(b"format", FORMAT)?;
            db.flush()?;
        }
        Ok(None) if existed => {
            return Err(OpenError::Corrupt(
                "its header record is gone (the store was damaged)".into(),
            ));
        }
        Ok(other) => {
            return Err(OpenError::Corrupt(format!(
                "format is {:?}, expected {:?}",
                other.map(|v| String::from_utf8_lossy(&v).into_owned()),
                String::from_utf8_lossy(FORMAT)
            )))
        }
        Err(e) => return Err(e.into()),
    }
    let explain = db.open_tree("explain")?;
    Ok((db, explain))
}

/// The database id of a job: a hash of its declared output paths.
pub fn job_id<'a>(outputs: impl IntoIterator<Item = &'a str>) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"qbuild-job\0");
    for o in outputs {
        h.update(o.as_bytes());
        h.update(b"\0");
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::StatKey;

    fn stat(size: u64) -> StatEntry {
        StatEntry {
            stat: StatKey {
                size,
                ..StatKey::default()
            },
            hash: [size as u8; 32],
            hashed_at_ns: 5,
        }
    }

    /// A state folder holding `state` as its snapshot.
    fn with_snapshot(state: &State) -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().expect("tempdir");
        let db = Db::new(d.path());
        db.compact(state).expect("snapshot");
        (d, db)
    }

    #[test]
    fn a_snapshot_larger_than_its_write_buffer_reads_back_whole() {
        let mut state = State::default();
        state
            .stat
            .extend((0..5000u64).map(|i| (format!("out/{i:05}.bin"), stat(i))));
        for i in 0..3000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            state.jobs.insert(
                id,
                JobRecord {
                    key: [7; 32],
                    outputs: vec![[i as u8; 32]; 2],
                    duration_ms: i as u64,
                },
            );
        }
        let (d, db) = with_snapshot(&state);
        let len = std::fs::metadata(d.path().join("snapshot"))
            .expect("meta")
            .len();
        assert!(len > 1 << 17, "only {len} bytes: not past the write buffer");
        let loaded = db.load().expect("load");
        assert_eq!(loaded.stat.entries(), state.stat.entries());
        assert_eq!(loaded.jobs, state.jobs);
    }

    #[test]
    fn the_journal_overlays_the_snapshot_and_its_latest_stat_wins() {
        let mut state = State::default();
        state
            .stat
            .extend(vec![("a".to_string(), stat(1)), ("b".to_string(), stat(1))]);
        let (_d, db) = with_snapshot(&state);
        db.record_stats(vec![("b".to_string(), stat(2)), ("c".to_string(), stat(2))])
            .expect("append");
        db.record_stats(vec![("b".to_string(), stat(3))])
            .expect("append");
        let loaded = db.load().expect("load");
        let sizes: Vec<(&str, u64)> = loaded
            .stat
            .entries()
            .iter()
            .map(|(p, e)| (p.as_str(), e.stat.size))
            .collect();
        assert_eq!(sizes, vec![("a", 1), ("b", 3), ("c", 2)]);
        // Stat entries alone are not worth a snapshot rewrite while the journal is small.
        assert!(!db.compaction_due());
    }
}
