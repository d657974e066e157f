# Shared helpers for bench/*.sh (sourced, not run).

BENCH_DIR=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(CDPATH='' cd -- "$BENCH_DIR/.." && pwd)

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
note() { echo "# $*" >&2; }

# need TOOL HINT: fail with an install hint when TOOL is missing.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "$(basename "$0"): '$1' not found. Install it with: $2" >&2
    MISSING=1
}

# Snapshot the qbuild binary into $1/bin, so that a concurrent `cargo build` in the repo
# cannot swap it in the middle of a measurement. Its label (bin/qbuild.commit) is the repo's
# HEAD when copied from target/release, or the file QBUILD.commit when QBUILD is set.
# With REUSE=1 an existing snapshot is kept (the trees it built stay valid for it), unless
# QBUILD names a binary: then that one replaces it, so that `-R` can measure a new build.
snapshot_qbuild() {
    local dst=$1/bin
    local src=${QBUILD:-$REPO/target/release/qbuild}
    mkdir -p "$dst"
    if [ "${REUSE:-0}" = 1 ] && [ -z "${QBUILD:-}" ] && [ -x "$dst/qbuild" ]; then
        src="$dst/qbuild (kept from the earlier run)"
    else
        [ -x "$src" ] || die "no qbuild binary at $src: run 'cargo build --release' in $REPO (or set QBUILD=/path/to/qbuild)"
        cp "$src" "$dst/qbuild"
        if [ -n "${QBUILD:-}" ] && [ -f "$QBUILD.commit" ]; then
            cp "$QBUILD.commit" "$dst/qbuild.commit"      # the binary's own label, if given
        elif [ -n "${QBUILD:-}" ]; then
            echo "$QBUILD (commit unknown)" >"$dst/qbuild.commit"
        else
            git -C "$REPO" log -1 --format='%h %cd %s' --date=iso >"$dst/qbuild.commit" 2>/dev/null || true
            git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || echo "(+ uncommitted changes in src/)" >>"$dst/qbuild.commit"
        fi
    fi
    QB=$dst/qbuild
    note "qbuild: $src ($("$QB" --version 2>/dev/null); built from: $(tr '\n' ' ' <"$dst/qbuild.commit" 2>/dev/null || echo '?'))"
}

# alt_stats JSON NAME: "median mean sd min rss_kb runs" of one command of an alt.py run.
alt_stats() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
r = next(x for x in json.load(open(sys.argv[1])) if x["name"] == sys.argv[2])
print(r["median"], r["mean"], r["sd"], r["min"], int(r["rss_kb_median"]), r["runs"])
EOF
}

# paired_ratio JSON A B: the median over rounds of A's time / B's time in the same round
# (alt.py runs every command once per round, so a change in background load mostly cancels).
paired_ratio() {
    python3 - "$1" "$2" "$3" <<'EOF'
import json, statistics, sys
runs = {x["name"]: x["times"] for x in json.load(open(sys.argv[1]))}
a, b = runs[sys.argv[2]], runs[sys.argv[3]]
print(f"{statistics.median(x / y for x, y in zip(a, b)):.2f}x")
EOF
}

# fmt_s SECONDS: human time.
fmt_s() {
    python3 -c '
import sys
s = float(sys.argv[1])
print(f"{s*1000:.1f} ms" if s < 1 else f"{s:.2f} s")' "$1"
}

ratio() { python3 -c 'import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f"{a/b:.2f}x" if b > 0 else "n/a")' "$1" "$2"; }

drop_caches() {
    sync
    if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        return 0
    fi
    return 1
}

machine_info() {
    echo "- date: $(date)"
    echo "- nproc: $(nproc); memory: $(free -h | awk '/^Mem:/ {print $2 " total, " $7 " available"}')"
    echo "- kernel: $(uname -r)"
    echo "- disk ($1): $(df -h "$1" | awk 'NR==2 {print $1 ", " $2 " size, " $4 " free"}'), fs $(df -T "$1" | awk 'NR==2 {print $2}')"
    echo "- tools: $(ninja --version 2>/dev/null | sed 's/^/ninja /'), $(make --version 2>/dev/null | head -1), $(hyperfine --version 2>/dev/null), $(b3sum --version 2>/dev/null)"
}
