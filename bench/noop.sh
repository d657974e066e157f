#!/usr/bin/env bash
# No-op build of a big synthetic QAIRT-shaped graph: qbuild vs ninja vs GNU make.
#
#   bench/noop.sh [-V VARIANTS] [-S SPLITS] [-r RUNS] [-m MAKE_BUILTIN_RUNS] [-t TOUCH_RUNS] [-w WORKDIR] [-k] [-R]
#
# Generates the graph (bench/gen.py) three times (one folder per tool), builds each fully
# with -j2, checks the three output trees are byte-identical, then times each tool's
# no-op build and its peak RSS with bench/alt.py (RUNS rounds, the three tools in
# alternation, after 2 warmup rounds; medians), and prints one markdown table with ratios
# vs ninja. The generated Makefile turns make's built-in rules off; an extra row times the
# same Makefile with them on (MAKE_BUILTIN_RUNS runs, 0 to skip: ~11 s each at V=3000).
# A last table times qbuild after `touch` of one variant's sources (same bytes: nothing may
# run) against its plain no-op, in alternation (TOUCH_RUNS rounds, default RUNS, 0 to skip).
# Defaults: V=3000, S=4 (90k commands, 114k outputs), RUNS=10, MAKE_BUILTIN_RUNS=3,
# WORKDIR=a new folder under ${TMPDIR:-/tmp}, removed at the end unless -k.
# QBUILD=/path/to/qbuild picks the binary (default: <repo>/target/release/qbuild).
# Each full build invocation is bounded by BUILD_TIMEOUT seconds (default 900); a tool that
# times out is re-invoked (it resumes: all three are incremental), at most BUILD_TRIES
# times (default 3), and the table says how many invocations it took.
# -R reuses WORKDIR from an earlier -k run: trees already built (marker .bench-built) are
# not generated or built again, so only the no-op measurements are repeated. The qbuild
# snapshot in WORKDIR/bin is kept too, unless QBUILD names a binary to measure instead.
set -euo pipefail
source "$(dirname -- "$0")/lib.sh"

V=3000 S=4 RUNS=10 MAKE_BUILTIN_RUNS=3 TOUCH_RUNS= WORK= KEEP=0 REUSE=0
while getopts "V:S:r:m:t:w:kRh" o; do
    case $o in
        V) V=$OPTARG ;; S) S=$OPTARG ;; r) RUNS=$OPTARG ;; m) MAKE_BUILTIN_RUNS=$OPTARG ;;
        t) TOUCH_RUNS=$OPTARG ;; w) WORK=$OPTARG ;; k) KEEP=1 ;; R) REUSE=1; KEEP=1 ;;
        *) sed -n '2,22p' "$0"; exit 2 ;;
    esac
done
TOUCH_RUNS=${TOUCH_RUNS:-$RUNS}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-900}
BUILD_TRIES=${BUILD_TRIES:-3}

MISSING=0
need python3 "apt-get install -y python3"
need timeout "apt-get install -y coreutils"
need ninja "apt-get update && apt-get install -y ninja-build"
need make "apt-get update && apt-get install -y make"
need b3sum "cargo install b3sum   (or: apt-get install -y b3sum)"
[ -x /usr/bin/time ] || die "/usr/bin/time is missing: apt-get install -y time"
[ "$MISSING" = 0 ] || exit 1

if [ -z "$WORK" ]; then WORK=$(mktemp -d "${TMPDIR:-/tmp}/qbuild-noop.XXXXXX"); fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cleanup() { if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else note "kept $WORK"; fi; }
trap cleanup EXIT
snapshot_qbuild "$WORK"
note "work dir $WORK ($(df -h "$WORK" | awk 'NR==2 {print $4}') free)"

declare -A BUILD_CMD NOOP_CMD FULL_S FULL_RSS
BUILD_CMD[qbuild]="$QB -C $WORK/qbuild -j2"
BUILD_CMD[ninja]="ninja -C $WORK/ninja -j2"
BUILD_CMD[make]="make -C $WORK/make -j2"
TOOLS=(qbuild ninja make)

