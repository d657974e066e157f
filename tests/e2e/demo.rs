//! The demo pipeline (`Qairtfile.example` with the bundled qairt-sim SDK), end to end:
//! exactly which jobs run after each kind of change.
//!
//! Jobs are named by their labels (`quantize ar=1 split=3`, `context binary split=2`, ...).
//! Expected sets are written per rule and per split, against the catalogue of every job the
//! demo has (from a dry run), so the tests keep their meaning while the example grows
//! (e.g. the link jobs `split` makes for each split's encodings and test vectors).
//!
//! The core of the graph, for ARs 128 and 1, CL 4096, 4 splits:
//!   export ar=A              models/llama3.{onnx,encodings} -> exported onnx + encodings
//!   split ar=A               exported onnx -> 4 split onnx (and links to the encodings and test vectors)
//!   mha2sha ar=A split=S     S = 2..4: split onnx + encodings -> SHA onnx + encodings
//!   convert ar=A split=S     S = 1: split onnx + encodings; else the SHA pair -> DLC
//!   quantize ar=A split=S    DLC + calibration inputs -> quantized DLC
//!   perf_config / backend_config split=S   configs written by qbuild itself
//!   context binary split=S   both ARs' quantized DLCs of split S + configs -> split_S.bin

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::{assert_same_files, assert_set, set, Catalog, Job, Space};

const ARS: [u32; 2] = [128, 1];
const SPLITS: [u32; 4] = [1, 2, 3, 4];

fn export(ar: u32) -> String {
    format!("export ar={ar}")
}
fn split(ar: u32) -> String {
    format!("split ar={ar}")
}
fn mha2sha(ar: u32, s: u32) -> String {
    format!("mha2sha ar={ar} split={s}")
}
fn convert(ar: u32, s: u32) -> String {
    format!("convert ar={ar} split={s}")
}
fn quantize(ar: u32, s: u32) -> String {
    format!("quantize ar={ar} split={s}")
}
fn perf_config(s: u32) -> String {
    format!("perf_config split={s}")
}
fn backend_config(s: u32) -> String {
    format!("backend_config split={s}")
}
fn context_binary(s: u32) -> String {
    format!("context binary split={s}")
}
fn bin(s: u32) -> String {
    format!("artifacts/serialized_binaries/split_{s}.bin")
}
fn qdlc(ar: u32, s: u32) -> String {
    format!("compiled_model/ar{ar}-cl4096_{s}_of_4_quantized.dlc")
}

/// The 38 jobs of the pipeline table in PRODUCT.md; the example may add helper jobs.
fn core_jobs() -> BTreeSet<String> {
    let mut v = BTreeSet::new();
    for ar in ARS {
        v.insert(export(ar));
        v.insert(split(ar));
        for s in SPLITS {
            if s != 1 {
                v.insert(mha2sha(ar, s));
            }
            v.insert(convert(ar, s));
            v.insert(quantize(ar, s));
        }
    }
    for s in SPLITS {
        v.insert(perf_config(s));
        v.insert(backend_config(s));
        v.insert(context_binary(s));
    }
    v
}

/// The splits an output path belongs to: `..._3_of_4...` or a stem ending in `_3`
/// (`split_3.bin`, `test_vectors_3`, `PerfSetting_3.conf`, `input_list_3.txt`).
fn split_of_path(path: &str) -> Option<u32> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if let Some(i) = name.find("_of_") {
        let before = &name[..i];
        return before.rsplit('_').next().and_then(|d| d.parse().ok());
    }
    let stem = name.split('.').next().unwrap_or(name);
    let (head, digits) = stem.rsplit_once('_')?;
    if head.is_empty() {
        return None;
    }
    digits.parse().ok()
}

impl Job {
    /// The splits this job writes something for (empty: per AR or global, e.g. export).
    fn splits(&self) -> BTreeSet<u32> {
        self.outputs
            .iter()
            .filter_map(|o| split_of_path(o))
            .collect()
    }
}

/// Views of the demo's jobs.
impl Catalog {
    /// From a dry run of `all` on a fresh copy of the demo (it writes no output).
    fn of_demo() -> Catalog {
        let s = Space::demo();
        let out = s.run(["-n", "all"]);
        out.assert_ok();
        Catalog::from_events(&out, "would_run")
    }

    fn rules(&self, rules: &[&str]) -> BTreeSet<String> {
        self.select(|j| rules.contains(&j.rule.as_str()))
    }

    /// Jobs all of whose outputs are symlinks in the built folder `s` (made by qbuild).
    fn links(&self, s: &Space) -> BTreeSet<String> {
        self.select(|j| j.outputs.iter().all(|o| s.is_symlink(o)))
    }

    /// What `split_S.bin` needs: every job for split S, and the per-AR jobs that write
    /// every split at once (export, split).
    fn needs_of_bin(&self, s: u32) -> BTreeSet<String> {
        self.select(|j| {
            let sp = j.splits();
            sp.is_empty() || sp.contains(&s)
        })
    }
}

/// The sources of a demo build.
const SOURCES: &[&str] = &["Qairtfile", "models"];

/// A built demo and its catalogue (from the first build's events).
fn built_demo() -> (Space, Catalog) {
    let s = Space::demo();
    let out = s.build_all();
    let cat = Catalog::from_events(&out, "job_finished");
    let core = core_jobs();
    assert!(
        cat.all().is_superset(&core),
        "a pipeline job is missing: {:?}",
        core.difference(&cat.all())
    );
    (s, cat)
}

/// The outputs of a clean build of this space's Qairtfile and sources, in a fresh folder.
#[track_caller]
fn assert_equals_clean_build(s: &Space) {
    let clean = s.copy_of(SOURCES);
    clean.build_all();
    assert_same_files(
        &s.snapshot(),
        &clean.snapshot(),
        "incremental build vs clean build",
    );
}

fn minus(a: &BTreeSet<String>, b: &BTreeSet<String>) -> BTreeSet<String> {
    a.difference(b).cloned().collect()
}

