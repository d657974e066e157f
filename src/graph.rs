//! The build graph: files and jobs in dense vectors with typed ids, job-to-job edges in petgraph; per-run state lives elsewhere.

use std::path::Path;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{closest, Diagnostic};
use crate::expand::{Action, JobSpec, Model};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u32);

impl FileId {
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}
impl JobId {
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug, Clone)]
pub struct File {
    /// Normalised path, relative to the work folder (or absolute for outside sources).
    pub path: String,
    /// The job that writes it; `None` for a source.
    pub producer: Option<JobId>,
}

#[derive(Debug, Clone)]
pub struct Job {
    /// The expanded rule instance; its `inputs`, `outputs` and `order_only` are emptied
    /// once interned (read paths through `ins`, `outs`, `order`).
    pub spec: Box<JobSpec>,
    pub ins: Vec<FileId>,
    pub outs: Vec<FileId>,
    /// Built before this job, but not part of its key (a link's target).
    pub order: Vec<FileId>,
    /// Jobs producing this job's inputs and order-only files, deduplicated.
    pub deps: Vec<JobId>,
}

impl Job {
    /// For a link qbuild makes (`links`): the file it points at.
    pub fn link_target(&self) -> Option<FileId> {
        match self.spec.action {
            Action::Link(_) => self.order.first().copied(),
            _ => None,
        }
    }
}

/// Path → file id, holding only ids: the text is the file table's (a map keyed by `String`
/// would keep a second copy of every path).
#[derive(Debug, Default)]
pub struct PathIndex {
    table: hashbrown::HashTable<FileId>,
}

fn hash_path(p: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(p)
}

impl PathIndex {
    fn with_capacity(n: usize) -> PathIndex {
        PathIndex {
            table: hashbrown::HashTable::with_capacity(n),
        }
    }

    pub fn get(&self, files: &[File], p: &str) -> Option<FileId> {
        self.get_hashed(files, p, hash_path(p))
    }

    fn get_hashed(&self, files: &[File], p: &str, hash: u64) -> Option<FileId> {
        self.table.find(hash, |f| files[f.idx()].path == p).copied()
    }

    /// Add `id`, whose path (of hash `hash`) is not in the index yet.
    fn insert_hashed(&mut self, files: &[File], id: FileId, hash: u64) {
        self.table
            .insert_unique(hash, id, |f| hash_path(&files[f.idx()].path));
    }
}

impl Graph {
    /// A file's path (relative to the work folder, or absolute for an outside source).
    pub fn path(&self, f: FileId) -> &str {
        &self.files[f.idx()].path
    }

    /// A job's declared outputs, in order.
    pub fn outputs(&self, j: JobId) -> Vec<&str> {
        self.jobs[j.idx()]
            .outs
            .iter()
            .map(|f| self.path(*f))
            .collect()
    }
}

/// Files, jobs and their edges, checked: no path has two producers and there is no cycle.
#[derive(Debug)]
pub struct Graph {
    pub model: Model,
    pub files: Vec<File>,
    pub jobs: Vec<Job>,
    pub by_path: PathIndex,
    /// Job → jobs that consume its outputs.
    pub dependents: Vec<Vec<JobId>>,
    /// Output → the files in the graph whose content changes when it is written, to hash
    /// again then: the folders that hold it (a generated file in a source folder some job
    /// reads), and, for a folder output, the files inside it that no job declares (a
    /// reader names one file of the folder).
    pub holders: rustc_hash::FxHashMap<FileId, Vec<FileId>>,
}

