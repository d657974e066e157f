//! The artifacts of the real pipeline, end to end through the `qbuild` binary (issue 3):
//! symlinks and directories as artifacts, the toolchain (dependency manager), and the
//! step sanity checker (`--check` and the checks after each step).
//!
//! `cargo test --test e2e artifacts::`; `QBUILD_KEEP=1` keeps the work folders for debugging.
//!
//! In the demo (`Qairtfile.example`), `split ar=A` declares per split a link to the exported
//! encodings and a link to `models/test_vectors/`; each link is a job of its own, labelled
//! `link PATH (split ar=A)`. mha2sha (splits 2..4) and convert (split 1) read the encodings
//! links; every quantize job reads its split's test-vectors link (as an input, and through
//! its input list, so the simulated quantizer's output depends on the vectors' names and
//! bytes). convert, quantize and context binary are the `toolchain = true` rules.

#![allow(dead_code)]

use crate::support;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use support::{assert_same_files, assert_set, set, Output, Space, REPO};

const ARS: [u32; 2] = [128, 1];
const SPLITS: [u32; 4] = [1, 2, 3, 4];

// ---------------------------------------------------------------------------------------
// The demo's jobs, by label.

fn convert(ar: u32, s: u32) -> String {
    format!("convert ar={ar} split={s}")
}
fn quantize(ar: u32, s: u32) -> String {
    format!("quantize ar={ar} split={s}")
}
fn context_binary(s: u32) -> String {
    format!("context binary split={s}")
}
/// The link to the test vectors of split `s` of AR `ar`.
fn tv_link(ar: u32, s: u32) -> String {
    format!("models_ar_n/ar{ar}-cl4096/splits/test_vectors_{s}")
}
/// The link to the encodings of split `s` of AR `ar`.
fn enc_link(ar: u32, s: u32) -> String {
    format!("models_ar_n/ar{ar}-cl4096/splits/ar{ar}-cl4096_{s}_of_4.encodings")
}
/// The job that makes a link of the demo's `split ar=A`.
fn link_job(path: &str, ar: u32) -> String {
    format!("link {path} (split ar={ar})")
}
fn qdlc(ar: u32, s: u32) -> String {
    format!("compiled_model/ar{ar}-cl4096_{s}_of_4_quantized.dlc")
}

fn every(f: impl Fn(u32, u32) -> String) -> BTreeSet<String> {
    ARS.iter()
        .flat_map(|&ar| SPLITS.iter().map(move |&s| (ar, s)))
        .map(|(ar, s)| f(ar, s))
        .collect()
}
fn all_converts() -> BTreeSet<String> {
    every(convert)
}
fn all_quantizes() -> BTreeSet<String> {
    every(quantize)
}
fn all_binaries() -> BTreeSet<String> {
    SPLITS.iter().map(|&s| context_binary(s)).collect()
}
fn all_tv_link_jobs() -> BTreeSet<String> {
    every(|ar, s| link_job(&tv_link(ar, s), ar))
}
fn all_enc_link_jobs() -> BTreeSet<String> {
    every(|ar, s| link_job(&enc_link(ar, s), ar))
}

fn union<const N: usize>(sets: [BTreeSet<String>; N]) -> BTreeSet<String> {
    sets.into_iter().flatten().collect()
}

/// A demo built from scratch, and the number of its jobs.
fn built_demo() -> (Space, u64) {
    built_demo_with(&[])
}

/// A demo built from scratch with this environment (e.g. another `QNN_SDK_ROOT`).
fn built_demo_with(env: &[(&str, &str)]) -> (Space, u64) {
    let s = Space::demo();
    let n = build(&s, env).count("ran");
    (s, n)
}

/// `qbuild all` with this environment; must succeed.
#[track_caller]
fn build(s: &Space, env: &[(&str, &str)]) -> Output {
    let out = run_with(s, &["all"], env);
    out.assert_ok();
    out
}

fn run_with(s: &Space, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut r = s.qbuild(args.iter().copied());
    for (k, v) in env {
        r = r.env(k, v);
    }
    r.run()
}

/// A no-op: nothing ran, and (the stat cache at work) not one byte was read.
#[track_caller]
fn assert_noop(s: &Space, n: u64, env: &[(&str, &str)]) {
    let out = run_with(s, &["all"], env);
    out.assert_nothing_ran(n);
    assert_eq!(out.count("hashed_bytes"), 0, "a no-op reads nothing\n{out}");
}

/// A work folder holding only this Qairtfile.
fn space_with(qairtfile: &str) -> Space {
    let s = Space::new();
    s.write("Qairtfile", qairtfile);
    s
}

/// A copy of the bundled simulated SDK, in a temporary folder of its own; returns the
/// space and the SDK's absolute path (the wrappers find qairt-sim through `QAIRT_SIM`).
fn sdk_copy() -> (Space, String) {
    let s = Space::at(Path::new(REPO)).copy_of(&["sim-sdk"]);
    let root = s.join("sim-sdk").to_string_lossy().into_owned();
    (s, root)
}

fn read_link(s: &Space, rel: &str) -> PathBuf {
    fs::read_link(s.join(rel)).unwrap_or_else(|e| panic!("readlink {rel}: {e}"))
}

/// The `error` of the failed job `label`'s `job_finished` event.
#[track_caller]
fn job_error(out: &Output, label: &str) -> String {
    out.events
        .iter()
        .find(|e| e["event"] == "job_finished" && e["job"] == label && e["status"] == "failed")
        .and_then(|e| e["error"].as_str())
        .unwrap_or_else(|| panic!("no failure with an error for `{label}`\n{out}"))
        .to_string()
}

/// Line and column (1-based) of the first occurrence of `needle` in `text`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not in the text"));
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The run refused its input before anything ran: exit 2, no events, no file written.
#[track_caller]
fn assert_refused(out: &Output, s: &Space, before: &support::Snapshot, had_state: bool) {
    out.assert_code(2);
    out.assert_error_event();
    assert!(!out.stderr.contains("panicked"), "{out}");
    assert_same_files(&s.snapshot(), before, "a refused run writes nothing");
    if !had_state {
        assert!(!s.exists(".qbuild"), "no state for a refused run\n{out}");
    }
}

// ---------------------------------------------------------------------------------------
// 1. Symlinks are first-class artifacts.

#[test]
fn links_are_relative_symlinks_made_by_jobs_of_their_own() {
    let s = Space::demo();
    let out = build(&s, &[]);
    let n = out.count("ran");
    let ran = out.ran();
    assert!(
        ran.is_superset(&union([all_tv_link_jobs(), all_enc_link_jobs()])),
        "every link is a job of its own, labelled `link PATH (RULE vars)`\n{out}"
    );
    for ev in out
        .events
        .iter()
        .filter(|e| e["event"] == "job_finished" && e["job"].as_str().unwrap().starts_with("link "))
    {
        assert_eq!(ev["rule"], "split", "{ev}");
        assert_eq!(ev["outputs"].as_array().unwrap().len(), 1, "{ev}");
    }
    let root = fs::canonicalize(s.path()).unwrap();
    for ar in ARS {
        for i in SPLITS {
            let tv = tv_link(ar, i);
            assert!(s.is_symlink(&tv), "{tv} is a symlink");
            assert_eq!(
                read_link(&s, &tv),
                Path::new("../../../models/test_vectors")
            );
            assert!(s.join(&tv).join("input_0.raw").is_file());
            let enc = enc_link(ar, i);
            assert!(s.is_symlink(&enc), "{enc} is a symlink");
            assert_eq!(read_link(&s, &enc), Path::new("../onnx/llama3.encodings"));
            assert_eq!(
                s.read(&enc),
                s.read(&format!("models_ar_n/ar{ar}-cl4096/onnx/llama3.encodings")),
                "a link shows its target's content"
            );
            for l in [&tv, &enc] {
                let resolved = fs::canonicalize(s.join(l)).unwrap();
                assert!(resolved.starts_with(&root), "{l} leaves the work folder");
            }
        }
    }
    assert_noop(&s, n, &[]);
}

#[test]
fn repointing_a_link_in_the_qairtfile_reruns_the_link_jobs_not_their_readers() {
    let (s, n) = built_demo();
    // The same vectors under another name: the links' text changes, their content does not.
    for f in ["input_0.raw", "input_1.raw", "input_2.raw"] {
        s.write(
            &format!("models/test_vectors_v2/{f}"),
            s.read(&format!("models/test_vectors/{f}")),
        );
    }
    let before = s.read(&qdlc(128, 2));
    s.replace(
        "Qairtfile",
        "test_vectors = \"models/test_vectors\"",
        "test_vectors = \"models/test_vectors_v2\"",
    );
    let out = s.run(["all"]);
    // The links are remade with their new text; their readers see the same vectors
    // through them (what a link leads to is what they read), so none reruns. The
    // encodings links are untouched.
    out.assert_ok().assert_ran(&all_tv_link_jobs());
    for ar in ARS {
        for i in SPLITS {
            assert_eq!(
                read_link(&s, &tv_link(ar, i)),
                Path::new("../../../models/test_vectors_v2")
            );
        }
    }
    assert_eq!(s.read(&qdlc(128, 2)), before);
    assert_noop(&s, n, &[]);

    // The old folder is no longer read by anyone; the new one is.
    s.append("models/test_vectors/input_0.raw", "x");
    s.run(["all"]).assert_nothing_ran(n);
    s.append("models/test_vectors_v2/input_0.raw", "x");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&union([all_quantizes(), all_binaries()]));
}

/// A source link's readers see what it leads to: weights moved to other storage (the link
/// re-pointed at the same bytes), or the link replaced by a copy, rerun nothing; other
/// bytes behind it do. (The link's text was part of its readers' keys: a move of the model
/// reran the whole pipeline.)
#[test]
fn a_source_link_repointed_at_the_same_bytes_reruns_nothing() {
    let s = Space::new();
    let shared = Space::new();
    shared
        .write("v1/w.bin", "weights\n")
        .write("v2/w.bin", "weights\n");
    shared.write("v3/w.bin", "other weights\n");
    s.write(
        "Qairtfile",
        r#"
[rule.compile]
inputs = ["models/w.bin"]
outputs = ["out/c.bin"]
command = "mkdir -p out && cat models/w.bin > out/c.bin"
[rule.pack]
inputs = ["out/c.bin"]
outputs = ["out/p.bin"]
command = "cat out/c.bin out/c.bin > out/p.bin"
"#,
    );
    fs::create_dir_all(s.join("models")).expect("mkdir");
    let link = s.join("models/w.bin");
    let point = |to: &str| {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(shared.join(to), &link).expect("symlink");
    };
    point("v1/w.bin");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["compile", "pack"]));
    point("v2/w.bin");
    s.run(["all"]).assert_ok().assert_nothing_ran(2);
    s.run(["--explain", "-n", "all"])
        .assert_ok()
        .assert_nothing_ran(2);
    // A plain copy of the same bytes in its place.
    fs::remove_file(&link).expect("rm");
    fs::copy(shared.join("v1/w.bin"), &link).expect("copy");
    s.run(["all"]).assert_ok().assert_nothing_ran(2);
    // Other bytes behind the link: both rerun, and match a clean build.
    point("v3/w.bin");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["compile", "pack"]));
    assert_eq!(s.read_string("out/p.bin"), "other weights\nother weights\n");
    // Removed from the shared storage: the dangling link is named, nothing is recorded.
    fs::remove_file(shared.join("v3/w.bin")).expect("rm");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(out.stderr.contains("dangling symlink"), "{out}");
}

/// A `links` job whose target was removed and is rebuilt with the same bytes is up to date
/// once the target is back: its link was judged dangling by the opening scan, and the job
/// reran (and `--explain` named the dangling link after the target had been rebuilt).
#[test]
fn a_link_to_a_rebuilt_target_is_judged_when_the_target_is_back() {
    let s = Space::new();
    s.write("s.txt", "data\n").write(
        "Qairtfile",
        r#"
[rule.p]
inputs = ["s.txt"]
outputs = ["c.txt"]
command = "cat s.txt > c.txt"
[rule.l]
links = [{ link = "a", to = "b" }, { link = "b", to = "c.txt" }]
[rule.r]
inputs = ["a"]
outputs = ["r.txt"]
command = "cat a > r.txt"
"#,
    );
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["p", "link a (l)", "link b (l)", "r"]));
    fs::remove_file(s.join("c.txt")).expect("rm");
    let out = s.run(["--explain", "all"]);
    out.assert_ok().assert_ran(&set(["p"]));
    assert!(!out.stderr.contains("dangling"), "{out}");
    assert_eq!(s.read_string("r.txt"), "data\n");
    assert_noop(&s, 4, &[]);
}