declare -A TRIES
for t in "${TOOLS[@]}"; do
    if [ "$REUSE" = 1 ] && [ -e "$WORK/$t/.bench-built" ]; then
        read -r FULL_S[$t] TRIES[$t] FULL_RSS[$t] <"$WORK/$t/.bench-built"
        note "reusing built $WORK/$t (full build took $(fmt_s "${FULL_S[$t]}") in ${TRIES[$t]} invocation(s))"
        continue
    fi
    bf=$WORK/$t/$(case $t in qbuild) echo Qairtfile ;; ninja) echo build.ninja ;; make) echo Makefile ;; esac)
    if [ "$REUSE" = 1 ] && [ -e "$bf" ]; then
        note "reusing partly built $WORK/$t: resuming its build"
    else
        rm -rf "${WORK:?}/$t"
        only=$([ "$t" = qbuild ] && echo qairtfile || echo "$t")
        python3 "$BENCH_DIR/gen.py" --variants "$V" --splits "$S" --out "$WORK/$t" --only "$only"
    fi
    # Full build, one tool at a time.
    total=0 ok=0 peak=0
    for ((try = 1; try <= BUILD_TRIES; try++)); do
        note "full build of $t, invocation $try: ${BUILD_CMD[$t]} (timeout ${BUILD_TIMEOUT}s)"
        start=$(date +%s.%N)
        rc=0
        timeout "$BUILD_TIMEOUT" /usr/bin/time -f %M -o "$WORK/$t.build.$try.rss" ${BUILD_CMD[$t]} \
            >"$WORK/$t.build.$try.log" 2>&1 || rc=$?
        kb=$(tail -1 "$WORK/$t.build.$try.rss" 2>/dev/null | tr -dc 0-9 || true)  # none if killed
        [ "${kb:-0}" -gt "$peak" ] && peak=$kb
        total=$(python3 -c "import sys; print(float(sys.argv[1]) + float(sys.argv[3]) - float(sys.argv[2]))" "$total" "$start" "$(date +%s.%N)")
        if [ "$rc" = 0 ]; then ok=1; break; fi
        tail -3 "$WORK/$t.build.$try.log" >&2
        [ "$rc" = 124 ] || die "$t: full build failed (exit $rc); log: $WORK/$t.build.$try.log"
        note "  $t: timed out after ${BUILD_TIMEOUT}s; resuming"
    done
    [ "$ok" = 1 ] || die "$t: full build not finished after $BUILD_TRIES invocations of ${BUILD_TIMEOUT}s"
    FULL_S[$t]=$total TRIES[$t]=$try FULL_RSS[$t]=$peak
    echo "$total $try $peak" >"$WORK/$t/.bench-built"
    note "  $t: $(fmt_s "$total") in $try invocation(s)"
done

# The three trees must hold the same outputs, byte for byte.
declare -A TREE
for t in "${TOOLS[@]}"; do
    TREE[$t]=$(cd "$WORK/$t" && find out -type f -print0 | sort -z | xargs -0 b3sum | b3sum | cut -c1-16)
    n=$(cd "$WORK/$t" && find out -type f | wc -l)
    note "  $t: $n output files, tree hash ${TREE[$t]}"
done
[ "${TREE[qbuild]}" = "${TREE[ninja]}" ] && [ "${TREE[ninja]}" = "${TREE[make]}" ] \
    || die "the three tools built different outputs: ${TREE[*]}"

# Each tool's no-op must really do nothing.
qb_json=$($QB -C "$WORK/qbuild" -j2 --json | tail -1)
note "qbuild no-op: $qb_json"
echo "$qb_json" | grep -q '"ran":0' || die "qbuild no-op ran something: $qb_json"
HASHED=$(echo "$qb_json" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("hashed_bytes"))')
out=$(ninja -C "$WORK/ninja" -j2 2>&1) || true
[[ $out == *"no work to do"* ]] || die "ninja no-op is not a no-op: $out"
out=$(make -C "$WORK/make" -j2 2>&1) || true
[[ $out == *"Nothing to be done"* ]] || die "make no-op is not a no-op: $out"

# No-op timing and peak RSS: the three tools in alternation (alt.py), RUNS rounds.
note "no-op: $RUNS rounds of the three tools in alternation (warmup 2)"
python3 "$BENCH_DIR/alt.py" --runs "$RUNS" --warmup 2 --json "$WORK/noop.json" \
    --cmd qbuild "${BUILD_CMD[qbuild]}" --cmd ninja "${BUILD_CMD[ninja]}" --cmd make "${BUILD_CMD[make]}" >/dev/null
declare -A MED MEAN SD MIN RSS NRUN
for t in "${TOOLS[@]}"; do
    read -r MED[$t] MEAN[$t] SD[$t] MIN[$t] RSS[$t] NRUN[$t] < <(alt_stats "$WORK/noop.json" "$t")
done
ROWS=("${TOOLS[@]}")
if [ "$MAKE_BUILTIN_RUNS" -gt 0 ]; then
    # The same Makefile without `--no-builtin-rules`: what an untuned Makefile costs.
    grep -v '^MAKEFLAGS\|^\.SUFFIXES:' "$WORK/make/Makefile" >"$WORK/make/Makefile.builtin"
    BUILD_CMD[make-builtin]="make -C $WORK/make -f Makefile.builtin -j2"
    note "no-op: ${BUILD_CMD[make-builtin]} ($MAKE_BUILTIN_RUNS runs)"
    python3 "$BENCH_DIR/alt.py" --runs "$MAKE_BUILTIN_RUNS" --warmup 0 --json "$WORK/noop-builtin.json" \
        --cmd make-builtin "${BUILD_CMD[make-builtin]}" >/dev/null
    read -r MED[make-builtin] MEAN[make-builtin] SD[make-builtin] MIN[make-builtin] RSS[make-builtin] NRUN[make-builtin] \
        < <(alt_stats "$WORK/noop-builtin.json" make-builtin)
    FULL_S[make-builtin]=${FULL_S[make]} TRIES[make-builtin]=${TRIES[make]} FULL_RSS[make-builtin]=${FULL_RSS[make]}
    ROWS+=(make-builtin)
