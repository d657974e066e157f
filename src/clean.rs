//! `--clean`: removes the outputs qbuild recorded as its own, still holding the bytes it wrote, and nothing else.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::artifact::Artifacts;
use crate::db::{job_id, Db, DbError, JobRecord};
use crate::graph::{Graph, JobId};
use crate::hash::Hash;
use crate::hash::HashStats;
use crate::stale::OwnedKeyParts;

/// Answers "does this output really lie where its path says?", remembering the work
/// folder's real path and the answer for each folder.
#[derive(Default)]
pub struct Inside {
    root: Option<PathBuf>,
    dirs: HashMap<PathBuf, Option<Detour>>,
}

/// Where a folder on an output's path really leads, when a symlink takes it elsewhere.
#[derive(Clone, Debug)]
pub struct Detour {
    /// The real place.
    pub to: PathBuf,
    /// Outside the work folder (else to another place inside it, a source folder say).
    pub outside: bool,
}

impl Inside {
    /// `None` when `rel` (a path inside the work folder) really lies at `rel` once the
    /// symlinks of its existing parent folders are resolved; else where it would go. A
    /// write through such a folder would land on someone else's file: outside the work
    /// folder, or on a source inside it.
    pub fn check(&mut self, workdir: &Path, rel: &str) -> Option<Detour> {
        if self.root.is_none() {
            self.root = workdir.canonicalize().ok();
        }
        let Some(root) = self.root.clone() else {
            return Some(Detour {
                to: workdir.to_path_buf(),
                outside: true,
            });
        };
        let full = workdir.join(rel);
        let mut dir = full
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| workdir.to_path_buf());
        loop {
            if let Some(ans) = self.dirs.get(&dir) {
                return ans.clone();
            }
            match dir.canonicalize() {
                Ok(c) => {
                    let lexical = match dir.strip_prefix(workdir) {
                        Ok(r) => root.join(r),
                        Err(_) => dir.clone(),
                    };
                    let ans = (c != lexical).then(|| Detour {
                        outside: !c.starts_with(&root),
                        to: c,
                    });
                    self.dirs.insert(dir, ans.clone());
                    return ans;
                }
                // Not there yet: whatever gets created will sit under the nearest existing folder.
                Err(_) => match dir.parent() {
                    Some(p) if dir != workdir => dir = p.to_path_buf(),
                    _ => {
                        return Some(Detour {
                            to: dir,
                            outside: true,
                        })
                    }
                },
            }
        }
    }
}

/// `p` (absolute, normalised) with its deepest existing folder resolved to its real path
/// and the rest as written: where `p` is, or would be, even through links to folders.
pub fn real_path(p: &Path) -> Option<PathBuf> {
    let mut base = p.parent()?;
    loop {
        if let Ok(real) = base.canonicalize() {
            return Some(real.join(p.strip_prefix(base).ok()?));
        }
        base = base.parent()?;
    }
}

/// The folders above a work-relative path (`a/b/c`: `a`, `a/b`).
fn folders_above(p: &str) -> impl Iterator<Item = &str> {
    p.match_indices('/').map(move |(i, _)| &p[..i])
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
    /// Records of jobs no longer in the Qairtfile whose outputs cannot be named (their
    /// readable keys are gone from the explain store): their files, if any, were left.
    pub unknown: usize,
    /// With `Dead::Count`: what `Dead::Remove` would remove.
    pub dead_left: Vec<String>,
    /// Folders left empty by the removals, removed too (deepest first).
    pub removed_dirs: Vec<String>,
}

/// What `clean` does with the outputs of jobs recorded but no longer in the Qairtfile.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dead {
    Leave,
    /// List what `Remove` would remove (in `dead_left`), removing nothing.
    Count,
    Remove,
}

