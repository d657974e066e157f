#!/bin/sh
# End-to-end check of qairt-sim through the sim-sdk wrappers: the whole LLM compile chain
# (ARs 1 and 128, CL 4096, 4 splits) in temp dirs, then determinism, path independence,
# split locality, error exits, qairt-dlc-info, failure injection, payload scaling, the
# device stage (adb push, genie-t2t-run through adb shell) and wrapper lookup.
#
#   sim/smoke.sh                  # builds target/release/qairt-sim first
#   SMOKE_NO_BUILD=1 sim/smoke.sh # uses whatever binary the wrappers find
#
# Exits non-zero on the first failed check.
set -eu

repo=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
if [ "${SMOKE_NO_BUILD:-}" != 1 ]; then
    (cd "$repo" && cargo build --release --bin qairt-sim)
fi
unset QAIRT_SIM QAIRT_SIM_FAIL QAIRT_SIM_SCALE QAIRT_SIM_WORK_MS
export QNN_SDK_ROOT="$repo/sim-sdk"
BIN=$QNN_SDK_ROOT/bin/x86_64-linux-clang
CL=4096
N=4
ARS="1 128"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qairt-sim-smoke.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

fail() {
    echo "smoke: FAIL: $*" >&2
    exit 1
}
step() {
    echo "smoke: $*"
}

# A fresh work folder with the demo sources.
workdir() {
    mkdir -p "$1"
    cp -R "$repo/models" "$1/models"
}

# The whole chain inside work folder $1, with paths relative to it (like a Qairtfile would).
pipeline() {
    (
        cd "$1"
        for AR in $ARS; do
            M=ar$AR-cl$CL
            D=models_ar_n/$M
            "$BIN/qairt-prepare-exports" --onnx models/llama3.onnx \
                --encodings models/llama3.encodings --ar "$AR" --cl "$CL" \
                --output-onnx "$D/onnx/$M.onnx" --output-encodings "$D/onnx/$M.encodings"
            "$BIN/qairt-split-model" --onnx "$D/onnx/$M.onnx" \
                --encodings "$D/onnx/$M.encodings" --num-splits "$N" --model-name "$M" \
                --output-dir "$D/splits"
            i=1
            while [ "$i" -le "$N" ]; do
                S=${M}_${i}_of_$N
                if [ "$i" -eq 1 ]; then
                    onnx=$D/splits/$S.onnx
                    enc=$D/onnx/$M.encodings
                else
                    "$BIN/mha2sha-onnx-converter" --sha-export-path "$D/sha" --model-name "$S" \
                        --exported-model-encoding-path "$D/onnx/$M.encodings" \
                        --exported-model-path "$D/splits/$S.onnx" \
                        --base-llm llama3 --mha-conv --nchw-aligned
                    onnx=$D/sha/$S.onnx
                    enc=$D/sha/$S.encodings
                fi
                "$BIN/qairt-converter" --input_network "$onnx" --quantization_overrides "$enc" \
                    -o "$D/converted_model/$S.dlc" \
                    --source_model_input_layout input_ids NONTRIVIAL \
                    --source_model_input_layout attention_mask NONTRIVIAL
                "$BIN/qairt-quantizer" --input_dlc "$D/converted_model/$S.dlc" \
                    --input_list models/input_list.txt --output_dlc "$D/compiled_model/$S.dlc" \
                    --act_bitwidth 16 --bias_bitwidth 32
                i=$((i + 1))
            done
        done
        mkdir -p cfg
        i=1
        while [ "$i" -le "$N" ]; do
            cat >"cfg/htp_backend_ext_config_$i.json" <<EOF
{"backend_extensions": {"shared_library_path": "libQnnHtpNetRunExtensions.so",
                        "config_file_path": "PerfSetting_$i.conf"}}
EOF
            cat >"cfg/PerfSetting_$i.conf" <<EOF
{
  "graphs": [{"O": 3, "vtcm_mb": 8,
              "graph_names": ["ar128-cl${CL}_${i}_of_$N", "ar1-cl${CL}_${i}_of_$N"]}],
  "devices": [{"soc_model": 69, "dsp_arch": "v79",
               "cores": [{"core_id": 0, "perf_profile": "burst", "rpc_control_latency": 100}]}],
  "context": {"weight_sharing_enabled": true},
  "memory": {"mem_type": "shared_buffer"}
}
EOF
            q=compiled_model/ar
            "$BIN/qnn-context-binary-generator" --backend libQnnHtp.so --model libQnnModelDlc.so \
                --input_output_tensor_mem_type memhandle \
                --output_dir artifacts/serialized_binaries \
                --config_file "cfg/htp_backend_ext_config_$i.json" --binary_file "split_$i" \
                --dlc_path "models_ar_n/ar128-cl$CL/${q}128-cl${CL}_${i}_of_$N.dlc,models_ar_n/ar1-cl$CL/${q}1-cl${CL}_${i}_of_$N.dlc"
            i=$((i + 1))
        done
    ) >"$1.log" 2>&1 || {
        cat "$1.log" >&2
        fail "pipeline in $1"
    }
}