#[test]
fn demo_builds_everything_then_nothing() {
    let cat = Catalog::of_demo();
    let n = cat.all().len() as u64;
    let s = Space::demo();
    // No target: the Qairtfile's `default` (the context binaries) needs every job.
    let out = s.run(Vec::<String>::new());
    out.assert_ok().assert_ran(&cat.all());
    assert!(
        cat.all().is_superset(&core_jobs()),
        "{:?}",
        core_jobs().difference(&cat.all())
    );
    assert_eq!(out.finished()["status"], "ok", "{out}");
    assert_eq!(out.count("failed"), 0);
    assert_eq!(out.count("up_to_date"), 0);
    assert!(
        out.count("hashed_bytes") > 0,
        "a first build hashes its inputs\n{out}"
    );
    for ev in out.events.iter().filter(|e| e["event"] == "job_finished") {
        assert!(
            ev["rule"].is_string() && ev["duration_ms"].is_u64() && ev["outputs"].is_array(),
            "{ev}"
        );
    }

    for i in SPLITS {
        let b = s.read(&bin(i));
        let head = String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned();
        assert!(
            head.contains(&format!(
                "graphs: ar128-cl4096_{i}_of_4, ar1-cl4096_{i}_of_4"
            )),
            "split_{i}.bin holds both ARs' graphs, AR128 first:\n{head}"
        );
        let conf: Value =
            serde_json::from_slice(&s.read(&format!("artifacts/configs/PerfSetting_{i}.conf")))
                .expect("PerfSetting is JSON");
        assert_eq!(
            conf["graphs"][0]["graph_names"],
            serde_json::json!([
                format!("ar128-cl4096_{i}_of_4"),
                format!("ar1-cl4096_{i}_of_4")
            ])
        );
        assert_eq!(conf["context"]["weight_sharing_enabled"], true);
        let ext: Value = serde_json::from_slice(&s.read(&format!(
            "artifacts/configs/htp_backend_ext_config_{i}.json"
        )))
        .expect("backend config is JSON");
        assert_eq!(
            ext["backend_extensions"]["config_file_path"],
            format!("artifacts/configs/PerfSetting_{i}.conf")
        );
        for ar in ARS {
            assert!(s.exists(&qdlc(ar, i)));
        }
    }
    // Every symlink qbuild made is relative and points inside the work folder.
    for (path, _) in s.snapshot() {
        if s.is_symlink(&path) {
            let target = std::fs::read_link(s.join(&path)).unwrap();
            assert!(target.is_relative(), "{path} -> {}", target.display());
            let resolved = std::fs::canonicalize(s.join(&path)).unwrap();
            assert!(
                resolved.starts_with(std::fs::canonicalize(s.path()).unwrap()),
                "{path} leaves the work folder"
            );
        }
    }

    // A second run: nothing to do, and nothing read.
    let again = s.run(["all"]);
    again.assert_nothing_ran(n);
    assert_eq!(
        again.count("hashed_bytes"),
        0,
        "a no-op must not read any file\n{again}"
    );
    s.run(Vec::<String>::new()).assert_nothing_ran(n);
}

/// `ars = [1]` is a pipeline of its own: each config still names its graphs as a JSON array
/// (one name), so the context binaries build; only the configs (and what reads them) and
/// the binaries rerun, and
/// after `--clean-dead` the folder equals a clean build of the one-AR Qairtfile.
#[test]
fn dropping_an_ar_reruns_only_the_configs_and_binaries() {
    let (s, _) = built_demo();
    s.replace("Qairtfile", "ars = [128, 1]", "ars = [1]");
    let out = s.build_all();
    let expected: BTreeSet<String> = (1..=4)
        .flat_map(|i| [perf_config(i), backend_config(i), context_binary(i)])
        .collect();
    out.assert_ran(&expected);
    let conf: serde_json::Value =
        serde_json::from_slice(&s.read("artifacts/configs/PerfSetting_2.conf")).expect("JSON");
    assert_eq!(
        conf["graphs"][0]["graph_names"],
        serde_json::json!(["ar1-cl4096_2_of_4"]),
        "{out}"
    );
    s.qbuild(["--clean-dead"]).no_json().run().assert_ok();
    assert_equals_clean_build(&s);
}

/// A rule's `check` judges its result, so it is part of the key: a stricter check reruns
/// the jobs and fails them where a clean build would, instead of passing them untested.
#[test]
fn changing_a_check_reruns_the_checked_jobs() {
    let (s, _) = built_demo();
    let check = "check = \"${bin}/qairt-dlc-info -i ${outputs}\"";
    s.replace("Qairtfile", check, "check = \"false\"");
    let out = s.qbuild(["-k", "all"]).run();
    out.assert_code(1);
    let quantize: BTreeSet<String> = (1..=4)
        .flat_map(|i| [quantize(128, i), quantize(1, i)])
        .collect();
    assert_eq!(out.failed(), quantize, "{out}");
    // Back to the old check: the failed jobs run again (their outputs were removed), and
    // write what they wrote before, so nothing after them reruns.
    s.replace("Qairtfile", "check = \"false\"", check);
    s.build_all().assert_ran(&quantize);
    assert_equals_clean_build(&s);
}

#[test]
fn touching_every_source_runs_nothing() {
    let (s, cat) = built_demo();
    let n = cat.all().len() as u64;
    let sources: Vec<String> = s
        .files()
        .into_iter()
        .filter(|f| f.starts_with("models/") || f == "Qairtfile")
        .collect();
    assert!(sources.len() >= 6, "{sources:?}");

    // New mtimes, same bytes.
    for f in &sources {
        s.touch(f, 5);
    }
    s.run(["all"]).assert_nothing_ran(n);

    // Rewritten with the very same bytes (new mtime and ctime).
    for f in &sources {
        let b = s.read(f);
        s.write(f, b);
    }
    s.run(["all"]).assert_nothing_ran(n);

    // The stat cache now knows the new stats: nothing is read at all.
    let out = s.run(["all"]);
    out.assert_nothing_ran(n);
    assert_eq!(out.count("hashed_bytes"), 0, "{out}");
}