/// A link, its target's producer, a reader through the link, and a reader of the source.
const LINKED: &str = r#"
[rule.gen]
inputs = ["src/a.txt"]
outputs = ["data/a.txt"]
command = "cp src/a.txt data/a.txt"

[rule.mk]
links = [{ link = "l/a.txt", to = "data/a.txt" }]

[rule.read]
inputs = ["l/a.txt"]
outputs = ["out/r.txt"]
command = "cat l/a.txt > out/r.txt"

[rule.other]
inputs = ["src/b.txt"]
outputs = ["out/o.txt"]
command = "cat src/b.txt > out/o.txt"
"#;

#[test]
fn changing_the_file_behind_a_link_reruns_its_readers_not_the_link() {
    let s = space_with(LINKED);
    s.write("src/a.txt", "one\n").write("src/b.txt", "b\n");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["gen", "link l/a.txt (mk)", "read", "other"]));
    assert_eq!(read_link(&s, "l/a.txt"), Path::new("../data/a.txt"));
    assert_eq!(s.read_string("out/r.txt"), "one\n");

    s.write("src/a.txt", "two\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["gen", "read"]));
    assert_eq!(s.read_string("out/r.txt"), "two\n");
    assert_noop(&s, 4, &[]);

    // The same through the demo's test-vectors links: readers rerun, the links do not.
    let (d, n) = built_demo();
    d.append("models/test_vectors/input_1.raw", "changed");
    d.run(["all"])
        .assert_ok()
        .assert_ran(&union([all_quantizes(), all_binaries()]));
    assert_noop(&d, n, &[]);
}

#[test]
fn a_hand_repointed_link_is_restored_and_its_readers_do_not_rerun() {
    let (s, n) = built_demo();
    let l = tv_link(1, 3);
    let job = link_job(&l, 1);
    let q = s.read(&qdlc(1, 3));
    s.write("models/other_vectors/input_0.raw", "other vectors");

    // Re-pointed by hand at other vectors: the link job puts its own text back; the
    // readers then see exactly what they were built from, so none reruns.
    fs::remove_file(s.join(&l)).unwrap();
    symlink("../../../models/other_vectors", s.join(&l)).unwrap();
    s.run(["all"]).assert_ok().assert_ran(&set([job.clone()]));
    assert_eq!(read_link(&s, &l), Path::new("../../../models/test_vectors"));
    assert_eq!(s.read(&qdlc(1, 3)), q);

    // Made absolute by hand (same target): restored to the relative text.
    fs::remove_file(s.join(&l)).unwrap();
    symlink(s.join("models/test_vectors"), s.join(&l)).unwrap();
    s.run(["all"]).assert_ok().assert_ran(&set([job.clone()]));
    assert_eq!(read_link(&s, &l), Path::new("../../../models/test_vectors"));

    // Deleted: made again, nothing else.
    fs::remove_file(s.join(&l)).unwrap();
    s.run(["all"]).assert_ok().assert_ran(&set([job]));
    assert!(s.is_symlink(&l));
    assert_noop(&s, n, &[]);
}

#[test]
fn a_dangling_link_fails_its_job_naming_the_link_and_its_target() {
    let s = space_with(
        r#"
[rule.mk]
links = [{ link = "l/a.txt", to = "nothere/a.txt" }]

[rule.read]
inputs = ["l/a.txt"]
outputs = ["out/r.txt"]
command = "cat l/a.txt > out/r.txt"
"#,
    );
    let out = s.run(["all"]);
    out.assert_code(1);
    assert_set(
        &out.failed(),
        &set(["link l/a.txt (mk)"]),
        "failed jobs",
        &out,
    );
    assert_eq!(out.count("skipped"), 1, "the reader does not run\n{out}");
    let err = job_error(&out, "link l/a.txt (mk)");
    assert!(
        err.contains("dangling") && err.contains("l/a.txt") && err.contains("nothere/a.txt"),
        "the error names the link and its target: {err}"
    );
    assert!(out.stderr.contains(&err), "{out}");
    assert!(!s.exists("out/r.txt"));

    // Once the target exists, the link and its reader are made.
    s.write("nothere/a.txt", "here\n");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["link l/a.txt (mk)", "read"]));
    assert_eq!(s.read_string("out/r.txt"), "here\n");
    // The target gone again: the link is there, and `--explain` says where it leads.
    fs::remove_file(s.join("nothere/a.txt")).expect("rm");
    let dry = s.qbuild(["-n", "--explain", "all"]).no_json().run();
    assert!(
        dry.stderr
            .contains("output l/a.txt is a link whose target is missing"),
        "{dry}"
    );
    s.write("nothere/a.txt", "here\n");

    // The demo: the test vectors go away after a build; every link to them dangles.
    let (d, n) = built_demo();
    fs::rename(d.join("models/test_vectors"), d.join("models/vectors_gone")).unwrap();
    let out = d.run(["-k", "all"]);
    out.assert_code(1);
    assert_set(&out.failed(), &all_tv_link_jobs(), "failed jobs", &out);
    assert_eq!(out.count("ran"), 0, "{out}");
    for ar in ARS {
        for i in SPLITS {
            let err = job_error(&out, &link_job(&tv_link(ar, i), ar));
            assert!(
                err.contains(&tv_link(ar, i)) && err.contains("../../../models/test_vectors"),
                "{err}"
            );
        }
    }
    // Back in place: the links are made again, and their readers see what they were
    // built from.
    fs::rename(d.join("models/vectors_gone"), d.join("models/test_vectors")).unwrap();
    let out = d.run(["all"]);
    out.assert_ok();
    assert!(
        out.ran().is_subset(&all_tv_link_jobs()),
        "only link jobs may run again\n{out}"
    );
    assert_noop(&d, n, &[]);
}

/// Regression: a `links` output replaced by hand with an absolute link to the same,
/// existing target was explained as "a link whose target is missing" (by `-n --explain`,
/// `--status` and a build's `--explain`). The reason now says what is wrong with it; the
/// build makes the relative link again.
#[test]
fn a_link_replaced_by_an_absolute_one_is_explained_truly() {
    let (d, n) = built_demo();
    let link = enc_link(128, 1);
    let job = link_job(&link, 128);
    let root = d.path().canonicalize().expect("canonicalize");
    let target = root.join("models_ar_n/ar128-cl4096/onnx/llama3.encodings");
    assert_eq!(fs::canonicalize(d.join(&link)).ok(), Some(target.clone()));
    fs::remove_file(d.join(&link)).expect("rm link");
    symlink(&target, d.join(&link)).expect("symlink");
    let want = format!(
        "output {link} is an absolute symlink (-> {}); links inside the work folder must be relative so the folder can move",
        target.display()
    );
    let dry = d.run(["-n", "--explain", "all"]);
    dry.assert_ok();
    let reasons = dry
        .would_run_events()
        .into_iter()
        .find(|e| e["job"] == job.as_str())
        .map(|e| e["reasons"].clone())
        .unwrap_or_else(|| panic!("{job} would not run\n{dry}"));
    assert_eq!(reasons, serde_json::json!([want]), "{dry}");
    let status = d.qbuild(["--status"]).no_json().run();
    assert!(status.stderr.contains(&want), "{status}");
    assert!(!status.stderr.contains("target is missing"), "{status}");
    let out = d.run(["--explain", "all"]);
    out.assert_ok();
    assert!(out.ran().contains(&job), "{out}");
    assert!(out.stderr.contains(&want), "{out}");
    assert_eq!(
        read_link(&d, &link),
        PathBuf::from("../onnx/llama3.encodings"),
        "the relative link is made again"
    );
    assert_noop(&d, n, &[]);
}

#[test]
fn links_pointing_outside_the_work_folder_are_refused_at_load() {
    let cases: [(&str, &str, &str); 5] = [
        (
            r#"links = [{ link = "l/a.txt", to = "../outside.txt" }]"#,
            "error: link target `../outside.txt` is outside the work folder",
            "\"../outside.txt\"",
        ),
        (
            r#"links = [{ link = "l/a.txt", to = "/etc/hostname" }]"#,
            "error: link target `/etc/hostname` is outside the work folder",
            "\"/etc/hostname\"",
        ),
        (
            r#"links = [{ link = "l/a.txt", to = "sub/../../x.txt" }]"#,
            "error: link target `sub/../../x.txt` is outside the work folder",
            "\"sub/../../x.txt\"",
        ),
        (
            r#"links = [{ link = "../l.txt", to = "x.txt" }]"#,
            "error: link `../l.txt` is outside the work folder",
            "\"../l.txt\"",
        ),
        (
            r#"links = [{ link = "/tmp/qbuild-artifacts-l.txt", to = "x.txt" }]"#,
            "error: link `/tmp/qbuild-artifacts-l.txt` is outside the work folder",
            "\"/tmp/qbuild-artifacts-l.txt\"",
        ),
    ];
    for (links, first, at) in cases {
        let q = format!(
            "[rule.ok]\noutputs = [\"x.txt\"]\ncommand = \"echo x > x.txt\"\n\n[rule.mk]\n{links}\n"
        );
        let (line, col) = position(&q, at);
        for args in [vec!["all"], vec!["--check"]] {
            let s = space_with(&q);
            let before = s.snapshot();
            let out = s.run(args.clone());
            assert_refused(&out, &s, &before, false);
            assert_eq!(out.stderr.lines().next(), Some(first), "{args:?}\n{out}");
            assert!(
                out.stderr
                    .contains(&format!("--> Qairtfile:{line}:{col}\n")),
                "{args:?}: expected Qairtfile:{line}:{col}\n{out}"
            );
        }
    }

    // The demo with its test vectors outside the work folder.
    let s = Space::demo();
    s.replace(
        "Qairtfile",
        "test_vectors = \"models/test_vectors\"",
        "test_vectors = \"../shared/test_vectors\"",
    );
    let (line, col) = position(&s.read_string("Qairtfile"), "\"${test_vectors}\"");
    let before = s.snapshot();
    let out = s.run(["all"]);
    assert_refused(&out, &s, &before, false);
    assert!(
        out.stderr.starts_with(
            "error: link target `../shared/test_vectors` is outside the work folder\n"
        ) && out
            .stderr
            .contains(&format!("--> Qairtfile:{line}:{col}\n")),
        "{out}"
    );
}

/// An absolute symlink inside the work folder that points inside it is an error (it breaks
/// when the folder moves); one that points to shared storage outside is followed.
#[test]
fn an_absolute_symlink_inside_the_work_folder_is_an_error() {
    let q = r#"
[rule.read]
inputs = ["src/in.txt"]
outputs = ["out/r.txt"]
command = "cat src/in.txt > out/r.txt"

[rule.list]
inputs = ["src/tv"]
outputs = ["out/l.txt"]
command = "ls src/tv > out/l.txt"

[rule.shared]
inputs = ["src/weights.bin"]
outputs = ["out/w.txt"]
command = "cat src/weights.bin > out/w.txt"
"#;
    let s = space_with(q);
    s.write("data/a.txt", "a\n").write("src/tv/f.raw", "f");
    symlink(s.join("data/a.txt"), s.join("src/in.txt")).unwrap();
    symlink(s.join("data/a.txt"), s.join("src/tv/abs.raw")).unwrap();
    // An absolute link to shared storage outside the work folder survives a move: followed.
    let storage = Space::new();
    storage.write("llama3/weights.bin", "w1");
    symlink(
        storage.join("llama3/weights.bin"),
        s.join("src/weights.bin"),
    )
    .unwrap();
    let out = s.run(["-k", "all"]);
    out.assert_code(1);
    assert_set(&out.failed(), &set(["read", "list"]), "failed jobs", &out);
    assert_set(&out.ran(), &set(["shared"]), "ran", &out);
    assert_eq!(s.read_string("out/w.txt"), "w1");
    storage.write("llama3/weights.bin", "w2");
    let out = s.run(["-k", "all"]);
    assert_set(
        &out.ran(),
        &set(["shared"]),
        "ran after the shared file changed",
        &out,
    );
    assert_eq!(s.read_string("out/w.txt"), "w2");
    for (job, link) in [("read", "src/in.txt"), ("list", "src/tv/abs.raw")] {
        let err = job_error(&out, job);
        assert!(
            err.contains(&format!("{link} is an absolute symlink")) && err.contains("relative"),
            "{err}"
        );
    }
    assert!(!s.exists("out/r.txt") && !s.exists("out/l.txt"));

    // Made relative, both build.
    for (rel, text) in [
        ("src/in.txt", "../data/a.txt"),
        ("src/tv/abs.raw", "../../data/a.txt"),
    ] {
        fs::remove_file(s.join(rel)).unwrap();
        symlink(text, s.join(rel)).unwrap();
    }
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["read", "list"]));
    s.run(["all"]).assert_nothing_ran(3);
}

