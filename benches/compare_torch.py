#!/usr/bin/env python3
"""Side-by-side: rankfuse vs PyTorch (and PEFT) on the same shapes, same threads, same process.

Optional tool, not part of CI. Needs `torch` (and, for the PEFT column, `peft`) from PyPI, and
the rankfuse shared library (`cargo build --release`; found by bindings/python):

    pip install torch peft numpy       # large download
    cargo build --release
    PYTHONPATH=bindings/python python3 benches/compare_torch.py --m 1,16,128,512 \
        --shapes 4096:4096 --ranks 16 --dtypes f32,bf16 --threads 2 --json cmp.json

Per case, all timed in ONE loop, interleaved each iteration in a rotating order (so a noisy machine slows every
column alike and the ratios survive), medians:
  rf fused     rankfuse rf_linear with the adapter (through the ctypes binding)
  rf base      rankfuse rf_linear without it
  rf packed    the same two with W packed once beforehand (rf_weights_pack / rf_linear_packed),
               the layout a serving host keeps for its frozen base
  torch base   F.linear(x, W)                                 (MKL for f32, oneDNN for bf16)
  torch lora   F.linear(x, W) + scale * F.linear(F.linear(x, A), B)   (unfused, what users run)
  peft         peft.tuners.lora.Linear wrapping nn.Linear (when peft is importable)
and the ratios
  fused vs torch base = torch base ms / rankfuse fused ms  (>= 1.0 means rankfuse's fused call,
                        adapter included, beats torch's base-only matmul)
  packed vs torch base = the same for the packed-W fused call
  rf fused/base, torch lora/base, peft/base = what each pays for the adapter.
  W GB/s (packed) = W's bytes / packed fused time: against `rankfuse bench`'s measured streaming
  read bandwidth (its `bandwidth` block) for the memory-bound m; GFLOP/s against the FMA peak.
Every call writes into a preallocated output on the rankfuse side; torch allocates its result
(as it does in a model). The binding adds tens of microseconds of ctypes marshalling per call,
which matters only for m = 1 (use `rankfuse bench` for overhead-free decode figures).
"""

import argparse
import json
import os
import statistics
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
    p.add_argument("--json", default=None, help="write the combined results here")
    return p.parse_args()


def time_case(torch, rankfuse, rt, case, min_ms, peft_mod):
    import numpy as np

    F = torch.nn.functional
    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[case["dtype"]]
    m, k, n, r = case["m"], case["k"], case["n"], case["r"]
    g = torch.Generator().manual_seed(m * 31 + k * 7 + n * 3 + r)
    x = (torch.rand(m, k, generator=g) * 2 - 1).to(dt)
    w = ((torch.rand(n, k, generator=g) * 2 - 1) * 0.02).to(dt)
    a = ((torch.rand(r, k, generator=g) * 2 - 1) * 0.02).to(dt)
    b = ((torch.rand(n, r, generator=g) * 2 - 1) * 0.02).to(dt)
    scale = 2.0  # alpha = 2r, scaling = alpha / r, as in `rankfuse bench`

    def np_of(t):  # the same bytes for rankfuse (bf16 as uint16 bits)
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.contiguous().numpy()

    rdt = {"f32": rankfuse.DType.F32, "bf16": rankfuse.DType.BF16, "f16": rankfuse.DType.F16}[case["dtype"]]
    adapter = rt.new_adapter("bench")
    lora = adapter.add_lora("proj", k, n, r, alpha=2.0 * r, dtype=rdt)
    lora.set_weights(np_of(a), np_of(b))
    xn, wn = np_of(x), np_of(w)
    pw = rt.pack(wn)
    y = np.empty((m, n), dtype=xn.dtype)

    # Same result on both sides (a wiring check, not a test).
    with torch.inference_mode():
        ref = (F.linear(x, w) + scale * F.linear(F.linear(x, a), b)).float()
    rt.linear(xn, wn, slots=[lora], out=y)
    got = torch.from_numpy(rankfuse.bf16_to_f32(y) if y.dtype == np.uint16 else y.astype(np.float32))
    rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    rt.linear(xn, pw, slots=[lora], out=y)
    got = torch.from_numpy(rankfuse.bf16_to_f32(y) if y.dtype == np.uint16 else y.astype(np.float32))
    rel = max(rel, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))

    def base():
        return F.linear(x, w)

    def lora_t():
        return F.linear(x, w) + scale * F.linear(F.linear(x, a), b)

    fns = {
        "rf_fused": lambda: rt.linear(xn, wn, slots=[lora], out=y),
        "rf_base": lambda: rt.linear(xn, wn, out=y),
        "rf_pfused": lambda: rt.linear(xn, pw, slots=[lora], out=y),
        "rf_pbase": lambda: rt.linear(xn, pw, out=y),
        "base": base,
        "lora": lora_t,
    }
    if peft_mod is not None:
        holder = torch.nn.Module()
        holder.proj = torch.nn.Linear(k, n, bias=False, dtype=dt)
        with torch.no_grad():
            holder.proj.weight.copy_(w)
        cfg = peft_mod.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0)
        model = peft_mod.get_peft_model(holder, cfg).to(dt).eval()
        layer = model.base_model.model.proj  # a peft lora.Linear
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        fns["peft"] = lambda: layer(x)

    times = {name: [] for name in fns}
    with torch.inference_mode():
        for f in fns.values():  # warm-up
            f()
        start = time.perf_counter()
        while len(times["base"]) < 5 or (time.perf_counter() - start) * 1e3 < len(fns) * min_ms:
            # Rotate the order every iteration: each function follows every other equally
            # often (the first rankfuse call after torch wakes rankfuse's pool and vice versa).
            items = list(fns.items())
            shift = len(times["base"]) % len(items)
            for name, f in items[shift:] + items[:shift]:
                t0 = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t0) * 1e3)
            if len(times["base"]) >= 200:
                break
    adapter.close()
    pw.close()
    out = {name: statistics.median(v) for name, v in times.items()}
    out["iters"] = len(times["base"])
    out["max_rel_diff"] = rel
    return out


