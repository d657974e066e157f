//! Unit tests: determinism, path independence, split locality, malformed inputs.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::emit::{parse_scale, Ctx};
use crate::formats::{count_lines, line_label, scan_lines};
use crate::tools::{self, Outcome};
use crate::SimError;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("qairt-sim-test-{}-{n}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
    fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }
    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(p, bytes).expect("write");
    }
    fn read(&self, rel: &str) -> Vec<u8> {
        fs::read(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run_in(ctx: &mut Ctx, tool: &str, args: &[String]) -> Result<(), SimError> {
    let t = tools::find(tool).expect("known tool");
    let argv: Vec<OsString> = args.iter().map(OsString::from).collect();
    match tools::run(t, ctx, &argv)? {
        Outcome::Ran => Ok(()),
        _ => panic!("unexpected help/version"),
    }
}

fn run(tool: &str, args: &[String]) -> Result<(), SimError> {
    run_in(&mut Ctx::default(), tool, args)
}

fn ok(tool: &str, args: &[String]) {
    if let Err(e) = run(tool, args) {
        panic!("{tool} failed: {e:?}");
    }
}

fn failed(tool: &str, args: &[String]) -> String {
    match run(tool, args) {
        Err(SimError::Failed(m)) => m,
        other => panic!("{tool}: expected a failure, got {other:?}"),
    }
}

fn usage(tool: &str, args: &[String]) -> String {
    match run(tool, args) {
        Err(SimError::Usage(m)) => m,
        other => panic!("{tool}: expected a usage error, got {other:?}"),
    }
}

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn base_onnx(lines: usize, edit: Option<usize>) -> String {
    let mut s = String::from("QSIM-ONNX v1\nproducer: test\ngraph: llama3\n\n");
    for i in 0..lines {
        let w = if edit == Some(i) {
            "edited"
        } else {
            "0123abcd"
        };
        s.push_str(&format!("layer {} attn proj{} w={w}\n", i / 4, i % 4));
    }
    s
}

const ENC: &str = r#"{"activation_encodings": {"x": [{"bitwidth": 16}]}, "param_encodings": {}}"#;
const CONF: &str = r#"{"graphs": [{"O": 3, "vtcm_mb": 8, "graph_names": ["ar128-cl4096_SPLIT_of_4", "ar1-cl4096_SPLIT_of_4"]}],
 "devices": [{"soc_model": 69, "dsp_arch": "v79"}],
 "context": {"weight_sharing_enabled": true}, "memory": {"mem_type": "shared_buffer"}}"#;

/// Lay out the demo sources under `root`.
fn sources(d: &Scratch, root: &str) {
    d.write(&format!("{root}/llama3.onnx"), base_onnx(64, None));
    d.write(&format!("{root}/llama3.encodings"), ENC);
    d.write(&format!("{root}/tv/input_0.raw"), [1u8, 2, 3]);
    d.write(&format!("{root}/tv/input_1.raw"), [4u8, 5, 6]);
    d.write(
        &format!("{root}/input_list.txt"),
        format!(
            "{}\n\n{}\n",
            d.s(&format!("{root}/tv/input_0.raw")),
            d.s(&format!("{root}/tv/input_1.raw"))
        ),
    );
}

/// Run the whole pipeline (2 ARs, 4 splits) under `root`; returns the relative paths of
/// every output written.
fn chain(d: &Scratch, root: &str) -> Vec<String> {
    let r = |rel: &str| d.s(&format!("{root}/{rel}"));
    let mut outs = Vec::new();
    let cl = 4096;
    let n = 4;
    for ar in [1, 128] {
        let m = format!("ar{ar}-cl{cl}");
        let onnx = format!("out/{m}/{m}.onnx");
        let enc = format!("out/{m}/{m}.encodings");
        ok(
            "qairt-prepare-exports",
            &v(&[
                "--onnx",
                &r("llama3.onnx"),
                "--encodings",
                &r("llama3.encodings"),
                "--ar",
                &ar.to_string(),
                "--cl",
                &cl.to_string(),
                "--output-onnx",
                &r(&onnx),
                "--output-encodings",
                &r(&enc),
            ]),
        );
        outs.push(onnx.clone());
        outs.push(enc.clone());
        ok(
            "qairt-split-model",
            &v(&[
                "--onnx",
                &r(&onnx),
                "--encodings",
                &r(&enc),
                "--num-splits",
                "4",
                "--model-name",
                &m,
                "--output-dir",
                &r(&format!("out/{m}/splits")),
            ]),
        );
        for i in 1..=n {
            let name = format!("{m}_{i}_of_{n}");
            let split = format!("out/{m}/splits/{name}.onnx");
            outs.push(split.clone());
            let (conv_onnx, conv_enc) = if i == 1 {
                (split, enc.clone())
            } else {
                ok(
                    "mha2sha-onnx-converter",
                    &v(&[
                        "--sha-export-path",
                        &r(&format!("out/{m}/sha")),
                        "--model-name",
                        &name,
                        "--exported-model-encoding-path",
                        &r(&enc),
                        "--exported-model-path",
                        &r(&split),
                        "--base-llm",
                        "llama3",
                        "--mha-conv",
                        "--nchw-aligned",
                    ]),
                );
                let so = format!("out/{m}/sha/{name}.onnx");
                let se = format!("out/{m}/sha/{name}.encodings");
                outs.push(so.clone());
                outs.push(se.clone());
                (so, se)
            };
            let dlc = format!("out/{m}/converted/{name}.dlc");
            ok(
                "qairt-converter",
                &v(&[
                    "--input_network",
                    &r(&conv_onnx),
                    "--quantization_overrides",
                    &r(&conv_enc),
                    "-o",
                    &r(&dlc),
                    "--source_model_input_layout",
                    "input_ids",
                    "NONTRIVIAL",
                ]),
            );
            outs.push(dlc.clone());
            let qdlc = format!("out/{m}/compiled/{name}.dlc");
            ok(
                "qairt-quantizer",
                &v(&[
                    "--input_dlc",
                    &r(&dlc),
                    "--input_list",
                    &r("input_list.txt"),
                    "--output_dlc",
                    &r(&qdlc),
                    "--act_bitwidth",
                    "16",
                    "--bias_bitwidth",
                    "32",
                ]),
            );
            outs.push(qdlc);
        }
    }
    for i in 1..=n {
        d.write(
            &format!("{root}/cfg/htp_{i}.json"),
            format!(
                r#"{{"backend_extensions": {{"shared_library_path": "libQnnHtpNetRunExtensions.so", "config_file_path": "PerfSetting_{i}.conf"}}}}"#
            ),
        );
        d.write(
            &format!("{root}/cfg/PerfSetting_{i}.conf"),
            CONF.replace("SPLIT", &i.to_string()),
        );
        let q = |ar: u32| {
            r(&format!(
                "out/ar{ar}-cl{cl}/compiled/ar{ar}-cl{cl}_{i}_of_{n}.dlc"
            ))
        };
        ok(
            "qnn-context-binary-generator",
            &v(&[
                "--backend",
                "libQnnHtp.so",
                "--model",
                "libQnnModelDlc.so",
                "--input_output_tensor_mem_type",
                "memhandle",
                "--output_dir",
                &r("out/bin"),
                "--config_file",
                &r(&format!("cfg/htp_{i}.json")),
                "--binary_file",
                &format!("split_{i}"),
                "--dlc_path",
                &format!("{},{}", q(128), q(1)),
            ]),
        );
        outs.push(format!("out/bin/split_{i}.bin"));
    }
    outs
}

#[test]
fn full_chain_is_deterministic_and_path_independent() {
    let d = Scratch::new("chain");
    sources(&d, "a");
    sources(&d, "elsewhere/deeper/b");
    let outs = chain(&d, "a");
    assert_eq!(outs.len(), 2 * (2 + 4 + 2 * 3 + 4 + 4) + 4);
    let first: Vec<Vec<u8>> = outs.iter().map(|o| d.read(&format!("a/{o}"))).collect();
    // Rebuilding with unchanged inputs rewrites byte-identical files.
    let again = chain(&d, "a");
    assert_eq!(outs, again);
    for (o, bytes) in outs.iter().zip(&first) {
        assert_eq!(&d.read(&format!("a/{o}")), bytes, "{o} changed on rebuild");
    }
    // Identical inputs at another path give identical outputs.
    chain(&d, "elsewhere/deeper/b");
    for (o, bytes) in outs.iter().zip(&first) {
        assert_eq!(
            &d.read(&format!("elsewhere/deeper/b/{o}")),
            bytes,
            "{o} depends on its path"
        );
    }
    // Every output starts with its magic line.
    for (o, bytes) in outs.iter().zip(&first) {
        let magic = if o.ends_with(".encodings") {
            "{"
        } else if o.ends_with(".onnx") {
            "QSIM-ONNX v1\n"
        } else if o.ends_with(".bin") {
            "QSIM-CTXBIN v1\n"
        } else if o.contains("/compiled/") {
            "QSIM-QDLC v1\n"
        } else {
            "QSIM-DLC v1\n"
        };
        assert!(bytes.starts_with(magic.as_bytes()), "{o}");
    }
    // Different ARs give different models.
    assert_ne!(
        d.read("a/out/ar1-cl4096/ar1-cl4096.onnx"),
        d.read("a/out/ar128-cl4096/ar128-cl4096.onnx")
    );
    let bin = String::from_utf8_lossy(&first[first.len() - 1]).into_owned();
    assert!(
        bin.contains("graphs: ar128-cl4096_4_of_4, ar1-cl4096_4_of_4\n"),
        "{bin}"
    );
    assert!(bin.contains("weight-sharing: true\n"));
}

#[test]
fn outputs_depend_on_non_path_flags_and_inputs() {
    let d = Scratch::new("flags");
    sources(&d, "s");
    let conv = |enc: &str, out: &str, layout: &str| {
        ok(
            "qairt-converter",
            &v(&[
                "-i",
                &d.s("s/llama3.onnx"),
                "--quantization_overrides",
                &d.s(enc),
                "--output_path",
                &d.s(out),
                "--source_model_input_layout",
                "x",
                layout,
            ]),
        );
        d.read(out)
    };
    let a = conv("s/llama3.encodings", "o/a.dlc", "NCHW");
    let b = conv("s/llama3.encodings", "o/b.dlc", "NHWC");
    assert_ne!(a, b);
    d.write("s/other.encodings", r#"{"activation_encodings": {}}"#);
    let c = conv("s/other.encodings", "o/c.dlc", "NCHW");
    assert_ne!(a, c);
    let a2 = conv("s/llama3.encodings", "o/a2.dlc", "NCHW");
    assert_eq!(a, a2);

    // Quantizer: a changed calibration input changes the output.
    let quant = |out: &str| {
        ok(
            "qairt-quantizer",
            &v(&[
                "--input_dlc",
                &d.s("o/a.dlc"),
                "--input_list",
                &d.s("s/input_list.txt"),
                "--output_dlc",
                &d.s(out),
            ]),
        );
        d.read(out)
    };
    let q1 = quant("o/q1.dlc");
    d.write("s/tv/input_1.raw", [9u8]);
    let q2 = quant("o/q2.dlc");
    assert_ne!(q1, q2);
    // Defaults are the recorded identity: explicit 8/8 equals implicit.
    ok(
        "qairt-quantizer",
        &v(&[
            "--input_dlc",
            &d.s("o/a.dlc"),
            "--input_list",
            &d.s("s/input_list.txt"),
            "--output_dlc",
            &d.s("o/q3.dlc"),
            "--act_bitwidth=8",
            "--bias_bitwidth",
            "8",
        ]),
    );
    assert_eq!(q2, d.read("o/q3.dlc"));
}

#[test]
fn editing_one_region_changes_only_one_split() {
    let d = Scratch::new("locality");
    d.write("base.onnx", base_onnx(64, None));
    d.write("edited.onnx", base_onnx(64, Some(40))); // line 40 lies in chunk 3 (32..48)
    d.write("enc.json", ENC);
    let split = |src: &str, dir: &str| -> Vec<Vec<u8>> {
        ok(
            "qairt-split-model",
            &v(&[
                "--onnx",
                &d.s(src),
                "--encodings",
                &d.s("enc.json"),
                "--num-splits",
                "4",
                "--model-name",
                "m",
                "--output-dir",
                &d.s(dir),
            ]),
        );
        (1..=4)
            .map(|i| d.read(&format!("{dir}/m_{i}_of_4.onnx")))
            .collect()
    };
    let a = split("base.onnx", "a");
    let b = split("edited.onnx", "b");
    for i in 0..4 {
        assert_eq!(a[i] == b[i], i != 2, "split {}", i + 1);
    }
    // The same holds through prepare-exports (line-wise) and then split.
    let export = |src: &str, out: &str| {
        ok(
            "qairt-prepare-exports",
            &v(&[
                "--onnx",
                &d.s(src),
                "--encodings",
                &d.s("enc.json"),
                "--ar",
                "128",
                "--cl",
                "4096",
                "--output-onnx",
                &d.s(out),
                "--output-encodings",
                &d.s(&format!("{out}.enc")),
            ]),
        );
    };
    export("base.onnx", "e/base.onnx");
    export("edited.onnx", "e/edited.onnx");
    // The exported encodings do not depend on the model, so splits stay local.
    assert_eq!(d.read("e/base.onnx.enc"), d.read("e/edited.onnx.enc"));
    let a = split("e/base.onnx", "ea");
    let b = split("e/edited.onnx", "eb");
    for i in 0..4 {
        assert_eq!(a[i] == b[i], i != 2, "exported split {}", i + 1);
    }
}

#[test]
fn split_line_distribution() {
    let d = Scratch::new("dist");
    d.write("x.onnx", base_onnx(10, None));
    d.write("enc.json", ENC);
    ok(
        "qairt-split-model",
        &v(&[
            "--onnx",
            &d.s("x.onnx"),
            "--encodings",
            &d.s("enc.json"),
            "--num-splits",
            "3",
            "--model-name",
            "m",
            "--output-dir",
            &d.s("o/"),
        ]),
    );
    let mut total = 0;
    for i in 1..=3 {
        let text = String::from_utf8(d.read(&format!("o/m_{i}_of_3.onnx"))).expect("utf8");
        let (header, payload) = text.split_once("\n\n").expect("header");
        assert!(header.contains(&format!("graph: m_{i}_of_3")));
        let n = payload.lines().count();
        assert!(header.contains(&format!("payload-lines: {n}")));
        total += n;
    }
    assert_eq!(total, 10);
    let m = failed(
        "qairt-split-model",
        &v(&[
            "--onnx",
            &d.s("x.onnx"),
            "--encodings",
            &d.s("enc.json"),
            "--num-splits",
            "11",
            "--model-name",
            "m",
            "--output-dir",
            &d.s("o"),
        ]),
    );
    assert!(m.contains("fewer than --num-splits 11"), "{m}");
}

#[test]
fn malformed_inputs_are_clear_errors() {
    let d = Scratch::new("bad");
    d.write("enc.json", ENC);
    d.write("good.onnx", base_onnx(8, None));
    let conv = |onnx: &str, enc: &str| {
        v(&[
            "--input_network",
            &d.s(onnx),
            "--quantization_overrides",
            &d.s(enc),
            "-o",
            &d.s("out.dlc"),
        ])
    };
    // Missing input file.
    let m = failed("qairt-converter", &conv("missing.onnx", "enc.json"));
    assert!(
        m.contains("missing.onnx") && m.contains("No such file"),
        "{m}"
    );
    // Wrong magic.
    d.write("wrong.onnx", "PK\u{3}\u{4} real onnx protobuf\n");
    let m = failed("qairt-converter", &conv("wrong.onnx", "enc.json"));
    assert!(
        m.contains("wrong.onnx") && m.contains("not a QSIM-ONNX v1 file"),
        "{m}"
    );
    // Empty file.
    d.write("empty.onnx", "");
    let m = failed("qairt-converter", &conv("empty.onnx", "enc.json"));
    assert!(m.contains("empty.onnx") && m.contains("empty"), "{m}");
    // Malformed header line.
    d.write(
        "hdr.onnx",
        "QSIM-ONNX v1\ngraph: x\nno colon here\n\nline\n",
    );
    let m = failed("qairt-converter", &conv("hdr.onnx", "enc.json"));
    assert!(
        m.contains("hdr.onnx:3:") && m.contains("malformed header line"),
        "{m}"
    );
    // Header without a blank line.
    d.write("trunc.onnx", "QSIM-ONNX v1\ngraph: x\n");
    let m = failed("qairt-converter", &conv("trunc.onnx", "enc.json"));
    assert!(
        m.contains("trunc.onnx:3:") && m.contains("unexpected end of file"),
        "{m}"
    );
    // A DLC where an ONNX is expected.
    ok("qairt-converter", &conv("good.onnx", "enc.json"));
    let m = failed("qairt-converter", &conv("out.dlc", "enc.json"));
    assert!(
        m.contains("is a QSIM-DLC v1 file, expected QSIM-ONNX v1"),
        "{m}"
    );
    // Bad JSON: file, line, column.
    d.write("bad.json", "{\n  \"activation_encodings\": {,}\n}\n");
    let m = failed("qairt-converter", &conv("good.onnx", "bad.json"));
    assert!(
        m.starts_with(&format!("{}:2:", d.s("bad.json"))) && m.contains("invalid JSON"),
        "{m}"
    );
    // JSON that is not an object.
    d.write("arr.json", "[1, 2]");
    let m = failed("qairt-converter", &conv("good.onnx", "arr.json"));
    assert!(m.contains("must be a JSON object, found an array"), "{m}");
    // A directory given as a file.
    fs::create_dir_all(d.path("dir.onnx")).expect("mkdir");
    let m = failed("qairt-converter", &conv("dir.onnx", "enc.json"));
    assert!(m.contains("is a directory"), "{m}");
    // Invalid UTF-8 and binary junk never panic.
    d.write("junk.onnx", [0xffu8, 0xfe, 0, 1, b'\n', 0xc3]);
    failed("qairt-converter", &conv("junk.onnx", "enc.json"));
    d.write("junk.json", [0xffu8, 0xfe, 0, 1]);
    failed("qairt-converter", &conv("good.onnx", "junk.json"));
    // Same file as input and output.
    let m = failed(
        "qairt-converter",
        &v(&[
            "--input_network",
            &d.s("good.onnx"),
            "-o",
            &d.s("good.onnx"),
        ]),
    );
    assert!(m.contains("same file"), "{m}");
    assert_eq!(d.read("good.onnx"), base_onnx(8, None).into_bytes());
}

#[test]
fn usage_errors() {
    let u = usage(
        "qairt-converter",
        &v(&["--input_network", "a.onnx", "--bogus", "-o", "x"]),
    );
    assert!(u.contains("unknown flag '--bogus'"), "{u}");
    let u = usage("qairt-converter", &v(&["--input_network", "a.onnx"]));
    assert!(u.contains("missing required flag --output_path"), "{u}");
    let u = usage("qairt-converter", &v(&["--input_network"]));
    assert!(u.contains("requires a value"), "{u}");
    let u = usage(
        "qairt-converter",
        &v(&["--input_network", "a", "--input_network", "b", "-o", "x"]),
    );
    assert!(u.contains("more than once"), "{u}");
    let u = usage("qairt-converter", &v(&["stray"]));
    assert!(u.contains("unexpected argument"), "{u}");
    let u = usage(
        "qairt-converter",
        &v(&["-i", "a", "-o", "b", "--source_model_input_layout", "x"]),
    );
    assert!(u.contains("requires 2 values"), "{u}");
    let u = usage(
        "qairt-converter",
        &v(&[
            "-i",
            "a",
            "-o",
            "b",
            "--source_model_input_layout",
            "x",
            "SIDEWAYS",
        ]),
    );
    assert!(u.contains("not one of"), "{u}");
    let u = usage(
        "qairt-prepare-exports",
        &v(&[
            "--onnx",
            "a",
            "--encodings",
            "b",
            "--ar",
            "0",
            "--cl",
            "4096",
            "--output-onnx",
            "c",
            "--output-encodings",
            "d",
        ]),
    );
    assert!(u.contains("--ar"), "{u}");
    let u = usage(
        "qairt-prepare-exports",
        &v(&[
            "--onnx",
            "a",
            "--encodings",
            "b",
            "--ar",
            "4097",
            "--cl",
            "4096",
            "--output-onnx",
            "c",
            "--output-encodings",
            "d",
        ]),
    );
    assert!(u.contains("larger than --cl"), "{u}");
    let u = usage(
        "qairt-split-model",
        &v(&[
            "--onnx",
            "a",
            "--encodings",
            "b",
            "--num-splits",
            "x",
            "--model-name",
            "m",
            "--output-dir",
            "o",
        ]),
    );
    assert!(u.contains("--num-splits"), "{u}");
    let u = usage(
        "qairt-split-model",
        &v(&[
            "--onnx",
            "a",
            "--encodings",
            "b",
            "--num-splits",
            "2",
            "--model-name",
            "../m",
            "--output-dir",
            "o",
        ]),
    );
    assert!(u.contains("file name"), "{u}");
    let u = usage(
        "qairt-quantizer",
        &v(&[
            "--input_dlc",
            "a",
            "--input_list",
            "b",
            "--output_dlc",
            "c",
            "--act_bitwidth",
            "12",
        ]),
    );
    assert!(u.contains("--act_bitwidth"), "{u}");
    let t = tools::find("qairt-quantizer").expect("tool");
    let help = tools::run(t, &mut Ctx::default(), &[OsString::from("--help")]);
    assert!(matches!(help, Ok(Outcome::Help(h)) if h.contains("--input_list LIST")));
}

#[test]
fn quantizer_and_context_binary_checks() {
    let d = Scratch::new("q");
    sources(&d, "s");
    ok(
        "qairt-converter",
        &v(&["-i", &d.s("s/llama3.onnx"), "-o", &d.s("f.dlc")]),
    );
    let q = |list: &str, ctx: &mut Ctx| {
        run_in(
            ctx,
            "qairt-quantizer",
            &v(&[
                "--input_dlc",
                "f.dlc",
                "--input_list",
                list,
                "--output_dlc",
                "q.dlc",
            ]),
        )
    };
    let mut ctx = Ctx {
        base: Some(d.0.clone()),
        ..Ctx::default()
    };
    // Relative list entries resolve against the current directory; directories hash as trees.
    d.write("list.txt", "# comment\ninput_ids:=s/tv/input_0.raw s/tv\n");
    q("list.txt", &mut ctx).expect("quantize");
    let q1 = d.read("q.dlc");
    d.write("s/tv/sub/new.raw", [7u8]);
    q("list.txt", &mut ctx).expect("quantize");
    assert_ne!(q1, d.read("q.dlc"));
    d.write("list.txt", "s/tv/missing.raw\n");
    match q("list.txt", &mut ctx) {
        Err(SimError::Failed(m)) => assert!(
            m.contains("list.txt:1:") && m.contains("missing.raw"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    d.write("list.txt", "\n# nothing\n");
    assert!(
        matches!(q("list.txt", &mut ctx), Err(SimError::Failed(m)) if m.contains("lists no inputs"))
    );
    d.write("list.txt", "s/tv/input_0.raw\n");
    q("list.txt", &mut ctx).expect("quantize");
    // Quantizing twice is refused.
    let m = failed(
        "qairt-quantizer",
        &v(&[
            "--input_dlc",
            &d.s("q.dlc"),
            "--input_list",
            &d.s("list.txt"),
            "--output_dlc",
            &d.s("qq.dlc"),
        ]),
    );
    assert!(m.contains("already quantized"), "{m}");

    // Context binary: float DLC refused; config found next to the JSON; graph names checked.
    let gen = |dlcs: &str, cfg: &str, ctx: &mut Ctx| {
        run_in(
            ctx,
            "qnn-context-binary-generator",
            &v(&[
                "--backend",
                "libQnnHtp.so",
                "--model",
                "libQnnModelDlc.so",
                "--output_dir",
                "bin",
                "--config_file",
                cfg,
                "--binary_file",
                "ctx",
                "--dlc_path",
                dlcs,
            ]),
        )
    };
    d.write(
        "cfg/c.json",
        r#"{"backend_extensions": {"shared_library_path": "x.so", "config_file_path": "p.conf"}}"#,
    );
    d.write(
        "cfg/p.conf",
        r#"{"graphs": [{"graph_names": ["llama3"]}], "context": {"weight_sharing_enabled": true}}"#,
    );
    gen("q.dlc", "cfg/c.json", &mut ctx).expect("ctx bin");
    let bin = d.read("bin/ctx.bin");
    assert!(bin.starts_with(b"QSIM-CTXBIN v1\n"));
    assert!(
        matches!(gen("f.dlc", "cfg/c.json", &mut ctx), Err(SimError::Failed(m)) if m.contains("not a quantized DLC"))
    );
    assert!(
        matches!(gen("q.dlc,q.dlc", "cfg/c.json", &mut ctx), Err(SimError::Failed(m)) if m.contains("already provided"))
    );
    assert!(matches!(
        gen("q.dlc,", "cfg/c.json", &mut ctx),
        Err(SimError::Usage(_))
    ));
    d.write("cfg/p.conf", r#"{"graphs": [{"graph_names": ["other"]}]}"#);
    assert!(
        matches!(gen("q.dlc", "cfg/c.json", &mut ctx), Err(SimError::Failed(m)) if m.contains("does not list graph 'llama3'"))
    );
    // The .conf content feeds the output.
    d.write("cfg/p.conf", r#"{"graphs": [{"graph_names": ["llama3"]}], "context": {"weight_sharing_enabled": false}}"#);
    gen("q.dlc", "cfg/c.json", &mut ctx).expect("ctx bin");
    assert_ne!(bin, d.read("bin/ctx.bin"));
    d.write(
        "cfg/c.json",
        r#"{"backend_extensions": {"config_file_path": "nowhere.conf"}}"#,
    );
    assert!(
        matches!(gen("q.dlc", "cfg/c.json", &mut ctx), Err(SimError::Failed(m)) if m.contains("nowhere.conf"))
    );
    d.write("cfg/c.json", r#"{"backend_extensions": {}}"#);
    assert!(
        matches!(gen("q.dlc", "cfg/c.json", &mut ctx), Err(SimError::Failed(m)) if m.contains("config_file_path"))
    );
    d.write(
        "cfg/c.json",
        r#"{"backend_extensions": {"config_file_path": "cfg/p.conf"}"#,
    );
    assert!(
        matches!(gen("q.dlc", "cfg/c.json", &mut ctx), Err(SimError::Failed(m)) if m.contains("c.json:1:"))
    );
}

#[test]
fn payload_size_and_failure_injection() {
    let d = Scratch::new("scale");
    d.write("m.onnx", base_onnx(4, None));
    let mut ctx = Ctx {
        payload: (1 << 20) + 3,
        ..Ctx::default()
    };
    run_in(
        &mut ctx,
        "qairt-converter",
        &v(&["-i", &d.s("m.onnx"), "-o", &d.s("big.dlc")]),
    )
    .expect("convert");
    let big = d.read("big.dlc");
    let header_end = big.windows(2).position(|w| w == b"\n\n").expect("header") + 2;
    assert_eq!(big.len() - header_end, (1 << 20) + 3);
    assert_eq!(ctx.report.len(), 1);
    assert!(ctx.report[0].ends_with(&format!("({} bytes)", big.len())));
    // ONNX outputs scale their payload lines.
    run_in(
        &mut ctx,
        "qairt-split-model",
        &v(&[
            "--onnx",
            &d.s("m.onnx"),
            "--encodings",
            &d.s("m.onnx"),
            "--num-splits",
            "2",
            "--model-name",
            "m",
            "--output-dir",
            &d.s("s"),
        ]),
    )
    .expect_err("an ONNX is not an encodings file");
    d.write("e.json", ENC);
    run_in(
        &mut ctx,
        "qairt-split-model",
        &v(&[
            "--onnx",
            &d.s("m.onnx"),
            "--encodings",
            &d.s("e.json"),
            "--num-splits",
            "2",
            "--model-name",
            "m",
            "--output-dir",
            &d.s("s"),
        ]),
    )
    .expect("split");
    let len = d.read("s/m_1_of_2.onnx").len();
    assert!(len > (1 << 20) && len < (1 << 20) + 4096, "{len}");

    assert_eq!(parse_scale("0.5".as_ref()).ok(), Some(1 << 19));
    assert_eq!(parse_scale("1024".as_ref()).ok(), Some(1 << 30));
    assert!(parse_scale("-1".as_ref()).is_err());
    assert!(parse_scale("NaN".as_ref()).is_err());
    assert!(parse_scale("1e300".as_ref()).is_err());

    let mut ctx = Ctx {
        fail: Some("of_2".to_string()),
        ..Ctx::default()
    };
    let r = run_in(
        &mut ctx,
        "qairt-split-model",
        &v(&[
            "--onnx",
            &d.s("m.onnx"),
            "--encodings",
            &d.s("e.json"),
            "--num-splits",
            "2",
            "--model-name",
            "f",
            "--output-dir",
            &d.s("f"),
        ]),
    );
    match r {
        Err(SimError::Injected(p)) => assert!(p.ends_with("f_1_of_2.onnx"), "{p}"),
        other => panic!("{other:?}"),
    }
    let partial = d.read("f/f_1_of_2.onnx");
    assert!(partial.starts_with(b"QSIM-ONNX v1\n") && !partial.windows(2).any(|w| w == b"\n\n"));
    assert!(!d.path("f/f_2_of_2.onnx").exists());
    assert!(ctx.report.is_empty());
}

#[test]
fn line_scanner_streams_any_bytes() {
    let data: Vec<u8> = b"a w=1\n\nlong "
        .iter()
        .copied()
        .chain(std::iter::repeat_n(b'x', 100_000))
        .chain(*b"\nlast")
        .collect();
    let mut r = std::io::BufReader::with_capacity(7, &data[..]);
    let (n, h) = count_lines(&mut r, "t").expect("count");
    assert_eq!(n, 4);
    assert_eq!(h, blake3::hash(&data));
    let mut r = std::io::BufReader::with_capacity(7, &data[..]);
    let mut seen = Vec::new();
    scan_lines(&mut r, "t", |l| {
        seen.push((l.index, line_label(l.prefix), l.hash));
        Ok(())
    })
    .expect("scan");
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].1, "a");
    assert_eq!(seen[0].2, blake3::hash(b"a w=1"));
    assert_eq!(seen[1].1, "_");
    assert_eq!(seen[2].1.len(), 120);
    assert_eq!(seen[3].2, blake3::hash(b"last"));
    assert_eq!(line_label(b"\xff\x01 x w=zz"), "?? x");
}

#[test]
fn relative_dirs_in_output_names() {
    let d = Scratch::new("rel");
    d.write("m.onnx", base_onnx(4, None));
    d.write("e.json", ENC);
    let mut ctx = Ctx {
        base: Some(d.0.clone()),
        ..Ctx::default()
    };
    run_in(
        &mut ctx,
        "mha2sha-onnx-converter",
        &v(&[
            "--sha-export-path",
            "sha/",
            "--model-name",
            "g",
            "--exported-model-encoding-path",
            "e.json",
            "--exported-model-path",
            "m.onnx",
            "--base-llm",
            "llama3",
        ]),
    )
    .expect("mha2sha");
    assert_eq!(
        ctx.report[0],
        format!("wrote sha/g.onnx ({} bytes)", d.read("sha/g.onnx").len())
    );
    assert!(Path::new(&d.path("sha/g.encodings")).exists());
    let enc: serde_json::Value = serde_json::from_slice(&d.read("sha/g.encodings")).expect("json");
    assert_eq!(enc["qairt_sim"]["graph"], "g");
    assert!(enc["activation_encodings"]["x"].is_array());
}

/// Run qairt-dlc-info on `file`, returning its stdout lines.
fn dlc_info(d: &Scratch, file: &str) -> Result<Vec<String>, SimError> {
    let mut ctx = Ctx::default();
    run_in(&mut ctx, "qairt-dlc-info", &v(&["-i", &d.s(file)]))?;
    Ok(ctx.report)
}

fn dlc_info_failed(d: &Scratch, file: &str) -> String {
    match dlc_info(d, file) {
        Err(SimError::Failed(m)) => m,
        other => panic!("qairt-dlc-info {file}: expected a failure, got {other:?}"),
    }
}

/// Sources plus `f.dlc` (converted) and `q.dlc` (quantized, 16/32) in a scratch dir.
fn dlc_fixture(tag: &str) -> Scratch {
    let d = Scratch::new(tag);
    sources(&d, "s");
    ok(
        "qairt-converter",
        &v(&["-i", &d.s("s/llama3.onnx"), "-o", &d.s("f.dlc")]),
    );
    ok(
        "qairt-quantizer",
        &v(&[
            "--input_dlc",
            &d.s("f.dlc"),
            "--input_list",
            &d.s("s/input_list.txt"),
            "--output_dlc",
            &d.s("q.dlc"),
            "--act_bitwidth",
            "16",
            "--bias_bitwidth",
            "32",
        ]),
    );
    d
}

/// Names in a directory, sorted.
fn listing(dir: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    names
}

#[test]
fn dlc_info_valid_dlc() {
    let d = dlc_fixture("info-dlc");
    let before = listing(&d.0);
    let f = d.read("f.dlc");
    assert_eq!(
        dlc_info(&d, "f.dlc").expect("dlc info"),
        v(&[
            &format!("file: {}", d.s("f.dlc")),
            "kind: DLC (QSIM-DLC v1)",
            "graph: llama3",
            "payload-bytes: 4096",
        ])
    );
    // It writes nothing.
    assert_eq!(listing(&d.0), before);
    assert_eq!(d.read("f.dlc"), f);
    // The recorded payload size follows QAIRT_SIM_SCALE and is checked against the file.
    let mut big = Ctx {
        payload: 12345,
        ..Ctx::default()
    };
    run_in(
        &mut big,
        "qairt-converter",
        &v(&["-i", &d.s("s/llama3.onnx"), "-o", &d.s("big.dlc")]),
    )
    .expect("convert");
    let out = dlc_info(&d, "big.dlc").expect("big info");
    assert_eq!(out.last().map(String::as_str), Some("payload-bytes: 12345"));
}

#[test]
fn dlc_info_valid_qdlc() {
    let d = dlc_fixture("info-qdlc");
    let before = listing(&d.0);
    let mut ctx = Ctx::default();
    run_in(
        &mut ctx,
        "qairt-dlc-info",
        &v(&["--input_dlc", &d.s("q.dlc")]),
    )
    .expect("qdlc info");
    assert_eq!(
        ctx.report,
        v(&[
            &format!("file: {}", d.s("q.dlc")),
            "kind: quantized DLC (QSIM-QDLC v1)",
            "graph: llama3",
            "act_bitwidth: 16",
            "bias_bitwidth: 32",
            "payload-bytes: 4096",
        ])
    );
    assert_eq!(listing(&d.0), before);
}

#[test]
fn dlc_info_truncated_qdlc() {
    let d = dlc_fixture("info-trunc");
    let q = d.read("q.dlc");
    // One byte short of the payload.
    d.write("t1.dlc", &q[..q.len() - 1]);
    let m = dlc_info_failed(&d, "t1.dlc");
    assert!(
        m.contains(&d.s("t1.dlc")) && m.contains("is truncated") && m.contains("only 4095"),
        "{m}"
    );
    // Cut inside a header line, and between header lines.
    d.write("t2.dlc", &q[..40]);
    let m = dlc_info_failed(&d, "t2.dlc");
    assert!(
        m.contains(&d.s("t2.dlc")) && m.contains("unexpected end of file in the header"),
        "{m}"
    );
    let second_line = q.iter().position(|&b| b == b'\n').expect("magic") + 1;
    d.write("t3.dlc", &q[..second_line]);
    let m = dlc_info_failed(&d, "t3.dlc");
    assert!(m.contains("unexpected end of file in the header"), "{m}");
    // Cut right after the header: no payload at all.
    let header_end = q.windows(2).position(|w| w == b"\n\n").expect("header") + 2;
    d.write("t4.dlc", &q[..header_end]);
    let m = dlc_info_failed(&d, "t4.dlc");
    assert!(m.contains("is truncated") && m.contains("only 0"), "{m}");
    // What an injected failure leaves behind.
    let mut ctx = Ctx {
        fail: Some("inject".to_string()),
        ..Ctx::default()
    };
    run_in(
        &mut ctx,
        "qairt-quantizer",
        &v(&[
            "--input_dlc",
            &d.s("f.dlc"),
            "--input_list",
            &d.s("s/input_list.txt"),
            "--output_dlc",
            &d.s("inject.dlc"),
        ]),
    )
    .expect_err("injected");
    let m = dlc_info_failed(&d, "inject.dlc");
    assert!(m.contains("unexpected end of file in the header"), "{m}");
    // Extra bytes after the payload are reported too.
    let mut long = q.clone();
    long.push(b'x');
    d.write("long.dlc", &long);
    let m = dlc_info_failed(&d, "long.dlc");
    assert!(
        m.contains("4097 payload bytes") && m.contains("trailing"),
        "{m}"
    );
}

#[test]
fn dlc_info_garbage_and_malformed() {
    let d = dlc_fixture("info-bad");
    // Binary garbage.
    d.write(
        "junk.dlc",
        [0x7fu8, b'E', b'L', b'F', 0, 1, 2, 0xff, b'\n', 9],
    );
    let m = dlc_info_failed(&d, "junk.dlc");
    assert!(
        m.contains(&d.s("junk.dlc")) && m.contains("not a QSIM-DLC v1 file"),
        "{m}"
    );
    d.write("text.dlc", "hello\nworld\n");
    let m = dlc_info_failed(&d, "text.dlc");
    assert!(m.contains("first line: 'hello'"), "{m}");
    d.write("empty.dlc", "");
    assert!(dlc_info_failed(&d, "empty.dlc").contains("is empty"));
    // Sim files of other kinds, missing files, directories.
    let m = dlc_info_failed(&d, "s/llama3.onnx");
    assert!(m.contains("is a QSIM-ONNX v1 file"), "{m}");
    assert!(dlc_info_failed(&d, "missing.dlc").contains("missing.dlc"));
    assert!(dlc_info_failed(&d, "s").contains("is a directory"));
    // Header fields must parse.
    let text = String::from_utf8_lossy(&d.read("q.dlc")).into_owned();
    let edit = |name: &str, from: &str, to: &str| {
        assert!(text.contains(from), "{from}");
        d.write(name, text.replacen(from, to, 1));
        dlc_info_failed(&d, name)
    };
    let m = edit("nosize.dlc", "payload-bytes: 4096\n", "");
    assert!(m.contains("missing header field 'payload-bytes'"), "{m}");
    let m = edit(
        "badsize.dlc",
        "payload-bytes: 4096\n",
        "payload-bytes: 4k\n",
    );
    assert!(
        m.contains("payload-bytes: '4k' is not a whole number"),
        "{m}"
    );
    let m = edit(
        "signed.dlc",
        "payload-bytes: 4096\n",
        "payload-bytes: +4096\n",
    );
    assert!(m.contains("not a whole number"), "{m}");
    let m = edit("badbits.dlc", "act_bitwidth: 16\n", "act_bitwidth: 12\n");
    assert!(m.contains("act_bitwidth: 12 is not one of 8, 16"), "{m}");
    let m = edit("nobias.dlc", "bias_bitwidth: 32\n", "");
    assert!(m.contains("missing header field 'bias_bitwidth'"), "{m}");
    let m = edit(
        "dup.dlc",
        "graph: llama3\n",
        "graph: llama3\ngraph: other\n",
    );
    assert!(m.contains("'graph' appears more than once"), "{m}");
    let m = edit("hdr.dlc", "graph: llama3\n", "graph llama3\n");
    assert!(m.contains("hdr.dlc:3: malformed header line"), "{m}");
    // Usage errors.
    let u = usage("qairt-dlc-info", &v(&[]));
    assert!(u.contains("missing required flag --input_dlc"), "{u}");
    let u = usage("qairt-dlc-info", &v(&[&d.s("q.dlc")]));
    assert!(u.contains("unexpected argument"), "{u}");
    let u = usage("qairt-dlc-info", &v(&["-i", "a.dlc", "-o", "b"]));
    assert!(u.contains("unknown flag '-o'"), "{u}");
}

// ---------------------------------------------------------------- the device stage

/// The pipeline's four context binaries, a tokenizer, device libraries, and a Genie config
/// listing `bins` (paths relative to `root`): a device-side folder ready for genie-t2t-run.
fn genie_setup(d: &Scratch, bins: &[&str], size: u64) -> Ctx {
    sources(d, "m");
    chain(d, "m");
    d.write("m/tokenizer.json", r#"{"model": {"type": "BPE"}}"#);
    for lib in [
        "libGenie.so",
        "libQnnHtp.so",
        "libQnnSystem.so",
        "libQnnHtpV79Stub.so",
        "libQnnHtpV79Skel.so",
    ] {
        d.write(&format!("m/{lib}"), "placeholder");
    }
    let list: Vec<String> = bins.iter().map(|b| format!("\"{b}\"")).collect();
    d.write(
        "m/genie_config.json",
        format!(
            r#"{{"dialog": {{"context": {{"size": {size}}}, "tokenizer": {{"path": "tokenizer.json"}},
 "engine": {{"backend": {{"type": "QnnHtp"}}, "model": {{"binary": {{"ctx-bins": [{}]}}}}}}}}}}"#,
            list.join(", ")
        ),
    );
    Ctx {
        base: Some(d.path("m")),
        ld_library_path: Some(d.path("m").into_os_string()),
        adsp_library_path: Some(d.path("m").into_os_string()),
        ..Ctx::default()
    }
}

const BINS: [&str; 4] = [
    "out/bin/split_1.bin",
    "out/bin/split_2.bin",
    "out/bin/split_3.bin",
    "out/bin/split_4.bin",
];

fn genie(ctx: &mut Ctx, prompt: &str) -> Result<Vec<String>, SimError> {
    ctx.report.clear();
    run_in(
        ctx,
        "genie-t2t-run",
        &v(&["-c", "genie_config.json", "-p", prompt]),
    )?;
    Ok(ctx.report.clone())
}

#[test]
fn genie_answers_the_same_for_the_same_inputs_and_differently_otherwise() {
    let d = Scratch::new("genie");
    let mut ctx = genie_setup(&d, &BINS, 4096);
    let a = genie(&mut ctx, "What is the capital of France?").expect("runs");
    assert!(
        a.iter()
            .any(|l| l == "[PROMPT]: What is the capital of France?"),
        "{a:?}"
    );
    let answer = a
        .iter()
        .find(|l| l.starts_with("[BEGIN]: "))
        .expect("an answer");
    assert!(answer.ends_with(".[END]"), "{answer}");
    assert_eq!(
        genie(&mut ctx, "What is the capital of France?").expect("again"),
        a
    );
    // The prompt from a file, trailing newline dropped: the same answer.
    d.write("m/prompt.txt", "What is the capital of France?\n");
    ctx.report.clear();
    run_in(
        &mut ctx,
        "genie-t2t-run",
        &v(&["-c", "genie_config.json", "--prompt_file", "prompt.txt"]),
    )
    .expect("runs");
    assert_eq!(ctx.report, a);
    // Another prompt, or one binary's bytes changed: another answer.
    assert_ne!(genie(&mut ctx, "Name a river.").expect("runs"), a);
    let mut bin = d.read("m/out/bin/split_3.bin");
    let last = bin.len() - 1;
    bin[last] ^= 1;
    d.write("m/out/bin/split_3.bin", bin);
    assert_ne!(
        genie(&mut ctx, "What is the capital of France?").expect("runs"),
        a
    );
}

#[test]
fn genie_refuses_binaries_out_of_order_missing_or_for_another_context() {
    let d = Scratch::new("genie-bad");
    let failed_with = |ctx: &mut Ctx| match genie(ctx, "hi") {
        Err(SimError::Failed(m)) => m,
        other => panic!("expected a failure, got {other:?}"),
    };
    let mut ctx = genie_setup(&d, &[BINS[1], BINS[0], BINS[2], BINS[3]], 4096);
    let m = failed_with(&mut ctx);
    assert!(
        m.contains("split_2.bin") && m.contains("split order"),
        "{m}"
    );
    let mut ctx = genie_setup(&d, &BINS[..3], 4096);
    let m = failed_with(&mut ctx);
    assert!(m.contains("split 1 of 4") && m.contains("of 3"), "{m}");
    let mut ctx = genie_setup(&d, &BINS, 2048);
    let m = failed_with(&mut ctx);
    assert!(
        m.contains("context length 4096") && m.contains("2048"),
        "{m}"
    );
    // A library the device cannot find.
    let mut ctx = genie_setup(&d, &BINS, 4096);
    fs::remove_file(d.path("m/libQnnHtpV79Skel.so")).expect("rm");
    let m = failed_with(&mut ctx);
    assert!(
        m.contains("libQnnHtpV79Skel.so") && m.contains("ADSP_LIBRARY_PATH"),
        "{m}"
    );
    // Neither or both prompt flags: a usage error.
    let mut ctx = genie_setup(&d, &BINS, 4096);
    assert!(matches!(
        run_in(&mut ctx, "genie-t2t-run", &v(&["-c", "genie_config.json"])),
        Err(SimError::Usage(_))
    ));
}

#[test]
fn adb_maps_device_paths_into_its_folder_and_no_further() {
    use crate::device::{map_paths, on_device};
    let root = Path::new("/dev-root");
    assert_eq!(
        map_paths(
            root,
            "cd /data/local/tmp/m && LD_LIBRARY_PATH=/data/local/tmp/m ./run"
        ),
        "cd /dev-root/data/local/tmp/m && LD_LIBRARY_PATH=/dev-root/data/local/tmp/m ./run"
    );
    // Only whole components, at the start of a word.
    assert_eq!(
        map_paths(root, "echo /database x/data/y '/sdcard'"),
        "echo /database x/data/y '/dev-root/sdcard'"
    );
    assert_eq!(map_paths(root, "PATH=/data:/x"), "PATH=/dev-root/data:/x");
    assert_eq!(
        on_device(root, "/data/local/../tmp").expect("ok"),
        Path::new("/dev-root/data/tmp")
    );
    assert!(on_device(root, "/data/../../etc").is_err());
    assert!(on_device(root, "data/x").is_err());
}
