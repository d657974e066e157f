//! The simulated QAIRT tools (the on-device `genie-t2t-run` lives in `device`).

use std::ffi::{OsStr, OsString};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::cli::{self, Args, Flag, Kind, Parsed};
use crate::emit::{begin, Ctx, Out, Planned};
use crate::formats::{
    count_lines, hash_file, hash_tree, io_msg, json_kind, line_label, open_input, open_sim,
    read_encodings, read_json, remaining_bytes, scan_lines, Header, Key, CTXBIN_MAGIC, DLC_MAGIC,
    ONNX_MAGIC, QDLC_MAGIC,
};
use crate::SimError;

type Run = fn(&mut Ctx, &Args) -> Result<(), SimError>;

/// A simulated tool.
pub struct Tool {
    pub name: &'static str,
    pub about: &'static str,
    pub flags: &'static [Flag],
    run: Run,
}

pub const TOOLS: &[Tool] = &[
    Tool {
        name: "qairt-prepare-exports",
        about: "export one ONNX + encodings for an AR/CL from the base model",
        flags: PREPARE_FLAGS,
        run: prepare_exports,
    },
    Tool {
        name: "qairt-split-model",
        about: "split an exported ONNX into N parts",
        flags: SPLIT_FLAGS,
        run: split_model,
    },
    Tool {
        name: "mha2sha-onnx-converter",
        about: "convert multi-head attention to single-head attention",
        flags: MHA2SHA_FLAGS,
        run: mha2sha,
    },
    Tool {
        name: "qairt-converter",
        about: "convert an ONNX model to a DLC",
        flags: CONVERTER_FLAGS,
        run: converter,
    },
    Tool {
        name: "qairt-quantizer",
        about: "quantize a DLC with calibration inputs",
        flags: QUANTIZER_FLAGS,
        run: quantizer,
    },
    Tool {
        name: "qnn-context-binary-generator",
        about: "build one weight-shared context binary from quantized DLCs",
        flags: CTXBIN_FLAGS,
        run: context_binary,
    },
    Tool {
        name: "qairt-dlc-info",
        about: "check a DLC or quantized DLC and print a summary (writes nothing)",
        flags: DLC_INFO_FLAGS,
        run: dlc_info,
    },
    Tool {
        name: "genie-t2t-run",
        about: "(on the device) run the context binaries a Genie config names on a prompt",
        flags: crate::device::GENIE_FLAGS,
        run: crate::device::genie_t2t_run,
    },
];

pub fn find(name: &str) -> Option<&'static Tool> {
    TOOLS.iter().find(|t| t.name == name)
}

/// What running a tool's command line asked for.
pub enum Outcome {
    Ran,
    Help(String),
    Version(String),
}

/// Parse `argv` (without the tool name) and run the tool.
pub fn run(tool: &Tool, ctx: &mut Ctx, argv: &[OsString]) -> Result<Outcome, SimError> {
    match cli::parse(tool.name, tool.flags, argv)? {
        Parsed::Help => Ok(Outcome::Help(cli::usage(tool.name, tool.about, tool.flags))),
        Parsed::Version => Ok(Outcome::Version(format!(
            "{} (qairt-sim) {}",
            tool.name,
            crate::SIM_VERSION
        ))),
        Parsed::Run(args) => {
            (tool.run)(ctx, &args)?;
            Ok(Outcome::Ran)
        }
    }
}

// ---------------------------------------------------------------- helpers

/// A path flag: (resolved path, text as given).
fn path_arg(ctx: &Ctx, a: &Args, flag: &str) -> Result<(PathBuf, String), SimError> {
    let p = a.path(flag)?;
    Ok((ctx.resolve(p), p.to_string_lossy().into_owned()))
}

/// `DIR/FILE` for an output inside a directory flag.
fn in_dir(ctx: &Ctx, dir: &OsStr, file: &str, magic: &'static str) -> Planned {
    let shown_dir = dir.to_string_lossy();
    let trimmed = shown_dir.trim_end_matches('/');
    Planned {
        path: ctx.resolve(dir).join(file),
        shown: format!("{trimmed}/{file}"),
        magic,
    }
}

fn planned(ctx: &Ctx, a: &Args, flag: &str, magic: &'static str) -> Result<Planned, SimError> {
    let (path, shown) = path_arg(ctx, a, flag)?;
    Ok(Planned { path, shown, magic })
}

fn positive(a: &Args, flag: &str, max: u64) -> Result<u64, SimError> {
    let v = a.req_text(flag)?;
    match v.trim().parse::<u64>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ => Err(SimError::Usage(format!(
            "{flag}: expected a whole number from 1 to {max}, got '{}'",
            cli::sanitize(&v)
        ))),
    }
}

