#!/usr/bin/env python3
"""rankfuse <-> llama.cpp interop (issue 15), run by .ci/steps/65-llama-cpp.sh.

A tiny random Llama (Hugging Face layout, safetensors + config.json) and a random PEFT LoRA for
it are written here; the GGUF base is made from the HF tensors the way convert_hf_to_gguf.py
does (names mapped, q/k rows permuted per head). Then:

 (a) `rankfuse convert` writes the GGUF adapter and llama.cpp loads it (llama_adapter_lora_init);
 (b) llama.cpp's logits with the adapter at scale 1 equal llama.cpp's logits on the base that
     `rankfuse merge` produced with the adapter folded in (converted to GGUF the same way), and
     differ clearly from the base alone (so the check can fail);
 (c) rankfuse's own linear (`rankfuse apply`, adapter read back from the GGUF file) on one layer
     equals x @ W_merged^T;
 (d) optionally (--convert-lora DIR): llama.cpp's convert_lora_to_gguf.py converts the PEFT
     adapter and rankfuse reads the result with the same tensors as its own conversion.

Exits non-zero on any mismatch. Needs numpy and gguf (the package from PyPI).
"""
import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import gguf

CFG = dict(vocab=128, hidden=64, layers=3, heads=4, kv_heads=2, ffn=160, eps=1e-5, theta=10000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
rng = np.random.default_rng(2015)


def write_st(path, tensors):
    """A safetensors file (f32), written by hand."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def read_st(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        s, e = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + s:8 + n + e], dtype="<f4").reshape(info["shape"])
    return out


def hf_model():
    c = CFG
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (c["vocab"], h))}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, h)
        t[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.15, (c["heads"] * hd, h))
        t[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.15, (c["kv_heads"] * hd, h))
        t[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.15, (c["kv_heads"] * hd, h))
        t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.15, (h, c["heads"] * hd))
        t[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, h)
        t[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.15, (c["ffn"], h))
        t[p + "mlp.up_proj.weight"] = rng.normal(0, 0.15, (c["ffn"], h))
        t[p + "mlp.down_proj.weight"] = rng.normal(0, 0.15, (h, c["ffn"]))
    t["model.norm.weight"] = 1 + rng.normal(0, 0.1, h)
    t["lm_head.weight"] = rng.normal(0, 0.3, (c["vocab"], h))
    return {k: v.astype(np.float32) for k, v in t.items()}


def hf_config():
    c = CFG
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c["vocab"],
        "hidden_size": c["hidden"], "intermediate_size": c["ffn"], "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"],
        "rms_norm_eps": c["eps"], "rope_theta": c["theta"], "max_position_embeddings": 256,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (rotary pairs interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(tensors, path):
    """The HF tensors as a llama GGUF model, as convert_hf_to_gguf.py maps them."""
    c = CFG
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(256)
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_freq_base(c["theta"])
    w.add_rope_dimension_count(c["hidden"] // c["heads"])
    w.add_vocab_size(c["vocab"])
    w.add_string("tokenizer.ggml.model", "no_vocab")
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for k, v in tensors.items():
        if k == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif k == "model.norm.weight":
            g = "output_norm.weight"
        elif k == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, rest = k.split(".", 3)
            g = f"blk.{i}.{names[rest[:-len('.weight')]]}.weight"
            if rest.startswith("self_attn.q_proj"):
                v = permute(v, c["heads"])
            elif rest.startswith("self_attn.k_proj"):
                v = permute(v, c["kv_heads"])
        w.add_tensor(g, np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def peft_adapter(model, d):
    """A random PEFT LoRA (r 4, alpha 8 -> scale 2) on every projection, B non-zero."""
    d.mkdir(parents=True, exist_ok=True)
    r, t = 4, {}
    for k, v in model.items():
        if any(k.endswith(f"{m}.weight") for m in TARGETS):
            mod = k[: -len(".weight")]
            t[f"base_model.model.{mod}.lora_A.weight"] = rng.normal(0, 0.2, (r, v.shape[1])).astype(np.float32)
            t[f"base_model.model.{mod}.lora_B.weight"] = rng.normal(0, 0.2, (v.shape[0], r)).astype(np.float32)
    write_st(d / "adapter_model.safetensors", t)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": TARGETS, "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
           "base_model_name_or_path": str(d.parent / "hf")}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def logits(tool, model, out, toks, adapter=None):
    cmd = [tool, model, out, ",".join(map(str, toks))]
    if adapter:
        cmd += [adapter, "1.0"]
    run(cmd, stdout=sys.stdout, stderr=subprocess.DEVNULL)
    return np.fromfile(out, dtype="<f4").reshape(len(toks), CFG["vocab"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rankfuse", required=True)
    ap.add_argument("--logits", required=True, help="the tests/llama/logits.c binary")
    ap.add_argument("--work", required=True)
    ap.add_argument("--convert-lora", help="vendored llama.cpp dir (runs convert_lora_to_gguf.py)")
    a = ap.parse_args()
    wd = Path(a.work)
    wd.mkdir(parents=True, exist_ok=True)
    c = CFG
    fails = []

    model = hf_model()
    hf = wd / "hf"
    hf.mkdir(exist_ok=True)
    write_st(hf / "model.safetensors", model)
    (hf / "config.json").write_text(json.dumps(hf_config(), indent=2))
    to_gguf(model, wd / "base.gguf")
    peft_adapter(model, wd / "peft")

    # (a) rankfuse writes the GGUF adapter; llama.cpp loads it.
    run([a.rankfuse, "convert", wd / "peft", wd / "adapter.gguf", "--base-config", hf / "config.json"])
    # rankfuse merge folds the PEFT adapter into the HF base; the merged base goes to GGUF the same way.
    run([a.rankfuse, "merge", "--base", hf / "model.safetensors", "--adapter", wd / "peft",
         "--out", wd / "merged.safetensors"], stdout=subprocess.DEVNULL)
    merged = read_st(wd / "merged.safetensors")
    to_gguf(merged, wd / "merged.gguf")

    toks = [int(t) for t in rng.integers(0, c["vocab"], 24)]
    with_adapter = logits(a.logits, wd / "base.gguf", wd / "l_adapter.bin", toks, wd / "adapter.gguf")
    on_merged = logits(a.logits, wd / "merged.gguf", wd / "l_merged.bin", toks)
    base_only = logits(a.logits, wd / "base.gguf", wd / "l_base.bin", toks)
    d = float(np.abs(with_adapter - on_merged).max())
    ref = float(np.abs(on_merged).max())
    d0 = float(np.abs(base_only - on_merged).max())
    tol = 1e-3 * max(1.0, ref)
    print(f"(b) llama.cpp logits [{len(toks)} x {c['vocab']}]: base+GGUF adapter vs rankfuse-merged base: "
          f"max|diff| = {d:.3e} (max|logit| {ref:.3f}, tolerance {tol:.1e}); base alone vs merged: {d0:.3e}")
    if not d <= tol:
        fails.append(f"(b) adapter logits differ from merged logits by {d}")
    if not d0 > 100 * tol:
        fails.append(f"(b) the adapter barely changes the logits ({d0}); the check could not fail")

    # (c) rankfuse's own linear, adapter read back from the GGUF file, vs the merged weights.
    run([a.rankfuse, "convert", wd / "adapter.gguf", wd / "peft-back", "--base-config", hf / "config.json"],
        stdout=subprocess.DEVNULL)
    worst = 0.0
    for mod in ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.k_proj", "model.layers.0.mlp.down_proj"]:
        wm = merged[mod + ".weight"]
        x = rng.normal(0, 1, (5, wm.shape[1])).astype(np.float32)
        write_st(wd / "x.safetensors", {f"x.{mod}": x})
        run([a.rankfuse, "apply", "--base", hf / "model.safetensors", "--adapter", wd / "peft-back",
             "--input", wd / "x.safetensors", "--output", wd / "y.safetensors"], stdout=subprocess.DEVNULL)
        y = read_st(wd / "y.safetensors")[f"y.{mod}"]
        want = x.astype(np.float64) @ wm.astype(np.float64).T
        e = float(np.abs(y - want).max())
        worst = max(worst, e)
        print(f"(c) rankfuse linear (GGUF adapter read back) vs x @ W_merged^T, {mod}: max|diff| = {e:.3e}")
    if not worst <= 1e-4 * max(1.0, float(np.abs(want).max())):
        fails.append(f"(c) rankfuse linear differs from the merged weights by {worst}")

    # (d) llama.cpp's own converter, read by rankfuse.
    if a.convert_lora:
        out = wd / "adapter-llamacpp.gguf"
        run([sys.executable, Path(a.convert_lora) / "convert_lora_to_gguf.py", "--outtype", "f32",
             "--base", hf, "--outfile", out, wd / "peft"], stdout=subprocess.DEVNULL)
        run([a.rankfuse, "inspect", out], stdout=subprocess.DEVNULL)
        run([a.rankfuse, "convert", out, wd / "peft-from-llamacpp", "--n-head", c["heads"],
             "--n-head-kv", c["kv_heads"]], stdout=subprocess.DEVNULL)
        theirs = read_st(wd / "peft-from-llamacpp" / "adapter_model.safetensors")
        ours = read_st(wd / "peft" / "adapter_model.safetensors")
        # Their file has alpha 8 over r 4 like ours: tensors must come back identical.
        dd = max(float(np.abs(theirs[k] - ours[k]).max()) for k in ours)
        same_keys = sorted(theirs) == sorted(ours)
        print(f"(d) convert_lora_to_gguf.py output read by rankfuse: {len(theirs)} tensors, "
              f"same names as the PEFT input: {same_keys}, max|diff| = {dd:.3e}")
        if not (same_keys and dd == 0.0):
            fails.append("(d) convert_lora_to_gguf.py adapter read back differently")
        # And llama.cpp computes the same with either file.
        theirs_l = logits(a.logits, wd / "base.gguf", wd / "l_theirs.bin", toks, out)
        dt = float(np.abs(theirs_l - with_adapter).max())
        print(f"(d) llama.cpp logits with their adapter vs ours: max|diff| = {dt:.3e}")
        if not dt <= tol:
            fails.append(f"(d) llama.cpp logits differ between the two adapters by {dt}")

    if fails:
        print("FAILED:\n  " + "\n  ".join(fails))
        return 1
    print("llama.cpp interop: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
