//! The state database (sled under `.qbuild/`): the stat cache and, per job, the record of its last successful run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::hash::{Hash, StatEntry};

/// Bumped whenever the on-disk encoding changes; an older database is set aside, not trusted.
pub const FORMAT: &[u8] = b"qbuild-state-v1";

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
}

pub struct Db {
    path: PathBuf,
    db: sled::Db,
    stat: sled::Tree,
    jobs: sled::Tree,
    explain: sled::Tree,
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
            Err(why) => {
                let aside = state_dir.join(format!("state.sled.broken-{}", std::process::id()));
                warn(format!(
                    "the state database {} is unreadable ({why}); moved it to {} and starting fresh: everything will rebuild",
                    path.display(),
                    aside.display()
                ));
                if path.exists() {
                    std::fs::rename(&path, &aside).map_err(|e| DbError::Io {
                        path: path.clone(),
                        msg: format!("cannot move it aside: {e}"),
                    })?;
                }
                Self::try_open(&path).map_err(|msg| DbError::Io { path, msg })
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
        let aside = state_dir.join(format!("state.sled.broken-{}", std::process::id()));
        warn(format!(
            "the state database {} is unreadable ({why}); moved it to {} and starting fresh: everything will rebuild",
            path.display(),
            aside.display()
        ));
        std::fs::rename(&path, &aside).map_err(|e| DbError::Io {
            path: path.clone(),
            msg: format!("cannot move it aside: {e}"),
        })?;
        Self::try_open(&path).map_err(|msg| DbError::Io { path, msg })
    }

    fn try_open(path: &Path) -> Result<Db, String> {
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
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the sled store panicked while opening".into()),
        };
        match db.get(b"format") {
            Ok(Some(v)) if v.as_ref() == FORMAT => {}
            Ok(None) if existed => {
                return Err("its header record is gone (the store was damaged)".into());
            }
            Ok(None) if db.tree_names().len() <= 1 && db.is_empty() => {
                db.insert(b"format", FORMAT).map_err(|e| e.to_string())?;
            }
            Ok(other) => {
                return Err(format!(
                    "format is {:?}, expected {:?}",
                    other.map(|v| String::from_utf8_lossy(&v).into_owned()),
                    String::from_utf8_lossy(FORMAT)
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
        let t = |name: &str| db.open_tree(name).map_err(|e| e.to_string());
        Ok(Db {
            path: path.to_path_buf(),
            stat: t("stat")?,
            jobs: t("jobs")?,
            explain: t("explain")?,
            db,
        })
    }

    fn err(&self, source: sled::Error) -> DbError {
        DbError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Load the whole stat cache with one scan (much cheaper than a point get per file).
    /// Entries that do not decode are dropped, so they get re-hashed.
    pub fn load_stat(&self) -> Result<HashMap<String, StatEntry>, DbError> {
        scan(&self.stat).map_err(|e| self.err(e))
    }

    /// Load every job record with one scan.
    pub fn load_jobs(&self) -> Result<HashMap<Hash, JobRecord>, DbError> {
        let mut out = HashMap::with_capacity(self.jobs.len());
        for kv in self.jobs.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            if let (Ok(id), Some(rec)) = (<Hash>::try_from(k.as_ref()), decode::<JobRecord>(&v)) {
                out.insert(id, rec);
            }
        }
        Ok(out)
    }

    /// The readable twin of a job's key, for explanations.
    pub fn explain<T: DeserializeOwned>(&self, id: &Hash) -> Option<T> {
        self.explain.get(id).ok().flatten().and_then(|v| decode(&v))
    }

    /// Record a finished job (its record, the readable key, and its outputs' stat entries).
    pub fn record_job<T: Serialize>(
        &self,
        id: &Hash,
        rec: &JobRecord,
        explain: &T,
        stats: &[(String, StatEntry)],
    ) -> Result<(), DbError> {
        self.put_stats(stats)?;
        self.explain
            .insert(id, encode(explain))
            .map_err(|e| self.err(e))?;
        // The job record goes last: if we die before it lands, the job simply reruns.
        self.jobs.insert(id, encode(rec)).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Forget a job (its outputs were removed or it failed mid-way).
    pub fn forget_job(&self, id: &Hash) -> Result<(), DbError> {
        self.jobs.remove(id).map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn put_stats(&self, stats: &[(String, StatEntry)]) -> Result<(), DbError> {
        if stats.is_empty() {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        for (p, e) in stats {
            b.insert(p.as_bytes(), encode(e));
        }
        self.stat.apply_batch(b).map_err(|e| self.err(e))
    }

    pub fn remove_stats(&self, paths: &[String]) -> Result<(), DbError> {
        let mut b = sled::Batch::default();
        for p in paths {
            b.remove(p.as_bytes());
        }
        self.stat.apply_batch(b).map_err(|e| self.err(e))
    }

    /// Make everything written so far durable (survives kill -9 and power loss).
    pub fn flush(&self) -> Result<(), DbError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }
}

fn scan<T: DeserializeOwned>(tree: &sled::Tree) -> Result<HashMap<String, T>, sled::Error> {
    let mut out = HashMap::with_capacity(tree.len());
    for kv in tree.iter() {
        let (k, v) = kv?;
        if let (Ok(p), Some(e)) = (std::str::from_utf8(&k), decode::<T>(&v)) {
            out.insert(p.to_string(), e);
        }
    }
    Ok(out)
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
