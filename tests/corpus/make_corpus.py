#!/usr/bin/env python3
"""Writes tests/corpus/: hostile safetensors files, sharded indexes and PEFT adapter folders, and
expected.tsv (what tests/corpus.rs checks through the C ABI). Deterministic; re-run after
editing, then commit the output. Standard library only.

expected.tsv columns (tab-separated):
  kind     weights | get | adapter | linear
  path     relative to tests/corpus/
  status   rf_status name without the RF_STATUS_ prefix (OK for loads that must succeed)
  needle   text the error message must contain (the file, tensor or field at fault)
  arg      get: tensor name; linear: base tensor in base.safetensors and module, 'tensor|module'
  note     what the case is
"""
import json, os, shutil, struct

ROOT = os.path.dirname(os.path.abspath(__file__))
rows = []


def add(kind, path, status, needle, note, arg="-"):
    assert "\t" not in needle + note + arg
    rows.append((kind, path, status, needle, arg, note))


def st_bytes(header, data=b"", raw_header=None, length=None):
    """A safetensors file: u64 little-endian header length, JSON header, data."""
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


def f32(*vals):
    return struct.pack("<%df" % len(vals), *vals)


def write(rel, content):
    p = os.path.join(ROOT, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())


def weights(name, content, status, needle, note):
    rel = "weights/" + name
    write(rel, content)
    add("weights", rel, status, needle, note)