/// A renamed job's old output stays on disk (qbuild deletes nothing it was not asked to), and
/// so does its stat-cache entry; once the file is deleted, the entry goes at the next run's
/// end, so later runs no longer stat it (ninja's log recompaction drops dead paths the same way).
#[test]
fn the_state_forgets_files_that_are_gone_and_no_longer_in_the_qairtfile() {
    let qairtfile = |ids: &str| {
        format!(
            "[vars]\nids = [{ids}]\n\n[rule.copy]\nmatrix = {{ i = \"${{ids}}\" }}\n\
             inputs = [\"src/${{i}}.txt\"]\noutputs = [\"out/${{i}}.txt\"]\n\
             command = \"cp ${{inputs}} ${{outputs}}\"\n"
        )
    };
    let s = Space::new();
    s.write("Qairtfile", qairtfile("\"a\", \"b\""))
        .write("src/a.txt", "a\n")
        .write("src/b.txt", "b\n")
        .write("src/c.txt", "c\n");
    s.build_all();
    let state = |s: &Space| {
        let mut bytes = s.read(".qbuild/snapshot");
        if s.exists(".qbuild/journal") {
            bytes.extend(s.read(".qbuild/journal"));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    };
    assert!(
        state(&s).contains("out/b.txt"),
        "the snapshot names no path"
    );

    s.write("Qairtfile", qairtfile("\"a\", \"c\""));
    s.build_all().assert_ran(&set(["copy i=c"]));
    assert!(s.exists("out/b.txt"));
    let out = s.run(["all"]);
    out.assert_nothing_ran(2);
    assert!(
        state(&s).contains("out/b.txt"),
        "a file still on disk was forgotten"
    );

    s.remove("out/b.txt");
    s.run(["all"]).assert_nothing_ran(2);
    let after = state(&s);
    assert!(
        !after.contains("out/b.txt"),
        "the state still names out/b.txt"
    );
    for kept in ["out/a.txt", "out/c.txt", "src/a.txt", "src/c.txt"] {
        assert!(after.contains(kept), "{kept} was dropped from the state");
    }
    let snapshot = s.read(".qbuild/snapshot");
    let out = s.run(["all"]);
    out.assert_nothing_ran(2);
    assert_eq!(out.count("hashed_bytes"), 0, "{out}");
    assert!(
        s.read(".qbuild/snapshot") == snapshot,
        "a no-op with nothing to drop rewrote the snapshot"
    );
}

/// A run that only learns new stats (a `touch`) appends them to the journal instead of
/// rewriting the snapshot (a durable rewrite of every record when nothing ran); the journal
/// is folded in once it grows past a quarter of the snapshot, or when a job is recorded.
/// Losing those stats costs a rehash, never a rerun.
#[test]
fn a_touch_only_run_appends_to_the_journal_and_keeps_the_snapshot() {
    let (s, cat) = built_demo();
    let n = cat.all().len() as u64;
    let snapshot = s.join(".qbuild/snapshot");
    let journal = s.join(".qbuild/journal");
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let before = std::fs::read(&snapshot).expect("a built demo has a snapshot");
    assert_eq!(size(&journal), 0, "a finished build leaves no journal");

    s.touch("models/llama3.onnx", 5);
    let out = s.run(["all"]);
    out.assert_nothing_ran(n);
    assert!(
        out.count("hashed_bytes") > 0,
        "the touched file is read\n{out}"
    );
    assert!(
        std::fs::read(&snapshot).expect("snapshot") == before,
        "the snapshot was rewritten for a touch"
    );
    assert!(size(&journal) > 8, "the new stat is not in the journal");
    let out = s.run(["all"]);
    out.assert_nothing_ran(n);
    assert_eq!(
        out.count("hashed_bytes"),
        0,
        "the journal's stat is not used\n{out}"
    );

    // The journal lost (as a crash may lose it): the file is read again, nothing runs.
    std::fs::remove_file(&journal).expect("remove the journal");
    let out = s.run(["all"]);
    out.assert_nothing_ran(n);
    assert!(out.count("hashed_bytes") > 0, "{out}");

    // Touch-only runs never let the journal grow past a quarter of the snapshot (and
    // 4 KiB) plus one run's entry: it is folded in, and the stats stay known.
    let sources: Vec<String> = s
        .files()
        .into_iter()
        .filter(|f| f.starts_with("models/"))
        .collect();
    let mut folded = false;
    for round in 1..=40 {
        for f in &sources {
            s.touch(f, 5 + round);
        }
        let had = size(&journal);
        s.run(["all"]).assert_nothing_ran(n);
        let bound = (size(&snapshot) / 4).max(4096) + 4096;
        assert!(
            size(&journal) <= bound,
            "journal {} > {bound}",
            size(&journal)
        );
        if had > 0 && size(&journal) == 0 {
            folded = true;
            break;
        }
    }
    assert!(folded, "touch-only runs never folded the journal in");
    let out = s.run(["all"]);
    out.assert_nothing_ran(n);
    assert_eq!(out.count("hashed_bytes"), 0, "{out}");

    // A job recorded folds the journal in at the end of its run.
    for f in &sources {
        s.touch(f, 60);
    }
    s.run(["all"]).assert_nothing_ran(n);
    assert!(size(&journal) > 8);
    s.append("models/test_vectors/input_0.raw", "x");
    let out = s.run(["all"]);
    assert!(!out.ran().is_empty(), "editing a source ran nothing\n{out}");
    assert_eq!(size(&journal), 0, "the journal was not folded in");
    assert_equals_clean_build(&s);
}

#[test]
fn moving_the_work_folder_runs_nothing() {
    let (s, cat) = built_demo();
    // Same bytes in another folder: relative paths and relative links keep every key.
    let moved = Space::new();
    let to = moved.join("moved");
    std::fs::rename(s.path(), &to).expect("rename the work folder");
    std::fs::create_dir(s.path()).expect("leave an empty folder for the temp dir to remove");
    let out = Space::at(&to).run(["all"]);
    out.assert_nothing_ran(cat.all().len() as u64);
}

#[test]
fn editing_the_base_encodings_reruns_its_dependents_only() {
    let (s, cat) = built_demo();
    let before = s.snapshot();
    // Still valid JSON, different bytes.
    s.replace(
        "models/llama3.encodings",
        "\"max\": 128255.0",
        "\"max\": 128256.0",
    );
    let out = s.run(["all"]);
    out.assert_ok();
    // Every tool writes the encodings' hash into its output, so the change reaches every
    // tool job downstream of export. The config files (written by qbuild from the
    // Qairtfile) do not depend on it, and a symlink is recorded as its link text: it does not
    // rerun when what it points to changes (its readers do).
    let links = cat.links(&s);
    let expected = minus(
        &cat.rules(&[
            "export",
            "split",
            "mha2sha",
            "convert",
            "quantize",
            "context_binary",
        ]),
        &links,
    );
    assert!(expected.is_superset(&minus(
        &core_jobs(),
        &cat.rules(&["perf_config", "backend_config"])
    )));
    out.assert_ran(&expected);

    // Every file a rerun job wrote changed.
    let after = s.snapshot();
    for o in out.ran_outputs() {
        assert_ne!(before.get(&o), after.get(&o), "{o} should have changed");
    }
    assert_equals_clean_build(&s);
}

#[test]
fn editing_one_weight_line_reruns_only_that_splits_chain() {
    let (s, cat) = built_demo();
    // Layer 9 sits in split 3 of 4 (16 payload lines per split): exports and splits rerun,
    // but only split 3's split ONNX changes, so early cutoff stops the other splits.
    s.replace(
        "models/llama3.onnx",
        "layer 9 attn q_proj w=ea8f9776dc949897df6e01c03c7d6c4a",
        "layer 9 attn q_proj w=0000000000000000df6e01c03c7d6c4a",
    );
    let out = s.run(["all"]);
    out.assert_ok();
    let tools_of_3 = cat.select(|j| {
        ["mha2sha", "convert", "quantize", "context_binary"].contains(&j.rule.as_str())
            && j.splits() == BTreeSet::from([3])
    });
    let mut expected = set(ARS.iter().flat_map(|&ar| [export(ar), split(ar)]));
    expected.extend(tools_of_3);
    assert_eq!(
        expected,
        set([
            export(128),
            export(1),
            split(128),
            split(1),
            mha2sha(128, 3),
            mha2sha(1, 3),
            convert(128, 3),
            convert(1, 3),
            quantize(128, 3),
            quantize(1, 3),
            context_binary(3)
        ])
    );
    out.assert_ran(&expected);
    assert_equals_clean_build(&s);
}

#[test]
fn changing_quantize_bitwidth_reruns_quantize_and_binaries_only() {
    let (s, cat) = built_demo();
    s.replace("Qairtfile", "--act_bitwidth 16", "--act_bitwidth 8");
    let out = s.run(["all"]);
    out.assert_ok();
    let expected = cat.rules(&["quantize", "context_binary"]);
    assert_eq!(expected.len(), 12);
    out.assert_ran(&expected);
    assert_eq!(
        out.count("up_to_date"),
        cat.all().len() as u64 - 12,
        "{out}"
    );
    for ar in ARS {
        for i in SPLITS {
            let q = s.read(&qdlc(ar, i));
            assert!(
                String::from_utf8_lossy(&q[..200]).contains("act_bitwidth: 8"),
                "{}",
                qdlc(ar, i)
            );
        }
    }
    s.run(["all"]).assert_nothing_ran(cat.all().len() as u64);
    assert_equals_clean_build(&s);
}

#[test]
fn deleting_a_quantized_dlc_reruns_that_quantize_only() {
    let (s, cat) = built_demo();
    let q = qdlc(1, 3);
    assert_eq!(cat.job(&quantize(1, 3)).outputs, vec![q.clone()]);
    let old = s.read(&q);
    s.remove(&q);
    let out = s.run(["all"]);
    // The simulator writes the same bytes again: early cutoff spares `context binary split=3`.
    out.assert_ok().assert_ran(&set([quantize(1, 3)]));
    assert_eq!(s.read(&q), old);
    s.run(["all"]).assert_nothing_ran(cat.all().len() as u64);
}

#[test]
fn hand_editing_a_quantized_dlc_reruns_that_quantize_only() {
    let (s, cat) = built_demo();
    let q = qdlc(128, 2);
    let old = s.read(&q);
    s.append(&q, "hand edit");
    let out = s.run(["all"]);
    out.assert_ok().assert_ran(&set([quantize(128, 2)]));
    assert_eq!(s.read(&q), old, "the rerun restores the built bytes");
    s.run(["all"]).assert_nothing_ran(cat.all().len() as u64);

    // Same size, different bytes: the stat cache must not be fooled by an equal size.
    let mut edited = s.read(&q);
    let n = edited.len();
    edited[n - 1] ^= 0xff;
    s.write(&q, edited);
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set([quantize(128, 2)]));
    assert_eq!(s.read(&q), old);
}

