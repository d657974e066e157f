#!/usr/bin/env python3
"""Write a build.ninja and a Makefile equivalent to Qairtfile.example's default graph.

    demo_ninja.py --sdk SDK_ROOT --out DIR

Mirrors Qairtfile.example as of 2026-11-26 (commit 28d693f: model llama3, cl 4096,
ars [128, 1], 4 splits, split links, quantize check): the same 30 tool commands with the
same arguments (plus the quantize sanity check and the split links, made with `ln -sfn`),
and the 16 generated files (qbuild `content` rules) written with printf, byte-identical to
qbuild's. If Qairtfile.example changes, update this file: bigfiles.sh reports whether the
outputs still match qbuild's. Used by
bigfiles.sh to time what ninja and make do after `touch` of the demo's sources (they rerun
everything). DIR must already hold the demo's models/ folder.

The Makefile has no equivalent of the `quantize` pool (depth 1): make -j2 may run two
quantize jobs at once. Python 3 standard library only.
"""

import argparse
import json
import os

MODEL, CL, ARS, S = "llama3", 4096, [128, 1], 4
BASE_ONNX, BASE_ENC = f"models/{MODEL}.onnx", f"models/{MODEL}.encodings"


def edges(bin_dir):
    """(name, inputs, outputs, command, pool) in build order."""
    out = []
    splits = range(1, S + 1)
    for ar in ARS:
        d = f"models_ar_n/ar{ar}-cl{CL}/onnx"
        o = [f"{d}/{MODEL}.onnx", f"{d}/{MODEL}.encodings"]
        out.append((f"export ar={ar}", [BASE_ONNX, BASE_ENC], o,
                    f"{bin_dir}/qairt-prepare-exports --onnx {BASE_ONNX} --encodings {BASE_ENC} --ar {ar} --cl {CL} "
                    f"--output-onnx {o[0]} --output-encodings {o[1]}", None))
    for ar in ARS:
        name = f"ar{ar}-cl{CL}"
        i = [f"models_ar_n/{name}/onnx/{MODEL}.onnx", f"models_ar_n/{name}/onnx/{MODEL}.encodings"]
        o = [f"models_ar_n/{name}/splits/{name}_{s}_of_{S}.onnx" for s in splits]
        links = []
        for s in splits:
            links.append((f"models_ar_n/{name}/splits/{name}_{s}_of_{S}.encodings", f"../onnx/{MODEL}.encodings"))
            links.append((f"models_ar_n/{name}/splits/test_vectors_{s}", "../../../models/test_vectors"))
        out.append((f"split ar={ar}", i, o + [l for l, _ in links],
                    f"{bin_dir}/qairt-split-model --onnx {i[0]} --encodings {i[1]} --num-splits {S} "
                    f"--model-name {name} --output-dir models_ar_n/{name}/splits"
                    + "".join(f" && ln -sfn {t} {l}" for l, t in links), None))
    for ar in ARS:
        for s in splits:
            if s == 1:
                continue
            name = f"ar{ar}-cl{CL}_{s}_of_{S}"
            sha = f"models_ar_n/ar{ar}-cl{CL}/sha"
            i = [f"models_ar_n/ar{ar}-cl{CL}/splits/{name}.onnx", f"models_ar_n/ar{ar}-cl{CL}/splits/{name}.encodings"]
            o = [f"{sha}/{name}.onnx", f"{sha}/{name}.encodings"]
            out.append((f"mha2sha ar={ar} split={s}", i, o,
                        f"{bin_dir}/mha2sha-onnx-converter --sha-export-path {sha} --model-name {name} "
                        f"--exported-model-encoding-path {i[1]} --exported-model-path {i[0]} --base-llm {MODEL} "
                        f"--mha-conv --nchw-aligned", None))
    for ar in ARS:
        for s in splits:
            name = f"ar{ar}-cl{CL}_{s}_of_{S}"
            if s == 1:
                onnx = f"models_ar_n/ar{ar}-cl{CL}/splits/{name}.onnx"
                enc = f"models_ar_n/ar{ar}-cl{CL}/splits/{name}.encodings"
            else:
                onnx = f"models_ar_n/ar{ar}-cl{CL}/sha/{name}.onnx"
                enc = f"models_ar_n/ar{ar}-cl{CL}/sha/{name}.encodings"
            o = [f"converted_model/{name}.dlc"]
            out.append((f"convert ar={ar} split={s}", [onnx, enc], o,
                        f"{bin_dir}/qairt-converter --input_network {onnx} --quantization_overrides {enc} -o {o[0]} "
                        f"--source_model_input_layout input_ids NONTRIVIAL", None))
    for ar in ARS:
        for s in splits:
            lst = f"models_ar_n/ar{ar}-cl{CL}/input_lists/input_list_{s}.txt"
            out.append((f"input_list ar={ar} split={s}", [], [lst],
                        printf(f"models_ar_n/ar{ar}-cl{CL}/splits/test_vectors_{s}\n", lst), None))
    for ar in ARS:
        for s in splits:
            name = f"ar{ar}-cl{CL}_{s}_of_{S}"
            lst = f"models_ar_n/ar{ar}-cl{CL}/input_lists/input_list_{s}.txt"
            i = [f"converted_model/{name}.dlc", lst, f"models_ar_n/ar{ar}-cl{CL}/splits/test_vectors_{s}"]
            o = [f"compiled_model/{name}_quantized.dlc"]
            out.append((f"quantize ar={ar} split={s}", i, o,
                        f"{bin_dir}/qairt-quantizer --input_dlc {i[0]} --input_list {lst} --output_dlc {o[0]} "
                        f"--act_bitwidth 16 --bias_bitwidth 32 && {bin_dir}/qairt-dlc-info -i {o[0]}", "quantize"))
    for s in splits:
        names = [f"ar{ar}-cl{CL}_{s}_of_{S}" for ar in ARS]
        text = ('{\n  "graphs": [{"O": 3, "vtcm_mb": 8, "graph_names": ' + json.dumps(names, separators=(",", ":"))
                + '}],\n  "devices": [{"soc_model": 69, "dsp_arch": "v79", "cores": [{"core_id": 0, "perf_profile": "burst", '
                '"rpc_control_latency": 100}]}],\n  "context": {"weight_sharing_enabled": true},\n  "memory": {"mem_type": "shared_buffer"}\n}\n')
        conf = f"artifacts/configs/PerfSetting_{s}.conf"
        out.append((f"perf_config split={s}", [], [conf], printf(text, conf), None))
        js = f"artifacts/configs/htp_backend_ext_config_{s}.json"
        text = ('{"backend_extensions": {"shared_library_path": "libQnnHtpNetRunExtensions.so", "config_file_path": "'
                + conf + '"}}\n')
        out.append((f"backend_config split={s}", [conf], [js], printf(text, js), None))
    for s in splits:
        dlcs = [f"compiled_model/ar{ar}-cl{CL}_{s}_of_{S}_quantized.dlc" for ar in ARS]
        config = f"artifacts/configs/htp_backend_ext_config_{s}.json"
        o = [f"artifacts/serialized_binaries/split_{s}.bin"]
        out.append((f"context binary split={s}", dlcs + [config, f"artifacts/configs/PerfSetting_{s}.conf"], o,
                    f"{bin_dir}/qnn-context-binary-generator --backend libQnnHtp.so --model libQnnModelDlc.so "
                    f"--input_output_tensor_mem_type memhandle --output_dir artifacts/serialized_binaries "
                    f"--config_file {config} --binary_file split_{s} --dlc_path {','.join(dlcs)}", None))
    return out