#[test]
fn moving_the_work_folder_reruns_nothing() {
    let (s, n) = built_demo();
    // Renamed: relative paths, relative links and the stat cache (keyed by relative path)
    // all survive, so nothing runs and nothing is read.
    let elsewhere = Space::new();
    let moved = elsewhere.join("moved-work-folder");
    fs::rename(s.path(), &moved).expect("rename the work folder");
    fs::create_dir(s.path()).expect("leave a folder for the temp dir to remove");
    let m = Space::at(&moved);
    assert_noop(&m, n, &[]);
    for ar in ARS {
        for i in SPLITS {
            assert!(m.join(&tv_link(ar, i)).join("input_0.raw").is_file());
        }
    }

    // Copied (new inodes: files are re-hashed, but every key still matches).
    let entries: Vec<String> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
    let c = m.copy_of(&refs);
    c.run(["all"]).assert_nothing_ran(n);
    assert_noop(&c, n, &[]);

    // The links of the copy lead into the copy, not back to the original.
    m.append("models/test_vectors/input_2.raw", "only in the original");
    c.run(["all"]).assert_nothing_ran(n);
    c.append("models/test_vectors/input_2.raw", "in the copy");
    c.run(["all"])
        .assert_ok()
        .assert_ran(&union([all_quantizes(), all_binaries()]));
}

// ---------------------------------------------------------------------------------------
// 2. Directories are artifacts.

#[test]
fn test_vector_changes_rerun_exactly_the_quantize_jobs_that_read_them() {
    let (s, n) = built_demo();
    let tv = "models/test_vectors";
    // The quantizer folds the vectors' names and bytes into its output, so every change it
    // can see reaches the context binaries too.
    let through = union([all_quantizes(), all_binaries()]);
    let step = |what: &str, expected: &BTreeSet<String>| {
        let out = s.run(["all"]);
        out.assert_ok();
        assert_set(&out.ran(), expected, what, &out);
        assert_eq!(out.count("ran"), expected.len() as u64, "{what}\n{out}");
        assert_noop(&s, n, &[]);
    };

    // Edit one file (same size).
    let mut b = s.read(&format!("{tv}/input_1.raw"));
    b[0] ^= 0xff;
    s.write(&format!("{tv}/input_1.raw"), b);
    step("edit a file", &through);

    // Add a file.
    s.write(&format!("{tv}/input_3.raw"), [7u8; 128]);
    step("add a file", &through);

    // Remove it again.
    s.remove(&format!("{tv}/input_3.raw"));
    step("remove a file", &through);

    // Rename a file.
    fs::rename(
        s.join(&format!("{tv}/input_2.raw")),
        s.join(&format!("{tv}/input_9.raw")),
    )
    .unwrap();
    step("rename a file", &through);

    // Add a file in a new subfolder.
    s.write(&format!("{tv}/extra/input_0.raw"), [3u8; 128]);
    step("add a file in a subfolder", &through);
    fs::remove_dir_all(s.join(&format!("{tv}/extra"))).unwrap();
    step("remove the subfolder", &through);

    // A file replaced by a relative link to identical bytes: the tree (which records link
    // texts) changed, so every quantize reruns; the quantizer follows the link and sees
    // the same vectors, so early cutoff stops before the context binaries.
    s.write(
        "models/shared_input_0.raw",
        s.read(&format!("{tv}/input_0.raw")),
    );
    s.remove(&format!("{tv}/input_0.raw"));
    symlink(
        "../shared_input_0.raw",
        s.join(&format!("{tv}/input_0.raw")),
    )
    .unwrap();
    step("a file replaced by a link", &all_quantizes());

    // Editing the file behind that link inside the tree reaches its readers.
    s.append("models/shared_input_0.raw", "more");
    step("edit the file behind a link in the tree", &through);

    // New timestamps, same bytes: nothing runs.
    for f in ["input_1.raw", "input_9.raw"] {
        s.touch(&format!("{tv}/{f}"), 5);
    }
    s.run(["all"]).assert_nothing_ran(n);
    assert_noop(&s, n, &[]);
}

#[test]
fn a_directory_input_hashes_names_file_hashes_and_link_texts() {
    // `list` sees only names (its output is the file list); `report` reads that list.
    let s = space_with(
        r#"
[rule.list]
inputs = ["tv"]
outputs = ["out/list.txt"]
command = "cd tv && find . | LC_ALL=C sort > ../out/list.txt"

[rule.report]
inputs = ["out/list.txt"]
outputs = ["out/report.txt"]
command = "wc -l < out/list.txt > out/report.txt"
"#,
    );
    s.write("tv/a.raw", "a").write("tv/sub/b.raw", "b");
    symlink("a.raw", s.join("tv/l.raw")).unwrap();
    let both = set(["list", "report"]);
    s.run(["all"]).assert_ok().assert_ran(&both);
    assert_noop(&s, 2, &[]);

    // A nested file's bytes: `list` reruns, writes the same list, `report` is spared.
    s.write("tv/sub/b.raw", "B");
    s.run(["all"]).assert_ok().assert_ran(&set(["list"]));
    assert_noop(&s, 2, &[]);

    // A link's text inside the tree (same name): the same.
    fs::remove_file(s.join("tv/l.raw")).unwrap();
    symlink("sub/b.raw", s.join("tv/l.raw")).unwrap();
    s.run(["all"]).assert_ok().assert_ran(&set(["list"]));

    // A new empty folder, a rename, a removal: names change, both rerun.
    s.mkdir("tv/empty");
    s.run(["all"]).assert_ok().assert_ran(&both);
    fs::rename(s.join("tv/a.raw"), s.join("tv/c.raw")).unwrap();
    fs::remove_file(s.join("tv/l.raw")).unwrap();
    symlink("c.raw", s.join("tv/l.raw")).unwrap();
    s.run(["all"]).assert_ok().assert_ran(&both);
    fs::remove_dir_all(s.join("tv/sub")).unwrap();
    s.run(["all"]).assert_ok().assert_ran(&both);
    assert_noop(&s, 2, &[]);
}

/// Regression: a FIFO as an input (or inside an input folder) hung the run for good in
/// `open`, which waits for a writer, and Ctrl-C could not end it. A FIFO, socket or device
/// is not an artifact: the jobs that read or write one fail, naming it; the rest build.
#[test]
fn a_fifo_fails_the_jobs_that_read_or_write_it_instead_of_hanging() {
    let s = space_with(
        r#"
[rule.one]
inputs = ["in.fifo"]
outputs = ["out/one.txt"]
command = "echo one > out/one.txt"

[rule.tree]
inputs = ["tv"]
outputs = ["out/tree.txt"]
command = "ls tv > out/tree.txt"

[rule.makes]
outputs = ["out/made.fifo"]
command = "mkdir -p out && mkfifo out/made.fifo"

[rule.fine]
outputs = ["out/fine.txt"]
command = "echo fine > out/fine.txt"
"#,
    );
    s.write("tv/a.raw", "a");
    for p in ["in.fifo", "tv/p.fifo"] {
        let st = std::process::Command::new("mkfifo")
            .arg(s.join(p))
            .status()
            .expect("mkfifo");
        assert!(st.success());
    }
    let out = s.run(["-k", "all"]);
    out.assert_code(1);
    assert_eq!(out.failed(), set(["one", "tree", "makes"]), "{out}");
    assert_eq!(out.ran(), set(["fine"]), "{out}");
    for (job, path) in [
        ("one", "in.fifo"),
        ("tree", "tv/p.fifo"),
        ("makes", "out/made.fifo"),
    ] {
        let says = format!("{path} is a FIFO (named pipe)");
        let block = out.stderr.split("FAILED: ").find(|b| b.starts_with(job));
        assert!(
            block.is_some_and(|b| b.contains(&says)),
            "{job}: {says}\n{out}"
        );
    }
    assert!(
        !s.exists("out/made.fifo"),
        "the FIFO output is removed\n{out}"
    );

    // Files in their place: exactly the failed jobs run.
    s.remove("in.fifo").write("in.fifo", "now a file");
    s.remove("tv/p.fifo");
    s.replace(
        "Qairtfile",
        "mkfifo out/made.fifo",
        "echo made > out/made.fifo",
    );
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["one", "tree", "makes"]));
    assert_noop(&s, 4, &[]);
}

/// Found by hand: a job writing a file into a source folder that another job reads.
/// The reader did not wait for the writer, and once it did, it recorded the folder as it
/// was before the writer ran, so every second build reran it. Now the reader waits, sees
/// the folder as written, a dry run predicts it, and early cutoff holds through the folder.
#[test]
fn a_file_written_into_a_folder_that_is_read_orders_its_reader() {
    let q = r#"
[rule.list]
inputs = ["tv"]
outputs = ["out/list.txt"]
command = "cat tv/* > out/list.txt"

[rule.gen]
outputs = ["tv/gen.raw"]
command = "sleep 0.3; echo g1 > tv/gen.raw"
"#;
    let s = space_with(q);
    s.write("tv/a.raw", "a\n");
    let both = set(["list", "gen"]);
    s.run(["all"]).assert_ok().assert_ran(&both);
    assert_eq!(s.read_string("out/list.txt"), "a\ng1\n");
    assert_noop(&s, 2, &[]);

    // A new output of `gen`: the dry run says both, and both run.
    s.replace("Qairtfile", "echo g1", "echo g2");
    let dry = s.run(["-n", "all"]);
    assert_eq!(dry.would_run(), both, "{dry}");
    s.run(["all"]).assert_ok().assert_ran(&both);
    assert_eq!(s.read_string("out/list.txt"), "a\ng2\n");
    assert_noop(&s, 2, &[]);

    // `gen` reruns and writes the same bytes: the folder is unchanged, `list` is spared.
    s.replace(
        "Qairtfile",
        "sleep 0.3; echo g2",
        "sleep 0.3; true; echo g2",
    );
    s.run(["all"]).assert_ok().assert_ran(&set(["gen"]));
    assert_noop(&s, 2, &[]);

    // The same outputs as a clean build of the same Qairtfile and sources.
    let clean = space_with(&s.read_string("Qairtfile"));
    clean.write("tv/a.raw", "a\n");
    clean.run(["all"]).assert_ok();
    assert_eq!(
        clean.read_string("out/list.txt"),
        s.read_string("out/list.txt")
    );
    assert_eq!(clean.read_string("tv/gen.raw"), s.read_string("tv/gen.raw"));
}

/// Found by hand: a link inside an input folder that leads back up (`tv/up -> ..`) made
/// qbuild hash the whole work folder again at every level until a depth limit of 64 (21
/// copies of a 50 MB file, 1 GB read, before the error). The cycle is now caught the first
/// time the walk comes back to a folder it is inside.
#[test]
fn a_folder_that_holds_itself_through_a_link_fails_at_once() {
    let s = space_with(
        r#"
[rule.list]
inputs = ["tv"]
outputs = ["out/list.txt"]
command = "ls tv > out/list.txt"
"#,
    );
    let big = vec![7u8; 4 << 20];
    s.write("data/big.bin", &big).write("tv/a.raw", "a");
    symlink("..", s.join("tv/up")).unwrap();
    let out = s.run(["all"]);
    out.assert_code(1);
    assert_eq!(out.failed(), set(["list"]), "{out}");
    assert!(
        out.stderr
            .contains("cannot read input tv: tv is a folder that holds itself"),
        "{out}"
    );
    let read = out.count("hashed_bytes");
    assert!(
        read < 2 * big.len() as u64,
        "read {read} bytes: the walk went round"
    );
    fs::remove_file(s.join("tv/up")).unwrap();
    s.run(["all"]).assert_ok().assert_ran(&set(["list"]));
}

#[test]
fn a_directory_output_must_exist_and_may_be_read() {
    let s = space_with(
        r#"
[rule.vectors]
inputs = ["src/seed.txt"]
outputs = ["gen/vectors"]
command = "mkdir -p gen/vectors && cp src/seed.txt gen/vectors/input_0.raw"

[rule.mk]
links = [{ link = "splits/test_vectors_1", to = "gen/vectors" }]

[rule.use]
inputs = ["splits/test_vectors_1"]
outputs = ["out/used.txt"]
command = "cat splits/test_vectors_1/input_0.raw > out/used.txt"
"#,
    );
    s.write("src/seed.txt", "seed 1\n");
    s.run(["all"]).assert_ok().assert_ran(&set([
        "vectors",
        "link splits/test_vectors_1 (mk)",
        "use",
    ]));
    assert_eq!(s.read_string("out/used.txt"), "seed 1\n");
    s.write("src/seed.txt", "seed 2\n");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["vectors", "use"]));
    assert_eq!(s.read_string("out/used.txt"), "seed 2\n");
    assert_noop(&s, 3, &[]);
    // A hand edit inside the output folder: its producer rebuilds it; the reader is spared.
    s.write("gen/vectors/input_0.raw", "hand edit\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["vectors"]));
    assert_eq!(s.read_string("gen/vectors/input_0.raw"), "seed 2\n");
}