#[test]
fn a_target_path_builds_exactly_what_it_needs() {
    let cat = Catalog::of_demo();
    let s = Space::demo();
    let out = s.run([bin(3)]);
    out.assert_ok();
    let expected = cat.needs_of_bin(3);
    assert!(expected.is_superset(&set([
        export(128),
        export(1),
        split(128),
        split(1),
        mha2sha(128, 3),
        mha2sha(1, 3),
        convert(128, 3),
        convert(1, 3),
        quantize(128, 3),
        quantize(1, 3),
        perf_config(3),
        backend_config(3),
        context_binary(3)
    ])));
    out.assert_ran(&expected);
    // Nothing of splits 1, 2, 4: only the per-AR jobs (export, split) write for them.
    for label in out.ran() {
        let sp = cat.job(&label).splits();
        assert!(
            sp == BTreeSet::from([3])
                || label.starts_with("export ")
                || label.starts_with("split "),
            "{label} ran for split_3.bin"
        );
        for other in ["split=1", "split=2", "split=4"] {
            assert!(!label.contains(other), "{label} ran for split_3.bin\n{out}");
        }
    }
    assert!(s.exists(&bin(3)));
    for i in [1, 2, 4] {
        assert!(!s.exists(&bin(i)));
        for ar in ARS {
            assert!(!s.exists(&qdlc(ar, i)));
        }
    }
    // The same target again: up to date; then split 1 adds only what is new for it.
    s.run([bin(3)]).assert_nothing_ran(expected.len() as u64);
    let out = s.run([bin(1)]);
    out.assert_ok()
        .assert_ran(&minus(&cat.needs_of_bin(1), &expected));
}

