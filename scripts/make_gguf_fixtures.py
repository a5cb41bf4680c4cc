#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/: GGUF files made by llama.cpp's own `gguf` package, and the values
rankfuse must read back from them, computed by the same package (so the tests need no Python).

    pip install gguf numpy
    python3 scripts/make_gguf_fixtures.py

Files:
  tiny.gguf          Q8_0, Q4_0, Q4_K, Q6_K, F16, BF16 and F32 tensors; metadata of every value
                     type (nested array included). Q8_0/Q4_0/BF16/F16 come from
                     gguf.quants.quantize; the package cannot quantize Q4_K or Q6_K, so their
                     blocks are random bytes with small finite scales (every nibble, 2-bit high
                     part and scale/min pattern occurs).
  tiny.ref.safetensors
                     per tensor '<name>': gguf.quants.dequantize of its bytes (f32), the values
                     rankfuse must decode bit-exactly; and for each quantized W: 'x.<name>',
                     'a.<name>', 'b.<name>', 'bias.<name>' and 'y.<name>' = x W^T + bias +
                     0.5 (x A^T) B^T computed in float64 from the dequantized W.
The safetensors file is written by hand (8-byte header length, JSON, data) to avoid a dependency.
"""
import json
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import GGUFWriter, quants

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf"
rng = np.random.default_rng(14)


def q4_k_blocks(rows, cols):
    nb = cols // 256
    b = rng.integers(0, 256, size=(rows, nb, 144), dtype=np.uint8)
    d = rng.uniform(0.002, 0.03, size=(rows, nb)).astype(np.float16)
    dmin = rng.uniform(0.0, 0.02, size=(rows, nb)).astype(np.float16)
    b[:, :, 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
    b[:, :, 2:4] = dmin.view(np.uint8).reshape(rows, nb, 2)
    return b.reshape(rows, nb * 144)


def q6_k_blocks(rows, cols):
    # gguf cannot quantize Q6_K either: random ql / qh / i8 scales, a small finite d (last).
    nb = cols // 256
    b = rng.integers(0, 256, size=(rows, nb, 210), dtype=np.uint8)
    d = rng.uniform(0.00005, 0.0008, size=(rows, nb)).astype(np.float16)
    b[:, :, 208:210] = d.view(np.uint8).reshape(rows, nb, 2)
    return b.reshape(rows, nb * 210)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(OUT / "tiny.gguf"), arch="rankfuse-test")
    # Metadata: every value type, and arrays (of ints, of strings, of arrays).
    w.add_key_value("test.u8", 200, V.UINT8)
    w.add_key_value("test.i8", -100, V.INT8)
    w.add_key_value("test.u16", 60000, V.UINT16)
    w.add_key_value("test.i16", -30000, V.INT16)
    w.add_key_value("test.u32", 4000000000, V.UINT32)
    w.add_key_value("test.i32", -2000000000, V.INT32)
    w.add_key_value("test.f32", 0.15625, V.FLOAT32)
    w.add_key_value("test.bool", True, V.BOOL)
    w.add_key_value("test.string", "grüße, gguf", V.STRING)
    w.add_key_value("test.u64", 2**63 + 5, V.UINT64)
    w.add_key_value("test.i64", -(2**40), V.INT64)
    w.add_key_value("test.f64", -2.5e-300, V.FLOAT64)
    w.add_key_value("test.array_i32", [1, -2, 3], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("test.array_str", ["a", "bc", ""], V.ARRAY, sub_type=V.STRING)
    w.add_key_value("test.nested", [[1, 2], [3]], V.ARRAY)

    ref = {}
    shapes = {
        "w.q8_0": (T.Q8_0, 5, 96),
        "w.q4_0": (T.Q4_0, 7, 64),
        "w.q4_k": (T.Q4_K, 3, 512),
        "w.f16": (T.F16, 4, 40),
        "w.bf16": (T.BF16, 2, 16),
        "w.f32": (T.F32, 3, 8),
        "w.q6_k": (T.Q6_K, 3, 512),
    }
    for name, (t, rows, cols) in shapes.items():
        if t == T.Q4_K:
            raw = q4_k_blocks(rows, cols)
        elif t == T.Q6_K:
            raw = q6_k_blocks(rows, cols)
        else:
            raw = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), t)
        if t in (T.F16, T.F32):
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_dtype=t)
        deq = quants.dequantize(raw, t).astype(np.float32).reshape(rows, cols)
        ref[name] = deq
        if t in (T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K):
            m, r = 3, 4
            x = rng.uniform(-1, 1, (m, cols)).astype(np.float32)
            a = rng.uniform(-1, 1, (r, cols)).astype(np.float32)
            b = rng.uniform(-1, 1, (rows, r)).astype(np.float32)
            bias = rng.uniform(-1, 1, (1, rows)).astype(np.float32)
            x64, w64 = x.astype(np.float64), deq.astype(np.float64)
            y = x64 @ w64.T + bias + 0.5 * (x64 @ a.astype(np.float64).T) @ b.astype(np.float64).T
            for k, v in (("x", x), ("a", a), ("b", b), ("bias", bias), ("y", y)):
                ref[f"{k}.{name}"] = v.astype(np.float32)
    # A 1-D F32 tensor (a bias-like vector).
    vec = rng.standard_normal(10).astype(np.float32)
    w.add_tensor("v.f32", vec)
    ref["v.f32"] = vec.reshape(1, 10)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    header, blobs, off = {}, [], 0
    for name, arr in sorted(ref.items()):
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(OUT / "tiny.ref.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    print("wrote", OUT / "tiny.gguf", "and", OUT / "tiny.ref.safetensors")


if __name__ == "__main__":
    main()
