//! `--clean`: removes the outputs qbuild recorded as its own, still holding the bytes it wrote, and nothing else.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::artifact::Artifacts;
use crate::db::{job_id, Db, DbError};
use crate::graph::{Graph, JobId};
use crate::hash::HashStats;

/// Answers "does this output really lie inside the work folder?", remembering the work
/// folder's real path and the answer for each folder.
#[derive(Default)]
pub struct Inside {
    root: Option<PathBuf>,
    dirs: HashMap<PathBuf, bool>,
}

impl Inside {
    /// Whether `rel` (a path inside the work folder) really lies inside it once the
    /// symlinks of its existing parent folders are resolved.
    pub fn check(&mut self, workdir: &Path, rel: &str) -> bool {
        if self.root.is_none() {
            self.root = workdir.canonicalize().ok();
        }
        let Some(root) = &self.root else {
            return false;
        };
        let full = workdir.join(rel);
        let mut dir = full
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| workdir.to_path_buf());
        loop {
            if let Some(ans) = self.dirs.get(&dir) {
                return *ans;
            }
            match dir.canonicalize() {
                Ok(c) => {
                    let ans = c.starts_with(root);
                    self.dirs.insert(dir, ans);
                    return ans;
                }
                // Not there yet: whatever gets created will sit under the nearest existing folder.
                Err(_) => match dir.parent() {
                    Some(p) if dir != workdir => dir = p.to_path_buf(),
                    _ => return false,
                },
            }
        }
    }
}

/// If `rel` is a symlink whose target lies outside the work folder, that target.
pub fn link_leading_out(workdir: &Path, rel: &str) -> Option<PathBuf> {
    let path = workdir.join(rel);
    let text = fs::read_link(&path).ok()?;
    let root = workdir.canonicalize().ok()?;
    let parent = path.parent()?.canonicalize().ok()?;
    let target = parent.join(&text);
    // Resolve what exists; judge a dangling target by its lexical path.
    let resolved = target
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(crate::expand::normalize(&target.to_string_lossy())));
    (!resolved.starts_with(&root)).then_some(resolved)
}

#[derive(Debug, Default)]
pub struct Cleaned {
    pub removed: Vec<String>,
    pub kept: Vec<(String, String)>,
}

/// Remove the recorded outputs of the given jobs. An output is removed only if qbuild
/// recorded it as produced and it still has the recorded bytes (a file put there since is
/// kept), and only if it lies inside the work folder; a symlink is removed, never followed.
/// With `dry`, nothing is removed or forgotten: `removed` lists what would be.
pub fn clean(
    g: &Graph,
    workdir: &Path,
    db: &Db,
    jobs: &[JobId],
    dry: bool,
) -> Result<Cleaned, DbError> {
    let mut state = db.load()?;
    let records = std::mem::take(&mut state.jobs);
    let cache = std::mem::take(&mut state.stat);
    let stats = HashStats::default();
    let arts = Artifacts::new(workdir, &cache, &stats);
    let mut inside = Inside::default();
    let mut out = Cleaned::default();
    let mut forget = Vec::new();
    for &j in jobs {
        let outputs = g.outputs(j);
        let id = job_id(outputs.iter().copied());
        let Some(rec) = records.get(&id) else {
            continue;
        };
        for (i, &rel) in outputs.iter().enumerate() {
            let path = workdir.join(rel);
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if !inside.check(workdir, rel) {
                out.kept.push((
                    rel.to_string(),
                    "it lies outside the work folder (through a symlinked folder)".into(),
                ));
                continue;
            }
            let now = arts.identity(rel).ok().flatten();
            if now.is_none() || now != rec.outputs.get(i).copied() {
                out.kept
                    .push((rel.to_string(), "it changed since qbuild wrote it".into()));
                continue;
            }
            if dry {
                out.removed.push(rel.to_string());
                continue;
            }
            let res = if meta.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match res {
                Ok(()) => out.removed.push(rel.to_string()),
                Err(e) => out.kept.push((rel.to_string(), e.to_string())),
            }
        }
        forget.push(id);
    }
    drop(arts);
    if dry {
        return Ok(out);
    }
    let mut records = records;
    for id in &forget {
        records.remove(id);
    }
    db.compact(&crate::db::State {
        stat: cache,
        jobs: records,
    })?;
    Ok(out)
}
