#!/usr/bin/env python3
"""Write one synthetic QAIRT-shaped build graph as a Qairtfile, a build.ninja and a Makefile.

    gen.py --variants V --splits S --out DIR

The graph has V model variants; each variant has ARs [128, 1] and S splits and runs

    export (per AR, 2 outputs: onnx + encodings)
      -> split (per AR, one command writes S split .onnx files)
      -> sha (per AR and split, not for split 1)
      -> convert (per AR and split; split 1 converts the split .onnx directly)
      -> quantize (per AR and split; also reads the shared input list)
      -> context binary (per split; reads the quantized .dlc of both ARs)

with plain, cheap shell commands (`cat ... > OUT`). Per variant that is
2 + 2 + 2(S-1) + 2S + 2S + S commands and 4 + 2S + 2(S-1) + 2S + 2S + S outputs:
30 commands / 38 outputs at S=4, so V=3000 gives 90,000 commands / 114,000 outputs.

Sources (DIR/src/...): per variant `src/vN/model.onnx` and `src/vN/model.encodings`,
plus one shared `src/input_list.txt`. All three build files produce byte-identical outputs
under DIR/out/ (the same commands, in the same input order).

The output directories are created by this script (ninja and qbuild create missing output
directories themselves, GNU make does not), so the three tools run the same commands.
Use --no-mkdirs to skip that (then only ninja and qbuild can build the tree).

Python 3 standard library only.
"""

import argparse
import os
import sys

ARS = [128, 1]  # largest AR first, as the context binary lists it first
CL = 4096


def split_name(ar, split, splits):
    return f"ar{ar}-cl{CL}_{split}_of_{splits}"


class Graph:
    """The expanded graph: list of (rule, inputs, outputs) in a valid build order."""

    def __init__(self, variants, splits):
        self.variants = variants
        self.splits = splits
        self.edges = []
        self.dirs = set()
        for v in range(1, variants + 1):
            self._variant(v)

    def _add(self, rule, inputs, outputs):
        self.edges.append((rule, inputs, outputs))
        for o in outputs:
            self.dirs.add(os.path.dirname(o))

    def _variant(self, v):
        S = self.splits
        src = f"src/v{v}/model"
        root = f"out/v{v}"
        for ar in ARS:
            d = f"{root}/models_ar_n/ar{ar}-cl{CL}"
            ex_onnx, ex_enc = f"{d}/onnx/model.onnx", f"{d}/onnx/model.encodings"
            self._add("export", [f"{src}.onnx", f"{src}.encodings"], [ex_onnx, ex_enc])
            self._add("split", [ex_onnx, ex_enc],
                      [f"{d}/splits/{split_name(ar, s, S)}.onnx" for s in range(1, S + 1)])
            for s in range(2, S + 1):
                n = split_name(ar, s, S)
                self._add("sha", [f"{d}/splits/{n}.onnx", ex_enc], [f"{d}/sha/{n}.onnx"])
            for s in range(1, S + 1):
                n = split_name(ar, s, S)
                onnx = f"{d}/splits/{n}.onnx" if s == 1 else f"{d}/sha/{n}.onnx"
                self._add("convert", [onnx, ex_enc], [f"{root}/converted_model/{n}.dlc"])
            for s in range(1, S + 1):
                n = split_name(ar, s, S)
                self._add("quantize", [f"{root}/converted_model/{n}.dlc", "src/input_list.txt"],
                          [f"{root}/compiled_model/{n}_quantized.dlc"])
        for s in range(1, S + 1):
            self._add("context_binary",
                      [f"{root}/compiled_model/{split_name(ar, s, S)}_quantized.dlc" for ar in ARS],
                      [f"{root}/serialized_binaries/split_{s}.bin"])


# The shell commands, written once per rule over the rule's inputs/outputs. `$f`, `$1`,
# `$o` are shell variables.
def sh_command(rule, inputs, outputs):
    i, o = " ".join(inputs), " ".join(outputs)
    if rule == "export":
        return f"set -- {o}; for f in {i}; do cat $f > $1; shift; done"
    if rule == "split":
        return f"for o in {o}; do {{ cat {i}; echo $o; }} > $o; done"
    return f"cat {i} > {o}"