fi

echo
echo "### No-op build, V=$V S=$S ($((V * (7 * S + 2))) commands, $((V * (9 * S + 2))) outputs), -j2"
echo
machine_info "$WORK"
echo "- qbuild: $(cat "$WORK/bin/qbuild.commit" 2>/dev/null || echo '?')"
echo "- qbuild no-op hashed_bytes: $HASHED"
echo
echo "| tool | no-op median | mean ± sd | min | runs | vs ninja | peak RSS (median) | vs ninja | full build -j2 (1 run) | full build peak RSS |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for t in "${ROWS[@]}"; do
    printf '| %s | %s | %s ± %s | %s | %s | %s | %s MB | %s | %s | %s |\n' "$t" \
        "$(fmt_s "${MED[$t]}")" "$(fmt_s "${MEAN[$t]}")" "$(fmt_s "${SD[$t]}")" "$(fmt_s "${MIN[$t]}")" "${NRUN[$t]}" \
        "$(ratio "${MED[$t]}" "${MED[ninja]}")" "$((RSS[$t] / 1024))" "$(ratio "${RSS[$t]}" "${RSS[ninja]}")" \
        "$(fmt_s "${FULL_S[$t]}")$([ "${TRIES[$t]}" = 1 ] || echo " (${TRIES[$t]} invocations)")" \
        "$([ -n "${FULL_RSS[$t]:-}" ] && [ "${FULL_RSS[$t]}" -gt 0 ] && echo "$((FULL_RSS[$t] / 1024)) MB" || echo "not recorded")"
done
echo
python3 - "${MED[qbuild]}" "${MED[ninja]}" "${RSS[qbuild]}" "${RSS[ninja]}" <<'EOF'
import sys
q, n, qr, nr = map(float, sys.argv[1:])
print(f"- target no-op median <= ninja: {'MET' if q <= n else 'MISSED'} (qbuild/ninja = {q/n:.2f}x"
      + ("" if q <= n else f", {(q-n)*1000:.0f} ms or {100*(q/n-1):.0f}% over") + ")")
print(f"- target peak RSS <= 2x ninja: {'MET' if qr <= 2*nr else 'MISSED'} (qbuild/ninja = {qr/nr:.2f}x"
      + ("" if qr <= 2 * nr else f", {(qr-2*nr)/1024:.0f} MB over 2x") + ")")
EOF
echo
echo "Commands (bench/alt.py, $RUNS rounds in alternation after 2 warmup rounds; peak RSS = the process's ru_maxrss, as /usr/bin/time -f %M):"
for t in "${ROWS[@]}"; do echo "- \`${BUILD_CMD[$t]}\`"; done

if [ "$TOUCH_RUNS" -gt 0 ]; then
    # New mtimes, same bytes: qbuild must run nothing (ninja and make would rerun the
    # variant's jobs). Checked once, then timed against the plain no-op in alternation.
    TOUCH="touch $WORK/qbuild/src/v1/*"
    sh -c "$TOUCH"
    qb_json=$($QB -C "$WORK/qbuild" -j2 --json | tail -1)
    echo "$qb_json" | grep -q '"ran":0' || die "qbuild ran something after a touch: $qb_json"
    note "touched: $TOUCH_RUNS rounds, qbuild after \`$TOUCH\` vs its no-op"
    python3 "$BENCH_DIR/alt.py" --runs "$TOUCH_RUNS" --warmup 1 --json "$WORK/touched.json" \
        --cmd touched "${BUILD_CMD[qbuild]}" --prepare touched "$TOUCH" \
        --cmd noop "${BUILD_CMD[qbuild]}" >/dev/null
    read -r TM _ _ _ TR _ < <(alt_stats "$WORK/touched.json" touched)
    read -r NM _ _ _ NR _ < <(alt_stats "$WORK/touched.json" noop)
    echo
    echo "### qbuild after \`touch\` of one variant's sources (src/v1/*, same bytes), V=$V S=$S"
    echo
    echo "| run | median | peak RSS (median) | vs no-op |"
    echo "|---|---|---|---|"
    printf '| after touch (nothing runs) | %s | %s MB | %s |\n' "$(fmt_s "$TM")" "$((TR / 1024))" "$(ratio "$TM" "$NM")"
    printf '| no-op | %s | %s MB | 1.00x |\n' "$(fmt_s "$NM")" "$((NR / 1024))"
    echo
    echo "($TOUCH_RUNS rounds in alternation after 1 warmup round; \`$TOUCH\` before each timed touched run, untimed.)"
fi