/// Regression: names that are not UTF-8 were keyed by their lossy text, so `tv/\xfe` and
/// `tv/\xff` (and a real `tv/\u{FFFD}`) shared one key: the once-per-run folder cache gave
/// the second folder the first one's hash, the stat cache gave one file the other's, and
/// the keys named no file, so every no-op read those files again.
#[test]
fn names_that_are_not_utf8_are_told_apart() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s = space_with(
        r#"
[rule.dirs]
inputs = ["tv"]
outputs = ["dirs.txt"]
command = "cat tv/*/f > dirs.txt"

[rule.files]
inputs = ["tf"]
outputs = ["files.txt"]
command = "cat tf/* > files.txt"

[rule.gen]
inputs = ["seed.txt"]
outputs = ["gen"]
command = "mkdir -p gen && cp seed.txt gen/$(printf '\\376') && cp seed.txt gen/$(printf '\\377')"
"#,
    );
    let at = |rel: &[u8]| s.path().join(OsStr::from_bytes(rel));
    let write = |rel: &[u8], text: &str| {
        if let Some(d) = at(rel).parent() {
            fs::create_dir_all(d).expect("mkdir");
        }
        fs::write(at(rel), text).expect("write");
    };
    write(b"tv/\xfe/f", "A\n");
    write(b"tv/\xff/f", "B1\n");
    write("tf/\u{FFFD}".as_bytes(), "C\n");
    write(b"tf/\xff", "D1\n");
    s.write("seed.txt", "seed\n");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["dirs", "files", "gen"]));
    assert_noop(&s, 3, &[]);

    // The second of two non-UTF-8 folders.
    write(b"tv/\xff/f", "B2\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["dirs"]));
    assert_eq!(s.read_string("dirs.txt"), "A\nB2\n");
    // A non-UTF-8 file beside the one its lossy name spells.
    write(b"tf/\xff", "D2\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["files"]));
    assert_eq!(s.read_string("files.txt"), "C\nD2\n");
    assert_noop(&s, 3, &[]);

    // A hand edit inside a folder output: its producer rebuilds it.
    write(b"gen/\xff", "hand edit\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["gen"]));
    assert_eq!(fs::read(at(b"gen/\xff")).expect("read"), b"seed\n");
    assert_noop(&s, 3, &[]);
}

// ---------------------------------------------------------------------------------------
// 3. The dependency manager.

/// The line of `[toolchain]` in the demo Qairtfile (the position toolchain errors name).
fn toolchain_position(s: &Space) -> String {
    let (line, _) = position(&s.read_string("Qairtfile"), "[toolchain]");
    format!("--> Qairtfile:{line}:2\n")
}

#[test]
fn toolchain_errors_stop_the_build_before_anything_runs() {
    // Each case breaks a fresh copy of the SDK; the work folder is a demo, once fresh and
    // once built (its outputs must stay untouched).
    type Break = fn(&Path);
    let cases: Vec<(&str, Break, &str, &str)> = vec![
        (
            "missing root",
            |sdk| fs::remove_dir_all(sdk).unwrap(),
            "error: toolchain `qairt`: root {SDK} does not exist",
            "hint: set QNN_SDK_ROOT",
        ),
        (
            "missing tool",
            |sdk| fs::remove_file(sdk.join("bin/x86_64-linux-clang/qairt-quantizer")).unwrap(),
            "error: toolchain `qairt`: tool {SDK}/bin/x86_64-linux-clang/qairt-quantizer is missing or not executable",
            "hint: is QNN_SDK_ROOT the right SDK",
        ),
        (
            "tool not executable",
            |sdk| {
                let p = sdk.join("bin/x86_64-linux-clang/qairt-dlc-info");
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap()
            },
            "error: toolchain `qairt`: tool {SDK}/bin/x86_64-linux-clang/qairt-dlc-info is missing or not executable",
            "hint: is QNN_SDK_ROOT the right SDK",
        ),
        (
            "no sdk.yaml",
            |sdk| fs::remove_file(sdk.join("sdk.yaml")).unwrap(),
            "error: toolchain `qairt`: cannot read {SDK}/sdk.yaml: No such file or directory (os error 2)",
            "hint: the SDK's version is the `version:` key",
        ),
        (
            "no version line",
            |sdk| fs::write(sdk.join("sdk.yaml"), "name: qairt-sim\n").unwrap(),
            "error: toolchain `qairt`: {SDK}/sdk.yaml has no `version:` line",
            "hint: expected a line like `version: ",
        ),
        (
            "too old",
            |sdk| fs::write(sdk.join("sdk.yaml"), "name: qairt-sim\nversion: 2.27.1.240801\n").unwrap(),
            "error: toolchain `qairt` is version 2.27.1.240801, older than the required 2.28",
            "hint: install QAIRT 2.28 or newer",
        ),
        (
            "too old, compared numerically",
            |sdk| fs::write(sdk.join("sdk.yaml"), "version: 2.9.10\n").unwrap(),
            "error: toolchain `qairt` is version 2.9.10, older than the required 2.28",
            "hint: install QAIRT 2.28 or newer",
        ),
    ];
    let built = Space::demo();
    let (keep, good_sdk) = sdk_copy();
    let n = build(&built, &[("QNN_SDK_ROOT", &good_sdk)]).count("ran");
    drop(keep);
    for (what, breaks, message, hint) in cases {
        let (_sdk_space, sdk) = sdk_copy();
        breaks(Path::new(&sdk));
        let message = message.replace("{SDK}", &sdk);
        for (s, had_state) in [(Space::demo(), false), (Space::at(built.path()), true)] {
            let where_ = toolchain_position(&s);
            for args in [&["all"][..], &["--check"][..]] {
                let before = s.snapshot();
                let out = run_with(&s, args, &[("QNN_SDK_ROOT", &sdk)]);
                assert_refused(&out, &s, &before, had_state);
                assert_eq!(
                    out.stderr.lines().next(),
                    Some(message.as_str()),
                    "{what} {args:?}\n{out}"
                );
                assert!(out.stderr.contains(&where_), "{what}: {where_}\n{out}");
                assert!(out.stderr.contains(hint), "{what}: {hint}\n{out}");
            }
        }
    }
    // Newer versions pass, compared part by part as numbers; the minimum itself passes.
    for version in ["2.28", "2.28.0", "2.100.0", "3.0"] {
        let (_sdk_space, sdk) = sdk_copy();
        fs::write(
            Path::new(&sdk).join("sdk.yaml"),
            format!("version: {version}\n"),
        )
        .unwrap();
        let s = Space::demo();
        let out = run_with(&s, &["--check"], &[("QNN_SDK_ROOT", &sdk)]);
        out.assert_ok();
        let out = run_with(&s, &["-n", "all"], &[("QNN_SDK_ROOT", &sdk)]);
        out.assert_ok();
        assert_eq!(out.count("would_run"), n, "{version}\n{out}");
    }
}

/// Regression: `--clean`, `--clean-dead`, `--list` and `--graph` verified the toolchain
/// and exited 2 once the SDK was gone, so a user could not clean or list after removing
/// it. They run no tool and compare no key: they work without it, and `--clean` still
/// removes exactly what qbuild made. A build, `-n`, `--status` and `--check` still refuse.
#[test]
fn a_missing_sdk_still_lets_list_graph_and_clean_work() {
    let s = Space::demo();
    let sources = s.snapshot();
    build(&s, &[]);
    let list = s.run(["--list", "all"]);
    let graph = s.qbuild(["--graph", "all"]).no_json().run();
    let gone = Space::new();
    let nowhere = gone.join("no-sdk").to_string_lossy().into_owned();
    let env = [("QNN_SDK_ROOT", nowhere.as_str())];
    let message = format!("error: toolchain `qairt`: root {nowhere} does not exist");
    for args in [&["all"][..], &["-n", "all"], &["--status"], &["--check"]] {
        let before = s.snapshot();
        let out = run_with(&s, args, &env);
        assert_refused(&out, &s, &before, true);
        assert_eq!(out.stderr.lines().next(), Some(message.as_str()), "{out}");
    }
    let out = run_with(&s, &["--list", "all"], &env);
    out.assert_ok();
    assert_eq!(out.stdout, list.stdout, "{out}");
    let out = s
        .qbuild(["--graph", "all"])
        .no_json()
        .env("QNN_SDK_ROOT", &nowhere)
        .run();
    out.assert_ok();
    assert_eq!(out.stdout, graph.stdout, "{out}");
    let built = s.snapshot();
    let out = run_with(&s, &["--clean", "-n"], &env);
    out.assert_ok();
    assert!(out.stderr.contains("qbuild: would remove "), "{out}");
    assert_same_files(&s.snapshot(), &built, "--clean -n removes nothing");
    run_with(&s, &["--clean-dead"], &env).assert_ok();
    assert_same_files(&s.snapshot(), &built, "--clean-dead: no dead jobs");
    let out = run_with(&s, &["--clean"], &env);
    out.assert_ok();
    assert!(!out.stderr.contains("kept"), "{out}");
    assert_same_files(&s.snapshot(), &sources, "--clean leaves the sources");
}

/// The same when the SDK's root comes from an environment variable that is not set (the
/// tools on PATH, as after QAIRT's `envsetup.sh`): `--list`, `--graph` and `--clean` work,
/// and what needs the toolchain names the variable, at its line and column.
#[test]
fn an_unset_sdk_variable_still_lets_list_graph_and_clean_work() {
    let s = space_with(
        r#"[toolchain]
name = "qairt"
root = "${env:QBUILD_TEST_UNSET_SDK}"
[rule.a]
outputs = ["a.txt"]
command = "echo a > a.txt"
"#,
    );
    let list = s.qbuild(["--list"]).no_json().run();
    list.assert_ok();
    assert!(list.stdout.starts_with("a (1 job)\n"), "{list}");
    let graph = s.qbuild(["--graph"]).no_json().run();
    graph.assert_ok();
    assert!(graph.stdout.starts_with("digraph"), "{graph}");
    s.qbuild(["--clean"]).no_json().run().assert_ok();
    for args in [&["all"][..], &["-n"], &["--check"]] {
        let out = s.qbuild(args.iter().copied()).no_json().run();
        out.assert_code(2);
        assert!(
            out.stderr
                .starts_with("error: environment variable `QBUILD_TEST_UNSET_SDK` is not set\n --> Qairtfile:3:9\n"),
            "{args:?}\n{out}"
        );
    }
    assert!(!s.exists("a.txt"));
}

#[test]
fn bumping_the_sdk_version_reruns_exactly_convert_quantize_and_context_binary() {
    let (_sdk_space, sdk) = sdk_copy();
    let env = [("QNN_SDK_ROOT", sdk.as_str())];
    let (s, n) = built_demo_with(&env);
    assert_noop(&s, n, &env);
    let yaml = Path::new(&sdk).join("sdk.yaml");
    let text = fs::read_to_string(&yaml).unwrap();
    assert!(text.contains("version: 2.31.0.250130"), "{text}");
    fs::write(
        &yaml,
        text.replace("version: 2.31.0.250130", "version: 2.32.0.250228"),
    )
    .unwrap();

    let dry = run_with(&s, &["-n", "--explain", "all"], &env);
    dry.assert_ok();
    assert!(
        dry.stderr
            .contains("toolchain changed: qairt 2.31.0.250130 -> qairt 2.32.0.250228"),
        "--explain names the toolchain\n{dry}"
    );
    let expected = union([all_converts(), all_quantizes(), all_binaries()]);
    assert_eq!(expected.len(), 20);
    assert_set(&dry.would_run(), &expected, "would run", &dry);

    let out = run_with(&s, &["all"], &env);
    out.assert_ok().assert_ran(&expected);
    assert_eq!(out.count("up_to_date"), n - 20, "{out}");
    assert_noop(&s, n, &env);

    // Back to the old version: the same jobs again (a key of its own, not a "newer" flag).
    fs::write(&yaml, text).unwrap();
    run_with(&s, &["all"], &env)
        .assert_ok()
        .assert_ran(&expected);
}

#[test]
fn a_rule_env_change_reruns_that_rule_only() {
    let s = Space::demo();
    s.replace(
        "Qairtfile",
        "command = \"${bin}/qairt-converter",
        "env = { QAIRT_LOG_LEVEL = \"info\" }\ncommand = \"${bin}/qairt-converter",
    );
    let n = build(&s, &[]).count("ran");
    s.replace(
        "Qairtfile",
        "QAIRT_LOG_LEVEL = \"info\"",
        "QAIRT_LOG_LEVEL = \"debug\"",
    );
    // The converter writes the same DLCs: early cutoff stops at convert.
    s.run(["all"]).assert_ok().assert_ran(&all_converts());
    assert_noop(&s, n, &[]);
    // The environment qbuild itself runs in is not part of any key.
    s.qbuild(["all"])
        .env("QAIRT_LOG_LEVEL", "trace")
        .run()
        .assert_nothing_ran(n);

    // The value reaches the command, and only the declaring rule reruns.
    let e = space_with(
        r#"
[rule.greet]
env = { GREETING = "hello" }
outputs = ["out/greet.txt"]
command = "echo \"$GREETING\" > out/greet.txt"

[rule.plain]
outputs = ["out/plain.txt"]
command = "echo plain > out/plain.txt"
"#,
    );
    e.run(["all"])
        .assert_ok()
        .assert_ran(&set(["greet", "plain"]));
    assert_eq!(e.read_string("out/greet.txt"), "hello\n");
    e.replace("Qairtfile", "\"hello\"", "\"bonjour\"");
    e.run(["all"]).assert_ok().assert_ran(&set(["greet"]));
    assert_eq!(e.read_string("out/greet.txt"), "bonjour\n");
}

#[test]
fn a_tools_file_change_reruns_the_rules_that_declare_it() {
    let (_sdk_space, sdk) = sdk_copy();
    let env = [("QNN_SDK_ROOT", sdk.as_str())];
    let s = Space::demo();
    // The context-binary generator loads the HTP backend library: make it part of the key.
    s.replace(
        "Qairtfile",
        "outputs = [\"artifacts/serialized_binaries/split_${split}.bin\"]",
        "outputs = [\"artifacts/serialized_binaries/split_${split}.bin\"]\ntools = [\"${sdk}/lib/x86_64-linux-clang/libQnnHtp.so\", \"${sdk}/lib/x86_64-linux-clang/libQnnModelDlc.so\"]",
    );
    let n = build(&s, &env).count("ran");
    assert_noop(&s, n, &env);

    let lib = Path::new(&sdk).join("lib/x86_64-linux-clang/libQnnHtp.so");
    let mut bytes = fs::read(&lib).unwrap();
    bytes.extend_from_slice(b"patched\n");
    fs::write(&lib, &bytes).unwrap();
    run_with(&s, &["all"], &env)
        .assert_ok()
        .assert_ran(&all_binaries());
    assert_noop(&s, n, &env);

    // A new timestamp alone changes nothing.
    let f = fs::OpenOptions::new().write(true).open(&lib).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    run_with(&s, &["all"], &env).assert_nothing_ran(n);

    // A tools file in the work folder, on a rule without the toolchain.
    let t = space_with(
        r#"
[rule.gen]
tools = ["tools/gen.sh"]
outputs = ["out/gen.txt"]
command = "sh tools/gen.sh > out/gen.txt"

[rule.other]
outputs = ["out/other.txt"]
command = "echo other > out/other.txt"
"#,
    );
    t.write("tools/gen.sh", "echo v1\n");
    t.run(["all"])
        .assert_ok()
        .assert_ran(&set(["gen", "other"]));
    t.write("tools/gen.sh", "echo v2\n");
    t.run(["all"]).assert_ok().assert_ran(&set(["gen"]));
    assert_eq!(t.read_string("out/gen.txt"), "v2\n");
}

// ---------------------------------------------------------------------------------------
// 4. The step sanity checker: `--check`, and the checks after each step.

/// One error of `qbuild --check`: a Qairtfile (alone in its work folder) and the exact
/// stderr. These are the examples `docs/qairtfile.md` shows under "Errors qbuild reports".
struct CheckCase {
    what: &'static str,
    qairtfile: &'static str,
    stderr: &'static str,
}

const CHECK_CASES: &[CheckCase] = &[
    CheckCase {
        what: "dependency cycle",
        qairtfile: r#"[rule.convert]
inputs = ["model_quantized.dlc"]
outputs = ["model.dlc"]
command = "cp model_quantized.dlc model.dlc"

[rule.quantize]
inputs = ["model.dlc"]
outputs = ["model_quantized.dlc"]
command = "cp model.dlc model_quantized.dlc"
"#,
        stderr: "error: dependency cycle: convert -> quantize -> convert
 --> Qairtfile:1:7
  |
1 | [rule.convert]
  |       ^^^^^^^
  = hint: `convert` (which writes `model.dlc`) ends up depending on its own output
",
    },
    CheckCase {
        what: "two rules write one path",
        qairtfile: r#"[rule.convert]
outputs = ["converted_model/model.dlc"]
command = "echo dlc > converted_model/model.dlc"

[rule.quantize]
outputs = ["converted_model/model.dlc"]
command = "echo qdlc > converted_model/model.dlc"
"#,
        stderr: "error: two rules write `converted_model/model.dlc`
 --> Qairtfile:6:12
  |
6 | outputs = [\"converted_model/model.dlc\"]
  |            ^^^^^^^^^^^^^^^^^^^^^^^^^^^
  = hint: `convert` already writes it (at Qairtfile:2:12); every path has one producer
",
    },
    CheckCase {
        what: "an input no rule writes and no file provides",
        qairtfile: r#"[rule.convert]
inputs = ["models/llama3.onnx"]
outputs = ["converted_model/llama3.dlc"]
command = "cp models/llama3.onnx converted_model/llama3.dlc"
"#,
        stderr: "error: input `models/llama3.onnx` of `convert` does not exist and no rule writes it
 --> Qairtfile:2:11
  |
2 | inputs = [\"models/llama3.onnx\"]
  |           ^^^^^^^^^^^^^^^^^^^^
  = hint: create it, fix the path, or add a rule whose outputs include it
",
    },
    CheckCase {
        what: "an output outside the work folder",
        qairtfile: r#"[rule.context_binary]
outputs = ["../serialized_binaries/split_1.bin"]
command = "echo bin > ../serialized_binaries/split_1.bin"
"#,
        stderr: "error: output `../serialized_binaries/split_1.bin` is outside the work folder
 --> Qairtfile:2:12
  |
2 | outputs = [\"../serialized_binaries/split_1.bin\"]
  |            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  = hint: outputs are relative paths inside the folder that holds the Qairtfile
",
    },
    CheckCase {
        what: "a link pointing outside the work folder",
        qairtfile: r#"[rule.split]
outputs = ["splits/model_1_of_4.onnx"]
command = "echo onnx > splits/model_1_of_4.onnx"
links = [{ link = "splits/model_1_of_4.encodings", to = "/data/llama3.encodings" }]
"#,
        stderr: "error: link target `/data/llama3.encodings` is outside the work folder
 --> Qairtfile:4:57
  |
4 | links = [{ link = \"splits/model_1_of_4.encodings\", to = \"/data/llama3.encodings\" }]
  |                                                         ^^^^^^^^^^^^^^^^^^^^^^^^
  = hint: links point inside the work folder, and qbuild writes them relative, so the folder can move
",
    },
    CheckCase {
        what: "an unused variable",
        qairtfile: r#"[vars]
cl = 4096
num_splits = 4

[rule.export]
outputs = ["ar128-cl${cl}.onnx"]
command = "echo onnx > ${outputs}"
"#,
        stderr: "error: variable `num_splits` is never used
 --> Qairtfile:3:1
  |
3 | num_splits = 4
  | ^^^^^^^^^^
  = hint: remove it, or use it
",
    },
    CheckCase {
        what: "an undefined variable",
        qairtfile: r#"[vars]
num_splits = 4

[rule.split]
matrix = { split = [1, 2, 3, 4] }
outputs = ["splits/model_${split}_of_${num_split}.onnx"]
command = "echo onnx > ${outputs}"
"#,
        stderr: "error: unknown variable `num_split`
 --> Qairtfile:6:38
  |
6 | outputs = [\"splits/model_${split}_of_${num_split}.onnx\"]
  |                                      ^^^^^^^^^^^^
  = hint: did you mean `num_splits`?
",
    },
];

#[test]
fn check_reports_each_error_with_its_position_and_runs_nothing() {
    for c in CHECK_CASES {
        let s = space_with(c.qairtfile);
        let before = s.snapshot();
        let out = s.run(["--check"]);
        assert_refused(&out, &s, &before, false);
        assert_eq!(out.stderr, c.stderr, "{}\n{out}", c.what);
    }
}

#[test]
fn check_names_a_longer_cycle() {
    let s = space_with(
        r#"[rule.a]
inputs = ["b.txt"]
outputs = ["a.txt"]
command = "cp b.txt a.txt"

[rule.b]
inputs = ["c.txt"]
outputs = ["b.txt"]
command = "cp c.txt b.txt"

[rule.c]
inputs = ["a.txt"]
outputs = ["c.txt"]
command = "cp a.txt c.txt"
"#,
    );
    let before = s.snapshot();
    let out = s.run(["--check"]);
    assert_refused(&out, &s, &before, false);
    let first = out.stderr.lines().next().unwrap_or_default();
    assert!(
        first == "error: dependency cycle: a -> b -> c -> a"
            || first == "error: dependency cycle: a -> c -> b -> a",
        "the cycle is named, every rule once, closing on the first\n{out}"
    );
    assert!(out.stderr.contains("--> Qairtfile:1:7\n"), "{out}");
}

#[test]
fn check_refuses_missing_inputs_of_the_demo_and_passes_the_example() {
    // The example, in a folder with its sources: valid, and nothing is built or recorded.
    let s = Space::demo();
    let before = s.snapshot();
    let out = s.run(["--check"]);
    out.assert_ok();
    assert_eq!(out.stdout, "", "{out}");
    assert!(
        out.stderr.starts_with("qbuild: Qairtfile is valid: "),
        "{out}"
    );
    support::assert_same_files(&s.snapshot(), &before, "--check writes nothing");
    assert!(!s.exists(".qbuild"));

    // Straight from the repository, with -f.
    let out = Space::at(Path::new(REPO))
        .qbuild(["-f", "Qairtfile.example", "--check"])
        .run();
    out.assert_ok();
    assert!(
        out.stderr
            .starts_with("qbuild: Qairtfile.example is valid: "),
        "{out}"
    );

    // A source gone: named, with the position of the input that reads it.
    s.remove("models/llama3.onnx");
    let text = s.read_string("Qairtfile");
    let (line, _) = position(&text, "inputs = [\"${base_onnx}\"");
    let before = s.snapshot();
    let out = s.run(["--check"]);
    assert_refused(&out, &s, &before, false);
    assert!(
        out.stderr.starts_with(
            "error: input `models/llama3.onnx` of `export ar=128` does not exist and no rule writes it\n"
        ),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!("--> Qairtfile:{line}:")),
        "{out}"
    );
}

/// Regression (was a bug): a link whose target no rule writes and no file provides is an
/// input nothing provides, but `--check` calls the Qairtfile valid; the build then runs
/// the jobs that do not need the link and fails only at the link job ("dangling symlink").
/// A typo in the demo's `test_vectors` path shows it.
#[test]
fn check_refuses_a_link_whose_target_nothing_provides() {
    let s = Space::demo();
    s.replace(
        "Qairtfile",
        "test_vectors = \"models/test_vectors\"",
        "test_vectors = \"models/test_vector\"",
    );
    let before = s.snapshot();
    let out = s.run(["--check"]);
    assert_refused(&out, &s, &before, false);
    assert!(
        out.stderr.contains("models/test_vector") && out.stderr.contains("--> Qairtfile:"),
        "--check names the missing link target and where it is declared\n{out}"
    );
}

/// The Qairtfile of the toolchain examples in the docs, and the SDK path they show.
const TOOLCHAIN_QAIRTFILE: &str = r#"[vars]
sdk = "${env:QNN_SDK_ROOT:-/opt/qcom/aistack/qairt/2.31.0.250130}"

[toolchain]
name = "qairt"
root = "${sdk}"
min_version = "2.28"
tools = ["bin/x86_64-linux-clang/qairt-converter", "bin/x86_64-linux-clang/qairt-quantizer"]

[rule.convert]
toolchain = true
outputs = ["converted_model/llama3.dlc"]
command = "${sdk}/bin/x86_64-linux-clang/qairt-converter --input_network models/llama3.onnx -o ${outputs}"
"#;
const DOC_SDK: &str = "/opt/qcom/aistack/qairt/2.31.0.250130";

type BreakSdk = fn(&Path);

/// A toolchain error as the docs show it (the SDK copy's path replaced by `DOC_SDK`).
const TOOLCHAIN_CASES: &[(&str, BreakSdk, &str)] = &[
    (
        "missing root",
        |sdk| fs::remove_dir_all(sdk).unwrap(),
        "error: toolchain `qairt`: root /opt/qcom/aistack/qairt/2.31.0.250130 does not exist
 --> Qairtfile:4:2
  |
4 | [toolchain]
  |  ^^^^^^^^^
  = hint: set QNN_SDK_ROOT to the QAIRT SDK folder (the one holding sdk.yaml and bin/)
",
    ),
    (
        "missing tool",
        |sdk| fs::remove_file(sdk.join("bin/x86_64-linux-clang/qairt-quantizer")).unwrap(),
        "error: toolchain `qairt`: tool /opt/qcom/aistack/qairt/2.31.0.250130/bin/x86_64-linux-clang/qairt-quantizer is missing or not executable
 --> Qairtfile:4:2
  |
4 | [toolchain]
  |  ^^^^^^^^^
  = hint: is QNN_SDK_ROOT the right SDK, and is it complete?
",
    ),
    (
        "no version line",
        |sdk| fs::write(sdk.join("sdk.yaml"), "name: qairt\n").unwrap(),
        "error: toolchain `qairt`: /opt/qcom/aistack/qairt/2.31.0.250130/sdk.yaml has no `version:` line
 --> Qairtfile:4:2
  |
4 | [toolchain]
  |  ^^^^^^^^^
  = hint: expected a line like `version: 2.31.0.250130`
",
    ),
    (
        "too old",
        |sdk| fs::write(sdk.join("sdk.yaml"), "name: qairt\nversion: 2.27.1.240801\n").unwrap(),
        "error: toolchain `qairt` is version 2.27.1.240801, older than the required 2.28
 --> Qairtfile:4:2
  |
4 | [toolchain]
  |  ^^^^^^^^^
  = hint: install QAIRT 2.28 or newer and point QNN_SDK_ROOT at it
",
    ),
];

#[test]
fn toolchain_errors_read_as_the_docs_show_them() {
    for (what, breaks, expected) in TOOLCHAIN_CASES {
        let (_sdk_space, sdk) = sdk_copy();
        breaks(Path::new(&sdk));
        let s = space_with(TOOLCHAIN_QAIRTFILE);
        let before = s.snapshot();
        let out = run_with(&s, &["--check"], &[("QNN_SDK_ROOT", &sdk)]);
        assert_refused(&out, &s, &before, false);
        assert_eq!(
            &out.stderr.replace(&sdk, DOC_SDK),
            expected,
            "{what}\n{out}"
        );
    }
    // And the intact SDK passes.
    let (_sdk_space, sdk) = sdk_copy();
    let s = space_with(TOOLCHAIN_QAIRTFILE);
    run_with(&s, &["--check"], &[("QNN_SDK_ROOT", &sdk)]).assert_ok();
}

#[test]
fn the_docs_show_each_check_error() {
    let doc = fs::read_to_string(Path::new(REPO).join("docs/qairtfile.md")).unwrap();
    let at = doc
        .find("\n## Errors qbuild reports\n")
        .expect("docs/qairtfile.md has a section `## Errors qbuild reports`");
    let section = &doc[at..];
    for c in CHECK_CASES {
        assert!(
            section.contains(c.qairtfile),
            "the docs show the Qairtfile of `{}`",
            c.what
        );
        assert!(
            section.contains(c.stderr),
            "the docs show the output of `{}`:\n{}",
            c.what,
            c.stderr
        );
    }
    assert!(
        section.contains(TOOLCHAIN_QAIRTFILE),
        "the toolchain example"
    );
    for (what, _, stderr) in TOOLCHAIN_CASES {
        assert!(
            section.contains(stderr),
            "the docs show the toolchain error `{what}`:\n{stderr}"
        );
    }
}

/// Regression (was a bug): a missing `tools` file is reported at the rule's `inputs` (here
/// underlining `"in.txt"`, which exists) instead of at the `tools` entry.
#[test]
fn check_points_at_a_missing_tools_file() {
    let q = r#"[rule.gen]
inputs = ["in.txt"]
outputs = ["out/gen.txt"]
tools = ["tools/gen.sh"]
command = "sh tools/gen.sh < in.txt > out/gen.txt"
"#;
    let s = space_with(q);
    s.write("in.txt", "x\n");
    let before = s.snapshot();
    let out = s.run(["--check"]);
    assert_refused(&out, &s, &before, false);
    assert!(
        out.stderr.starts_with(
            "error: input `tools/gen.sh` of `gen` does not exist and no rule writes it\n"
        ),
        "{out}"
    );
    assert!(
        out.stderr.contains(" --> Qairtfile:4:10\n"),
        "the position of `\"tools/gen.sh\"`\n{out}"
    );
}

/// Regression (was a bug): with several inputs, a missing one is reported at the first
/// input (the caret spans the whole list), not at the one that is missing.
#[test]
fn check_points_at_the_missing_input_among_several() {
    let q = r#"[rule.convert]
inputs = ["models/llama3.encodings", "models/llama3.onnx"]
outputs = ["converted_model/llama3.dlc"]
command = "cat ${inputs} > ${outputs}"
"#;
    let s = space_with(q);
    s.write("models/llama3.encodings", "{}");
    let before = s.snapshot();
    let out = s.run(["--check"]);
    assert_refused(&out, &s, &before, false);
    assert!(
        out.stderr.starts_with(
            "error: input `models/llama3.onnx` of `convert` does not exist and no rule writes it\n"
        ),
        "{out}"
    );
    let (line, col) = position(q, "\"models/llama3.onnx\"");
    assert!(
        out.stderr
            .contains(&format!(" --> Qairtfile:{line}:{col}\n")),
        "the position of the missing input, {line}:{col}\n{out}"
    );
}

#[test]
fn a_step_that_does_not_write_a_declared_output_fails_naming_it() {
    let s = space_with(
        r#"
[rule.split]
outputs = ["splits/model_1_of_2.onnx", "splits/model_2_of_2.onnx"]
command = "mkdir -p splits && echo one > splits/model_1_of_2.onnx"

[rule.convert]
inputs = ["splits/model_2_of_2.onnx"]
outputs = ["converted/model_2.dlc"]
command = "cp splits/model_2_of_2.onnx converted/model_2.dlc"
"#,
    );
    let out = s.run(["all"]);
    out.assert_code(1);
    assert_set(&out.failed(), &set(["split"]), "failed jobs", &out);
    assert_eq!(out.count("skipped"), 1, "its dependent does not run\n{out}");
    let err = job_error(&out, "split");
    assert!(
        err.contains("did not write the declared output splits/model_2_of_2.onnx"),
        "{err}"
    );
    assert!(out.stderr.contains("splits/model_2_of_2.onnx"), "{out}");
    assert!(
        !s.exists("splits/model_1_of_2.onnx"),
        "the partial output is removed\n{out}"
    );
    // Nothing was recorded: it fails again.
    s.run(["all"]).assert_code(1);
}

#[test]
fn an_empty_output_file_or_folder_fails_the_step_unless_allowed() {
    // (rule, its output, a command that leaves it empty, what the failure says)
    let cases = [
        (
            "quantize",
            "compiled_model/model_quantized.dlc",
            "mkdir -p compiled_model && : > compiled_model/model_quantized.dlc",
            "compiled_model/model_quantized.dlc is empty",
        ),
        // A tool that made its output folder and wrote nothing in it.
        (
            "vectors",
            "gen/vectors",
            "mkdir -p gen/vectors",
            "output folder gen/vectors is empty",
        ),
    ];
    for (rule, output, command, says) in cases {
        let s = space_with(&format!(
            "[rule.{rule}]\noutputs = [\"{output}\"]\ncommand = \"{command}\"\n"
        ));
        let out = s.run(["all"]);
        out.assert_code(1);
        assert_set(&out.failed(), &set([rule]), "failed jobs", &out);
        let err = job_error(&out, rule);
        assert!(err.contains(says) && err.contains("allow_empty"), "{err}");
        assert!(!s.exists(output), "the empty output is removed\n{out}");

        s.replace(
            "Qairtfile",
            &format!("[rule.{rule}]\n"),
            &format!("[rule.{rule}]\nallow_empty = true\n"),
        );
        s.run(["all"]).assert_ok().assert_ran(&set([rule]));
        let m = fs::symlink_metadata(s.join(output)).expect("the output is kept");
        assert!(m.is_dir() || m.len() == 0, "{output}: {m:?}");
        assert_noop(&s, 1, &[]);
    }
    // One entry is enough, even an empty file in it (its contents are the command's affair).
    let e = space_with(
        r#"
[rule.vectors]
outputs = ["gen/vectors"]
command = "mkdir -p gen/vectors && : > gen/vectors/input_0.raw"
"#,
    );
    e.run(["all"]).assert_ok().assert_ran(&set(["vectors"]));
}

#[test]
fn a_failing_check_fails_the_step_and_removes_its_output() {
    let s = space_with(
        r#"
[rule.quantize]
outputs = ["compiled_model/model_quantized.dlc"]
command = "mkdir -p compiled_model && echo bad > compiled_model/model_quantized.dlc"
check = "grep -q good ${outputs}"

[rule.binary]
inputs = ["compiled_model/model_quantized.dlc"]
outputs = ["bin/split_1.bin"]
command = "cp compiled_model/model_quantized.dlc bin/split_1.bin"
"#,
    );
    let out = s.run(["all"]);
    out.assert_code(1);
    assert_set(&out.failed(), &set(["quantize"]), "failed jobs", &out);
    assert_eq!(out.count("skipped"), 1, "{out}");
    let err = job_error(&out, "quantize");
    assert!(
        err.contains("check") && err.contains("grep -q good"),
        "{err}"
    );
    assert!(!s.exists("compiled_model/model_quantized.dlc"));
    assert!(!s.exists("bin/split_1.bin"));

    s.replace("Qairtfile", "echo bad", "echo good");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["quantize", "binary"]));
    assert_noop(&s, 2, &[]);

    // The demo: a quantizer that "succeeds" but leaves a truncated DLC is caught by its
    // `qairt-dlc-info` check; nothing downstream runs on the broken file.
    let d = Space::demo();
    d.replace(
        "Qairtfile",
        "--act_bitwidth 16 --bias_bitwidth 32\"",
        "--act_bitwidth 16 --bias_bitwidth 32 && truncate -s -1 ${outputs}\"",
    );
    let out = d.run(["-k", "all"]);
    out.assert_code(1);
    assert_set(&out.failed(), &all_quantizes(), "failed jobs", &out);
    assert_eq!(
        out.count("skipped"),
        4,
        "the context binaries do not run\n{out}"
    );
    for ar in ARS {
        for i in SPLITS {
            assert!(!d.exists(&qdlc(ar, i)), "{} is removed", qdlc(ar, i));
            let err = job_error(&out, &quantize(ar, i));
            assert!(err.contains("qairt-dlc-info"), "{err}");
        }
    }
    assert!(
        out.stderr.contains("truncated"),
        "the check's log tail is shown\n{out}"
    );
}

/// Regression (was a bug): a rerun whose command exits 0 without writing its output is
/// accepted when the previous run's output is still on disk: the old file passes the
/// "every declared output exists" check, is recorded as the new result, and its
/// dependents build on it. (In the pipeline: a quantize rerun with new flags whose tool
/// silently writes nothing leaves the old quantized DLC, and the context binary is built
/// from it as if it were current.)
#[test]
fn a_rerun_that_writes_nothing_fails_even_if_an_old_output_is_left() {
    let s = space_with(
        r#"
[rule.quantize]
outputs = ["compiled_model/model_quantized.dlc"]
command = "mkdir -p compiled_model && echo act_bitwidth=16 > compiled_model/model_quantized.dlc"

[rule.binary]
inputs = ["compiled_model/model_quantized.dlc"]
outputs = ["bin/split_1.bin"]
command = "cp compiled_model/model_quantized.dlc bin/split_1.bin"
"#,
    );
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["quantize", "binary"]));
    // The command changes (so the step must rerun), and the new command writes nothing.
    s.replace(
        "Qairtfile",
        "command = \"mkdir -p compiled_model && echo act_bitwidth=16 > compiled_model/model_quantized.dlc\"",
        "command = \"echo quantizing with act_bitwidth=8\"",
    );
    let out = s.run(["all"]);
    out.assert_code(1);
    assert_set(&out.failed(), &set(["quantize"]), "failed jobs", &out);
    let err = job_error(&out, "quantize");
    assert!(
        err.contains("compiled_model/model_quantized.dlc"),
        "the error names the output that was not written: {err}"
    );
}

/// A command that now writes nothing fails as a clean build does, for a folder output (its
/// tree is compared before and after) and for a symlink output qbuild made (removed before
/// the run): it used to pass the old folder and link off as new, exit 0. A folder output
/// is never removed: a file kept in it by hand survives a rerun, and a failed rerun keeps
/// the previous folder (neither held when folders were cleared before each rerun).
#[test]
fn a_rerun_that_writes_nothing_fails_and_a_folder_output_keeps_what_it_holds() {
    let qf = r#"
[rule.maybe]
inputs = ["s"]
outputs = ["d", "lnk"]
command = "if grep -q yes s; then mkdir -p d; cp s d/f; ln -sfn s lnk; fi"
[rule.gen]
inputs = ["t"]
outputs = ["gen"]
command = "mkdir -p gen && cp t gen/x && grep -q ok t"
"#;
    let s = Space::new();
    s.write("Qairtfile", qf)
        .write("s", "yes1\n")
        .write("t", "ok 1\n")
        .write("gen/notes.txt", "mine\n");
    s.run(["all"]).assert_ran(&set(["maybe", "gen"]));

    // The command writes nothing now: the job fails, and the old folder is not recorded
    // as its result (the link qbuild made is gone).
    s.write("s", "no\n");
    let out = s.run(["maybe"]);
    out.assert_code(1);
    assert!(
        out.stderr.contains(
            "the command succeeded but did not write the declared output d (the folder there is left from before"
        ),
        "{out}"
    );
    assert!(!s.is_symlink("lnk"), "{out}");
    assert_eq!(s.run(["-n", "maybe"]).would_run(), set(["maybe"]));

    // A rerun keeps the file kept in the folder by hand; a failed one keeps the folder.
    s.write("t", "ok 2\n");
    s.run(["gen"]).assert_ran(&set(["gen"]));
    assert_eq!(s.read_string("gen/notes.txt"), "mine\n");
    assert_eq!(s.read_string("gen/x"), "ok 2\n");
    s.write("t", "bad\n");
    s.run(["gen"]).assert_code(1);
    assert_eq!(s.read_string("gen/notes.txt"), "mine\n");
}

/// An output is never written through a symlink qbuild did not make, even one that stays
/// inside the work folder: a folder on its path linked to a source folder, or a link put
/// at the output path by hand. The sources it would have overwritten stay as they were,
/// and `--clean` does not delete through such a folder either.
#[test]
fn an_output_is_never_written_through_a_symlink_to_a_source_inside_the_work_folder() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.mk]
inputs = ["s"]
outputs = ["o"]
command = "tr a-z A-Z < s > o"
[rule.g]
inputs = ["s"]
outputs = ["gen/o"]
command = "mkdir -p gen && cp s gen/o"
"#,
    );
    s.write("s", "abc\n")
        .write("src/o", "mine\n")
        .write("src2", "source2\n");
    symlink("src", s.join("gen")).expect("symlink");
    // -k: without it, g's failure would stop mk, racing it.
    let out = s.run(["-k", "all"]);
    out.assert_code(1);
    assert!(
        out.stderr.contains(
            "output gen/o would be written to {} (a folder on its path is a symlink)"
                .replace(
                    "{}",
                    &s.path()
                        .canonicalize()
                        .expect("real path")
                        .join("src")
                        .display()
                        .to_string()
                )
                .as_str()
        ),
        "{out}"
    );
    assert_eq!(s.read_string("src/o"), "mine\n");
    assert_eq!(out.ran(), set(["mk"]), "{out}");

    // A link put at a built output's path by hand, to another source.
    s.remove("o");
    symlink("src2", s.join("o")).expect("symlink");
    s.write("s", "abd\n");
    let out = s.run(["mk"]);
    out.assert_code(1);
    assert!(
        out.stderr
            .contains("output o is a symlink to src2 that qbuild did not make"),
        "{out}"
    );
    assert_eq!(s.read_string("src2"), "source2\n");

    // --clean keeps what lies behind the linked folder.
    fs::remove_file(s.join("gen")).expect("rm link");
    s.run(["g"]).assert_ran(&set(["g"]));
    fs::rename(s.join("gen/o"), s.join("src/o")).expect("move");
    fs::remove_dir(s.join("gen")).expect("rmdir");
    symlink("src", s.join("gen")).expect("symlink");
    let out = s.qbuild(["--clean", "g"]).no_json().run();
    assert!(
        out.stderr
            .contains("kept gen/o: a folder on its path is a symlink"),
        "{out}"
    );
    assert_eq!(s.read_string("src/o"), "abd\n");
}