#[test]
fn a_target_path_relative_to_the_current_folder() {
    let cat = Catalog::of_demo();
    let s = Space::demo();
    s.mkdir("artifacts");
    let out = s
        .qbuild(["-f", "../Qairtfile", "serialized_binaries/split_3.bin"])
        .cwd("artifacts")
        .run();
    out.assert_ok().assert_ran(&cat.needs_of_bin(3));
    assert!(s.exists(&bin(3)));
    assert!(!s.exists(&bin(2)));
    // The work-folder-relative spelling names the same file, from the same place.
    s.qbuild([
        "-f",
        "../Qairtfile",
        "artifacts/serialized_binaries/split_3.bin",
    ])
    .cwd("artifacts")
    .run()
    .assert_nothing_ran(cat.needs_of_bin(3).len() as u64);
    // State and logs live in the work folder, not in the current folder.
    assert!(!s.exists("artifacts/.qbuild"));
    assert!(s.exists(".qbuild"));
}

/// qbuild run from `sub/` with `-f ../Qairtfile` and `args`.
fn from_sub(s: &Space, args: &[&str]) -> crate::support::Output {
    let mut all = vec!["-f", "../Qairtfile"];
    all.extend_from_slice(args);
    s.qbuild(all).cwd("sub").run()
}

/// Regression: from a subfolder, `./b` (and `b`) named the work folder's `b` when both
/// `b` and `sub/b` are outputs, so `--clean ./b` removed the other file. A path is read
/// from the current folder first, then from the work folder.
#[test]
fn a_current_folder_path_wins_over_the_same_path_at_the_top() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.top]\noutputs = [\"b\"]\ncommand = \"echo top > b\"\n\
         [rule.sub]\noutputs = [\"sub/b\"]\ncommand = \"mkdir -p sub && echo sub > sub/b\"\n\
         [rule.only_top]\noutputs = [\"c\"]\ncommand = \"echo c > c\"\n",
    );
    s.mkdir("sub");
    for t in ["./b", "b"] {
        let out = from_sub(&s, &["-n", t]);
        out.assert_ok();
        assert_eq!(out.would_run(), ["sub".to_string()].into(), "{t}\n{out}");
    }
    // A path only the work folder has is still found from the subfolder; `./c` is not it.
    from_sub(&s, &["c"])
        .assert_ok()
        .assert_ran(&["only_top".to_string()].into());
    from_sub(&s, &["./c"]).assert_code(2);
    s.run(["all"]).assert_ok();
    from_sub(&s, &["--clean", "./b"]).assert_ok();
    assert!(!s.exists("sub/b"));
    assert_eq!(s.read_string("b"), "top\n", "the other `b` is kept");
}

/// A file inside a folder output, as a target: the folder's job makes it. It was "a source
/// that does not exist" when another job named it as an input, and once built, "nothing to
/// do" however stale; not named anywhere, an unknown target.
#[test]
fn a_target_inside_a_folder_output_builds_the_folders_job() {
    let s = Space::new();
    let qairtfile = "[rule.mk]\noutputs = [\"d\"]\ncommand = \"mkdir -p d && echo x > d/plain && echo x > d/other\"\n\
         [rule.rd]\ninputs = [\"d/plain\"]\noutputs = [\"r.txt\"]\ncommand = \"cat d/plain > r.txt\"\n";
    s.write("Qairtfile", qairtfile);
    let mk = ["mk".to_string()].into();
    s.run(["d/plain"]).assert_ok().assert_ran(&mk);
    s.write("Qairtfile", qairtfile.replace("echo x", "echo y"));
    s.run(["d/other"]).assert_ok().assert_ran(&mk);
    assert_eq!(s.read_string("d/plain"), "y\n");
    s.run(["d/plain"]).assert_nothing_ran(1);
    s.write("Qairtfile", qairtfile);
    s.mkdir("sub");
    let out = s
        .qbuild(["-f", "../Qairtfile", "../d/plain"])
        .cwd("sub")
        .run();
    out.assert_ok().assert_ran(&mk);
}

/// Targets written in the Qairtfile (`default`, aliases) name the work folder's paths, run
/// from anywhere; only command-line paths are read from the current folder first.
#[test]
fn targets_written_in_the_qairtfile_are_the_work_folders() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "default = [\"b\"]\n[alias]\nal = [\"./b\"]\n\
         [rule.rtop]\noutputs = [\"b\"]\ncommand = \"echo top > b\"\n\
         [rule.rsub]\noutputs = [\"sub/b\"]\ncommand = \"echo sub > sub/b\"\n",
    );
    s.mkdir("sub");
    from_sub(&s, &[])
        .assert_ok()
        .assert_ran(&["rtop".to_string()].into());
    assert!(!s.exists("sub/b"));
    from_sub(&s, &["al"]).assert_nothing_ran(1);
    from_sub(&s, &["--clean", "al"]).assert_ok();
    assert!(!s.exists("b"));
}

/// `-C DIR` changes the current folder before anything else (as with make and ninja), so
/// a target path is relative to DIR, as the `-f` path is.
#[test]
fn a_target_path_relative_to_the_dash_c_folder() {
    let cat = Catalog::of_demo();
    // `-C work-folder` with a work-folder-relative path, from outside it.
    let t = Space::demo();
    let name = t.path().file_name().unwrap().to_string_lossy().into_owned();
    t.qbuild(["-C", &name, "artifacts/serialized_binaries/split_2.bin"])
        .cwd("..")
        .run()
        .assert_ok()
        .assert_ran(&cat.needs_of_bin(2));
    // `-C subfolder` with a path relative to it.
    let s = Space::demo();
    s.mkdir("artifacts");
    let out = s.run([
        "-C",
        "artifacts",
        "-f",
        "../Qairtfile",
        "serialized_binaries/split_3.bin",
    ]);
    out.assert_ok().assert_ran(&cat.needs_of_bin(3));
}