def write_qairtfile(path, variants, splits):
    text = f'''# Synthetic QAIRT-shaped graph: {variants} variants x ARs {ARS} x {splits} splits (bench/gen.py).
# export -> split -> sha (splits 2..S) -> convert -> quantize -> context binary per split.

[vars]
cl = {CL}
ars = [{", ".join(str(a) for a in ARS)}]
num_splits = {splits}
splits = {{ range = [1, "${{num_splits}}"] }}
variants = {{ range = [1, {variants}] }}
input_list = "src/input_list.txt"

[rule.export]
matrix = {{ v = "${{variants}}", ar = "${{ars}}" }}
let = {{ src = "src/v${{v}}/model", d = "out/v${{v}}/models_ar_n/ar${{ar}}-cl${{cl}}/onnx" }}
inputs = ["${{src}}.onnx", "${{src}}.encodings"]
outputs = ["${{d}}/model.onnx", "${{d}}/model.encodings"]
command = "set -- ${{outputs}}; for f in ${{inputs}}; do cat $f > $1; shift; done"

[rule.split]
matrix = {{ v = "${{variants}}", ar = "${{ars}}" }}
let = {{ d = "out/v${{v}}/models_ar_n/ar${{ar}}-cl${{cl}}" }}
inputs = ["${{d}}/onnx/model.onnx", "${{d}}/onnx/model.encodings"]
outputs = ["${{d}}/splits/ar${{ar}}-cl${{cl}}_${{splits}}_of_${{num_splits}}.onnx"]
command = "for o in ${{outputs}}; do {{ cat ${{inputs}}; echo $o; }} > $o; done"

[rule.sha]
matrix = {{ v = "${{variants}}", ar = "${{ars}}", split = "${{splits}}" }}
exclude = [{{ split = 1 }}]
let = {{ d = "out/v${{v}}/models_ar_n/ar${{ar}}-cl${{cl}}", n = "ar${{ar}}-cl${{cl}}_${{split}}_of_${{num_splits}}" }}
inputs = ["${{d}}/splits/${{n}}.onnx", "${{d}}/onnx/model.encodings"]
outputs = ["${{d}}/sha/${{n}}.onnx"]
command = "cat ${{inputs}} > ${{outputs}}"

[rule.convert]
matrix = {{ v = "${{variants}}", ar = "${{ars}}", split = "${{splits}}" }}
let = {{ d = "out/v${{v}}/models_ar_n/ar${{ar}}-cl${{cl}}", n = "ar${{ar}}-cl${{cl}}_${{split}}_of_${{num_splits}}", onnx = "${{d}}/sha/${{n}}.onnx" }}
case = [{{ when = {{ split = 1 }}, let = {{ onnx = "${{d}}/splits/${{n}}.onnx" }} }}]
inputs = ["${{onnx}}", "${{d}}/onnx/model.encodings"]
outputs = ["out/v${{v}}/converted_model/${{n}}.dlc"]
command = "cat ${{inputs}} > ${{outputs}}"

[rule.quantize]
matrix = {{ v = "${{variants}}", ar = "${{ars}}", split = "${{splits}}" }}
let = {{ n = "ar${{ar}}-cl${{cl}}_${{split}}_of_${{num_splits}}" }}
inputs = ["out/v${{v}}/converted_model/${{n}}.dlc", "${{input_list}}"]
outputs = ["out/v${{v}}/compiled_model/${{n}}_quantized.dlc"]
command = "cat ${{inputs}} > ${{outputs}}"

[rule.context_binary]
matrix = {{ v = "${{variants}}", split = "${{splits}}" }}
inputs = ["out/v${{v}}/compiled_model/ar${{ars}}-cl${{cl}}_${{split}}_of_${{num_splits}}_quantized.dlc"]
outputs = ["out/v${{v}}/serialized_binaries/split_${{split}}.bin"]
command = "cat ${{inputs}} > ${{outputs}}"
'''
    with open(path, "w") as f:
        f.write(text)