/// A name that becomes part of a file name.
fn file_name_arg(a: &Args, flag: &str) -> Result<String, SimError> {
    let v = a.req_text(flag)?;
    if v.is_empty() || v == "." || v == ".." || v.contains('/') || v.chars().any(|c| c.is_control())
    {
        return Err(SimError::Usage(format!(
            "{flag}: '{}' is not usable as a file name",
            cli::sanitize(&v)
        )));
    }
    Ok(v)
}

fn one_of(a: &Args, flag: &str, allowed: &[&str]) -> Result<Option<String>, SimError> {
    match a.text(flag)? {
        Some(v) if !allowed.contains(&v.as_str()) => Err(SimError::Usage(format!(
            "{flag}: '{}' is not one of {}",
            cli::sanitize(&v),
            allowed.join(", ")
        ))),
        other => Ok(other),
    }
}

/// Hex digits per derived payload line so that `lines` lines total about `payload` bytes.
fn line_hex(payload: u64, lines: u64) -> u64 {
    let per = payload / lines.max(1);
    (per.max(16)) & !1
}

/// One derived payload line: the input line's label and a weight blob seeded by the
/// input line's bytes and `key`.
fn derive_line(
    out: &mut Out,
    key: &blake3::Hash,
    label_src: &[u8],
    line_hash: &blake3::Hash,
    nhex: u64,
) -> Result<(), SimError> {
    let label = line_label(label_src);
    out.write(label.as_bytes())?;
    out.write(b" w=")?;
    let seed = Key::new("line").hash(key).hash(line_hash).finish();
    out.xof_hex(&seed, nhex)?;
    out.write(b"\n")
}

/// Write the payload lines of `r` transformed 1:1.
fn derive_lines<R: BufRead>(
    out: &mut Out,
    r: &mut R,
    shown: &str,
    key: &blake3::Hash,
    nhex: u64,
) -> Result<(), SimError> {
    scan_lines(r, shown, |line| {
        derive_line(out, key, line.prefix, &line.hash, nhex)
    })?;
    Ok(())
}

/// Write an encodings JSON: the input encodings plus a `qairt_sim` provenance object.
fn write_encodings(
    ctx: &mut Ctx,
    p: &Planned,
    mut map: Map<String, Value>,
    meta: Value,
) -> Result<(), SimError> {
    map.insert("qairt_sim".to_string(), meta);
    let mut text = serde_json::to_vec_pretty(&Value::Object(map))
        .map_err(|e| SimError::Failed(format!("cannot encode output '{}': {e}", p.shown)))?;
    text.push(b'\n');
    let mut out = Out::create(p)?;
    out.write(&text)?;
    out.finish(ctx)
}

// ---------------------------------------------------------------- prepare-exports

const PREPARE_FLAGS: &[Flag] = &[
    Flag::path("--onnx", "BASE.onnx", "base model (QSIM-ONNX)"),
    Flag::path(
        "--encodings",
        "BASE.encodings",
        "base AIMET encodings (JSON)",
    ),
    Flag::value("--ar", "AR", "autoregression length"),
    Flag::value("--cl", "CL", "context length"),
    Flag::path("--output-onnx", "OUT.onnx", "exported model to write"),
    Flag::path(
        "--output-encodings",
        "OUT.encodings",
        "exported encodings to write",
    ),
];

fn prepare_exports(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    let tool = a.tool();
    let ar = positive(a, "--ar", 1 << 20)?;
    let cl = positive(a, "--cl", 1 << 24)?;
    if ar > cl {
        return Err(SimError::Usage(format!(
            "--ar {ar} is larger than --cl {cl}"
        )));
    }
    let (onnx_p, onnx_s) = path_arg(ctx, a, "--onnx")?;
    let (enc_p, enc_s) = path_arg(ctx, a, "--encodings")?;
    let (enc, enc_hash) = read_encodings(&enc_p, &enc_s)?;
    let (hdr, mut r) = open_sim(&onnx_p, &onnx_s, &[ONNX_MAGIC])?;
    let (lines, _) = count_lines(&mut r, &onnx_s)?;
    drop(r);
    let flags = a.identity();
    let key = Key::new(tool).flags(&flags).hash(&enc_hash).finish();
    let outputs = [
        planned(ctx, a, "--output-onnx", ONNX_MAGIC)?,
        planned(ctx, a, "--output-encodings", "{")?,
    ];
    begin(
        ctx,
        tool,
        &[(onnx_p.clone(), onnx_s.clone()), (enc_p, enc_s)],
        &outputs,
    )?;

    let mut out = Out::create(&outputs[0])?;
    out.header(
        ONNX_MAGIC,
        &[
            ("producer", tool.to_string()),
            ("graph", hdr.graph()),
            ("ar", ar.to_string()),
            ("cl", cl.to_string()),
            ("flags", cli::render_flags(&flags)),
            ("source-encodings", enc_hash.to_hex().to_string()),
            ("payload-lines", lines.to_string()),
        ],
    )?;
    let (_, mut r) = open_sim(&onnx_p, &onnx_s, &[ONNX_MAGIC])?;
    derive_lines(
        &mut out,
        &mut r,
        &onnx_s,
        &key,
        line_hex(ctx.payload, lines),
    )?;
    out.finish(ctx)?;

    let meta = json!({
        "producer": tool,
        "flags": cli::render_flags(&flags),
        "ar": ar,
        "cl": cl,
        "source_encodings": enc_hash.to_hex().to_string(),
    });
    write_encodings(ctx, &outputs[1], enc, meta)
}