def main():
    a = parse_args()
    # Two thread pools share the cores (torch's OpenMP and rankfuse's): OpenMP threads must
    # sleep between calls instead of spinning, or they steal the cores rankfuse runs on.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    import rankfuse

    rt = rankfuse.Runtime(threads=a.threads)
    info = rt.info()
    rows = []
    print(f"rankfuse {info.get('isa')} ({info.get('kernels', {}).get('linear')}), "
          f"torch {torch.__version__}, {a.threads} threads; medians (ms), interleaved in one loop")
    hdr = (f"{'dtype':>5} {'m':>5} {'k':>6} {'n':>6} {'r':>4} {'rf fused':>9} {'rf base':>8} "
           f"{'torch base':>10} {'torch lora':>10} {'peft':>8} {'fused vs torch base':>19} "
           f"{'rf f/b':>6} {'lora/base':>9} {'peft/base':>9} {'GFLOP/s fused':>13} {'rel diff':>8} "
           f"{'rf packed':>9} {'packed vs torch base':>20} {'packed f/b':>10} {'W GB/s':>7} {'GFLOP/s':>7}")
    print(hdr)
    for dtype in a.dtypes.split(","):
        for shape in a.shapes.split(","):
            k, n = (int(v) for v in shape.split(":"))
            for r in (int(v) for v in a.ranks.split(",")):
                for m in (int(v) for v in a.m.split(",")):
                    case = {"dtype": dtype, "m": m, "k": k, "n": n, "r": r}
                    t = time_case(torch, rankfuse, rt, case, a.min_ms, peft_mod)
                    row = dict(case, **{f"{key}_ms" if key not in ("iters", "max_rel_diff") else key: v
                                        for key, v in t.items()})
                    rows.append(row)
                    peft_ms = t.get("peft")
                    peft_s = f"{peft_ms:.3f}" if peft_ms else "-"
                    peft_ratio = f"{peft_ms / t['base']:.3f}" if peft_ms else "-"
                    flop = 2.0 * m * n * k * (1 + r / n + r / k)
                    gflops = flop / (t["rf_fused"] * 1e6)
                    wbytes = n * k * (4 if dtype == "f32" else 2)
                    print(f"{dtype:>5} {m:>5} {k:>6} {n:>6} {r:>4} {t['rf_fused']:>9.3f} "
                          f"{t['rf_base']:>8.3f} {t['base']:>10.3f} {t['lora']:>10.3f} {peft_s:>8} "
                          f"{t['base'] / t['rf_fused']:>19.2f} {t['rf_fused'] / t['rf_base']:>6.3f} "
                          f"{t['lora'] / t['base']:>9.3f} {peft_ratio:>9} {gflops:>13.1f} "
                          f"{t['max_rel_diff']:>8.1e} {t['rf_pfused']:>9.3f} "
                          f"{t['base'] / t['rf_pfused']:>20.2f} {t['rf_pfused'] / t['rf_pbase']:>10.3f} "
                          f"{wbytes / (t['rf_pfused'] * 1e6):>7.1f} {flop / (t['rf_pfused'] * 1e6):>7.1f}",
                          flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rankfuse_runtime": info, "torch": torch.__version__, "threads": a.threads,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
