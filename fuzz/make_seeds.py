#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/: small seed inputs for each fuzz target, from tests/corpus/ and the
PEFT fixtures' configs plus a few valid files. Deterministic; commit the output. Run
tests/corpus/make_corpus.py first."""
import json, os, random, shutil, struct

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS = os.path.join(REPO, "tests", "corpus")
SEEDS = os.path.join(HERE, "seeds")
MAX = 4096  # libFuzzer's default -max_len; larger seeds would raise it for every run


def st(header, data=b""):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


def put(target, name, data):
    if len(data) > MAX:
        return
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


shutil.rmtree(SEEDS, ignore_errors=True)

# safetensors_header: every corpus weights file, plus valid multi-dtype files.
for f in sorted(os.listdir(os.path.join(CORPUS, "weights"))):
    put("safetensors_header", f, open(os.path.join(CORPUS, "weights", f), "rb").read())
valid = st({"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F16", "shape": [3], "data_offsets": [24, 30]},
            "c": {"dtype": "BF16", "shape": [1, 1], "data_offsets": [30, 32]},
            "d": {"dtype": "I8", "shape": [], "data_offsets": [32, 33]},
            "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [33, 33]}}, bytes(range(33)))
put("safetensors_header", "valid-mixed.safetensors", valid)

# sharded_index: index | SEP | shards named s0/s1/s2.safetensors.
SEP = b"\n#SHARD#\n"
s0 = st({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
s1 = st({"u": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
         "v": {"dtype": "F16", "shape": [1], "data_offsets": [8, 10]}}, bytes(10))
idx = json.dumps({"metadata": {"total_size": 18}, "weight_map": {"t": "s0.safetensors", "u": "s1.safetensors", "v": "s1.safetensors"}}).encode()
put("sharded_index", "two-shards", idx + SEP + s0 + SEP + s1)
put("sharded_index", "missing-shard", idx + SEP + s0)
put("sharded_index", "traversal", b'{"weight_map":{"t":"../s0.safetensors"}}' + SEP + s0)
put("sharded_index", "wrong-shard", b'{"weight_map":{"t":"s1.safetensors"}}' + SEP + s0 + SEP + s1)

# peft_config: fixture configs and every corpus adapter's config.
cfgs = []
for root, _, files in sorted(os.walk(REPO)):
    if "adapter_config.json" in files and ("fixtures" in root or "corpus" in root):
        cfgs.append((os.path.relpath(root, REPO).replace("/", "_"), open(os.path.join(root, "adapter_config.json"), "rb").read()))
for name, c in sorted(cfgs):
    put("peft_config", name, c)
put("peft_config", "patterns", json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2, r"layers\.1\..*": 3, "(a|b)+": 1},
                                           "alpha_pattern": {"mlp": 16.5}}).encode())

# peft_load: config | SEP | adapter_model.safetensors, from the corpus adapters.
WSEP = b"\n#WEIGHTS#\n"
adir = os.path.join(CORPUS, "adapters")
for name in sorted(os.listdir(adir)):
    c = os.path.join(adir, name, "adapter_config.json")
    w = os.path.join(adir, name, "adapter_model.safetensors")
    if os.path.exists(c) and os.path.exists(w):
        put("peft_load", name, open(c, "rb").read() + WSEP + open(w, "rb").read())
meta = json.dumps({"m": {"scaling": "fixed", "scale": 0.5, "alpha": 3.0}})
two = st({"__metadata__": {"rankfuse": meta},
          "base_model.model.m.lora_A.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
          "base_model.model.m.lora_B.weight": {"dtype": "BF16", "shape": [4, 2], "data_offsets": [12, 28]}}, bytes(28))
put("peft_load", "fixed-scaling", json.dumps({"r": 2, "lora_alpha": 2}).encode() + WSEP + two)

# linear_args: structured by `arbitrary`; random bytes are good starting points.
rng = random.Random(8)
for i in range(8):
    put("linear_args", f"random-{i}", bytes(rng.randrange(256) for _ in range(40 + 24 * i)))
print("seeds:", {t: len(os.listdir(os.path.join(SEEDS, t))) for t in sorted(os.listdir(SEEDS))})

# gguf_file: the GGUF fixture written by llama.cpp's gguf package (scripts/make_gguf_fixtures.py).
with open(os.path.join(REPO, "tests", "fixtures", "gguf", "tiny.gguf"), "rb") as f:
    put("gguf_file", "tiny.gguf", f.read())