/// Regression: `-C a -C b` went to `b` from the starting folder (the last -C won, as for
/// other repeated options); make and ninja apply each relative to the one before.
#[test]
fn repeated_dash_c_folders_are_taken_one_after_another() {
    let s = Space::new();
    s.write(
        "t1/a/Qairtfile",
        "[rule.a]\noutputs = [\"o\"]\ncommand = \"echo > o\"\n",
    );
    s.run(["-C", "t1", "-C", "a"])
        .assert_ok()
        .assert_ran(&["a".to_string()].into());
    assert!(s.exists("t1/a/o"));
    assert!(s.exists("t1/a/.qbuild"));
}

#[test]
fn a_rule_name_target_runs_its_instances_and_their_upstream() {
    let cat = Catalog::of_demo();
    let s = Space::demo();
    let out = s.run(["quantize"]);
    out.assert_ok();
    let downstream = cat.rules(&["perf_config", "backend_config", "context_binary"]);
    let expected = minus(&cat.all(), &downstream);
    assert!(
        expected.is_superset(&cat.rules(&["export", "split", "mha2sha", "convert", "quantize"]))
    );
    out.assert_ran(&expected);
    for ar in ARS {
        for i in SPLITS {
            assert!(s.exists(&qdlc(ar, i)));
        }
    }
    assert!(
        !s.exists("artifacts"),
        "nothing of the config or binary rules ran"
    );
    // An alias reaches the rest.
    s.run(["binaries"]).assert_ok().assert_ran(&downstream);
}

const FAIL_AT: &str = "ar1-cl4096_2_of_4_quantized";

#[test]
fn a_failing_command_stops_its_dependents_and_removes_its_partial_output() {
    let cat = Catalog::of_demo();
    let s = Space::demo();
    let out = s.qbuild(["all"]).env("QAIRT_SIM_FAIL", FAIL_AT).run();
    out.assert_code(1);
    assert_eq!(out.finished()["status"], "failed", "{out}");
    assert_eq!(out.failed(), set([quantize(1, 2)]), "{out}");
    assert_eq!(out.count("failed"), 1);
    assert!(
        !out.ran().contains(&context_binary(2)),
        "a dependent of the failed job ran\n{out}"
    );
    assert!(
        !s.exists(&qdlc(1, 2)),
        "the partial output must be removed\n{out}"
    );
    assert!(!s.exists(&bin(2)));
    // The failure, its command and the tail of its log are on stderr.
    assert!(
        out.stderr.contains(&format!("FAILED: {}", quantize(1, 2))),
        "{out}"
    );
    assert!(
        out.stderr.contains(
            "qairt-sim: injected failure for compiled_model/ar1-cl4096_2_of_4_quantized.dlc"
        ),
        "the log tail should be printed\n{out}"
    );
    assert!(
        out.stderr
            .contains(&format!("removed partial output(s): {}", qdlc(1, 2))),
        "{out}"
    );
    // Everything that ran before the build stopped is recorded: the next run (fixed) runs
    // exactly the rest.
    let fixed = s.run(["all"]);
    fixed.assert_ok();
    let rest = minus(&cat.all(), &out.ran());
    assert!(rest.contains(&quantize(1, 2)) && rest.contains(&context_binary(2)));
    fixed.assert_ran(&rest);
    assert_equals_clean_build(&s);
}

#[test]
fn keep_going_finishes_the_independent_branches() {
    let cat = Catalog::of_demo();
    let s = Space::demo();
    let out = s.qbuild(["-k", "all"]).env("QAIRT_SIM_FAIL", FAIL_AT).run();
    out.assert_code(1);
    assert_eq!(out.failed(), set([quantize(1, 2)]), "{out}");
    out.assert_ran(&minus(
        &cat.all(),
        &set([quantize(1, 2), context_binary(2)]),
    ));
    assert_eq!(out.count("skipped"), 1, "{out}");
    for i in [1, 3, 4] {
        assert!(s.exists(&bin(i)), "split_{i}.bin\n{out}");
    }
    assert!(!s.exists(&bin(2)));
    assert!(!s.exists(&qdlc(1, 2)));
    assert!(out.stderr.contains("FAILED"), "{out}");

    // Still failing: only the failed job is tried again.
    let again = s.qbuild(["-k", "all"]).env("QAIRT_SIM_FAIL", FAIL_AT).run();
    again.assert_code(1);
    assert_eq!(again.touched(), set([quantize(1, 2)]), "{again}");

    // Fixed: exactly what is missing.
    let fixed = s.run(["all"]);
    fixed
        .assert_ok()
        .assert_ran(&set([quantize(1, 2), context_binary(2)]));
    assert_equals_clean_build(&s);
}

/// Without `-k`, nothing starts after a failure, even a job already handed to the workers'
/// queue (they keep one job ready per slot): with `-j 1` and a failing first job, the four
/// independent jobs behind it never run, and the next run runs them.
#[test]
fn without_keep_going_no_queued_job_starts_after_a_failure() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.a]
outputs = ["a.txt"]
command = "test -e fixed && echo a > a.txt"
[rule.b]
matrix = { i = [1, 2, 3, 4] }
outputs = ["b${i}.txt"]
command = "echo ${i} > ${outputs}"
"#,
    );
    let out = s.run(["-j", "1", "a", "b"]);
    out.assert_code(1);
    assert_eq!(out.failed(), set(["a"]), "{out}");
    assert_eq!(
        out.touched(),
        set(["a"]),
        "nothing after the failure\n{out}"
    );
    for i in 1..=4 {
        assert!(!s.exists(&format!("b{i}.txt")), "{out}");
    }
    s.write("fixed", "");
    let next = s.run(["-j", "1", "a", "b"]);
    next.assert_ok()
        .assert_ran(&set(["a", "b i=1", "b i=2", "b i=3", "b i=4"]));
}

