#!/usr/bin/env python3
"""Side-by-side: `rankfuse bench` vs PyTorch (and PEFT) on the same shapes, same thread count.

Optional tool, not part of CI. Needs `torch` (and, for the PEFT column, `peft`) from PyPI:

    pip install torch peft            # large download; CPU wheels work
    cargo build --release
    python3 benches/compare_torch.py --m 1,16,128,512 --shapes 4096:4096 --ranks 16 \
        --dtypes f32,bf16 --threads 2

It first runs `target/release/rankfuse bench ... --json` (or --rankfuse-json FILE to reuse a
saved run), then times in PyTorch, per case, medians over interleaved iterations:
  torch base   F.linear(x, W)                                 (MKL for f32, oneDNN for bf16)
  torch lora   F.linear(x, W) + scale * F.linear(F.linear(x, A), B)   (unfused, what users run)
  peft         peft.tuners.lora.Linear wrapping nn.Linear (when peft is importable)
and prints rankfuse fused ms next to them, with
  fused vs torch base = torch base ms / rankfuse fused ms  (>= 1.0 means rankfuse's fused call,
                        adapter included, beats torch's base-only matmul)
  torch lora/base, peft/base = the unfused overhead PyTorch / PEFT pay for the adapter.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,16,128,512")
    p.add_argument("--shapes", default="4096:4096")
    p.add_argument("--ranks", default="16")
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--min-ms", type=int, default=300)
    p.add_argument("--rankfuse", default="target/release/rankfuse", help="path to the rankfuse binary")
    p.add_argument("--rankfuse-json", default=None, help="reuse a saved `rankfuse bench --json` file")
    p.add_argument("--json", default=None, help="write the combined results here")
    return p.parse_args()


def run_rankfuse(a):
    if a.rankfuse_json:
        with open(a.rankfuse_json) as f:
            return json.load(f)
    out = "rankfuse-bench.json"
    cmd = [
        a.rankfuse, "--threads", str(a.threads), "bench",
        "--m", a.m, "--shapes", a.shapes, "--ranks", a.ranks, "--dtypes", a.dtypes,
        "--min-ms", str(a.min_ms), "--no-mixed", "--bw-mib", "0", "--json", out,
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def time_torch(torch, case, min_ms, peft_mod):
    F = torch.nn.functional
    dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[case["dtype"]]
    m, k, n, r = case["m"], case["k"], case["n"], case["r"]
    g = torch.Generator().manual_seed(m * 31 + k * 7 + n * 3 + r)
    x = (torch.rand(m, k, generator=g) * 2 - 1).to(dt)
    w = ((torch.rand(n, k, generator=g) * 2 - 1) * 0.02).to(dt)
    a = ((torch.rand(r, k, generator=g) * 2 - 1) * 0.02).to(dt)
    b = ((torch.rand(n, r, generator=g) * 2 - 1) * 0.02).to(dt)
    scale = 2.0  # alpha = 2r, scaling = alpha / r, as in `rankfuse bench`

    def base():
        return F.linear(x, w)

    def lora():
        return F.linear(x, w) + scale * F.linear(F.linear(x, a), b)

    fns = {"base": base, "lora": lora}
    if peft_mod is not None:
        lin = torch.nn.Linear(k, n, bias=False, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(w)
        layer = peft_mod.tuners.lora.Linear(lin, "default", r=r, lora_alpha=2 * r)
        layer = layer.to(dt).eval()
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        fns["peft"] = lambda: layer(x)

    times = {name: [] for name in fns}
    with torch.inference_mode():
        for f in fns.values():  # warm-up
            f()
        start = time.perf_counter()
        while len(times["base"]) < 3 or (time.perf_counter() - start) * 1e3 < 3 * min_ms:
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t0) * 1e3)
            if len(times["base"]) >= 50:
                break
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    a = parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("compare_torch.py needs PyTorch: pip install torch (and peft for the PEFT column)")
    try:
        import peft as peft_mod
    except ImportError:
        peft_mod = None
        print("peft is not installed: the PEFT column is skipped (pip install peft)", file=sys.stderr)
    torch.set_num_threads(a.threads)
    rf = run_rankfuse(a)
    rows = []
    hdr = f"{'dtype':>5} {'m':>5} {'k':>6} {'n':>6} {'r':>4} {'rf fused':>9} {'rf base':>8} " \
          f"{'torch base':>10} {'torch lora':>10} {'peft':>8} {'fused vs torch base':>19} " \
          f"{'lora/base':>9} {'peft/base':>9}"
    print(f"rankfuse {rf['runtime'].get('isa')} ({rf['runtime'].get('kernels')}), "
          f"torch {torch.__version__}, {a.threads} threads")
    print(hdr)
    for case in rf["results"]:
        t = time_torch(torch, case, a.min_ms, peft_mod)
        row = dict(case, torch_base_ms=t["base"], torch_lora_ms=t["lora"], peft_ms=t.get("peft"))
        rows.append(row)
        peft_ms = t.get("peft")
        peft_s = f"{peft_ms:.3f}" if peft_ms else "-"
        peft_ratio = f"{peft_ms / t['base']:.3f}" if peft_ms else "-"
        print(f"{case['dtype']:>5} {case['m']:>5} {case['k']:>6} {case['n']:>6} {case['r']:>4} "
              f"{case['fused_ms']:>9.3f} {case['base_ms']:>8.3f} {t['base']:>10.3f} {t['lora']:>10.3f} "
              f"{peft_s:>8} {t['base'] / case['fused_ms']:>19.2f} "
              f"{t['lora'] / t['base']:>9.3f} {peft_ratio:>9}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rankfuse_runtime": rf["runtime"], "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
