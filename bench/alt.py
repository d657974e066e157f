#!/usr/bin/env python3
"""Time several commands in alternation and report medians (and peak RSS) per command.

    alt.py [--runs N] [--warmup W] [--json FILE] \\
        --cmd NAME 'COMMAND' [--prepare NAME 'SHELL COMMAND'] [--cmd NAME2 'COMMAND2' ...]

Each round runs every command once, in an order that rotates from round to round, so that a
change in background load (this machine is shared) hits all commands alike instead of
whichever one hyperfine happened to be timing then. A command is split with shlex and run
directly (no shell, stdout/stderr to /dev/null); its optional prepare step runs with
`sh -c` before it, untimed. Wall time is measured around fork+exec+wait. A command that
exits non-zero aborts the measurement.

Peak RSS is measured in RSS_RUNS (default 3) extra runs of each command under
`/usr/bin/time -f %M` (after its prepare step), not in the timed runs: a child spawned by
Python inherits the interpreter's memory high-water mark across exec (Linux keeps
ru_maxrss over exec), so Python's own ~15 MB would be the floor of every reading.

Prints a JSON object per command (and writes them to FILE as a list):
{"name", "command", "runs", "median", "mean", "sd", "min", "max", "times", "rss_kb_median"}.
Python 3 standard library only.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(argv):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rc = p.wait()
    return time.perf_counter() - t0, rc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--rss-runs", type=int, default=3, help="extra runs under /usr/bin/time for peak RSS (0: skip)")
    ap.add_argument("--cmd", nargs=2, action="append", metavar=("NAME", "COMMAND"), required=True)
    ap.add_argument("--prepare", nargs=2, action="append", metavar=("NAME", "SHELL_COMMAND"), default=[])
    a = ap.parse_args()
    cmds = [(n, c, shlex.split(c)) for n, c in a.cmd]
    prep = dict(a.prepare)
    unknown = set(prep) - {n for n, _, _ in cmds}
    if unknown:
        sys.exit(f"alt.py: --prepare for unknown command(s): {', '.join(sorted(unknown))}")
    times = {n: [] for n, _, _ in cmds}
    rss = {n: [] for n, _, _ in cmds}
    k = len(cmds)
    for r in range(a.warmup + a.runs):
        order = [cmds[(r + i) % k] for i in range(k)]
        for name, text, argv in order:
            if name in prep:
                subprocess.run(["sh", "-c", prep[name]], check=True, stdout=subprocess.DEVNULL)
            dt, rc = run_once(argv)
            if rc != 0:
                sys.exit(f"alt.py: `{text}` exited with {rc}")
            if r >= a.warmup:
                times[name].append(dt)
        print(f"alt.py: round {r + 1}/{a.warmup + a.runs}" + (" (warmup)" if r < a.warmup else "")
              + "".join(f"  {n} {times[n][-1]:.4f}s" for n, _, _ in cmds if r >= a.warmup), file=sys.stderr)
    for name, text, argv in cmds:
        rss[name] = []
        for _ in range(a.rss_runs):
            if name in prep:
                subprocess.run(["sh", "-c", prep[name]], check=True, stdout=subprocess.DEVNULL)
            with tempfile.NamedTemporaryFile("r") as f:
                rc = subprocess.run(["/usr/bin/time", "-o", f.name, "-f", "%M"] + argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                if rc != 0:
                    sys.exit(f"alt.py: `/usr/bin/time {text}` exited with {rc}")
                rss[name].append(int(f.read().split()[-1]))
    out = []
    for name, text, _ in cmds:
        t = times[name]
        out.append({
            "name": name, "command": text, "runs": len(t),
            "median": statistics.median(t), "mean": statistics.fmean(t),
            "sd": statistics.stdev(t) if len(t) > 1 else 0.0, "min": min(t), "max": max(t),
            "times": t, "rss_kb_median": statistics.median(rss[name]) if rss[name] else 0,
        })
        print(json.dumps({k2: v for k2, v in out[-1].items() if k2 != "times"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