// ---------------------------------------------------------------- split-model

/// Most splits accepted (each split keeps one output file open while splitting).
const MAX_SPLITS: u64 = 256;

const SPLIT_FLAGS: &[Flag] = &[
    Flag::path("--onnx", "X.onnx", "exported model (QSIM-ONNX)"),
    Flag::path("--encodings", "X.encodings", "its encodings (JSON)"),
    Flag::value("--num-splits", "N", "number of splits"),
    Flag::value(
        "--model-name",
        "NAME",
        "graph name prefix; outputs NAME_{i}_of_{N}.onnx",
    ),
    Flag::path("--output-dir", "DIR", "directory for the split models"),
];

fn split_model(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    let tool = a.tool();
    let n = positive(a, "--num-splits", MAX_SPLITS)?;
    let name = file_name_arg(a, "--model-name")?;
    let (onnx_p, onnx_s) = path_arg(ctx, a, "--onnx")?;
    let (enc_p, enc_s) = path_arg(ctx, a, "--encodings")?;
    let (_, enc_hash) = read_encodings(&enc_p, &enc_s)?;
    let (_, mut r) = open_sim(&onnx_p, &onnx_s, &[ONNX_MAGIC])?;
    let (lines, _) = count_lines(&mut r, &onnx_s)?;
    drop(r);
    if lines < n {
        return Err(SimError::Failed(format!(
            "'{onnx_s}' has {lines} payload lines, fewer than --num-splits {n}"
        )));
    }
    let dir = a.path("--output-dir")?;
    let outputs: Vec<Planned> = (1..=n)
        .map(|i| in_dir(ctx, dir, &format!("{name}_{i}_of_{n}.onnx"), ONNX_MAGIC))
        .collect();
    begin(
        ctx,
        tool,
        &[(onnx_p.clone(), onnx_s.clone()), (enc_p, enc_s)],
        &outputs,
    )?;

    let flags = a.identity();
    // Chunk i (0-based) holds payload lines [start[i], start[i+1]).
    let start: Vec<u64> = (0..=n)
        .map(|i| ((i as u128 * lines as u128) / n as u128) as u64)
        .collect();
    let mut outs = Vec::with_capacity(outputs.len());
    let mut keys = Vec::with_capacity(outputs.len());
    let mut nhex = Vec::with_capacity(outputs.len());
    for (i, p) in outputs.iter().enumerate() {
        let chunk = start[i + 1] - start[i];
        let idx = i as u64 + 1;
        let mut out = Out::create(p)?;
        out.header(
            ONNX_MAGIC,
            &[
                ("producer", tool.to_string()),
                ("graph", format!("{name}_{idx}_of_{n}")),
                ("split", format!("{idx} of {n}")),
                ("flags", cli::render_flags(&flags)),
                ("source-encodings", enc_hash.to_hex().to_string()),
                ("payload-lines", chunk.to_string()),
            ],
        )?;
        outs.push(out);
        keys.push(
            Key::new(tool)
                .flags(&flags)
                .hash(&enc_hash)
                .u64(idx)
                .finish(),
        );
        nhex.push(line_hex(ctx.payload, chunk));
    }
    let (_, mut r) = open_sim(&onnx_p, &onnx_s, &[ONNX_MAGIC])?;
    let mut cur = 0usize;
    scan_lines(&mut r, &onnx_s, |line| {
        while cur + 1 < outs.len() && line.index >= start[cur + 1] {
            cur += 1;
        }
        derive_line(
            &mut outs[cur],
            &keys[cur],
            line.prefix,
            &line.hash,
            nhex[cur],
        )
    })?;
    for out in outs {
        out.finish(ctx)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- mha2sha

const MHA2SHA_FLAGS: &[Flag] = &[
    Flag::path(
        "--sha-export-path",
        "DIR",
        "directory for NAME.onnx and NAME.encodings",
    ),
    Flag::value("--model-name", "NAME", "graph name of the converted model"),
    Flag::path(
        "--exported-model-encoding-path",
        "ENC",
        "encodings of the input model",
    ),
    Flag::path("--exported-model-path", "ONNX", "input model (QSIM-ONNX)"),
    Flag::value("--base-llm", "LLM", "model family, e.g. llama3"),
    Flag::switch("--mha-conv", "convert linear projections to convolutions"),
    Flag::switch("--nchw-aligned", "emit NCHW-aligned single-head attention"),
];

fn mha2sha(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    let tool = a.tool();
    let name = file_name_arg(a, "--model-name")?;
    let base_llm = a.req_text("--base-llm")?;
    let (onnx_p, onnx_s) = path_arg(ctx, a, "--exported-model-path")?;
    let (enc_p, enc_s) = path_arg(ctx, a, "--exported-model-encoding-path")?;
    let (enc, enc_hash) = read_encodings(&enc_p, &enc_s)?;
    let (_, mut r) = open_sim(&onnx_p, &onnx_s, &[ONNX_MAGIC])?;
    let (lines, payload_hash) = count_lines(&mut r, &onnx_s)?;
    drop(r);
    let dir = a.path("--sha-export-path")?;
    let outputs = [
        in_dir(ctx, dir, &format!("{name}.onnx"), ONNX_MAGIC),
        in_dir(ctx, dir, &format!("{name}.encodings"), "{"),
    ];
    begin(
        ctx,
        tool,
        &[(onnx_p.clone(), onnx_s.clone()), (enc_p, enc_s)],
        &outputs,
    )?;

    let flags = a.identity();
    let key = Key::new(tool).flags(&flags).hash(&enc_hash).finish();
    let mut out = Out::create(&outputs[0])?;
    out.header(
        ONNX_MAGIC,
        &[
            ("producer", tool.to_string()),
            ("graph", name.clone()),
            ("attention", "single-head".to_string()),
            ("base-llm", base_llm),
            ("flags", cli::render_flags(&flags)),
            ("source-encodings", enc_hash.to_hex().to_string()),
            ("payload-lines", lines.to_string()),
        ],
    )?;
    let (_, mut r) = open_sim(&onnx_p, &onnx_s, &[ONNX_MAGIC])?;
    derive_lines(
        &mut out,
        &mut r,
        &onnx_s,
        &key,
        line_hex(ctx.payload, lines),
    )?;
    out.finish(ctx)?;

    let meta = json!({
        "producer": tool,
        "flags": cli::render_flags(&flags),
        "graph": name,
        "source_encodings": enc_hash.to_hex().to_string(),
        "source_model": payload_hash.to_hex().to_string(),
    });
    write_encodings(ctx, &outputs[1], enc, meta)
}

// ---------------------------------------------------------------- converter

const LAYOUTS: &[&str] = &[
    "NCDHW",
    "NDHWC",
    "NCHW",
    "NHWC",
    "NFC",
    "NCF",
    "NTF",
    "TNF",
    "NF",
    "NC",
    "F",
    "NONTRIVIAL",
];

const CONVERTER_FLAGS: &[Flag] = &[
    Flag::path("--input_network", "ONNX", "model to convert (QSIM-ONNX)").aliases(&["-i"]),
    Flag::path(
        "--quantization_overrides",
        "ENC",
        "encodings to carry into the DLC",
    )
    .optional(),
    Flag::path("--output_path", "DLC", "DLC to write").aliases(&["-o"]),
    Flag::value(
        "--source_model_input_layout",
        "NAME LAYOUT",
        "layout of an input tensor (NCHW, NHWC, NONTRIVIAL, ...)",
    )
    .kind(Kind::Pair)
    .optional()
    .repeated(),
];

fn converter(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    let tool = a.tool();
    for pair in a.all("--source_model_input_layout") {
        let layout = pair.get(1).map(|v| v.to_string_lossy()).unwrap_or_default();
        if !LAYOUTS.contains(&layout.as_ref()) {
            return Err(SimError::Usage(format!(
                "--source_model_input_layout: '{}' is not one of {}",
                cli::sanitize(&layout),
                LAYOUTS.join(", ")
            )));
        }
    }
    let (onnx_p, onnx_s) = path_arg(ctx, a, "--input_network")?;
    let (hdr, r) = open_sim(&onnx_p, &onnx_s, &[ONNX_MAGIC])?;
    drop(r);
    let onnx_hash = hash_file(&onnx_p, &onnx_s)?;
    let mut inputs = vec![(onnx_p, onnx_s)];
    let enc_hash = match a.os("--quantization_overrides") {
        Some(p) => {
            let (enc_p, enc_s) = (ctx.resolve(p), p.to_string_lossy().into_owned());
            let (_, h) = read_encodings(&enc_p, &enc_s)?;
            inputs.push((enc_p, enc_s));
            Some(h)
        }
        None => None,
    };
    let outputs = [planned(ctx, a, "--output_path", DLC_MAGIC)?];
    begin(ctx, tool, &inputs, &outputs)?;

    let flags = a.identity();
    let mut k = Key::new(tool);
    k.flags(&flags).hash(&onnx_hash);
    match &enc_hash {
        Some(h) => k.str("overrides").hash(h),
        None => k.str("no-overrides"),
    };
    let key = k.finish();
    let mut out = Out::create(&outputs[0])?;
    out.header(
        DLC_MAGIC,
        &[
            ("producer", tool.to_string()),
            ("graph", hdr.graph()),
            ("flags", cli::render_flags(&flags)),
            ("source-model", onnx_hash.to_hex().to_string()),
            (
                "quantization-overrides",
                enc_hash.map_or("none".to_string(), |h| h.to_hex().to_string()),
            ),
            ("payload-bytes", ctx.payload.to_string()),
            ("key", key.to_hex().to_string()),
        ],
    )?;
    out.xof_raw(&key, ctx.payload)?;
    out.finish(ctx)
}

// ---------------------------------------------------------------- quantizer

/// Largest input list read.
const LIST_LIMIT: u64 = 16 * 1024 * 1024;

const QUANTIZER_FLAGS: &[Flag] = &[
    Flag::path("--input_dlc", "DLC", "float DLC from qairt-converter"),
    Flag::path(
        "--input_list",
        "LIST",
        "text file of calibration inputs, one line each",
    ),
    Flag::path("--output_dlc", "QDLC", "quantized DLC to write"),
    Flag::value("--act_bitwidth", "N", "activation bitwidth: 8 or 16").default("8"),
    Flag::value("--bias_bitwidth", "N", "bias bitwidth: 8 or 32").default("8"),
];

/// Hash every input named by an input list: `path` or `name:=path` tokens, blank lines
/// and lines starting with `#` or `%` skipped; paths relative to the current directory.
fn hash_input_list(ctx: &Ctx, path: &Path, shown: &str) -> Result<(blake3::Hash, u64), SimError> {
    use std::io::Read;
    let f = open_input(path, shown)?;
    let mut bytes = Vec::new();
    f.take(LIST_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SimError::Failed(format!("cannot read '{shown}': {}", io_msg(&e))))?;
    if bytes.len() as u64 > LIST_LIMIT {
        return Err(SimError::Failed(format!(
            "'{shown}' is too large for an input list (limit {LIST_LIMIT} bytes)"
        )));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return Err(SimError::Failed(format!(
            "'{shown}' is not a text input list (invalid UTF-8)"
        )));
    };
    let mut key = Key::new("input-list");
    let mut count = 0u64;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with('%') {
            continue;
        }
        for tok in t.split_whitespace() {
            let (name, p) = tok.split_once(":=").unwrap_or(("", tok));
            if p.is_empty() {
                return Err(SimError::Failed(format!(
                    "{shown}:{}: empty path in '{tok}'",
                    i + 1
                )));
            }
            let resolved = ctx.resolve(OsStr::new(p));
            if let Err(e) = std::fs::metadata(&resolved) {
                return Err(SimError::Failed(format!(
                    "{shown}:{}: calibration input '{p}': {}",
                    i + 1,
                    io_msg(&e)
                )));
            }
            let h = hash_tree(&resolved, p)?;
            key.str(name).hash(&h);
            count += 1;
        }
    }
    if count == 0 {
        return Err(SimError::Failed(format!("'{shown}' lists no inputs")));
    }
    key.u64(count);
    Ok((key.finish(), count))
}

fn quantizer(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    let tool = a.tool();
    let act = one_of(a, "--act_bitwidth", &["8", "16"])?.unwrap_or_default();
    let bias = one_of(a, "--bias_bitwidth", &["8", "32"])?.unwrap_or_default();
    let (dlc_p, dlc_s) = path_arg(ctx, a, "--input_dlc")?;
    let (hdr, r) = open_sim(&dlc_p, &dlc_s, &[DLC_MAGIC, QDLC_MAGIC])?;
    drop(r);
    if hdr.magic == QDLC_MAGIC {
        return Err(SimError::Failed(format!(
            "'{dlc_s}' is already quantized ({QDLC_MAGIC}); expected a float DLC from qairt-converter"
        )));
    }
    let dlc_hash = hash_file(&dlc_p, &dlc_s)?;
    let (list_p, list_s) = path_arg(ctx, a, "--input_list")?;
    let (calib_hash, calib_count) = hash_input_list(ctx, &list_p, &list_s)?;
    let outputs = [planned(ctx, a, "--output_dlc", QDLC_MAGIC)?];
    begin(ctx, tool, &[(dlc_p, dlc_s), (list_p, list_s)], &outputs)?;

    let flags = a.identity();
    let key = Key::new(tool)
        .flags(&flags)
        .hash(&dlc_hash)
        .hash(&calib_hash)
        .finish();
    let mut out = Out::create(&outputs[0])?;
    out.header(
        QDLC_MAGIC,
        &[
            ("producer", tool.to_string()),
            ("graph", hdr.graph()),
            ("act_bitwidth", act),
            ("bias_bitwidth", bias),
            ("flags", cli::render_flags(&flags)),
            ("source-dlc", dlc_hash.to_hex().to_string()),
            ("calibration-inputs", calib_count.to_string()),
            ("calibration", calib_hash.to_hex().to_string()),
            ("payload-bytes", ctx.payload.to_string()),
            ("key", key.to_hex().to_string()),
        ],
    )?;
    out.xof_raw(&key, ctx.payload)?;
    out.finish(ctx)
}

// ---------------------------------------------------------------- context binary

const CTXBIN_FLAGS: &[Flag] = &[
    Flag::value("--backend", "LIB", "backend library, e.g. libQnnHtp.so"),
    Flag::value("--model", "LIB", "model library, e.g. libQnnModelDlc.so"),
    Flag::value("--input_output_tensor_mem_type", "TYPE", "raw or memhandle").default("raw"),
    Flag::path("--output_dir", "DIR", "directory for NAME.bin"),
    Flag::path(
        "--config_file",
        "CFG.json",
        "backend extensions config (JSON)",
    )
    .optional(),
    Flag::value("--binary_file", "NAME", "output name; writes DIR/NAME.bin"),
    Flag::path(
        "--dlc_path",
        "A.dlc,B.dlc",
        "quantized DLCs, comma-separated",
    )
    .kind(Kind::PathList),
];

fn basename(s: &str) -> String {
    match s.rsplit_once('/') {
        Some((_, b)) => b.to_string(),
        None => s.to_string(),
    }
}

/// A library flag: its basename is its identity; a value with a `/` must exist.
fn library_arg(ctx: &Ctx, a: &Args, flag: &str) -> Result<String, SimError> {
    let v = a.req_text(flag)?;
    let base = basename(&v);
    if base.is_empty() {
        return Err(SimError::Usage(format!("{flag}: '{v}' names no library")));
    }
    if v.contains('/') && !ctx.resolve(OsStr::new(&v)).is_file() {
        return Err(SimError::Failed(format!("{flag}: library '{v}' not found")));
    }
    Ok(base)
}

/// The backend extension config: its identity bytes, and the .conf settings.
struct Config {
    identity: Vec<u8>,
    conf_hash: blake3::Hash,
    graph_names: Vec<String>,
    conf_shown: String,
    weight_sharing: bool,
}

fn read_config(ctx: &Ctx, path: &Path, shown: &str) -> Result<(Config, PathBuf), SimError> {
    let (mut cfg, _) = read_json(path, shown)?;
    let Some(ext) = cfg.get_mut("backend_extensions") else {
        return Err(SimError::Failed(format!(
            "'{shown}': missing \"backend_extensions\" object"
        )));
    };
    let Value::Object(ext) = ext else {
        return Err(SimError::Failed(format!(
            "'{shown}': \"backend_extensions\" must be an object, found {}",
            json_kind(ext)
        )));
    };
    let conf_rel = match ext.remove("config_file_path") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(other) => {
            return Err(SimError::Failed(format!(
            "'{shown}': backend_extensions.config_file_path must be a non-empty string, found {}",
            json_kind(&other)
        )))
        }
        None => {
            return Err(SimError::Failed(format!(
                "'{shown}': missing backend_extensions.config_file_path"
            )))
        }
    };
    if let Some(Value::String(lib)) = ext.get_mut("shared_library_path") {
        *lib = basename(lib);
    }
    // Relative to the current directory, else to the JSON's own directory.
    let rel = Path::new(&conf_rel);
    let from_cwd = ctx.resolve(rel.as_os_str());
    let conf_path = if rel.is_absolute() || from_cwd.exists() {
        from_cwd
    } else {
        let beside = path.parent().unwrap_or(Path::new("")).join(rel);
        if beside.exists() {
            beside
        } else {
            return Err(SimError::Failed(format!(
                "'{shown}': config_file_path '{conf_rel}' not found \
                 (looked in the current directory and next to '{shown}')"
            )));
        }
    };
    let (conf, conf_hash) = read_json(&conf_path, &conf_rel)?;
    let Value::Object(conf) = conf else {
        return Err(SimError::Failed(format!(
            "'{conf_rel}': the config must be a JSON object, found {}",
            json_kind(&conf)
        )));
    };
    let mut graph_names = Vec::new();
    match conf.get("graphs") {
        None => {}
        Some(Value::Array(graphs)) => {
            for g in graphs {
                match g.get("graph_names") {
                    None => {}
                    Some(Value::Array(names)) => {
                        for n in names {
                            match n {
                                Value::String(s) => graph_names.push(s.clone()),
                                other => {
                                    return Err(SimError::Failed(format!(
                                        "'{conf_rel}': graph_names must hold strings, found {}",
                                        json_kind(other)
                                    )))
                                }
                            }
                        }
                    }
                    Some(other) => {
                        return Err(SimError::Failed(format!(
                            "'{conf_rel}': graph_names must be an array, found {}",
                            json_kind(other)
                        )))
                    }
                }
            }
        }
        Some(other) => {
            return Err(SimError::Failed(format!(
                "'{conf_rel}': \"graphs\" must be an array, found {}",
                json_kind(other)
            )))
        }
    }
    let weight_sharing = matches!(
        conf.get("context")
            .and_then(|c| c.get("weight_sharing_enabled")),
        Some(Value::Bool(true))
    );
    let identity = serde_json::to_vec(&cfg).unwrap_or_default();
    Ok((
        Config {
            identity,
            conf_hash,
            graph_names,
            conf_shown: conf_rel,
            weight_sharing,
        },
        conf_path,
    ))
}