impl Graph {
    pub fn build(mut model: Model) -> Result<Graph, Diagnostic> {
        let specs = std::mem::take(&mut model.jobs);
        let mut files: Vec<File> = Vec::new();
        // About 1.3 files per job in the pipelines qbuild is for; the index grows if not.
        let mut by_path = PathIndex::with_capacity(specs.len() * 4 / 3);
        // Each path is moved (not copied) into `files` the first time it is seen.
        let mut intern = |p: String, files: &mut Vec<File>| -> FileId {
            let hash = hash_path(&p);
            if let Some(id) = by_path.get_hashed(files, &p, hash) {
                return id;
            }
            let id = FileId(files.len() as u32);
            files.push(File {
                path: p,
                producer: None,
            });
            by_path.insert_hashed(files, id, hash);
            id
        };
        let mut jobs = Vec::with_capacity(specs.len());
        for (ji, mut spec) in specs.into_iter().enumerate() {
            let jid = JobId(ji as u32);
            let paths = std::mem::take(&mut spec.outputs);
            let mut outs = Vec::with_capacity(paths.len());
            for (oi, o) in paths.into_iter().enumerate() {
                let f = intern(o, &mut files);
                if let Some(prev) = files[f.idx()].producer {
                    let o = &files[f.idx()].path;
                    if prev.idx() == ji {
                        return Err(model
                            .source
                            .error(
                                output_span(&model, &spec, oi),
                                format!("`{o}` is listed twice in one job's outputs"),
                            )
                            .with_hint("each output path appears once"));
                    }
                    let prev_job: &Job = &jobs[prev.idx()];
                    let here = output_span(&model, &spec, oi);
                    let there = output_span(
                        &model,
                        &prev_job.spec,
                        prev_job.outs.iter().position(|x| *x == f).unwrap_or(0),
                    );
                    let loc = model.source.locate(there);
                    let what = if prev_job.spec.rule == spec.rule {
                        "two instances of one rule"
                    } else {
                        "two rules"
                    };
                    let d = model.source.error(here, format!("{what} write `{o}`"));
                    return Err(d.with_hint(format!(
                        "`{}` already writes it (at {}:{}:{}); every path has one producer",
                        prev_job.spec.label,
                        loc.file.display(),
                        loc.line,
                        loc.column
                    )));
                }
                files[f.idx()].producer = Some(jid);
                outs.push(f);
            }
            // The paths live in `files` from now on: the spec keeps none.
            let ins: Vec<FileId> = std::mem::take(&mut spec.inputs)
                .into_iter()
                .map(|i| intern(i, &mut files))
                .collect();
            let order: Vec<FileId> = std::mem::take(&mut spec.order_only)
                .into_iter()
                .map(|i| intern(i, &mut files))
                .collect();
            jobs.push(Job {
                spec,
                ins,
                outs,
                order,
                deps: Vec::new(),
            });
        }
        let mut holds = nested_outputs(&model, &jobs, &files, &by_path)?;
        // A link qbuild makes inside such a folder shows what its target holds: the folder
        // changes when the target's job runs too (through chains of links).
        let mut behind = Vec::new();
        for (folder, inside) in &holds {
            for &(p, _) in inside {
                let mut cur = p;
                for _ in 0..40 {
                    let Some(t) = jobs[cur.idx()].link_target() else {
                        break;
                    };
                    let Some(q) = files[t.idx()].producer else {
                        break;
                    };
                    behind.push((*folder, (q, t)));
                    cur = q;
                }
            }
        }
        for (folder, made) in behind {
            holds.entry(folder).or_default().push(made);
        }
        let mut holders: rustc_hash::FxHashMap<FileId, Vec<FileId>> = Default::default();
        for (folder, inside) in &holds {
            for (_, out) in inside {
                holders.entry(*out).or_default().push(*folder);
            }
        }
        // A file no job declares, inside a folder a job writes: its readers wait for that
        // job (one lookup per folder above each such file; sources are few). When that
        // output is a link qbuild makes, the file lies in what the link leads to: the jobs
        // writing there are followed too, through chains of links.
        let mut maker: rustc_hash::FxHashMap<FileId, Vec<JobId>> = Default::default();
        // The nearest path at or above `path` that a job writes, and where `path` goes on.
        let written = |path: &str, exact: bool| -> Option<(FileId, JobId, usize)> {
            let mut end = path.len();
            if exact {
                if let Some(f) = by_path.get(&files, path) {
                    if let Some(p) = files[f.idx()].producer {
                        return Some((f, p, end));
                    }
                }
            }
            while let Some(slash) = path[..end].rfind('/') {
                end = slash;
                let Some(outer) = by_path.get(&files, &path[..end]) else {
                    continue;
                };
                if let Some(p) = files[outer.idx()].producer {
                    return Some((outer, p, end));
                }
            }
            None
        };
        for (fi, file) in files.iter().enumerate() {
            if file.producer.is_some() {
                continue;
            }
            let me = FileId(fi as u32);
            let mut path = file.path.clone();
            let mut exact = false;
            // At most 40 links, as the kernel follows them.
            for _ in 0..40 {
                let Some((outer, p, end)) = written(&path, exact) else {
                    break;
                };
                holders.entry(outer).or_default().push(me);
                maker.entry(me).or_default().push(p);
                let Some(to) = jobs[p.idx()].link_target() else {
                    break;
                };
                path = format!("{}{}", files[to.idx()].path, &path[end..]);
                exact = true;
            }
        }
        let mut g: DiGraph<(), ()> = DiGraph::with_capacity(jobs.len(), jobs.len() * 2);
        for _ in 0..jobs.len() {
            g.add_node(());
        }
        let mut dependents = vec![Vec::new(); jobs.len()];
        for (ji, job) in jobs.iter_mut().enumerate() {
            let mut deps: Vec<JobId> = job
                .ins
                .iter()
                .chain(&job.order)
                .flat_map(|f| {
                    // (A file kept by hand in the job's own folder output: no edge to itself.)
                    let made = maker.get(f).map_or(&[][..], Vec::as_slice);
                    let made = made.iter().copied().filter(|p| p.idx() != ji);
                    files[f.idx()].producer.into_iter().chain(made)
                })
                .collect();
            // A folder it reads (or links to) that holds other jobs' outputs: it waits for them.
            for (i, f) in job.ins.iter().chain(&job.order).enumerate() {
                for &(p, out) in holds.get(f).map_or(&[][..], Vec::as_slice) {
                    if p.idx() == ji {
                        // An input: where it is written; a link's target: the link.
                        let span = match job.spec.input_template.get(i) {
                            Some(t) if i < job.ins.len() => {
                                model.rules[job.spec.rule as usize].input_span(*t)
                            }
                            _ => output_span(&model, &job.spec, 0),
                        };
                        return Err(model
                            .source
                            .error(
                                span,
                                format!(
                                    "`{}` reads `{}`, which holds `{}`, one of its own outputs",
                                    job.spec.label,
                                    files[f.idx()].path,
                                    files[out.idx()].path
                                ),
                            )
                            .with_hint("a job cannot read what it writes: write the output elsewhere, or read only the files it needs"));
                    }
                    deps.push(p);
                }
            }
            deps.sort_unstable();
            deps.dedup();
            for d in &deps {
                g.add_edge(NodeIndex::new(d.idx()), NodeIndex::new(ji), ());
                dependents[d.idx()].push(JobId(ji as u32));
            }
            job.deps = deps;
        }
        // A component of more than one job, or a job feeding itself, is a cycle. (The
        // scheduler needs no precomputed order: it releases jobs as their inputs settle.)
        for scc in tarjan_scc(&g).iter().rev() {
            let is_cycle = scc.len() > 1
                || jobs[scc[0].index()]
                    .deps
                    .contains(&JobId(scc[0].index() as u32));
            if is_cycle {
                return Err(cycle_error(&model, &jobs, &files, &dependents, scc));
            }
        }
        Ok(Graph {
            model,
            files,
            jobs,
            by_path,
            dependents,
            holders,
        })
    }