def printf(text, out):
    """A shell command writing `text` exactly (no `%`, `\\` or `'` in it)."""
    assert not any(c in text for c in "%\\'")
    return "printf '" + text.replace("\n", "\\n") + "' > " + out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdk", required=True, help="QNN_SDK_ROOT (absolute)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    bin_dir = os.path.join(a.sdk, "bin/x86_64-linux-clang")
    es = edges(bin_dir)
    with open(os.path.join(a.out, "build.ninja"), "w") as f:
        f.write("# Qairtfile.example's default graph for ninja (bench/demo_ninja.py).\n")
        f.write("pool quantize\n  depth = 1\n\nrule run\n  command = $cmd\n  description = $desc\n\n")
        for desc, ins, outs, cmd, pool in es:
            f.write(f"build {' '.join(outs)}: run {' '.join(ins)}\n  cmd = {cmd.replace('$', '$$')}\n  desc = {desc}\n")
            if pool:
                f.write(f"  pool = {pool}\n")
    finals = [outs[0] for desc, _, outs, _, _ in es if desc.startswith("context binary")]
    with open(os.path.join(a.out, "Makefile"), "w") as f:
        f.write("# Qairtfile.example's default graph for GNU make >= 4.3 (bench/demo_ninja.py).\n")
        f.write("MAKEFLAGS += --no-builtin-rules --no-builtin-variables\n.SUFFIXES:\n.PHONY: all\n")
        f.write("all: " + " ".join(finals) + "\n\n")
        for desc, ins, outs, cmd, _ in es:
            sep = " &:" if len(outs) > 1 else ":"
            dirs = sorted({os.path.dirname(o) for o in outs})
            f.write(f"{' '.join(outs)}{sep} {' '.join(ins)}\n\t@mkdir -p {' '.join(dirs)}\n\t{cmd.replace('$', '$$')}\n")


if __name__ == "__main__":
    main()