fn context_binary(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    let tool = a.tool();
    let backend = library_arg(ctx, a, "--backend")?;
    let model = library_arg(ctx, a, "--model")?;
    one_of(a, "--input_output_tensor_mem_type", &["raw", "memhandle"])?;
    let name = file_name_arg(a, "--binary_file")?;
    let list = a.path("--dlc_path")?.to_string_lossy().into_owned();
    let mut inputs = Vec::new();
    for part in list.split(',') {
        if part.is_empty() {
            return Err(SimError::Usage(format!(
                "--dlc_path: empty entry in '{list}'"
            )));
        }
        inputs.push((ctx.resolve(OsStr::new(part)), part.to_string()));
    }
    let mut graphs: Vec<String> = Vec::new();
    let mut dlc_hashes = Vec::new();
    for (p, s) in &inputs {
        let (hdr, r) = open_sim(p, s, &[QDLC_MAGIC, DLC_MAGIC])?;
        drop(r);
        if hdr.magic != QDLC_MAGIC {
            return Err(SimError::Failed(format!(
                "'{s}' is not a quantized DLC ({}); run qairt-quantizer first",
                hdr.magic
            )));
        }
        let g = hdr.graph();
        if graphs.contains(&g) {
            return Err(SimError::Failed(format!(
                "'{s}': graph '{g}' is already provided by another DLC in --dlc_path"
            )));
        }
        graphs.push(g);
        dlc_hashes.push(hash_file(p, s)?);
    }
    let config = match a.os("--config_file") {
        Some(c) => {
            let (cp, cs) = (ctx.resolve(c), c.to_string_lossy().into_owned());
            let (config, conf_path) = read_config(ctx, &cp, &cs)?;
            if !config.graph_names.is_empty() {
                for (g, (_, s)) in graphs.iter().zip(&inputs) {
                    if !config.graph_names.contains(g) {
                        return Err(SimError::Failed(format!(
                            "'{}': graph_names does not list graph '{g}' of '{s}'",
                            config.conf_shown
                        )));
                    }
                }
            }
            inputs.push((cp, cs));
            inputs.push((conf_path, config.conf_shown.clone()));
            Some(config)
        }
        None => None,
    };
    let dir = a.path("--output_dir")?;
    let outputs = [in_dir(ctx, dir, &format!("{name}.bin"), CTXBIN_MAGIC)];
    begin(ctx, tool, &inputs, &outputs)?;

    let mut flags = a.identity();
    for (flag, values) in flags.iter_mut() {
        if flag == "--backend" || flag == "--model" {
            for v in values.iter_mut() {
                *v = basename(v);
            }
        }
    }
    let mut k = Key::new(tool);
    k.flags(&flags).u64(dlc_hashes.len() as u64);
    for h in &dlc_hashes {
        k.hash(h);
    }
    match &config {
        Some(c) => k.str("config").bytes(&c.identity).hash(&c.conf_hash),
        None => k.str("no-config"),
    };
    let key = k.finish();
    let hex_list = |hs: &[blake3::Hash]| {
        hs.iter()
            .map(|h| h.to_hex().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Out::create(&outputs[0])?;
    out.header(
        CTXBIN_MAGIC,
        &[
            ("producer", tool.to_string()),
            ("binary", name),
            ("backend", backend),
            ("model", model),
            ("graphs", graphs.join(", ")),
            (
                "weight-sharing",
                config
                    .as_ref()
                    .is_some_and(|c| c.weight_sharing)
                    .to_string(),
            ),
            ("flags", cli::render_flags(&flags)),
            ("source-dlcs", hex_list(&dlc_hashes)),
            (
                "config",
                config
                    .as_ref()
                    .map_or("none".to_string(), |c| c.conf_hash.to_hex().to_string()),
            ),
            ("payload-bytes", ctx.payload.to_string()),
            ("key", key.to_hex().to_string()),
        ],
    )?;
    out.xof_raw(&key, ctx.payload)?;
    out.finish(ctx)
}

// ---------------------------------------------------------------- dlc-info

const DLC_INFO_FLAGS: &[Flag] =
    &[Flag::path("--input_dlc", "DLC", "DLC or quantized DLC to inspect").aliases(&["-i"])];

/// A required header field holding a whole number.
fn header_number(hdr: &Header, shown: &str, key: &str) -> Result<u64, SimError> {
    let Some(v) = hdr.get(key) else {
        return Err(SimError::Failed(format!(
            "'{shown}': missing header field '{key}'"
        )));
    };
    match v.parse::<u64>() {
        Ok(n) if v.bytes().all(|c| c.is_ascii_digit()) => Ok(n),
        _ => Err(SimError::Failed(format!(
            "'{shown}': header field {key}: '{}' is not a whole number",
            cli::sanitize(v)
        ))),
    }
}

/// A required bitwidth header field, one of `allowed`.
fn header_bitwidth(hdr: &Header, shown: &str, key: &str, allowed: &[u64]) -> Result<u64, SimError> {
    let n = header_number(hdr, shown, key)?;
    if allowed.contains(&n) {
        return Ok(n);
    }
    let list: Vec<String> = allowed.iter().map(u64::to_string).collect();
    Err(SimError::Failed(format!(
        "'{shown}': header field {key}: {n} is not one of {}",
        list.join(", ")
    )))
}

fn dlc_info(ctx: &mut Ctx, a: &Args) -> Result<(), SimError> {
    let (path, shown) = path_arg(ctx, a, "--input_dlc")?;
    let shown = cli::sanitize(&shown);
    let (hdr, mut r) = open_sim(&path, &shown, &[DLC_MAGIC, QDLC_MAGIC])?;
    for (i, (k, _)) in hdr.fields.iter().enumerate() {
        if hdr.fields[..i].iter().any(|(prev, _)| prev == k) {
            return Err(SimError::Failed(format!(
                "'{shown}': header field '{k}' appears more than once"
            )));
        }
    }
    let quantized = hdr.magic == QDLC_MAGIC;
    let want = header_number(&hdr, &shown, "payload-bytes")?;
    let bits = if quantized {
        Some((
            header_bitwidth(&hdr, &shown, "act_bitwidth", &[8, 16])?,
            header_bitwidth(&hdr, &shown, "bias_bitwidth", &[8, 32])?,
        ))
    } else {
        None
    };
    let got = remaining_bytes(&mut r, &shown)?;
    if got < want {
        return Err(SimError::Failed(format!(
            "'{shown}' is truncated: its header records payload-bytes: {want}, \
             but only {got} payload bytes follow"
        )));
    }
    if got > want {
        return Err(SimError::Failed(format!(
            "'{shown}' has {got} payload bytes, more than the payload-bytes: {want} \
             its header records (trailing data)"
        )));
    }
    let kind = if quantized { "quantized DLC" } else { "DLC" };
    ctx.report.push(format!("file: {shown}"));
    ctx.report.push(format!("kind: {kind} ({})", hdr.magic));
    ctx.report
        .push(format!("graph: {}", cli::sanitize(&hdr.graph())));
    if let Some((act, bias)) = bits {
        ctx.report.push(format!("act_bitwidth: {act}"));
        ctx.report.push(format!("bias_bitwidth: {bias}"));
    }
    ctx.report.push(format!("payload-bytes: {got}"));
    Ok(())
}
