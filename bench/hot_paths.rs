//! `cargo bench`: the hot paths (Qairtfile expansion, the no-op staleness check, hashing), so regressions show.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use qbuild::db::Db;
use qbuild::graph::JobId;
use qbuild::hash::{hash_file, HashStats};
use qbuild::progress::Quiet;
use qbuild::work::{build, Options};

fn main() {
    divan::main();
}

/// A QAIRT-shaped Qairtfile of `variants` × ARs [1, 128] × 4 splits, with cheap commands.
fn qairtfile(variants: usize) -> String {
    let mut q = String::new();
    let _ = write!(
        q,
        r#"[vars]
variants = {{ range = [1, {variants}] }}
ars = [1, 128]
splits = {{ range = [1, 4] }}
[rule.export]
matrix = {{ v = "${{variants}}", ar = "${{ars}}" }}
inputs = ["src/v${{v}}.txt"]
outputs = ["out/v${{v}}/ar${{ar}}/model.onnx"]
command = "cat ${{inputs}} > ${{outputs}}"
[rule.split]
matrix = {{ v = "${{variants}}", ar = "${{ars}}" }}
inputs = ["out/v${{v}}/ar${{ar}}/model.onnx"]
outputs = ["out/v${{v}}/ar${{ar}}/split_${{splits}}.onnx"]
command = "for o in ${{outputs}}; do cat ${{inputs}} > $o; done"
[rule.convert]
matrix = {{ v = "${{variants}}", ar = "${{ars}}", s = "${{splits}}" }}
inputs = ["out/v${{v}}/ar${{ar}}/split_${{s}}.onnx"]
outputs = ["out/v${{v}}/ar${{ar}}/conv_${{s}}.dlc"]
command = "cat ${{inputs}} > ${{outputs}}"
[rule.ctx]
matrix = {{ v = "${{variants}}", s = "${{splits}}" }}
inputs = ["out/v${{v}}/ar${{ars}}/conv_${{s}}.dlc"]
outputs = ["out/v${{v}}/ctx_${{s}}.bin"]
command = "cat ${{inputs}} > ${{outputs}}"
"#
    );
    q
}

fn write_tree(dir: &Path, variants: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("src")).expect("mkdir");
    for v in 1..=variants {
        std::fs::write(dir.join(format!("src/v{v}.txt")), format!("variant {v}\n")).expect("write");
    }
    let file = dir.join("Qairtfile");
    std::fs::write(&file, qairtfile(variants)).expect("write");
    file
}

/// Parse + expand + graph (the start-up cost of every run).
#[divan::bench(args = [100, 1000])]
fn expand_qairtfile(bencher: divan::Bencher, variants: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_tree(dir.path(), variants);
    bencher.bench(|| qbuild::load_graph(&file, Path::new("Qairtfile")).expect("loads"));
}

/// A no-op build: load state, stat every file, decide every job up to date.
#[divan::bench(args = [100, 1000], sample_count = 20)]
fn noop_build(bencher: divan::Bencher, variants: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_tree(dir.path(), variants);
    bench_noop(bencher, dir.path(), &file);
}

/// A no-op where 16 splits each link one folder of `files` test vectors and read it (the
/// real pipeline's shape): the folder must be walked once, not once per link.
#[divan::bench(args = [100, 1000], sample_count = 20)]
fn noop_linked_folder(bencher: divan::Bencher, files: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("tv")).expect("mkdir");
    for i in 0..files {
        std::fs::write(d.join(format!("tv/input_{i}.raw")), [i as u8; 128]).expect("write");
    }
    std::fs::write(d.join("model.txt"), "model\n").expect("write");
    let file = d.join("Qairtfile");
    std::fs::write(
        &file,
        r#"[vars]
splits = { range = [1, 16] }
[rule.split]
matrix = { s = "${splits}" }
inputs = ["model.txt"]
outputs = ["out/split_${s}.txt"]
links = [{ link = "out/tv_${s}", to = "tv" }]
command = "cat ${inputs} > out/split_${s}.txt"
[rule.quantize]
matrix = { s = "${splits}" }
inputs = ["out/split_${s}.txt", "out/tv_${s}"]
outputs = ["out/q_${s}.txt"]
command = "ls ${inputs} > ${outputs}"
"#,
    )
    .expect("write");
    bench_noop(bencher, d, &file);
}

fn bench_noop(bencher: divan::Bencher, dir: &Path, file: &Path) {
    let g = qbuild::load_graph(file, Path::new("Qairtfile")).expect("loads");
    let state = dir.join(".qbuild");
    std::fs::create_dir_all(&state).expect("mkdir");
    let db = Db::new(&state);
    let jobs: Vec<JobId> = (0..g.jobs.len()).map(|i| JobId(i as u32)).collect();
    let opts = Options {
        jobs: Some(2),
        keep_going: false,
        dry_run: false,
        read_only: false,
        explain: false,
        verbose: false,
        trace: false,
        toolchain: Vec::new(),
    };
    let run = || build(&g, dir, &db, &jobs, &opts, &mut Quiet, &mut |_| {}, None);
    let first = run().expect("first build");
    assert!(first.ok());
    bencher.bench(|| {
        let s = run().expect("no-op");
        assert_eq!(s.ran, 0);
        assert_eq!(s.hashed_bytes, 0);
    });
}

/// Hashing one big file (mmap + rayon) and many small ones.
#[divan::bench(args = [1 << 12, 64 << 20])]
fn hash_bytes(bencher: divan::Bencher, size: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("f");
    std::fs::write(&p, vec![7u8; size]).expect("write");
    let stats = HashStats::default();
    bencher
        .counter(divan::counter::BytesCount::new(size))
        .bench(|| hash_file(&p, size as u64, &stats).expect("hash"));
}