    /// Every alias and the `default` must name something, used or not, and an alias must
    /// not take a rule's name or an output's path (a target would then mean two things).
    /// An alias cycle is named whole. Checked by every run, as `--check` does.
    pub fn check_names(&self, workdir: &Path) -> Result<(), Diagnostic> {
        let aliases = &self.model.aliases;
        let src = &self.model.source;
        for (a, targets) in aliases {
            if targets.is_empty() {
                return Err(src
                    .error(
                        a.span.clone(),
                        format!("alias `{}` names no target", a.text),
                    )
                    .with_hint(
                        "an alias stands for the targets it lists: list some, or remove it",
                    ));
            }
            let clash = if self.model.rules.iter().any(|r| r.name == a.text) {
                Some("a rule")
            } else if self
                .by_path
                .get(&self.files, &crate::expand::normalize(&a.text))
                .is_some_and(|f| self.files[f.idx()].producer.is_some())
            {
                Some("an output")
            } else {
                None
            };
            if let Some(what) = clash {
                return Err(src
                    .error(
                        a.span.clone(),
                        format!("alias `{}` has the name of {what}", a.text),
                    )
                    .with_hint("a target would mean both; rename the alias"));
            }
        }
        // So must a rule: `qbuild o` means the rule `o`, so another rule's output `o` could
        // only be named `./o`. (A rule named for its own output means the same either way.)
        for (ri, r) in self.model.rules.iter().enumerate() {
            let Some(f) = self.by_path.get(&self.files, &r.name) else {
                continue;
            };
            let Some(p) = self.files[f.idx()].producer else {
                continue;
            };
            let other = self.jobs[p.idx()].spec.rule as usize;
            if other != ri {
                return Err(src
                    .error(
                        r.name_span.clone(),
                        format!(
                            "rule `{}` has the name of an output of rule `{}`",
                            r.name, self.model.rules[other].name
                        ),
                    )
                    .with_hint("a target would mean both; rename the rule"));
            }
        }
        // Alias cycles, named whole (`a -> b -> a`) at the alias that starts one: one
        // depth-first walk over the alias graph, each alias entered once.
        let index: rustc_hash::FxHashMap<&str, usize> = aliases
            .iter()
            .enumerate()
            .map(|(i, (a, _))| (a.text.as_str(), i))
            .collect();
        // 0: not seen; 1: on the walk's path; 2: done.
        let mut color = vec![0u8; aliases.len()];
        for start in 0..aliases.len() {
            if color[start] != 0 {
                continue;
            }
            let mut path = vec![(start, 0usize)];
            color[start] = 1;
            while let Some(&mut (at, ref mut next)) = path.last_mut() {
                let Some(t) = aliases[at].1.get(*next) else {
                    color[at] = 2;
                    path.pop();
                    continue;
                };
                *next += 1;
                let Some(&to) = index.get(t.text.as_str()) else {
                    continue;
                };
                match color[to] {
                    0 => {
                        color[to] = 1;
                        path.push((to, 0));
                    }
                    1 => {
                        let from = path.iter().position(|(k, _)| *k == to).unwrap_or(0);
                        let names: Vec<&str> = path[from..]
                            .iter()
                            .map(|(k, _)| aliases[*k].0.text.as_str())
                            .chain(std::iter::once(aliases[to].0.text.as_str()))
                            .collect();
                        return Err(src
                            .error(
                                aliases[to].0.span.clone(),
                                format!("alias cycle: {}", names.join(" -> ")),
                            )
                            .with_hint(
                                "an alias may name other aliases, but not itself through them",
                            ));
                    }
                    _ => {}
                }
            }
        }
        // Every item of every alias, and the default, names something: each checked once,
        // not through the aliases it names (which are checked themselves).
        let named: Vec<(String, Option<std::ops::Range<usize>>)> = aliases
            .iter()
            .flat_map(|(_, ts)| ts.iter())
            .chain(self.model.default.iter())
            .filter(|t| !index.contains_key(t.text.as_str()))
            .map(|t| (t.text.clone(), Some(t.span.clone())))
            .collect();
        self.resolve_targets(&named, workdir, workdir).map(|_| ())
    }

