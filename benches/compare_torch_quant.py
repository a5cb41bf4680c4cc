#!/usr/bin/env python3
"""rankfuse on a block-quantized base (GGUF Q8_0 / Q4_0) vs PyTorch dequantize-then-matmul, in
one process, interleaved, medians. Optional tool, not part of CI.

    pip install torch numpy gguf        # gguf: llama.cpp's reader/writer with numpy (de)quantize
    cargo build --release
    PYTHONPATH=bindings/python python3 benches/compare_torch_quant.py --shape 4096:11008 \
        --m 1,512 --types q8_0,q4_0 --rank 16 --threads 2 --json cmpq.json

W (n x k, f32, seeded) is quantized by `gguf.quants.quantize` and written to a GGUF file that
rankfuse memory-maps (`rf_weights_open`); x is f32, the adapter a rank-16 LoRA (f32).
Columns, timed in one loop with a rotating order:
  rf fused / rf base    rf_linear on the quantized W with / without the adapter (the blocks are
                        dequantized in registers (m <= 8) or into packed panels; adapter fused)
  rf bf16 fused         rf_linear on the same W as bf16 (the dense comparison the issue sets)
  torch deq+mm          what a PyTorch host does without a fused kernel: dequantize W with torch
                        ops from the same blocks (ggml layout; checked equal to gguf's numpy
                        dequantize), then F.linear + the LoRA (two more F.linear)
  torch mm (cached)     F.linear with W dequantized once and kept in f32 (4-8x the memory)
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time


def torch_dequant(torch, blocks, qtype, n, k):
    """Dequantizes ggml Q8_0 / Q4_0 blocks (uint8 tensor, n x bytes) with torch ops."""
    nb = k // 32
    if qtype == "q8_0":
        b = blocks.reshape(n, nb, 34)
        d = b[:, :, 0:2].contiguous().view(torch.float16).float()  # n x nb x 1
        q = b[:, :, 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(n, k)
    if qtype == "q4_0":
        b = blocks.reshape(n, nb, 18)
        d = b[:, :, 0:2].contiguous().view(torch.float16).float()
        qs = b[:, :, 2:].to(torch.int16)
        lo = (qs & 0x0F) - 8
        hi = (qs >> 4) - 8
        q = torch.cat([lo, hi], dim=2).float()  # element j and j + 16
        return (d * q).reshape(n, k)
    raise ValueError(qtype)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096:11008", help="K:N")
    p.add_argument("--m", default="1,512")
    p.add_argument("--types", default="q8_0,q4_0")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--min-ms", type=int, default=400)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import numpy as np
    import torch
    import gguf
    import rankfuse
    from rankfuse import _ffi

    torch.set_num_threads(a.threads)
    F = torch.nn.functional
    k, n = (int(v) for v in a.shape.split(":"))
    rt = rankfuse.Runtime(threads=a.threads)
    g = np.random.default_rng(7)
    w32 = (g.standard_normal((n, k)) * 0.02).astype(np.float32)
    r = a.rank
    A = (g.standard_normal((r, k)) * 0.02).astype(np.float32)
    B = (g.standard_normal((n, r)) * 0.02).astype(np.float32)
    adapter = rt.new_adapter("bench")
    lora = adapter.add_lora("proj", k, n, r, alpha=2.0 * r)
    lora.set_weights(A, B)
    scale = 2.0
    tA, tB = torch.from_numpy(A), torch.from_numpy(B)
    wbf = rankfuse.f32_to_bf16(w32)
    rows = []
    tmp = tempfile.mkdtemp()
    for qt in a.types.split(","):
        gt = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qt]
        q = gguf.quants.quantize(w32, gt)  # n x bytes, uint8
        path = os.path.join(tmp, f"w_{qt}.gguf")
        wr = gguf.GGUFWriter(path, "llama")
        wr.add_tensor("w", q, raw_dtype=gt)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
        weights = rt.open_weights(path)
        wm = weights.matrix("w")
        tq = torch.from_numpy(q.copy())
        deq_np = gguf.quants.dequantize(q, gt).reshape(n, k)
        deq_t = torch_dequant(torch, tq, qt, n, k)
        assert torch.equal(deq_t, torch.from_numpy(deq_np)), "torch dequantization differs from gguf's"
        for m in (int(v) for v in a.m.split(",")):
            x = (g.standard_normal((m, k))).astype(np.float32)
            tx = torch.from_numpy(x)
            y = np.empty((m, n), dtype=np.float32)
            xm = rankfuse._matrix(x, "x")
            ym = rankfuse._matrix(y, "y", writable=True)
            slot = (_ffi.rf_lora_slot * 1)(_ffi.rf_lora_slot(lora._live(), 0, 1.0))
            rtp = rt._live()

            def rf(with_adapter):
                rankfuse._check(
                    rankfuse._lib.rf_linear(rtp, ctypes.byref(xm), ctypes.byref(wm), None,
                                            slot if with_adapter else None, 1 if with_adapter else 0,
                                            None, ctypes.byref(ym)))

            # Wiring check against the exact dequantization.
            rf(True)
            ref = (tx @ deq_t.T + scale * (tx @ tA.T) @ tB.T).numpy()
            rel = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
            fns = {
                "rf_fused": lambda: rf(True),
                "rf_base": lambda: rf(False),
                "rf_bf16_fused": lambda: rt.linear(x, wbf, slots=[lora], out=y),
                "torch_deq_mm": lambda: F.linear(tx, torch_dequant(torch, tq, qt, n, k))
                + scale * F.linear(F.linear(tx, tA), tB),
                "torch_mm_cached": lambda: F.linear(tx, deq_t) + scale * F.linear(F.linear(tx, tA), tB),
            }
            times = {name: [] for name in fns}
            with torch.inference_mode():
                for f in fns.values():
                    f()
                start = time.perf_counter()
                while len(times["rf_base"]) < 5 or (time.perf_counter() - start) * 1e3 < len(fns) * a.min_ms:
                    items = list(fns.items())
                    s = len(times["rf_base"]) % len(items)
                    for name, f in items[s:] + items[:s]:
                        t0 = time.perf_counter()
                        f()
                        times[name].append((time.perf_counter() - t0) * 1e3)
                    if len(times["rf_base"]) >= 100:
                        break
            row = {"type": qt, "m": m, "k": k, "n": n, "r": r, "iters": len(times["rf_base"]),
                   "max_rel_diff": rel, "quant_bytes": int(q.nbytes)}
            row.update({name: statistics.median(v) for name, v in times.items()})
            row["fused_over_base"] = row["rf_fused"] / row["rf_base"]
            row["fused_over_bf16_fused"] = row["rf_fused"] / row["rf_bf16_fused"]
            row["torch_deq_mm_over_rf_fused"] = row["torch_deq_mm"] / row["rf_fused"]
            row["quant_read_gbs"] = q.nbytes / (row["rf_base"] * 1e-3) / 1e9
            rows.append(row)
            print(f"{qt:>5} m={m:<4} rf fused {row['rf_fused']:8.3f} ms  base {row['rf_base']:8.3f}  "
                  f"f/base {row['fused_over_base']:.3f}  bf16 fused {row['rf_bf16_fused']:8.3f}  "
                  f"(q/bf16 {row['fused_over_bf16_fused']:.2f})  torch deq+mm {row['torch_deq_mm']:8.3f} "
                  f"({row['torch_deq_mm_over_rf_fused']:.1f}x rf)  torch cached {row['torch_mm_cached']:8.3f}  "
                  f"W read {row['quant_read_gbs']:.1f} GB/s  rel diff {rel:.1e}", flush=True)
        weights.close()
    out = {"threads": a.threads, "torch": torch.__version__, "rankfuse": rankfuse.version(),
           "info": rt.info(), "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