# Checksums of every output of work folder $1 (relative names).
manifest() {
    (cd "$1" && find models_ar_n artifacts -type f | LC_ALL=C sort | xargs cksum)
}

# ---------------------------------------------------------------- the chain
step "pipeline in $tmp/a"
workdir "$tmp/a"
pipeline "$tmp/a"
manifest "$tmp/a" >"$tmp/a.sum"
count=$(wc -l <"$tmp/a.sum")
want=$((2 * (2 + N + 2 * (N - 1) + N + N) + N))
[ "$count" -eq "$want" ] || fail "expected $want outputs, found $count"
i=1
while [ "$i" -le "$N" ]; do
    b=$tmp/a/artifacts/serialized_binaries/split_$i.bin
    [ "$(head -n 1 "$b")" = "QSIM-CTXBIN v1" ] || fail "$b: bad magic"
    grep -q "^graphs: ar128-cl${CL}_${i}_of_$N, ar1-cl${CL}_${i}_of_$N\$" "$b" || fail "$b: graphs"
    grep -q '^weight-sharing: true$' "$b" || fail "$b: weight sharing"
    i=$((i + 1))
done
for f in "$tmp"/a/models_ar_n/*/compiled_model/*.dlc; do
    [ "$(head -n 1 "$f")" = "QSIM-QDLC v1" ] || fail "$f: not a quantized DLC"
done
for f in "$tmp"/a/models_ar_n/*/converted_model/*.dlc; do
    [ "$(head -n 1 "$f")" = "QSIM-DLC v1" ] || fail "$f: not a DLC"
done
grep -q '^graph: ar1-cl4096_1_of_4$' "$tmp/a/models_ar_n/ar1-cl4096/converted_model/ar1-cl4096_1_of_4.dlc" ||
    fail "split 1 DLC graph name"
[ ! -e "$tmp/a/models_ar_n/ar1-cl4096/sha/ar1-cl4096_1_of_4.onnx" ] || fail "split 1 went through mha2sha"

step "rebuild with unchanged inputs is byte-identical"
pipeline "$tmp/a"
manifest "$tmp/a" | cmp -s - "$tmp/a.sum" || fail "rebuild changed outputs"

step "same inputs at another path give the same bytes"
workdir "$tmp/elsewhere/deeper/b"
pipeline "$tmp/elsewhere/deeper/b"
manifest "$tmp/elsewhere/deeper/b" | cmp -s - "$tmp/a.sum" || fail "outputs depend on paths"

step "editing one region of the base ONNX changes one split"
workdir "$tmp/c"
# Payload line 40 (0-based) of 64 is in chunk 3 of 4; the header is 6 lines + a blank line.
sed '48s/w=[0-9a-f]*/w=00000000000000000000000000000000/' "$repo/models/llama3.onnx" >"$tmp/c/models/llama3.onnx"
cmp -s "$tmp/c/models/llama3.onnx" "$repo/models/llama3.onnx" && fail "edit did not apply"
pipeline "$tmp/c"
manifest "$tmp/c" >"$tmp/c.sum"
changed=
for f in $(cd "$tmp/c" && find models_ar_n artifacts -type f | LC_ALL=C sort); do
    cmp -s "$tmp/a/$f" "$tmp/c/$f" || changed="$changed $f"