    /// Resolve targets to jobs. A target is `all`, an alias, a rule name, or a path
    /// (relative to `cwd`, else to the work folder); a source path that exists needs no job.
    /// Targets written in the Qairtfile (`default`, aliases) carry their span, so errors
    /// about them point at the Qairtfile.
    pub fn resolve_targets(
        &self,
        targets: &[(String, Option<std::ops::Range<usize>>)],
        cwd: &Path,
        workdir: &Path,
    ) -> Result<Vec<JobId>, Diagnostic> {
        let mut out = Vec::new();
        let mut stack: Vec<(String, Option<std::ops::Range<usize>>)> = targets
            .iter()
            .rev()
            .map(|(t, sp)| (t.clone(), sp.clone()))
            .collect();
        let err = |span: &Option<std::ops::Range<usize>>, msg: String| match span {
            Some(sp) => self.model.source.error(sp.clone(), msg),
            None => Diagnostic::plain(msg),
        };
        // Each alias and rule is expanded once, however many aliases name it (a diamond of
        // aliases would otherwise double the work at every level).
        let mut expanded: rustc_hash::FxHashSet<String> = Default::default();
        let mut all_done = false;
        while let Some((t, span)) = stack.pop() {
            if t == "all" {
                // Every job but those of `manual` rules (Bazel's `tags = ["manual"]`: a
                // deploy step that needs a device), which still run when what is built
                // needs them.
                if !std::mem::replace(&mut all_done, true) {
                    out.extend(
                        self.jobs
                            .iter()
                            .enumerate()
                            .filter(|(_, j)| !self.model.rules[j.spec.rule as usize].manual)
                            .map(|(i, _)| JobId(i as u32)),
                    );
                }
                continue;
            }
            if let Some((_, ts)) = self.model.aliases.iter().find(|(a, _)| a.text == t) {
                if expanded.insert(t) {
                    stack.extend(
                        ts.iter()
                            .rev()
                            .map(|x| (x.text.clone(), Some(x.span.clone()))),
                    );
                }
                continue;
            }
            if let Some(ri) = self.model.rules.iter().position(|r| r.name == t) {
                if expanded.insert(t) {
                    out.extend(
                        self.jobs
                            .iter()
                            .enumerate()
                            .filter(|(_, j)| j.spec.rule as usize == ri)
                            .map(|(i, _)| JobId(i as u32)),
                    );
                }
                continue;
            }
            // A path written in the Qairtfile (`default`, an alias) is the work folder's,
            // wherever qbuild runs from.
            let base = if span.is_some() { workdir } else { cwd };
            let found = self.lookup_path(&t, base, workdir);
            // A file inside a folder a job writes (named as another job's input, or not in
            // the graph at all): that job makes it.
            if let Some(j) = found
                .and_then(|f| self.files[f.idx()].producer)
                .or_else(|| self.folder_producer(&t, base, workdir))
            {
                out.push(j);
                continue;
            }
            if let Some(f) = found {
                match self.files[f.idx()].producer {
                    Some(j) => out.push(j),
                    None => {
                        if !workdir.join(&self.files[f.idx()].path).exists() {
                            return Err(err(
                                &span,
                                format!(
                                    "`{t}` is a source that does not exist, and no rule writes it"
                                ),
                            ));
                        }
                    }
                }
                continue;
            }
            let mut names: Vec<&str> = vec!["all"];
            names.extend(self.model.rules.iter().map(|r| r.name.as_str()));
            names.extend(self.model.aliases.iter().map(|(a, _)| a.text.as_str()));
            // A mistyped output path (`split_1.bim`): the paths jobs write.
            let outputs = self.files.iter().filter(|f| f.producer.is_some());
            names.extend(outputs.map(|f| f.path.as_str()));
            let d = err(
                &span,
                format!("unknown target `{t}`: not a rule, an alias, or a path any rule writes"),
            );
            return Err(match closest(&t, names.iter().copied()) {
                Some(c) => d.with_hint(format!("did you mean `{c}`?")),
                None => d.with_hint("`qbuild --list` shows the rules and their outputs"),
            });
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Find a file by a path relative to `cwd`, or else relative to the work folder (so from
    /// a subfolder, `b` and `./b` are the subfolder's `b` when the graph has one).
    pub fn lookup_path(&self, t: &str, cwd: &Path, workdir: &Path) -> Option<FileId> {
        let (from_cwd, from_top) = target_rels(t, cwd, workdir);
        if let Some(f) = from_cwd.and_then(|rel| self.by_path.get(&self.files, &rel)) {
            return Some(f);
        }
        // The work folder (or the target's folder) spelled through a symlink: compare
        // real paths, folder by folder up from the target (which may not exist yet).
        let under_cwd = || {
            let abs = crate::expand::normalize(&cwd.join(t).to_string_lossy());
            let real_wd = workdir.canonicalize().ok()?;
            let real = crate::clean::real_path(Path::new(&abs))?;
            let rel = real.strip_prefix(&real_wd).ok()?;
            self.by_path.get(&self.files, &rel.to_string_lossy())
        };
        under_cwd().or_else(|| from_top.and_then(|rel| self.by_path.get(&self.files, &rel)))
    }

    /// The job whose folder output holds the target path `t` (relative to `cwd`, else to
    /// the work folder), if one does.
    fn folder_producer(&self, t: &str, cwd: &Path, workdir: &Path) -> Option<JobId> {
        let (from_cwd, from_top) = target_rels(t, cwd, workdir);
        [from_cwd, from_top].into_iter().flatten().find_map(|rel| {
            self.files_at_and_above(&rel)
                .find_map(|(_, f)| self.files[f.idx()].producer)
        })
    }

    /// The files of the graph at the work-folder path `rel` and at each folder above it,
    /// nearest first, with their paths.
    pub fn files_at_and_above<'p>(
        &'p self,
        rel: &'p str,
    ) -> impl Iterator<Item = (&'p str, FileId)> + 'p {
        std::iter::successors(Some(rel), |p| p.rfind('/').map(|i| &p[..i]))
            .filter_map(|p| self.by_path.get(&self.files, p).map(|f| (p, f)))
    }

    /// Every job the given targets need, in dependency order.
    pub fn closure(&self, targets: &[JobId]) -> Vec<bool> {
        let mut want = vec![false; self.jobs.len()];
        let mut stack: Vec<JobId> = targets.to_vec();
        while let Some(j) = stack.pop() {
            if want[j.idx()] {
                continue;
            }
            want[j.idx()] = true;
            stack.extend(self.jobs[j.idx()].deps.iter().copied());
        }
        want
    }
}

fn output_span(model: &Model, spec: &JobSpec, oi: usize) -> std::ops::Range<usize> {
    let rule = &model.rules[spec.rule as usize];
    match spec.output_template.get(oi).copied() {
        // A link job: point at its `link`.
        Some(u16::MAX) => spec
            .input_template
            .first()
            .and_then(|li| rule.links.get(*li as usize))
            .map_or(rule.name_span.clone(), |(l, _)| l.span.clone()),
        t => rule
            .outputs
            .get(t.unwrap_or(0) as usize)
            .map_or(rule.name_span.clone(), |s| s.span.clone()),
    }
}

/// A target path `t` as work-folder paths: read from `cwd` (if that lies in the work
/// folder), and from the work folder itself unless `t` is explicitly relative or absolute
/// (`./b`, `../b`, `/b`).
fn target_rels(t: &str, cwd: &Path, workdir: &Path) -> (Option<String>, Option<String>) {
    let abs = crate::expand::normalize(&cwd.join(t).to_string_lossy());
    let wd = crate::expand::normalize(&workdir.to_string_lossy());
    let from_cwd = abs
        .strip_prefix(&wd)
        .and_then(|r| r.strip_prefix('/'))
        .map(str::to_string);
    let explicit = Path::new(t).is_absolute() || t.starts_with("./") || t.starts_with("../");
    let from_top = (!explicit).then(|| crate::expand::normalize(t));
    (from_cwd, from_top)
}

/// Folder (a file of the graph without a producer) -> each output inside it, with its job.
type Holds = rustc_hash::FxHashMap<FileId, Vec<(JobId, FileId)>>;

/// An output inside another job's output (a folder) is refused: the folder's hash would
/// change whenever the inner file's job ran, so the folder's job would rerun as if its
/// output had been edited by hand (Bazel refuses such prefixes too). Within one job it is
/// fine: both are written by the same command.
///
/// Returns the folders in the graph that hold outputs (a source folder of test vectors with
/// a generated file in it, say): folder -> (producer, output) for each output inside, so
/// that a job reading the folder waits for those producers.
fn nested_outputs(
    model: &Model,
    jobs: &[Job],
    files: &[File],
    by_path: &PathIndex,
) -> Result<Holds, Diagnostic> {
    // One lookup per folder above each output: 17 ms at 90k jobs (114k outputs), 3% of a
    // no-op there. (Remembering folders already found clear saved nothing: few outputs
    // share a folder.)
    let mut holds = Holds::default();
    for (ji, job) in jobs.iter().enumerate() {
        for (oi, f) in job.outs.iter().enumerate() {
            let path = files[f.idx()].path.as_str();
            let mut end = path.len();
            while let Some(slash) = path[..end].rfind('/') {
                end = slash;
                let folder = &path[..end];
                let Some(outer) = by_path.get(files, folder) else {
                    continue;
                };
                let owner = match files[outer.idx()].producer {
                    None => {
                        holds.entry(outer).or_default().push((JobId(ji as u32), *f));
                        continue;
                    }
                    Some(o) if o.idx() == ji => continue,
                    Some(o) => o,
                };
                let other = &jobs[owner.idx()];
                let there = output_span(
                    model,
                    &other.spec,
                    other.outs.iter().position(|x| *x == outer).unwrap_or(0),
                );
                let loc = model.source.locate(there);
                return Err(model
                    .source
                    .error(
                        output_span(model, &job.spec, oi),
                        format!(
                            "`{path}` is inside `{folder}`, an output of `{}`",
                            other.spec.label
                        ),
                    )
                    .with_hint(format!(
                        "a folder output belongs to one job (`{}`, at {}:{}:{}): write `{path}` elsewhere, or make it in that job",
                        other.spec.label,
                        loc.file.display(),
                        loc.line,
                        loc.column
                    )));
            }
        }
    }
    Ok(holds)
}

fn cycle_error(
    model: &Model,
    jobs: &[Job],
    files: &[File],
    dependents: &[Vec<JobId>],
    scc: &[NodeIndex],
) -> Diagnostic {
    // Walk the component from its first job until we return to it.
    let members: std::collections::HashSet<usize> = scc.iter().map(|n| n.index()).collect();
    let start = scc.iter().map(|n| n.index()).min().unwrap_or(0);
    let mut path = vec![start];
    let mut cur = start;
    for _ in 0..=members.len() {
        // Pick a dependent of `cur` inside the component (follow data flow, including the
        // edges from a folder's writers to its readers).
        let next = dependents[cur]
            .iter()
            .map(|d| d.idx())
            .find(|i| members.contains(i) && (!path.contains(i) || *i == start));
        match next {
            Some(n) => {
                path.push(n);
                if n == start {
                    break;
                }
                cur = n;
            }
            None => break,
        }
    }
    let names: Vec<String> = path.iter().map(|j| jobs[*j].spec.label.clone()).collect();
    // An edge that no input or link target explains goes through a folder the reader reads.
    let via_folder = path.windows(2).any(|w| {
        let (from, to) = (&jobs[w[0]], &jobs[w[1]]);
        !from
            .outs
            .iter()
            .any(|o| to.ins.contains(o) || to.order.contains(o))
    });
    let rule = &model.rules[jobs[start].spec.rule as usize];
    let example = jobs[start]
        .outs
        .first()
        .map(|f| files[f.idx()].path.clone())
        .unwrap_or_default();
    model
        .source
        .error(
            rule.name_span.clone(),
            format!("dependency cycle: {}", names.join(" -> ")),
        )
        .with_hint(format!(
            "`{}` (which writes `{example}`) ends up depending on its own output{}",
            jobs[start].spec.label,
            if via_folder {
                " (a job that reads a folder waits for every job that writes into it, and one \
                 that reads a file inside another job's folder output waits for that job)"
            } else {
                ""
            }
        ))
}