/// Remove the recorded outputs of the given jobs. An output is removed only if qbuild
/// recorded it as produced and it still has the recorded bytes (a file put there since is
/// kept), and only if it lies inside the work folder; a symlink is removed, never followed.
/// With `Dead::Remove`, the same for jobs recorded in the state but no longer in the
/// Qairtfile (a dropped split, a renamed output), as `ninja -t cleandead` does: their old
/// outputs would otherwise stay beside the new ones, in folders that jobs read. Their
/// paths come from their readable keys, checked against the job's id (the hash of its
/// output list). A path the Qairtfile still names (an output of another job, or now a
/// source), a folder holding one, and the Qairtfile itself are left. Another Qairtfile or
/// variant built in the same folder shares the state, so this is never implicit.
/// With `dry`, nothing is removed or forgotten: `removed` lists what would be.
pub fn clean(
    g: &Graph,
    workdir: &Path,
    db: &Db,
    jobs: &[JobId],
    dead: Dead,
    dry: bool,
) -> Result<Cleaned, DbError> {
    let mut state = db.load()?;
    let records = std::mem::take(&mut state.jobs);
    let cache = std::mem::take(&mut state.stat);
    let stats = HashStats::default();
    let mut c = Cleaner {
        workdir,
        arts: Artifacts::new(workdir, &cache, &stats),
        inside: Inside::default(),
        out: Cleaned::default(),
        dry,
    };
    let mut forget = Vec::new();
    for &j in jobs {
        let outputs = g.outputs(j);
        let id = job_id(outputs.iter().copied());
        let Some(rec) = records.get(&id) else {
            continue;
        };
        let kept_before = c.out.kept.len();
        for (i, &rel) in outputs.iter().enumerate() {
            c.remove(rel, rec.outputs.get(i));
        }
        // A job with an output kept (edited by hand) keeps its record, so the next build
        // says why it reruns ("output ... changed") rather than "never built".
        if c.out.kept.len() == kept_before {
            forget.push(id);
        }
    }
    if dead != Dead::Leave {
        let count = dead == Dead::Count;
        let qairtfile = g.model.source.path.file_name().map(|f| f.to_string_lossy());
        let gone = dead_jobs(g, db, &records);
        if !count {
            c.out.unknown = gone.unknown;
        }
        // Every folder above a path the Qairtfile names: such a folder is not dead.
        let named_dirs: rustc_hash::FxHashSet<&str> = g
            .files
            .iter()
            .flat_map(|f| folders_above(&f.path))
            .collect();
        for (id, outputs) in &gone.known {
            for (i, rel) in outputs.iter().enumerate() {
                if g.by_path.get(&g.files, rel).is_some() {
                    continue;
                }
                if qairtfile.as_deref() == Some(rel.as_str()) {
                    continue;
                }
                if named_dirs.contains(rel.as_str()) {
                    if !count {
                        c.out.kept.push((
                            rel.to_string(),
                            "it is a folder holding paths the Qairtfile names".into(),
                        ));
                    }
                    continue;
                }
                if count {
                    if let Some(Ok(_)) = c.removable(rel, records[id].outputs.get(i)) {
                        c.out.dead_left.push(rel.clone());
                    }
                    continue;
                }
                c.remove(rel, records[id].outputs.get(i));
            }
            if !count {
                forget.push(*id);
            }
        }
    }
    let mut out = std::mem::take(&mut c.out);
    drop(c);
    if dry {
        return Ok(out);
    }
    out.removed_dirs = remove_emptied_folders(g, workdir, &out.removed);
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

/// Remove the folders above `removed` that are empty now, deepest first, as `git clean -d`
/// would: after `ars` drops 128, `models_ar_n/ar128-cl4096/` would otherwise stay as a tree
/// of empty folders. Only folders above a removed output are tried, and each path there
/// passed `Inside::check` (no symlinked folder on it), so nothing outside the work folder is
/// touched; a path the Qairtfile names (an input folder that happens to be empty) stays;
/// `rmdir` itself refuses a folder that still holds anything.
fn remove_emptied_folders(g: &Graph, workdir: &Path, removed: &[String]) -> Vec<String> {
    let mut dirs: Vec<&str> = removed
        .iter()
        .flat_map(|p| folders_above(p))
        .filter(|d| !d.is_empty() && g.by_path.get(&g.files, d).is_none())
        .collect();
    dirs.sort_unstable_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    dirs.dedup();
    dirs.into_iter()
        .filter(|d| fs::remove_dir(workdir.join(d)).is_ok())
        .map(str::to_string)
        .collect()
}

/// Jobs recorded in the state but no longer in the Qairtfile.
pub struct DeadJobs {
    /// Each one's id and output paths, from its readable key (checked against the id, the
    /// hash of its output list), in id order.
    pub known: Vec<(Hash, Vec<String>)>,
    /// How many have no readable key left (the explain store lost it).
    pub unknown: usize,
}

/// The recorded jobs no longer in `g`, with their outputs where the explain store has them.
pub fn dead_jobs(g: &Graph, db: &Db, records: &rustc_hash::FxHashMap<Hash, JobRecord>) -> DeadJobs {
    let live: rustc_hash::FxHashSet<Hash> = (0..g.jobs.len())
        .map(|i| job_id(g.outputs(JobId(i as u32)).iter().copied()))
        .collect();
    let mut gone: Vec<&Hash> = records.keys().filter(|id| !live.contains(*id)).collect();
    gone.sort();
    let mut dead = DeadJobs {
        known: Vec::new(),
        unknown: 0,
    };
    for id in gone {
        let k = db
            .explain::<OwnedKeyParts>(id)
            .filter(|k| job_id(k.outputs.iter().map(|o| o.as_ref())) == *id);
        match k {
            Some(k) => dead
                .known
                .push((*id, k.outputs.iter().map(|o| o.to_string()).collect())),
            None => dead.unknown += 1,
        }
    }
    dead
}

/// What one `clean` removes and keeps.
struct Cleaner<'a> {
    workdir: &'a Path,
    arts: Artifacts<'a>,
    inside: Inside,
    out: Cleaned,
    dry: bool,
}

impl Cleaner<'_> {
    /// Whether the output `rel` may go: `None` if nothing is there; why not, if it lies
    /// elsewhere than its path says or no longer has the identity qbuild recorded for it.
    fn removable(
        &mut self,
        rel: &str,
        recorded: Option<&Hash>,
    ) -> Option<Result<fs::Metadata, String>> {
        let meta = fs::symlink_metadata(self.workdir.join(rel)).ok()?;
        if let Some(d) = self.inside.check(self.workdir, rel) {
            return Some(Err(if d.outside {
                "it lies outside the work folder (through a symlinked folder)".to_string()
            } else {
                format!(
                    "a folder on its path is a symlink; it is really {}",
                    d.to.display()
                )
            }));
        }
        let now = self.arts.identity(rel).ok().flatten();
        if now.is_none() || now.as_ref() != recorded {
            return Some(Err("it changed since qbuild wrote it".into()));
        }
        Some(Ok(meta))
    }

    /// Remove the output `rel` if it may go (see `removable`); say what stays and why.
    fn remove(&mut self, rel: &str, recorded: Option<&Hash>) {
        let meta = match self.removable(rel, recorded) {
            None => return,
            Some(Err(why)) => return self.out.kept.push((rel.to_string(), why)),
            Some(Ok(meta)) => meta,
        };
        if self.dry {
            self.out.removed.push(rel.to_string());
            return;
        }
        let path = self.workdir.join(rel);
        let res = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match res {
            Ok(()) => self.out.removed.push(rel.to_string()),
            Err(e) => self.out.kept.push((rel.to_string(), e.to_string())),
        }
    }
}