def ninja_escape(p):
    return p.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja(path, g):
    with open(path, "w") as f:
        f.write(f"# Synthetic QAIRT-shaped graph: {g.variants} variants x ARs {ARS} x {g.splits} splits (bench/gen.py).\n")
        f.write("ninja_required_version = 1.7\n\n")
        f.write("rule export\n  command = set -- $out; for f in $in; do cat $$f > $$1; shift; done\n\n")
        f.write("rule split\n  command = for o in $out; do { cat $in; echo $$o; } > $$o; done\n\n")
        for r in ("sha", "convert", "quantize", "context_binary"):
            f.write(f"rule {r}\n  command = cat $in > $out\n\n")
        for rule, ins, outs in g.edges:
            f.write(f"build {' '.join(map(ninja_escape, outs))}: {rule} {' '.join(map(ninja_escape, ins))}\n")


def write_makefile(path, g):
    finals = [outs[0] for rule, _, outs in g.edges if rule == "context_binary"]
    with open(path, "w") as f:
        f.write(f"# Synthetic QAIRT-shaped graph: {g.variants} variants x ARs {ARS} x {g.splits} splits (bench/gen.py).\n")
        f.write("# GNU make >= 4.3 (grouped targets `&:`). Built-in rules are off, as a tuned Makefile would have them.\n")
        f.write("MAKEFLAGS += --no-builtin-rules --no-builtin-variables\n.SUFFIXES:\n")
        f.write(".PHONY: all\n.DEFAULT_GOAL := all\n")
        f.write("all:")
        for p in finals:
            f.write(" \\\n " + p)
        f.write("\n\n")
        for rule, ins, outs in g.edges:
            sep = " &:" if len(outs) > 1 else ":"
            cmd = sh_command(rule, ins, outs).replace("$", "$$")
            f.write(f"{' '.join(outs)}{sep} {' '.join(ins)}\n\t{cmd}\n")


def write_sources(out, variants, mkdirs, g):
    # Deterministic, distinct, small source files.
    os.makedirs(os.path.join(out, "src"), exist_ok=True)
    with open(os.path.join(out, "src/input_list.txt"), "w") as f:
        f.write("".join(f"test_vectors/input_{k}.raw\n" for k in range(3)))
    for v in range(1, variants + 1):
        d = os.path.join(out, f"src/v{v}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "model.onnx"), "w") as f:
            f.write(f"onnx model variant {v}\n" + "".join(f"node{k} MatMul w{v}_{k}\n" for k in range(8)))
        with open(os.path.join(d, "model.encodings"), "w") as f:
            f.write(f'{{"variant": {v}, "activation_encodings": {{}}, "param_encodings": {{}}}}\n')
    if mkdirs:
        for d in sorted(g.dirs):
            os.makedirs(os.path.join(out, d), exist_ok=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", "-V", type=int, required=True, help="model variants (V)")
    ap.add_argument("--splits", "-S", type=int, default=4, help="splits per model (S, default 4)")
    ap.add_argument("--out", required=True, help="folder to write (created; existing build files are overwritten)")
    ap.add_argument("--no-mkdirs", action="store_true", help="do not pre-create output directories")
    ap.add_argument("--only", choices=["qairtfile", "ninja", "make"], action="append",
                    help="write only these build files (repeatable; default all three)")
    a = ap.parse_args()
    if a.variants < 1 or a.splits < 2:
        sys.exit("gen.py: need --variants >= 1 and --splits >= 2")
    only = set(a.only or ["qairtfile", "ninja", "make"])
    os.makedirs(a.out, exist_ok=True)
    g = Graph(a.variants, a.splits)
    write_sources(a.out, a.variants, not a.no_mkdirs, g)
    if "qairtfile" in only:
        write_qairtfile(os.path.join(a.out, "Qairtfile"), a.variants, a.splits)
    if "ninja" in only:
        write_ninja(os.path.join(a.out, "build.ninja"), g)
    if "make" in only:
        write_makefile(os.path.join(a.out, "Makefile"), g)
    ncmd = len(g.edges)
    nout = sum(len(o) for _, _, o in g.edges)
    print(f"gen.py: {a.out}: {a.variants} variants x {len(ARS)} ARs x {a.splits} splits: "
          f"{ncmd} commands, {nout} outputs, {2 * a.variants + 1} sources", file=sys.stderr)


if __name__ == "__main__":
    main()