/// Regression (was a bug, from a refactor that took the outputs' stats as it unlinked
/// them): a job with an output that has another hard link and cannot be unlinked (here
/// immutable, `chattr +i`) fails before its command starts, and its other outputs, the
/// last run's and untouched, were removed as partial ones.
#[test]
fn an_output_that_cannot_be_unlinked_leaves_the_other_outputs_alone() {
    /// Takes `chattr +i` off again, whatever the test did.
    struct Mutable(PathBuf);
    impl Drop for Mutable {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .status();
        }
    }
    let s = space_with(
        "[rule.a]\ninputs = [\"v\"]\noutputs = [\"a.txt\", \"b.txt\"]\ncommand = \"cat v > a.txt; cat v > b.txt\"\n",
    );
    s.write("v", "1\n");
    s.run(["all"]).assert_ok();
    fs::hard_link(s.join("a.txt"), s.join("a-copy.txt")).expect("hard link");
    let _undo = Mutable(s.join("a.txt"));
    let immutable = std::process::Command::new("chattr")
        .arg("+i")
        .arg(s.join("a.txt"))
        .status();
    if !immutable.is_ok_and(|st| st.success()) || fs::remove_file(s.join("a.txt")).is_ok() {
        return support::skip(
            "an_output_that_cannot_be_unlinked_leaves_the_other_outputs_alone",
            "chattr +i is not available here",
        );
    }
    s.write("v", "2\n");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(
        out.stderr.contains("cannot remove the old output a.txt"),
        "{out}"
    );
    assert_eq!(
        s.read("b.txt"),
        b"1\n",
        "the other output is left as it was\n{out}"
    );
    assert_eq!(s.read("a-copy.txt"), b"1\n");
}

