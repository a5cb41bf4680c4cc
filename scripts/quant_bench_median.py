#!/usr/bin/env python3
"""Medians over repeated `rankfuse bench --quant` runs (this VM's figures swing +-20% run to run).

  python3 scripts/quant_bench_median.py --runs 5 -- --shapes 4096:11008 --m 1 --ranks 16

Runs target/release/rankfuse (build it first: cargo build --release) N times with the given
bench arguments and prints, per W / mode, the median fused ms, base ms, the median of the
per-run %read (fused time against a plain read of the same W bytes timed in the same loop) and
fused/base; --json writes the per-run rows too.
"""
import argparse, json, statistics, subprocess, sys, tempfile, os

ap = argparse.ArgumentParser()
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--bin", default="target/release/rankfuse")
ap.add_argument("--json", default=None)
ap.add_argument("rest", nargs=argparse.REMAINDER)
a = ap.parse_args()
extra = [x for x in a.rest if x != "--"]
runs = []
for i in range(a.runs):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "q.json")
        subprocess.run([a.bin, "bench", "--quant", "--bw-mib", "0", "--json", out] + extra,
                       check=True, stderr=subprocess.DEVNULL)
        runs.append(json.load(open(out)))
    print(f"run {i + 1}/{a.runs} done", file=sys.stderr)
rows = {}
for r in runs:
    for q in r["quant"]:
        key = (q["dtype"], q["packed"], q["act"], q["m"], q["k"], q["n"], q["r"])
        rows.setdefault(key, []).append(q)
print(f"isa {runs[0]['runtime'].get('isa')}, {runs[0]['runtime'].get('threads')} threads, "
      f"medians of {a.runs} runs")
print(f"{'W':>12} {'m':>3} {'k':>5} {'n':>6} {'r':>3} {'base ms':>8} {'fused ms':>9} "
      f"{'f/base':>7} {'W GB/s':>7} {'%read':>6} {'(min..max)':>12}")
for key, qs in rows.items():
    dt, pk, act, m, k, n, r = key
    label = dt + ("+pk" if pk else "") + ("+q8x" if act == "q8" else "")
    med = lambda f: statistics.median(f(q) for q in qs)
    reads = [100 * q["of_stream"] for q in qs]
    print(f"{label:>12} {m:>3} {k:>5} {n:>6} {r:>3} {med(lambda q: q['base_ms']):8.3f} "
          f"{med(lambda q: q['fused_ms']):9.3f} {med(lambda q: q['fused_ms'] / q['base_ms']):7.3f} "
          f"{med(lambda q: q['fused_w_gbs']):7.1f} {statistics.median(reads):5.0f}% "
          f"{min(reads):5.0f}..{max(reads):.0f}%")
if a.json:
    json.dump(runs, open(a.json, "w"), indent=1)
