"""GGUF LoRA adapters (llama.cpp's format) through the binding: PEFT -> GGUF -> rf_linear gives
PEFT's outputs, the architecture is kept, and broken files raise Error naming the tensor."""

import pytest

import rankfuse
from conftest import FIXTURE
from test_fixture import assert_close, bias_of

GGUF = FIXTURE.parent / "gguf-adapter"


def test_peft_to_gguf_and_back(rt, base, io, tmp_path):
    a = rt.load_peft(FIXTURE / "adapters" / "rslora-pattern")
    assert a.architecture() is None
    a.save_gguf(tmp_path / "a.gguf", architecture="qwen2")
    g = rt.load_gguf(tmp_path / "a.gguf")
    assert g.architecture() == "qwen2"
    assert "blk.0.attn_q" in g.modules() and len(g) == len(a)
    # GGUF names are the base GGUF model's; the outputs are PEFT's.
    for m, gm in (("layers.0.self_attn.q_proj", "blk.0.attn_q"), ("layers.1.mlp.up_proj", "blk.1.ffn_up")):
        y = rt.linear(io["x." + m], base[m + ".weight"], bias_of(base, m), [g[gm]])
        assert_close(y, io[f"y.rslora-pattern.{m}"], 1e-4, 1e-4, m)


def test_gguf_errors(rt, tmp_path):
    with pytest.raises(rankfuse.Error) as e:
        rt.load_gguf(GGUF / "lone-a.gguf")
    assert e.value.status == rankfuse.Status.FORMAT and "blk.0.attn_k.weight.lora_a" in str(e.value)
    a = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
    with pytest.raises(rankfuse.Error) as e:
        a.save_gguf(tmp_path / "x.gguf", architecture="llama")
    assert "n_head" in str(e.value)
    a.save_gguf(tmp_path / "x.gguf", architecture="llama", n_head=2, n_head_kv=1, alpha=rankfuse.GgufAlpha.FOLD)
    g = rt.load_gguf(tmp_path / "x.gguf")
    with pytest.raises(rankfuse.Error) as e:
        g.check_base(rt.open_weights(GGUF / "base.gguf"))
    assert e.value.status == rankfuse.Status.NOT_FOUND