def good_one():
    return st_bytes({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32(1, 2))


for d in ("weights", "index", "adapters"):
    shutil.rmtree(os.path.join(ROOT, d), ignore_errors=True)

# ---------------------------------------------------------------- single safetensors files
weights("ok.safetensors", good_one(), "OK", "-", "a valid 1-tensor file (control)")
weights("empty.safetensors", b"", "FORMAT", "empty.safetensors", "zero bytes")
weights("short-prefix.safetensors", b"\x10\x00\x00", "FORMAT", "short-prefix.safetensors",
        "truncated inside the 8-byte header length")
weights("truncated-header.safetensors", good_one()[:20], "FORMAT", "truncated-header.safetensors",
        "truncated inside the JSON header")
weights("truncated-data.safetensors", good_one()[:-3], "FORMAT", "truncated-data.safetensors",
        "truncated inside the tensor data")
weights("header-len-beyond-file.safetensors", st_bytes({}, length=1000), "FORMAT",
        "header-len-beyond-file.safetensors", "header length larger than the file")
weights("header-len-huge.safetensors", struct.pack("<Q", 0xFFFFFFFFFFFFFFF0) + b"{}", "FORMAT",
        "header-len-huge.safetensors", "header length near 2^64 (overflow bait)")
weights("header-over-limit.safetensors", struct.pack("<Q", 17 << 20) + b"{}", "FORMAT", "limit",
        "header length of 17 MiB: over rankfuse's 16 MiB cap, refused before reading it")
weights("header-not-utf8.safetensors",
        st_bytes(None, raw_header=b'{"t\xff\xfe":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'),
        "FORMAT", "header-not-utf8.safetensors", "non-UTF-8 bytes in a tensor name")
weights("name-lone-surrogate.safetensors",
        st_bytes(None, raw_header=b'{"t\\udc80":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'),
        "FORMAT", "name-lone-surrogate.safetensors", "tensor name with an unpaired UTF-16 surrogate escape")
weights("name-nul.safetensors",
        st_bytes({"a\u0000b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, f32(1)),
        "FORMAT", "name-nul.safetensors", "tensor name with a NUL byte (cannot be a C string)")
weights("header-not-json.safetensors", st_bytes(None, raw_header=b"{not json"), "FORMAT",
        "header-not-json.safetensors", "header is not JSON")
weights("header-array.safetensors", st_bytes(None, raw_header=b"[1,2,3]"), "FORMAT",
        "header-array.safetensors", "header is a JSON array")
weights("header-deep-nesting.safetensors",
        st_bytes(None, raw_header=b'{"__metadata__":' + b"[" * 10000 + b"]" * 10000 + b"}"),
        "FORMAT", "header-deep-nesting.safetensors", "10000-deep JSON nesting inside the header (stack bomb)")
weights("entry-not-object.safetensors", st_bytes({"t": 5}), "FORMAT", "entry-not-object.safetensors",
        "tensor entry is a number")
weights("missing-dtype.safetensors", st_bytes({"t": {"shape": [2], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "missing-dtype.safetensors", "tensor entry without dtype")
weights("missing-offsets.safetensors", st_bytes({"t": {"dtype": "F32", "shape": [2]}}, f32(1, 2)),
        "FORMAT", "missing-offsets.safetensors", "tensor entry without data_offsets")
weights("unknown-dtype.safetensors",
        st_bytes({"t": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "F33", "dtype that does not exist")
weights("shape-negative.safetensors",
        st_bytes({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "-2", "negative dimension")
weights("shape-overflow.safetensors",
        st_bytes({"t": {"dtype": "F32", "shape": [1 << 32, 1 << 32, 16], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "shape-overflow.safetensors", "shape product overflows 64 bits")
weights("shape-bytes-overflow.safetensors",
        st_bytes({"t": {"dtype": "F32", "shape": [1 << 62], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "shape-bytes-overflow.safetensors", "element count fits, byte count overflows")
weights("wrong-dtype-size.safetensors",
        st_bytes({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "'t'", "F32 x 4 described with 8 bytes")
weights("offsets-beyond-data.safetensors",
        st_bytes({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32(1, 2)),
        "FORMAT", "'t'", "data_offsets end past the end of the file")
weights("offsets-huge.safetensors",
        st_bytes({"t": {"dtype": "F32", "shape": [2], "data_offsets": [(1 << 64) - 8, (1 << 64) - 1]}}, f32(1, 2)),
        "FORMAT", "offsets-huge.safetensors", "data_offsets near 2^64")
weights("offsets-reversed.safetensors",
        st_bytes({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, f32(1, 2)),
        "FORMAT", "offsets-reversed.safetensors", "end offset before start offset")
weights("offsets-overlap.safetensors",
        st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, f32(1, 2, 3)),
        "FORMAT", "overlap", "two tensors sharing bytes")
weights("offsets-gap.safetensors",
        st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                  "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, f32(1, 2, 3)),
        "FORMAT", "gap", "unreferenced bytes between tensors")
weights("trailing-bytes.safetensors", good_one() + b"\0" * 7, "FORMAT", "trailing-bytes.safetensors",
        "bytes after the last tensor")
weights("duplicate-names.safetensors",
        st_bytes(None, raw_header=b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                 b'"t":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}', data=f32(1)),
        "FORMAT", "'t'", "the same tensor name twice with different meanings (parsers disagree on which wins)")
weights("metadata-not-strings.safetensors",
        st_bytes({"__metadata__": {"format": 5}, "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "metadata-not-strings.safetensors", "__metadata__ values must be strings")

# Loads fine; the tensor cannot be a matrix view.
write("weights/rank3.safetensors",
      st_bytes({"t3": {"dtype": "F32", "shape": [1, 2, 1], "data_offsets": [0, 8]}}, f32(1, 2)))
add("get", "weights/rank3.safetensors", "FORMAT", "t3", "3-D tensor asked for as a matrix", "t3")
write("weights/int64.safetensors",
      st_bytes({"i": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, struct.pack("<q", 7)))
add("get", "weights/int64.safetensors", "UNSUPPORTED", "I64", "I64 tensor asked for as a matrix", "i")
add("get", "weights/ok.safetensors", "NOT_FOUND", "nope", "a tensor that is not there", "nope")


# ---------------------------------------------------------------- sharded indexes
def index(name, idx, shards, status, needle, note):
    rel = "index/" + name
    for fname, content in shards.items():
        write(rel + "/" + fname, content)
    text = idx if isinstance(idx, (bytes, str)) else json.dumps(idx)
    write(rel + "/model.safetensors.index.json", text)
    add("weights", rel + "/model.safetensors.index.json", status, needle, note)


s1 = good_one()
s2 = st_bytes({"u": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, f32(3))
index("ok", {"weight_map": {"t": "a.safetensors", "u": "b.safetensors"}},
      {"a.safetensors": s1, "b.safetensors": s2}, "OK", "-", "a valid 2-shard index (control)")
index("not-json", "{\"weight_map\": ", {}, "FORMAT", "model.safetensors.index.json", "index is not JSON")
index("no-weight-map", {"metadata": {}}, {}, "FORMAT", "weight_map", "index without weight_map")
index("value-not-string", {"weight_map": {"t": 3}}, {}, "FORMAT", "weight_map['t']",
      "weight_map value is a number")
index("path-traversal", {"weight_map": {"t": "../weights/ok.safetensors"}}, {}, "FORMAT", "../weights",
      "shard name escaping the index's folder")
index("absolute-path", {"weight_map": {"t": "/etc/passwd"}}, {}, "FORMAT", "/etc/passwd",
      "absolute shard path")
index("missing-shard", {"weight_map": {"t": "gone.safetensors"}}, {}, "NOT_FOUND", "gone.safetensors",
      "shard file does not exist")
index("tensor-not-in-shard", {"weight_map": {"t": "a.safetensors", "zz": "a.safetensors"}},
      {"a.safetensors": s1}, "NOT_FOUND", "zz", "index names a tensor its shard lacks")
index("bad-shard", {"weight_map": {"t": "a.safetensors"}},
      {"a.safetensors": s1[:-2]}, "FORMAT", "a.safetensors", "shard itself truncated")


# ---------------------------------------------------------------- PEFT adapters
CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "use_rslora": False}


def lora_file(mods, dtype_a="F32", dtype_b="F32", extra=None):
    """mods: {module: (r, in, out)}; values are small numbers."""
    header, data = {}, b""
    def put(key, dtype, shape):
        nonlocal data
        n = 1
        for d in shape:
            n *= d
        size = {"F32": 4, "F16": 2, "BF16": 2}[dtype] * n
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += bytes((i * 7 + 3) % 64 for i in range(size))  # small finite values in every dtype
    for m, (r, i, o) in mods.items():
        put(f"base_model.model.{m}.lora_A.weight", dtype_a, [r, i])
        put(f"base_model.model.{m}.lora_B.weight", dtype_b, [o, r])
    for key, (dtype, shape) in (extra or {}).items():
        put(key, dtype, shape)
    return st_bytes(header, data)


def adapter(name, cfg, wfile, status, needle, note, wname="adapter_model.safetensors"):
    rel = "adapters/" + name
    os.makedirs(os.path.join(ROOT, rel), exist_ok=True)
    if cfg is not None:
        write(rel + "/adapter_config.json", cfg if isinstance(cfg, (bytes, str)) else json.dumps(cfg))
    if wfile is not None:
        write(rel + "/" + wname, wfile)
    add("adapter", rel, status, needle, note)


ONE = {"layers.0.q": (2, 4, 5)}
adapter("ok", CFG, lora_file(ONE), "OK", "-", "a valid adapter (control)")
adapter("config-not-json", "{\"r\": 2,", lora_file(ONE), "FORMAT", "adapter_config.json", "config is not JSON")
adapter("config-array", "[]", lora_file(ONE), "FORMAT", "adapter_config.json", "config is a JSON array")
adapter("config-nan-alpha", '{"r": 2, "lora_alpha": NaN}', lora_file(ONE), "FORMAT", "adapter_config.json",
        "Python's json writes NaN; it is not JSON")
adapter("r-string", dict(CFG, r="2"), lora_file(ONE), "FORMAT", "'r'", "r is a string")
adapter("r-zero", dict(CFG, r=0), lora_file(ONE), "FORMAT", "'r'", "r = 0")
adapter("r-huge", dict(CFG, r=1 << 40), lora_file(ONE), "FORMAT", "'r'", "r = 2^40")
adapter("alpha-string", dict(CFG, lora_alpha="4"), lora_file(ONE), "FORMAT", "'lora_alpha'", "lora_alpha is a string")
adapter("alpha-huge", dict(CFG, lora_alpha=1e300), lora_file(ONE), "FORMAT", "'lora_alpha'", "lora_alpha overflows f32")
adapter("rslora-not-bool", dict(CFG, use_rslora="yes"), lora_file(ONE), "FORMAT", "'use_rslora'", "use_rslora is a string")
adapter("target-modules-number", dict(CFG, target_modules=7), lora_file(ONE), "FORMAT", "'target_modules'",
        "target_modules is a number")
adapter("rank-pattern-list", dict(CFG, rank_pattern=["q"]), lora_file(ONE), "FORMAT", "'rank_pattern'",
        "rank_pattern is a list")
adapter("rank-pattern-value-string", dict(CFG, rank_pattern={"q": "2"}), lora_file(ONE), "FORMAT",
        "rank_pattern['q']", "rank_pattern value is a string")
adapter("regex-bomb-repeat", dict(CFG, rank_pattern={"(a{1000}){1000}": 2}), lora_file(ONE), "FORMAT",
        "rank_pattern", "a regex whose automaton would need ~10^6 states")
adapter("regex-bomb-nesting", dict(CFG, alpha_pattern={"(" * 1000 + "q" + ")" * 1000: 2}), lora_file(ONE),
        "FORMAT", "alpha_pattern", "regex nested 1000 deep")
adapter("regex-key-too-long", dict(CFG, rank_pattern={"q" * 5000: 2}), lora_file(ONE), "FORMAT",
        "rank_pattern", "a 5000-byte pattern key")
adapter("regex-lookaround", dict(CFG, rank_pattern={"(?=q)q": 2}), lora_file(ONE), "FORMAT",
        "rank_pattern", "look-ahead is not supported by the linear-time regex engine")
adapter("peft-type-ia3", dict(CFG, peft_type="IA3"), lora_file(ONE), "UNSUPPORTED", "'peft_type'", "not a LoRA adapter")
adapter("use-dora", dict(CFG, use_dora=True), lora_file(ONE), "UNSUPPORTED", "'use_dora'", "DoRA changes the math")
adapter("init-pissa", dict(CFG, init_lora_weights="pissa"), lora_file(ONE), "UNSUPPORTED", "'init_lora_weights'",
        "PiSSA rewrites the base weights")
adapter("no-config", None, lora_file(ONE), "NOT_FOUND", "adapter_config.json", "no adapter_config.json")
adapter("no-weights", CFG, None, "NOT_FOUND", "adapter_model.safetensors", "no adapter_model.safetensors")
adapter("pickle-only", CFG, b"\x80\x02}q\x00.", "UNSUPPORTED", "adapter_model.bin",
        "only a pickled adapter_model.bin", wname="adapter_model.bin")
adapter("weights-truncated", CFG, lora_file(ONE)[:-5], "FORMAT", "adapter_model.safetensors", "weights file truncated")
adapter("no-lora-tensors", CFG, st_bytes({}), "FORMAT", "no lora_A/lora_B", "weights file without tensors")
adapter("a-without-b", CFG,
        st_bytes({"base_model.model.layers.0.q.lora_A.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]}}, f32(1, 2)),
        "FORMAT", "layers.0.q", "lora_A without its lora_B")
adapter("rank-disagrees-with-config", dict(CFG, r=3), lora_file(ONE), "SHAPE", "layers.0.q",
        "tensors have rank 2, config says r = 3")
adapter("a-b-rank-mismatch", CFG,
        lora_file({}, extra={"base_model.model.m.lora_A.weight": ("F32", [2, 4]),
                             "base_model.model.m.lora_B.weight": ("F32", [5, 3])}),
        "SHAPE", "'m'", "lora_A has rank 2, lora_B rank 3")
adapter("a-b-dtype-mismatch", CFG, lora_file(ONE, dtype_a="F32", dtype_b="F16"), "DTYPE", "layers.0.q",
        "lora_A is F32, lora_B is F16")
adapter("lora-1d", CFG,
        lora_file({}, extra={"base_model.model.m.lora_A.weight": ("F32", [2]),
                             "base_model.model.m.lora_B.weight": ("F32", [5, 2])}),
        "UNSUPPORTED", "lora_A", "1-D lora_A")
adapter("dora-magnitude", CFG, lora_file(ONE, extra={"base_model.model.layers.0.q.lora_magnitude_vector": ("F32", [5])}),
        "UNSUPPORTED", "lora_magnitude_vector", "DoRA magnitude vector in the weights")
adapter("modules-to-save", CFG, lora_file(ONE, extra={"base_model.model.lm_head.weight": ("F32", [2, 2])}),
        "UNSUPPORTED", "lm_head.weight", "a full weight (modules_to_save)")
adapter("int-dtype", CFG,
        st_bytes({"base_model.model.m.lora_A.weight": {"dtype": "I32", "shape": [2, 1], "data_offsets": [0, 8]},
                  "base_model.model.m.lora_B.weight": {"dtype": "I32", "shape": [1, 2], "data_offsets": [8, 16]}},
                 b"\0" * 16),
        "UNSUPPORTED", "I32", "integer LoRA tensors")

# ---------------------------------------------------------------- adapters vs the base
# base.safetensors: 'q.weight' is 5 x 4 (out x in), 'wide.weight' 5 x 6, 'tall.weight' 7 x 4.
base = {}
data = b""
for name, (o, i) in {"q.weight": (5, 4), "wide.weight": (5, 6), "tall.weight": (7, 4)}.items():
    base[name] = {"dtype": "F32", "shape": [o, i], "data_offsets": [len(data), len(data) + 4 * o * i]}
    data += f32(*[0.25] * (o * i))
write("base.safetensors", st_bytes(base, data))
add("linear", "adapters/ok", "OK", "-", "adapter 4 -> 5 on a 5 x 4 base weight (control)", "q.weight|layers.0.q")
add("linear", "adapters/ok", "SHAPE", "layers.0.q", "adapter in_features 4, base weight has 6 columns",
    "wide.weight|layers.0.q")
add("linear", "adapters/ok", "SHAPE", "layers.0.q", "adapter out_features 5, base weight has 7 rows",
    "tall.weight|layers.0.q")

with open(os.path.join(ROOT, "expected.tsv"), "w") as f:
    f.write("# generated by make_corpus.py: kind\tpath\tstatus\tneedle\targ\tnote\n")
    for r in rows:
        f.write("\t".join(r) + "\n")
print(f"{len(rows)} cases, {sum(1 for r in rows if r[2] != 'OK')} of them bad")