done
for f in $changed; do
    case $f in
        models_ar_n/*/onnx/*.onnx | *_3_of_4.* | artifacts/serialized_binaries/split_3.bin) ;;
        *) fail "unexpected change: $f (changed: $changed)" ;;
    esac
done
echo "smoke:   changed:$changed"
case $changed in
    *split_3.bin*) ;;
    *) fail "split_3.bin did not change (changed: $changed)" ;;
esac

# ---------------------------------------------------------------- errors
step "errors, exit codes, failure injection, scaling"
cd "$tmp/a"
expect() { # expect CODE CMD...: run CMD, check its exit code, keep its stderr in $tmp/err
    want=$1
    shift
    set +e
    "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    set -e
    [ "$got" -eq "$want" ] || {
        cat "$tmp/err" >&2
        fail "expected exit $want, got $got: $*"
    }
}
expect 2 "$BIN/qairt-converter" --input_network models/llama3.onnx -o x.dlc --bogus
grep -q "^qairt-converter: error: unknown flag '--bogus'" "$tmp/err" || fail "unknown flag message"
expect 2 "$BIN/qairt-quantizer" --input_dlc x.dlc
grep -q "missing required flag" "$tmp/err" || fail "missing flag message"
expect 1 "$BIN/qairt-converter" --input_network models/nope.onnx -o x.dlc
grep -q "models/nope.onnx" "$tmp/err" || fail "missing input message"
echo '{"activation_encodings": [1,}' >bad.encodings
expect 1 "$BIN/qairt-converter" --input_network models/llama3.onnx --quantization_overrides bad.encodings -o x.dlc
grep -q "bad.encodings:1:[0-9]*: invalid JSON" "$tmp/err" || fail "bad JSON message"
expect 1 "$BIN/qairt-converter" --input_network models/llama3.encodings -o x.dlc
grep -q "not a QSIM-ONNX v1 file" "$tmp/err" || fail "bad magic message"
f1=models_ar_n/ar1-cl4096/converted_model/ar1-cl4096_2_of_4.dlc
expect 1 "$BIN/qnn-context-binary-generator" --backend libQnnHtp.so --model libQnnModelDlc.so \
    --output_dir out --binary_file x --dlc_path "$f1"
grep -q "not a quantized DLC" "$tmp/err" || fail "float DLC to context binary"
q1=models_ar_n/ar128-cl4096/compiled_model/ar128-cl4096_2_of_4.dlc
expect 0 "$BIN/qairt-dlc-info" -i "$q1"
for want in 'kind: quantized DLC (QSIM-QDLC v1)' 'graph: ar128-cl4096_2_of_4' \
    'act_bitwidth: 16' 'bias_bitwidth: 32' 'payload-bytes: 4096'; do
    grep -qxF "$want" "$tmp/out" || fail "qairt-dlc-info summary lacks '$want'"
done
head -c 4000 "$q1" >trunc.dlc
expect 1 "$BIN/qairt-dlc-info" --input_dlc trunc.dlc
grep -q "^qairt-dlc-info: error: 'trunc.dlc' is truncated" "$tmp/err" || fail "truncated DLC message"

QAIRT_SIM_FAIL=inject expect 1 "$BIN/qairt-converter" --input_network models/llama3.onnx -o inject/x.dlc
grep -q "^qairt-sim: injected failure for inject/x.dlc$" "$tmp/err" || fail "injection message"
[ "$(head -n 1 inject/x.dlc)" = "QSIM-DLC v1" ] || fail "injected output not partial"
grep -q '^$' inject/x.dlc && fail "injected output is complete"

QAIRT_SIM_SCALE=1.5 QAIRT_SIM_WORK_MS=5 expect 0 "$BIN/qairt-converter" --input_network models/llama3.onnx -o big.dlc
size=$(wc -c <big.dlc)
[ "$size" -gt 1572864 ] && [ "$size" -lt 1576960 ] || fail "QAIRT_SIM_SCALE=1.5 gave $size bytes"
grep -q "^wrote big.dlc ($size bytes)\$" "$tmp/out" || fail "report line"
QAIRT_SIM_SCALE=lots expect 2 "$BIN/qairt-converter" --input_network models/llama3.onnx -o big.dlc

# ---------------------------------------------------------------- the device
step "adb push and genie-t2t-run on the device folder"
ADB=$QNN_SDK_ROOT/platform-tools/adb
export QAIRT_SIM_DEVICE="$tmp/device"
DEV=/data/local/tmp/smoke
bins=""
for i in 1 2 3 4; do bins="$bins\"artifacts/serialized_binaries/split_$i.bin\", "; done
printf '{"dialog": {"context": {"size": %s}, "tokenizer": {"path": "tokenizer.json"}, "engine": {"backend": {"type": "QnnHtp"}, "model": {"binary": {"ctx-bins": [%s]}}}}}\n' \
    "$CL" "${bins%, }" >genie_config.json
expect 0 "$ADB" shell mkdir -p "$DEV/artifacts"
expect 0 "$ADB" push artifacts/serialized_binaries "$DEV/artifacts/"
expect 0 "$ADB" push genie_config.json models/tokenizer.json "$QNN_SDK_ROOT"/lib/aarch64-android/libGenie.so \
    "$QNN_SDK_ROOT"/lib/aarch64-android/libQnnHtp.so "$QNN_SDK_ROOT"/lib/aarch64-android/libQnnSystem.so \
    "$QNN_SDK_ROOT"/lib/aarch64-android/libQnnHtpV79Stub.so \
    "$QNN_SDK_ROOT"/lib/hexagon-v79/unsigned/libQnnHtpV79Skel.so "$QNN_SDK_ROOT"/bin/aarch64-android/genie-t2t-run "$DEV/"
[ -f "$tmp/device$DEV/artifacts/serialized_binaries/split_4.bin" ] || fail "push of a folder"
run_genie() {
    "$ADB" shell "cd $DEV && LD_LIBRARY_PATH=$DEV ADSP_LIBRARY_PATH=$DEV ./genie-t2t-run -c genie_config.json -p 'Hi there'"
}
expect 0 run_genie
grep -q '^\[BEGIN\]: .*\[END\]$' "$tmp/out" || fail "genie-t2t-run answer"
cp "$tmp/out" "$tmp/answer1"
expect 0 run_genie
cmp -s "$tmp/out" "$tmp/answer1" || fail "genie-t2t-run is not deterministic"
expect 0 "$ADB" shell rm "$DEV/libQnnSystem.so"
expect 1 run_genie
grep -q 'libQnnSystem.so' "$tmp/err" || fail "missing library message"
expect 1 "$ADB" shell false
expect 1 "$ADB" push genie_config.json /data/../../escape
echo keep >"$tmp/device/data/self.txt"
expect 0 "$ADB" push "$tmp/device/data/self.txt" /data/self.txt
[ "$(cat "$tmp/device/data/self.txt")" = keep ] || fail "a push onto itself lost the file"
QAIRT_SIM_DEVICE="$tmp/a b" expect 1 "$ADB" shell true
grep -q 'holds characters a shell line would read' "$tmp/err" || fail "a device folder with a space"
unset QAIRT_SIM_DEVICE

# ---------------------------------------------------------------- wrappers
step "wrappers find the binary"
expect 0 sh -c 'cd "$1/sim-sdk" && ./bin/x86_64-linux-clang/qairt-quantizer --version' - "$repo"
grep -q "^qairt-quantizer (qairt-sim) " "$tmp/out" || fail "relative wrapper call"
expect 0 sh -c 'cd "$1/sim-sdk/bin" && sh x86_64-linux-clang/qairt-converter --help' - "$repo"
grep -q "^usage: qairt-converter" "$tmp/out" || fail "wrapper via sh"
mkdir -p "$tmp/linkbin"
ln -s "$BIN/qairt-split-model" "$tmp/linkbin/qairt-split-model"
PATH="$tmp/linkbin:$PATH" expect 0 qairt-split-model --version
real=$(sh -c 'cd "$1" && if [ -x target/release/qairt-sim ]; then echo "$PWD/target/release/qairt-sim"; else echo "$PWD/target/debug/qairt-sim"; fi' - "$repo")
QAIRT_SIM=$real expect 0 "$BIN/qairt-converter" --version
QAIRT_SIM=/nonexistent/qairt-sim expect 127 "$BIN/qairt-converter" --version
# A copy of the SDK with no built binary next to it and none on PATH.
mkdir -p "$tmp/norepo"
cp -R "$repo/sim-sdk" "$tmp/norepo/sim-sdk"
PATH=/usr/bin:/bin expect 127 "$tmp/norepo/sim-sdk/bin/x86_64-linux-clang/qairt-converter" --version
grep -q "qairt-sim not built: run cargo build --release" "$tmp/err" || fail "not-built message"
grep -q '^version: ' "$repo/sim-sdk/sdk.yaml" || fail "sdk.yaml version"

echo "smoke: ok"