#[test]
fn dry_run_reports_what_would_run_and_runs_nothing() {
    let s = Space::demo();
    let sources = s.snapshot();
    let out = s.run(["-n", "all"]);
    out.assert_ok();
    let would = out.would_run();
    assert!(would.is_superset(&core_jobs()), "{out}");
    assert_eq!(out.count("would_run"), would.len() as u64);
    assert_eq!(out.count("ran"), 0);
    assert!(out.touched().is_empty(), "{out}");
    for ev in out.would_run_events() {
        let reasons = ev["reasons"].as_array().expect("reasons");
        assert!(!reasons.is_empty(), "{ev}");
        assert!(
            ev["outputs"].as_array().is_some_and(|o| !o.is_empty()),
            "{ev}"
        );
        assert!(ev["rule"].is_string(), "{ev}");
    }
    let export_ev = out
        .would_run_events()
        .into_iter()
        .find(|e| e["job"] == export(128))
        .expect("export ar=128");
    assert_eq!(export_ev["reasons"], serde_json::json!(["never built"]));
    assert_eq!(s.snapshot(), sources, "a dry run must not write any output");
    // It recorded nothing either, and predicted the real build exactly.
    s.build_all().assert_ran(&would);

    // After a command change: the quantize jobs (command changed) and the binaries (an
    // input would be rebuilt), nothing else; still nothing written.
    s.replace("Qairtfile", "--act_bitwidth 16", "--act_bitwidth 8");
    let before = s.snapshot();
    let out = s.run(["-n", "all"]);
    out.assert_ok();
    let mut expected: BTreeSet<String> = ARS
        .iter()
        .flat_map(|&ar| SPLITS.map(|i| quantize(ar, i)))
        .collect();
    expected.extend(SPLITS.map(context_binary));
    assert_set(&out.would_run(), &expected, "would_run", &out);
    for ev in out.would_run_events() {
        let reasons: Vec<&str> = ev["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        match ev["rule"].as_str().unwrap() {
            "quantize" => assert!(
                reasons.iter().any(|r| r.starts_with("command changed")),
                "{ev}"
            ),
            "context_binary" => {
                assert!(
                    reasons
                        .iter()
                        .any(|r| r.contains("_quantized.dlc will be rebuilt")),
                    "{ev}"
                )
            }
            other => panic!("unexpected rule {other}"),
        }
    }
    assert_eq!(s.snapshot(), before);
    s.run(["all"]).assert_ok().assert_ran(&expected);
}

#[test]
fn explain_says_the_command_changed() {
    let (s, cat) = built_demo();
    s.replace("Qairtfile", "--act_bitwidth 16", "--act_bitwidth 8");
    let out = s.run(["--explain", "all"]);
    out.assert_ok()
        .assert_ran(&cat.rules(&["quantize", "context_binary"]));
    let e = &out.stderr;
    assert!(
        e.contains(&format!("explain: {} is stale:", quantize(128, 3))),
        "{out}"
    );
    assert!(e.contains("command changed"), "{out}");
    assert!(
        e.contains("- … 16 …") && e.contains("+ … 8 …"),
        "the diff shows the changed word\n{out}"
    );
    // Binaries rerun because their inputs changed, not because of a command change.
    let block = e
        .split("explain: ")
        .find(|b| b.starts_with(&format!("{} is stale", context_binary(1))))
        .unwrap_or_else(|| panic!("no explanation for {}\n{out}", context_binary(1)));
    assert!(
        block.contains("input compiled_model/ar128-cl4096_1_of_4_quantized.dlc changed"),
        "{block}"
    );
    assert!(!block.contains("command changed"), "{block}");
    // Up-to-date jobs are not explained.
    assert!(
        !e.contains(&format!("explain: {} is stale", export(1))),
        "{out}"
    );
}

/// Change a source file's bytes in a way its reader still accepts.
fn edit_source(s: &Space, path: &str) {
    let mut b = s.read(path);
    if path.ends_with(".raw") {
        b[0] ^= 1;
        s.write(path, b);
    } else if path.ends_with(".encodings") {
        s.replace(path, "\"max\": 0.0,", "\"max\": 0.5,");
    } else if path.ends_with(".onnx") {
        let text = String::from_utf8(b).expect("QSIM-ONNX is text");
        let line = text
            .lines()
            .find(|l| l.starts_with("layer 14 mlp"))
            .expect("layer 14")
            .to_string();
        let w = line.rsplit_once("w=").expect("w=").1;
        s.replace(path, &line, &line.replace(w, &"f".repeat(w.len())));
    } else {
        s.append(path, "\n# edited\n");
    }
}

#[test]
fn every_source_edit_gives_the_clean_build_result() {
    // For every file under models/, one edit at a time: the incremental result must equal a
    // clean build of the same sources. (A file a tool reads but the Qairtfile does not
    // declare would show up here.)
    let (s, _) = built_demo();
    let sources: Vec<String> = s
        .files()
        .into_iter()
        .filter(|f| f.starts_with("models/"))
        .collect();
    for path in &sources {
        edit_source(&s, path);
        let out = s.run(["all"]);
        out.assert_ok();
        let clean = s.copy_of(SOURCES);
        clean.build_all();
        let (a, b) = (s.snapshot(), clean.snapshot());
        let differing: Vec<&String> = a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, _)| k)
            .collect();
        assert!(
            differing.is_empty() && a.len() == b.len(),
            "after editing {path}, the incremental build differs from a clean build\n  ran: {:?}\n  differing: {differing:?}",
            out.ran()
        );
    }
}

#[test]
fn without_json_progress_goes_to_stderr_only() {
    let s = Space::demo();
    let out = s.qbuild([bin(4)]).no_json().run();
    out.assert_ok();
    assert_eq!(out.stdout, "", "stdout is for --json only\n{out}");
    let n = Catalog::of_demo().needs_of_bin(4).len();
    // One plain line per finished job (stderr is not a terminal), then the summary.
    assert!(
        out.stderr.contains(&format!("] {} (", context_binary(4))),
        "{out}"
    );
    assert!(out.stderr.contains(&format!("[{n}/{n}] ")), "{out}");
    assert!(
        out.stderr
            .contains(&format!("qbuild: ran {n}, 0 up to date")),
        "{out}"
    );
    let again = s.qbuild([bin(4)]).no_json().run();
    again.assert_ok();
    assert!(
        again
            .stderr
            .contains(&format!("qbuild: nothing to do, {n} up to date")),
        "{again}"
    );
}