/// A rerun does not write through a hard link someone made to a built output: the other
/// name keeps its bytes.
#[test]
fn a_rerun_never_changes_another_hard_link_to_its_output() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.mk]\ninputs = [\"s\"]\noutputs = [\"o\"]\ncommand = \"tr a-z A-Z < s > o\"\n",
    );
    s.write("s", "abc\n");
    s.run(["all"]).assert_ran(&set(["mk"]));
    fs::hard_link(s.join("o"), s.join("o.bak")).expect("hard link");
    s.write("s", "xyz\n");
    s.run(["all"]).assert_ran(&set(["mk"]));
    assert_eq!(s.read_string("o"), "XYZ\n");
    assert_eq!(s.read_string("o.bak"), "ABC\n");
}

/// A link inside an input folder that leads into `.qbuild/` (which changes on every run)
/// fails the job, naming the link: it used to make the job rerun on every run.
#[test]
fn a_link_into_the_state_folder_inside_an_input_folder_fails_its_reader() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.c]\ninputs = [\"sub\"]\noutputs = [\"o\"]\ncommand = \"echo ok > o\"\n",
    );
    s.write("sub/f", "1\n");
    symlink("../.qbuild", s.join("sub/st")).expect("symlink");
    // Regression: the same by way of the folder above and back in (`../<work>/.qbuild`)
    // passed, and the reader reran on every run.
    let name = s.path().file_name().expect("name").to_string_lossy();
    let back = format!("../../{name}/.qbuild/lock");
    for link in ["st", "back"] {
        if link == "back" {
            symlink(&back, s.join("sub/back")).expect("symlink");
        }
        for _ in 0..2 {
            let out = s.run(["all"]);
            out.assert_code(1);
            assert!(
                out.stderr.contains(&format!(
                    "sub/{link} is a symlink into qbuild's own state folder"
                )),
                "{out}"
            );
            assert!(out.ran().is_empty(), "{out}");
        }
        s.remove(&format!("sub/{link}"));
    }
    s.run(["all"]).assert_ok().assert_ran(&set(["c"]));
}

