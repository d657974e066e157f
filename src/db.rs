//! The state database (sled under `.qbuild/`): the stat cache and, per job, the record of its last successful run.

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::hash::{Hash, StatEntry};
use crate::journal::{Entry, Journal};

/// Bumped whenever the on-disk encoding changes; an older database is set aside, not trusted.
pub const FORMAT: &[u8] = b"qbuild-state-v2";

/// Key of the snapshot value in the default tree.
const SNAPSHOT: &[u8] = b"snapshot";

/// Everything a run loads: the stat cache and the job records.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub stat: FxHashMap<String, StatEntry>,
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
            sled::Error::Io(io) => OpenError::Io(io.to_string()),
            other => OpenError::Corrupt(other.to_string()),
        }
    }
}

pub struct Db {
    path: PathBuf,
    db: sled::Db,
    explain: sled::Tree,
    journal: Journal,
}

fn cfg() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, cfg()).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(b, cfg())
        .ok()
        .map(|(v, _)| v)
}

impl Db {
    /// Open (or create) the database in `state_dir`. A database that cannot be opened or has
    /// another format is moved aside with a warning and a fresh one is created: qbuild then
    /// rebuilds everything rather than trusting bytes it cannot read.
    pub fn open(state_dir: &Path, warn: &mut dyn FnMut(String)) -> Result<Db, DbError> {
        let path = state_dir.join("state.sled");
        match Self::try_open(&path) {
            Ok(db) => Ok(db),
            Err(OpenError::Io(msg)) => Err(DbError::Io { path, msg }),
            Err(OpenError::Corrupt(why)) => {
                Self::set_aside_and_reopen(state_dir, &path, &why, warn)
            }
        }
    }

    /// Set this database aside (after it proved unreadable) and open a fresh one.
    pub fn reset(
        self,
        state_dir: &Path,
        why: &str,
        warn: &mut dyn FnMut(String),
    ) -> Result<Db, DbError> {
        let path = self.path.clone();
        drop(self);
        Self::set_aside_and_reopen(state_dir, &path, why, warn)
    }

    /// Move an unreadable store, and the journal that belongs to it, aside (never trusting
    /// either again) and open a fresh store in its place.
    fn set_aside_and_reopen(
        state_dir: &Path,
        path: &Path,
        why: &str,
        warn: &mut dyn FnMut(String),
    ) -> Result<Db, DbError> {
        let aside = state_dir.join(format!("state.sled.broken-{}", std::process::id()));
        warn(format!(
            "the state database {} is unreadable ({why}); moved it to {} and starting fresh: everything will rebuild",
            path.display(),
            aside.display()
        ));
        if path.exists() {
            std::fs::rename(path, &aside).map_err(|e| DbError::Io {
                path: path.to_path_buf(),
                msg: format!("cannot move it aside: {e}"),
            })?;
        }
        let journal = state_dir.join("journal");
        if journal.exists() {
            let _ = std::fs::rename(&journal, aside.with_extension("journal"));
        }
        Self::try_open(path).map_err(|e| match e {
            OpenError::Io(msg) | OpenError::Corrupt(msg) => DbError::Io {
                path: path.to_path_buf(),
                msg,
            },
        })
    }

    fn try_open(path: &Path) -> Result<Db, OpenError> {
        let existed = path.join("db").exists();
        // sled can panic on some corrupt files; treat a panic as unreadable.
        let opened = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(path)
                .flush_every_ms(None)
                .cache_capacity(64 << 20)
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
        let t = |name: &str| db.open_tree(name).map_err(OpenError::from);
        Ok(Db {
            path: path.to_path_buf(),
            explain: t("explain")?,
            journal: Journal::new(&path.with_file_name("journal")),
            db,
        })
    }

    fn err(&self, source: sled::Error) -> DbError {
        DbError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Load the stat cache and every job record: the last snapshot (one value, decoded in
    /// one go) overlaid with the journal (jobs finished since).
    pub fn load(&self) -> Result<State, DbError> {
        let mut state = match self.db.get(SNAPSHOT).map_err(|e| self.err(e))? {
            Some(v) => decode::<State>(&v).ok_or_else(|| DbError::Corrupt {
                path: self.path.clone(),
                msg: "its snapshot does not decode".into(),
            })?,
            None => State::default(),
        };
        for e in self.journal.read().map_err(|e| self.io(e))? {
            state.stat.extend(e.stats);
            state.jobs.insert(e.id, e.record);
        }
        Ok(state)
    }

    /// Whether jobs were recorded since the last snapshot.
    pub fn journal_pending(&self) -> bool {
        !self.journal.is_empty()
    }

    /// Make `state` (which must already hold every journal entry) the new snapshot, move
    /// the journal's readable keys into the explain tree, flush, then empty the journal.
    /// A crash in between leaves journal entries that repeat the snapshot: harmless.
    pub fn compact(&self, state: &State) -> Result<(), DbError> {
        self.db
            .insert(SNAPSHOT, encode(state))
            .map_err(|e| self.err(e))?;
        let mut batch = sled::Batch::default();
        for e in self.journal.read().map_err(|e| self.io(e))? {
            batch.insert(&e.id, e.explain);
        }
        self.explain.apply_batch(batch).map_err(|e| self.err(e))?;
        self.flush()?;
        self.journal.clear().map_err(|e| self.io(e))
    }

    fn io(&self, e: std::io::Error) -> DbError {
        DbError::Io {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }

    /// The readable twin of a job's key, for explanations.
    pub fn explain<T: DeserializeOwned>(&self, id: &Hash) -> Option<T> {
        self.explain.get(id).ok().flatten().and_then(|v| decode(&v))
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
            id: *id,
            record: rec.clone(),
            explain: encode(explain),
            stats: stats.to_vec(),
        };
        self.journal.append(&e).map_err(|e| self.io(e))
    }

    /// Make everything written so far durable (survives kill -9 and power loss).
    pub fn flush(&self) -> Result<(), DbError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }
}

/// The database id of a job: a hash of its declared output paths.
pub fn job_id(outputs: &[String]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"qbuild-job\0");
    for o in outputs {
        h.update(o.as_bytes());
        h.update(b"\0");
    }
    *h.finalize().as_bytes()
}
