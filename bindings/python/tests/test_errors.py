"""Bad calls raise rankfuse.Error with the status and the library's message; no crash."""

import gc

import numpy as np
import pytest

import rankfuse
from rankfuse import Error, Status
from conftest import FIXTURE


def test_missing_module(rt):
    a = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
    with pytest.raises(Error) as e:
        a["layers.9.nope"]
    assert e.value.status == Status.NOT_FOUND
    assert "layers.9.nope" in e.value.message
    assert "NOT_FOUND" in str(e.value)


def test_missing_file(rt, tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(Error) as e:
        rt.open_weights(path)
    assert e.value.status != Status.OK and str(path) in e.value.message


def test_shape_mismatch_from_the_library(rt, base, io):
    x = io["x.layers.0.mlp.down_proj"]  # 5 x 172
    w = base["layers.0.self_attn.q_proj.weight"]  # 64 x 256
    with pytest.raises(Error) as e:
        rt.linear(x, w)
    assert e.value.status == Status.SHAPE
    assert "172" in e.value.message and "256" in e.value.message


def test_checks_on_the_python_side(rt, base, io):
    m = "layers.0.mlp.up_proj"
    x, w = io["x." + m], base[m + ".weight"]
    with pytest.raises(Error) as e:
        rt.linear(x.astype(np.float64), w)
    assert e.value.status == Status.DTYPE and "float64" in e.value.message
    with pytest.raises(Error) as e:
        rt.linear(x, w, out=w)  # a read-only view of the mapping
    assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(Error) as e:
        rt.linear(x, w, row_slot=[0, 0])
    assert e.value.status == Status.SHAPE
    with pytest.raises(Error) as e:
        rt.linear(np.asfortranarray(np.array(x)), w)
    assert e.value.status == Status.INVALID_ARGUMENT and "contiguous" in e.value.message
    with pytest.raises(Error):
        rt.linear(x, w, slots=["not a lora"])


def test_rank_out_of_range(rt):
    lora = rt.load_peft(FIXTURE / "adapters" / "lora-r8")["layers.0.mlp.up_proj"]
    with pytest.raises(Error) as e:
        lora.set_rank(9)
    assert e.value.status == Status.INVALID_ARGUMENT and e.value.message


def test_bad_slot_index_from_the_library(rt, base, io):
    m = "layers.0.mlp.up_proj"
    lora = rt.load_peft(FIXTURE / "adapters" / "lora-r8")[m]
    with pytest.raises(Error) as e:
        rt.linear(io["x." + m], base[m + ".weight"], None, [lora], row_slot=[0, 0, 5, 0, 0])
    assert e.value.message


def test_use_after_close(rt, base):
    a = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
    lora = a["layers.0.mlp.up_proj"]
    a.close()
    a.close()  # idempotent
    with pytest.raises(Error, match="closed"):
        lora.info()
    with pytest.raises(Error, match="closed"):
        a.modules()
    assert len(a) == 0


def test_views_keep_weights_mapped(rt):
    w = rt.open_weights(FIXTURE / "io.safetensors")
    view = w["x.layers.0.mlp.up_proj"]
    expect = float(np.array(view).sum())
    w.close()
    with pytest.raises(Error, match="closed"):
        w["x.layers.0.mlp.up_proj"]
    gc.collect()
    assert float(view.sum()) == expect  # still mapped: the view holds a reference
    assert not view.flags.writeable


def test_runtime_outlives_its_objects():
    rt = rankfuse.Runtime()
    w = rt.open_weights(FIXTURE / "base.safetensors")
    rt.close()
    with pytest.raises(Error, match="closed"):
        rt.open_weights(FIXTURE / "base.safetensors")
    assert len(w.names()) > 0  # the C runtime is freed only after w
    w.close()
    del w, rt
    gc.collect()


def test_objects_freed_by_gc():
    for _ in range(3):
        rt = rankfuse.Runtime()
        a = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
        lora = a["layers.0.mlp.up_proj"]
        del rt, a  # the lora keeps its adapter alive, the adapter its runtime
        assert lora.info().rank == 8
        del lora
        gc.collect()