/// A folder output holding a link its command made: the link's text is what the job made,
/// so an edit behind the link reruns the folder's readers only (it reran the job that made
/// the folder, as if its output had been edited: in the pipeline, a split rerun for a test
/// vector). Re-pointing the link, or editing a file of the folder, still reruns its maker.
#[test]
fn a_link_inside_a_folder_output_is_part_of_it_by_its_text() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.split]
inputs = ["model.onnx"]
outputs = ["splits"]
command = "mkdir -p splits; cat model.onnx > splits/model_1.onnx; ln -sfn ../test_vectors splits/tv_1"
[rule.use]
inputs = ["splits"]
outputs = ["use.txt"]
command = "cat splits/model_1.onnx splits/tv_1/* > use.txt"
"#,
    )
    .write("model.onnx", "m\n")
    .write("test_vectors/in.raw", "in1\n");
    s.run(["all"])
        .assert_ok()
        .assert_ran(&set(["split", "use"]));
    s.write("test_vectors/in.raw", "in2\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["use"]));
    assert_eq!(s.read_string("use.txt"), "m\nin2\n");
    s.run(["all"]).assert_nothing_ran(2);
    // The link re-pointed by hand: the folder is not what split made.
    s.remove("splits/tv_1");
    symlink("../model.onnx", s.join("splits/tv_1")).expect("symlink");
    s.run(["all"]).assert_ok().assert_ran(&set(["split"]));
    assert_eq!(s.read_string("use.txt"), "m\nin2\n");
    s.run(["all"]).assert_nothing_ran(2);
}

/// Regression: a link's `..` was resolved on its text, not from where the folders before
/// it lead, so `sub/../d` (with `sub` a link elsewhere) took the key of the input folder's
/// own `d`, and edits behind it were never seen: the cached hash of the other `d` stood in.
#[test]
fn a_dot_dot_after_a_linked_folder_in_a_link_is_resolved_as_the_kernel_does() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.use]\ninputs = [\"tv\"]\noutputs = [\"use.txt\"]\ncommand = \"cat tv/d/* tv/l/* > use.txt\"\n",
    );
    s.write("tv/d/f", "A\n")
        .write("deep/x/keep", "")
        .write("deep/d/f", "B1\n");
    symlink("../deep/x", s.join("tv/sublink")).expect("symlink");
    symlink("sublink/../d", s.join("tv/l")).expect("symlink");
    s.run(["all"]).assert_ok().assert_ran(&set(["use"]));
    assert_eq!(s.read_string("use.txt"), "A\nB1\n");
    s.write("deep/d/f", "B2\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["use"]));
    assert_eq!(s.read_string("use.txt"), "A\nB2\n");
    s.run(["all"]).assert_nothing_ran(1);
}

/// A source that is a symlink to another job's output would need that job first, but jobs
/// are ordered by the paths they declare: its readers fail naming the link (on a fresh
/// tree they failed on a "dangling" link and never started the producer; once built, they
/// stayed "up to date" after the producer reran), and `--check` refuses it.
#[test]
fn a_source_symlink_to_another_jobs_output_fails_its_readers_by_name() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.g]
inputs = ["s"]
outputs = ["gen/o"]
command = "mkdir -p gen && cp s gen/o"
[rule.r1]
inputs = ["lk"]
outputs = ["r1.txt"]
command = "cat lk > r1.txt"
"#,
    );
    s.write("s", "1\n");
    symlink("gen/o", s.join("lk")).expect("symlink");
    let why = "lk is a symlink to gen/o, which `g` writes";
    let out = s.qbuild(["--check"]).no_json().run();
    out.assert_code(2);
    assert!(
        out.stderr.contains(why) && out.stderr.contains("--> Qairtfile:7:11"),
        "{out}"
    );
    for _ in 0..2 {
        let out = s.run(["-k", "all"]);
        out.assert_code(1);
        assert_eq!(out.failed(), set(["r1"]), "{out}");
        assert!(out.stderr.contains(why), "{out}");
    }
}