/// The `case` semantics the demo's convert rule relies on (split 1 converts the split ONNX):
/// a matching case's lets win over the rule's, a case may add a let of its own, only the
/// first matching case applies, and an instance no case matches keeps the rule's lets.
/// A misspelt name is suggested from the case's lets too.
#[test]
fn case_lets_override_the_rules_lets_and_the_first_match_wins() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.t]
matrix = { i = [1, 2, 3] }
let = { word = "base${i}", tail = "" }
case = [
  { when = { i = 2 }, let = { word = "two", own = "+own", tail = "${own}" } },
  { when = { i = 2 }, let = { word = "never" } },
  { when = { i = 3 }, let = { tail = "+three" } },
]
outputs = ["out/${i}.txt"]
command = "echo ${word}${tail} > ${outputs}"
"#,
    );
    s.build_all();
    assert_eq!(s.read_string("out/1.txt"), "base1\n");
    assert_eq!(s.read_string("out/2.txt"), "two+own\n");
    assert_eq!(s.read_string("out/3.txt"), "base3+three\n");
    // A name only a case defines is known, for suggestions, to the instances it matches.
    s.replace("Qairtfile", "tail = \"${own}\"", "tail = \"${onw}\"");
    let out = s.run(["all"]);
    out.assert_code(2);
    assert!(out.stderr.contains("unknown variable `onw`"), "{out}");
    assert!(out.stderr.contains("did you mean `own`?"), "{out}");
}

/// A state of more than 32 KB is read on a second thread while the Qairtfile loads (a
/// smaller one in line; every other test here has a small one): the decisions are the
/// same. 400 `content` jobs, half reading each of two sources.
#[test]
fn a_state_read_on_a_second_thread_decides_as_one_read_in_line() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.a]
matrix = { i = { range = [1, 200] } }
inputs = ["a.txt"]
outputs = ["a/${i}.txt"]
content = "a ${i}"
[rule.b]
matrix = { i = { range = [1, 200] } }
inputs = ["b.txt"]
outputs = ["b/${i}.txt"]
content = "b ${i}"
"#,
    );
    s.write("a.txt", "a").write("b.txt", "b");
    let label = |r: &str, i: u32| format!("{r} i={i}");
    let all: BTreeSet<String> = (1..=200)
        .flat_map(|i| [label("a", i), label("b", i)])
        .collect();
    s.run(["all"]).assert_ok().assert_ran(&all);
    let snapshot = s.read(".qbuild/snapshot").len();
    assert!(
        snapshot >= 32 << 10,
        "snapshot {snapshot} B: too small to take the thread"
    );
    s.run(["all"]).assert_nothing_ran(400);
    // One source touched (same bytes), the other changed: only its readers run.
    s.touch("a.txt", 5).write("b.txt", "b2");
    let bs: BTreeSet<String> = (1..=200).map(|i| label("b", i)).collect();
    s.run(["all"]).assert_ok().assert_ran(&bs);
    s.run(["all"]).assert_nothing_ran(400);
    let clean = s.copy_of(&["Qairtfile", "a.txt", "b.txt"]);
    clean.run(["all"]).assert_ok().assert_ran(&all);
    assert_same_files(&s.snapshot(), &clean.snapshot(), "incremental vs clean");
}

/// The execute stage: `all` leaves its `manual` rules out; `qbuild execute` pushes the
/// binaries and runs them on the (simulated) device, and reruns only what a change reaches:
/// a new prompt reruns the prompt and the device run, a binary rebuilt with the same bytes
/// reruns nothing on the device.
#[test]
fn execute_runs_on_the_device_only_when_asked_and_when_its_inputs_change() {
    let (s, cat) = built_demo();
    let n = cat.all().len() as u64;
    let device = tempfile::tempdir().expect("device folder");
    let dev = device.path().to_str().expect("utf-8 temp path");
    let exec = |args: &[&str]| {
        s.qbuild(args.iter().copied())
            .env("QAIRT_SIM_DEVICE", dev)
            .run()
    };
    let device_jobs = set(["genie_config", "prompt", "run on device"]);
    assert!(
        cat.all().is_disjoint(&device_jobs),
        "`all` ran a manual job\n{:?}",
        cat.all()
    );

    let out = exec(&["execute"]);
    out.assert_ok().assert_ran(&device_jobs);
    assert_eq!(out.count("up_to_date"), n, "{out}");
    let answer = s.read_string("artifacts/device/response.txt");
    assert!(
        answer.contains("[PROMPT]: What is the capital of France?") && answer.contains("[END]"),
        "{answer}"
    );
    // What the device holds: every split's binary as built, and what runs them.
    let on_device = device.path().join("data/local/tmp/llama3");
    for i in SPLITS {
        assert_eq!(
            std::fs::read(on_device.join(format!("split_{i}.bin"))).expect("pushed binary"),
            s.read(&bin(i))
        );
    }
    for f in [
        "genie-t2t-run",
        "libGenie.so",
        "libQnnHtpV79Skel.so",
        "genie_config.json",
        "tokenizer.json",
    ] {
        assert!(on_device.join(f).is_file(), "{f} was not pushed");
    }
    exec(&["execute"]).assert_nothing_ran(n + 3);
    s.run(["all"]).assert_nothing_ran(n);

    // A new prompt: the prompt file and the device run, nothing else.
    s.replace(
        "Qairtfile",
        "prompt = \"What is the capital of France?\"",
        "prompt = \"Name three rivers in France.\"",
    );
    exec(&["execute"])
        .assert_ok()
        .assert_ran(&set(["prompt", "run on device"]));
    let second = s.read_string("artifacts/device/response.txt");
    assert!(
        second.contains("[PROMPT]: Name three rivers in France."),
        "{second}"
    );
    assert_ne!(
        answer.lines().last(),
        second.lines().last(),
        "the same answer to another prompt"
    );

    // A binary removed by hand is rebuilt with the same bytes: the device does not rerun.
    s.remove(&bin(2));
    exec(&["execute"])
        .assert_ok()
        .assert_ran(&set([context_binary(2)]));

    // A changed weight reaches every binary... and so the device, once.
    s.replace("Qairtfile", "--act_bitwidth 16", "--act_bitwidth 8");
    let out = exec(&["execute"]);
    out.assert_ok();
    assert!(out.ran().contains("run on device"), "{out}");
    assert_ne!(s.read_string("artifacts/device/response.txt"), second);
    exec(&["execute"]).assert_nothing_ran(n + 3);
}
