#!/usr/bin/env python3
"""Writes tests/fixtures/gguf-adapter/: GGUF LoRA adapters as llama.cpp's convert_lora_to_gguf.py
writes them (with llama.cpp's own `gguf` package), broken variants, a tiny GGUF base, and the
values rankfuse must read back (so the Rust tests need no Python).

    pip install gguf numpy
    python3 scripts/make_gguf_adapter_fixtures.py

Files (architecture "llama"; lora_a has GGUF dims [in, r], lora_b [r, out]):
  mixed.gguf      alpha 12; blk.0.attn_q (64 -> 32, r 4, F32), blk.0.attn_v (64 -> 32, r 2,
                  F16), blk.0.ffn_up (64 -> 96, r 3, BF16), blk.0.ffn_down (96 -> 64, r 4,
                  Q8_0 lora_a [r, 96] and F32 lora_b), plus blk.0.attn_norm.weight (skipped, as
                  llama.cpp skips it)
  no-alpha.gguf   no adapter.lora.alpha (scale 1), one F32 module
  lone-a.gguf, rank-mismatch.gguf, model.gguf (general.type "model"), bad-suffix.gguf,
  not-lora.gguf (adapter.type "control_vector"): each must fail naming the tensor or key
  base.gguf       a GGUF "model" with blk.0.attn_q.weight [32, 64] (ne [64, 32]) and
                  blk.0.attn_v.weight of the WRONG shape [16, 64], architecture llama
  ref.safetensors per module of mixed.gguf: 'a.<m>' [r, in], 'b.<m>' [out, r] as f32 (the
                  gguf package's dequantize), and 'scale.<m>' [1, 1] = alpha / r
The safetensors file is written by hand (8-byte header length, JSON, data).
"""
import json
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf-adapter"
rng = np.random.default_rng(15)


def writer(name, general_type="adapter", adapter_type="lora", alpha=None):
    w = GGUFWriter(str(OUT / name), arch="llama")
    w.add_string("general.type", general_type)
    if adapter_type is not None:
        w.add_string("adapter.type", adapter_type)
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    return w


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add(w, name, arr, t):
    """arr is row-major [rows, cols] f32; stored as type t (GGUF dims reversed)."""
    if t == T.F32:
        w.add_tensor(name, arr.astype(np.float32))
        return arr.astype(np.float32)
    raw = quants.quantize(arr.astype(np.float32), t)
    if t == T.F16:
        w.add_tensor(name, raw)
    else:
        w.add_tensor(name, raw, raw_dtype=t)
    return quants.dequantize(raw, t).astype(np.float32).reshape(arr.shape)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    ref = {}
    alpha = 12.0
    w = writer("mixed.gguf", alpha=alpha)
    mods = [
        ("blk.0.attn_q", 64, 32, 4, T.F32, T.F32),
        ("blk.0.attn_v", 64, 32, 2, T.F16, T.F16),
        ("blk.0.ffn_up", 64, 96, 3, T.BF16, T.BF16),
        ("blk.0.ffn_down", 96, 64, 4, T.Q8_0, T.F32),
    ]
    for m, n_in, n_out, r, ta, tb in mods:
        a = rng.uniform(-1, 1, (r, n_in))
        b = rng.uniform(-1, 1, (n_out, r))
        ref[f"a.{m}"] = add(w, f"{m}.weight.lora_a", a, ta)
        ref[f"b.{m}"] = add(w, f"{m}.weight.lora_b", b, tb)
        ref[f"scale.{m}"] = np.array([[np.float32(alpha) / np.float32(r)]], dtype=np.float32)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    finish(w)

    w = writer("no-alpha.gguf")
    add(w, "blk.1.attn_output.weight.lora_a", rng.uniform(-1, 1, (2, 32)), T.F32)
    add(w, "blk.1.attn_output.weight.lora_b", rng.uniform(-1, 1, (64, 2)), T.F32)
    finish(w)

    w = writer("lone-a.gguf", alpha=4.0)
    add(w, "blk.0.attn_q.weight.lora_a", rng.uniform(-1, 1, (2, 64)), T.F32)
    add(w, "blk.0.attn_q.weight.lora_b", rng.uniform(-1, 1, (32, 2)), T.F32)
    add(w, "blk.0.attn_k.weight.lora_a", rng.uniform(-1, 1, (2, 64)), T.F32)
    finish(w)

    w = writer("rank-mismatch.gguf", alpha=4.0)
    add(w, "blk.0.attn_q.weight.lora_a", rng.uniform(-1, 1, (4, 64)), T.F32)
    add(w, "blk.0.attn_q.weight.lora_b", rng.uniform(-1, 1, (32, 2)), T.F32)
    finish(w)

    w = writer("bad-suffix.gguf", alpha=4.0)
    add(w, "blk.0.attn_q.weight.lora_a", rng.uniform(-1, 1, (2, 64)), T.F32)
    add(w, "blk.0.attn_q.weight.lora_b", rng.uniform(-1, 1, (32, 2)), T.F32)
    add(w, "blk.0.attn_q.weight.lora_c", rng.uniform(-1, 1, (32, 2)), T.F32)
    finish(w)

    w = writer("not-lora.gguf", adapter_type="control_vector", alpha=4.0)
    add(w, "blk.0.attn_q.weight.lora_a", rng.uniform(-1, 1, (2, 64)), T.F32)
    add(w, "blk.0.attn_q.weight.lora_b", rng.uniform(-1, 1, (32, 2)), T.F32)
    finish(w)

    w = writer("model.gguf", general_type="model", adapter_type=None)
    add(w, "blk.0.attn_q.weight", rng.uniform(-1, 1, (32, 64)), T.F32)
    finish(w)

    w = writer("base.gguf", general_type="model", adapter_type=None)
    add(w, "blk.0.attn_q.weight", rng.uniform(-1, 1, (32, 64)), T.F32)
    add(w, "blk.0.attn_v.weight", rng.uniform(-1, 1, (16, 64)), T.F32)
    finish(w)

    header, blobs, off = {}, [], 0
    for name, arr in sorted(ref.items()):
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(OUT / "ref.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