/// A folder put by hand where a file output was: the rerun's `cp s o` would copy into it
/// and pass it off as the file. The job fails naming it, and keeps failing until it goes;
/// the folder's contents stay.
#[test]
fn a_folder_put_where_a_file_output_was_fails_the_job() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.mk]\ninputs = [\"s\"]\noutputs = [\"o\"]\ncommand = \"cp s o\"\n",
    );
    s.write("s", "a\n");
    s.run(["all"]).assert_ran(&set(["mk"]));
    s.remove("o");
    s.write("o/x", "mine\n");
    for _ in 0..2 {
        let out = s.run(["all"]);
        out.assert_code(1);
        assert!(
            out.stderr
                .contains("output o was a file and is now a folder that qbuild did not make"),
            "{out}"
        );
        assert_eq!(s.files(), vec!["Qairtfile", "o/x", "s"]);
    }
    fs::remove_dir_all(s.join("o")).expect("rm");
    s.run(["all"]).assert_ran(&set(["mk"]));
    assert_eq!(s.read_string("o"), "a\n");
}

/// An error of the OS deep inside an input folder names the entry (it said only
/// "cannot read input in: File name too long").
#[test]
fn an_os_error_inside_an_input_folder_names_the_entry() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.c]\ninputs = [\"in\"]\noutputs = [\"o\"]\ncommand = \"echo > o\"\n",
    );
    // Past PATH_MAX (4096): a shell makes it one level at a time, from inside.
    let name = "d".repeat(100);
    s.mkdir("in");
    let cname = std::ffi::CString::new(name.clone()).expect("name");
    let inside =
        std::ffi::CString::new(s.join("in").into_os_string().into_encoded_bytes()).expect("path");
    // SAFETY: plain *at calls on descriptors this loop opens and closes.
    unsafe {
        let mut fd = libc::open(inside.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
        for _ in 0..45 {
            assert!(fd >= 0);
            assert_eq!(libc::mkdirat(fd, cname.as_ptr(), 0o755), 0);
            let next = libc::openat(fd, cname.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            libc::close(fd);
            fd = next;
        }
        assert!(fd >= 0);
        libc::close(fd);
    }
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(
        out.stderr
            .contains(&format!("cannot read input in: in/{name}/")),
        "{out}"
    );
    assert!(out.stderr.contains("File name too long"), "{out}");
}

/// A folder output reached through a symlinked folder is refused before anything is
/// removed: the old folder behind the link (moved there with its bytes intact) stays.
#[test]
fn nothing_is_cleared_through_a_symlinked_folder_before_the_refusal() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        "[rule.g]\ninputs = [\"s\"]\noutputs = [\"gen/d\"]\ncommand = \"mkdir -p gen/d && cp s gen/d/f\"\n",
    );
    s.write("s", "1\n");
    s.run(["all"]).assert_ran(&set(["g"]));
    fs::rename(s.join("gen"), s.join("src")).expect("move");
    symlink("src", s.join("gen")).expect("symlink");
    s.write("s", "2\n");
    let out = s.run(["all"]);
    out.assert_code(1);
    assert!(
        out.stderr.contains("a folder on its path is a symlink"),
        "{out}"
    );
    assert_eq!(s.read_string("src/d/f"), "1\n");
}

/// The source-link check follows links as the kernel does: a chain of links to another
/// job's output is caught (only the first hop was looked at, and the build read a stale
/// target), and a `..` in a link reached through a symlinked folder is resolved from the
/// link's real folder (a valid source was refused).
#[test]
fn the_source_link_check_follows_chains_and_real_folders() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.gen]
outputs = ["cfg.txt"]
command = "echo generated > cfg.txt"
[rule.r]
inputs = ["cur/cfg.link"]
outputs = ["r.out"]
command = "cat cur/cfg.link > r.out"
[rule.c]
inputs = ["a.lnk"]
outputs = ["c.out"]
command = "cat a.lnk > c.out"
"#,
    );
    s.write("data/cfg.txt", "source in data\n").mkdir("data/v2");
    symlink("../cfg.txt", s.join("data/v2/cfg.link")).expect("symlink");
    symlink("data/v2", s.join("cur")).expect("symlink");
    symlink("b.lnk", s.join("a.lnk")).expect("symlink");
    symlink("cfg.txt", s.join("b.lnk")).expect("symlink");
    let out = s.run(["-k", "all"]);
    assert_eq!(out.ran(), set(["gen", "r"]), "{out}");
    assert_eq!(out.failed(), set(["c"]), "{out}");
    assert!(
        out.stderr
            .contains("a.lnk is a symlink to cfg.txt, which `gen` writes"),
        "{out}"
    );
    assert_eq!(s.read_string("r.out"), "source in data\n");
}

/// A file inside a folder another job writes, named as an input or as a link's target, is
/// waited for and re-read once that job ran: a clean build works (it failed with "does not
/// exist"), `--check` accepts it (also a folder input only other jobs' outputs make), and
/// after an edit one run brings the reader up to date (it needed two, and read the old file).
#[test]
fn a_file_inside_another_jobs_folder_output_is_waited_for() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.fo]
inputs = ["v"]
outputs = ["fold"]
command = "sleep 0.3; mkdir -p fold && cp v fold/v"
[rule.rx]
inputs = ["fold/v"]
outputs = ["rx"]
command = "cat fold/v > rx"
[rule.ln]
links = [{ link = "fl", to = "fold/v" }]
[rule.rd]
inputs = ["fl"]
outputs = ["rd"]
command = "cat fl > rd"
[rule.b]
outputs = ["sha2/x"]
command = "mkdir -p sha2; echo x > sha2/x"
[rule.c]
inputs = ["sha2"]
outputs = ["shaz"]
command = "cat sha2/x > shaz"
"#,
    )
    .write("v", "1\n");
    let check = s.run(["--check"]);
    check.assert_ok();
    s.run(["-j2", "all"]).assert_ok();
    assert_eq!(s.read_string("rx"), "1\n");
    assert_eq!(s.read_string("rd"), "1\n");
    assert_eq!(s.read_string("shaz"), "x\n");

    s.write("v", "2\n");
    let dry = s.run(["-n", "all"]);
    assert_eq!(dry.would_run(), set(["fo", "rx", "rd"]), "{dry}");
    s.run(["-j2", "all"])
        .assert_ok()
        .assert_ran(&set(["fo", "rx", "rd"]));
    assert_eq!(s.read_string("rx"), "2\n");
    assert_eq!(s.read_string("rd"), "2\n");
    s.run(["-j2", "all"]).assert_nothing_ran(6);

    // A file kept by hand in a job's own folder output, read by that job: no cycle.
    let t = Space::new();
    t.write("d/seed.txt", "seed\n").write(
        "Qairtfile",
        "[rule.w]\ninputs = [\"d/seed.txt\"]\noutputs = [\"d\"]\ncommand = \"mkdir -p d; cat d/seed.txt > d/x.txt\"\n",
    );
    t.run(["all"]).assert_ok().assert_ran(&set(["w"]));
    t.run(["all"]).assert_nothing_ran(1);
    t.write("d/seed.txt", "seed 2\n");
    t.run(["all"]).assert_ok().assert_ran(&set(["w"]));
    assert_eq!(t.read_string("d/x.txt"), "seed 2\n");
}

/// The same through links qbuild makes: a file read as `lk/f` (or `lk2/f`, a link to that
/// link) where `lk` leads to another job's folder output is read again after that job
/// reruns. It was hashed before, so one run left `r` with the old content.
#[test]
fn a_file_read_through_a_declared_link_to_a_folder_output_is_reread() {
    let s = Space::new();
    s.write(
        "Qairtfile",
        r#"
[rule.gen]
inputs = ["v"]
outputs = ["gen"]
command = "mkdir -p gen && cp v gen/f"
links = [{ link = "lk", to = "gen" }]
[rule.ch]
links = [{ link = "lk2", to = "lk" }]
[rule.read]
inputs = ["lk/f", "lk2/f"]
outputs = ["r"]
command = "cat lk/f lk2/f > r"
"#,
    )
    .write("v", "a\n");
    s.run(["-j2", "all"]).assert_ok();
    assert_eq!(s.read_string("r"), "a\na\n");
    s.write("v", "b\n");
    let dry = s.run(["-n", "all"]);
    assert_eq!(dry.would_run(), set(["gen", "read"]), "{dry}");
    s.run(["-j2", "all"])
        .assert_ok()
        .assert_ran(&set(["gen", "read"]));
    assert_eq!(s.read_string("r"), "b\nb\n");
    s.run(["all"]).assert_nothing_ran(4);
}

/// A source link whose chain leaves the work folder (shared storage) and comes back to
/// another job's output is refused like a direct one: it was accepted, its reader not
/// ordered after the writer, and an edit took two runs.
#[test]
fn a_source_link_back_to_an_output_through_outside_storage_is_refused() {
    let s = Space::new();
    let shared = Space::new();
    s.write("src/in.txt", "v1\n").write(
        "Qairtfile",
        r#"
[rule.gen]
inputs = ["src/in.txt"]
outputs = ["out/gen.txt"]
command = "mkdir -p out && cat src/in.txt > out/gen.txt"
[rule.reader]
inputs = ["src/via.txt"]
outputs = ["out/reader.txt"]
command = "cat src/via.txt > out/reader.txt"
"#,
    );
    std::os::unix::fs::symlink(s.join("out/gen.txt"), shared.join("hop.txt")).expect("symlink");
    std::os::unix::fs::symlink(shared.join("hop.txt"), s.join("src/via.txt")).expect("symlink");
    let out = s.run(["--check"]);
    out.assert_code(2);
    assert!(out.stderr.contains("which `gen` writes"), "{out}");
    // The same through a second name for the work folder (a link to it elsewhere).
    std::os::unix::fs::symlink(s.path(), shared.join("alias")).expect("symlink");
    fs::remove_file(s.join("src/via.txt")).expect("rm");
    std::os::unix::fs::symlink(shared.join("alias/out/gen.txt"), s.join("src/via.txt"))
        .expect("symlink");
    let out = s.run(["--check"]);
    out.assert_code(2);
    assert!(out.stderr.contains("which `gen` writes"), "{out}");
}

/// A command that only changes an old output's mode (or links) did not write it: the job
/// fails as when it touches nothing (`cp` failing on a read-only output, then `chmod`, was
/// recorded with the old content). A link the command made to shared storage outside the
/// work folder is replaced on a rerun (every rerun was refused as "writing through" it).
#[test]
fn a_chmod_is_no_write_and_an_own_link_leading_out_is_replaced() {
    let s = Space::new();
    let shared = Space::new();
    shared.write("w.bin", "weights\n");
    let to = shared.join("w.bin").to_string_lossy().into_owned();
    s.write(
        "Qairtfile",
        format!(
            r#"
[rule.cp]
inputs = ["src"]
outputs = ["out"]
command = "if grep -q yes src; then cp src out; fi; chmod 600 out"
[rule.ln]
outputs = ["l"]
command = "ln -s {to} l # 1"
"#
        ),
    )
    .write("src", "yes 1\n");
    s.run(["all"]).assert_ok().assert_ran(&set(["cp", "ln"]));
    s.write("src", "no\n");
    s.replace("Qairtfile", "l # 1", "l # 2");
    let out = s.run(["-k", "all"]);
    out.assert_code(1);
    assert_eq!(out.failed(), set(["cp"]), "{out}");
    assert!(
        out.stderr.contains("did not write the declared output out"),
        "{out}"
    );
    assert!(out.ran().contains("ln"), "{out}");
    assert_eq!(shared.read_string("w.bin"), "weights\n");
    s.run(["all"]).assert_code(1);
}

/// A source folder holding a link qbuild makes to another job's output: its reader reruns
/// in the same build when that output changes (it took two: the folder was re-read only
/// after the link's own job, which was up to date).
#[test]
fn a_folder_holding_a_declared_link_is_reread_when_the_target_changes() {
    let s = Space::new();
    s.write("models/tv/t0", "t0\n")
        .write("seed.txt", "seed\n")
        .write(
            "Qairtfile",
            r#"
[rule.gen]
inputs = ["seed.txt"]
outputs = ["gen.txt"]
command = "cat seed.txt > gen.txt"
links = [{ link = "models/tv/extra", to = "gen.txt" }]
[rule.read]
inputs = ["models/tv"]
outputs = ["read.txt"]
command = "cat models/tv/extra models/tv/t0 > read.txt"
"#,
        );
    s.run(["-j2", "all"]).assert_ok();
    s.write("seed.txt", "seed2\n");
    assert_eq!(s.run(["-n", "all"]).would_run(), set(["gen", "read"]));
    s.run(["-j2", "all"])
        .assert_ok()
        .assert_ran(&set(["gen", "read"]));
    assert_eq!(s.read_string("read.txt"), "seed2\nt0\n");
    s.run(["all"]).assert_nothing_ran(3);
}
