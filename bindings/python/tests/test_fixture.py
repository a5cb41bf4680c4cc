"""Parity with PEFT's outputs on the peft-tiny fixture (tests/fixtures/peft-tiny/README.md)."""

import json
import re

import numpy as np
import pytest

import rankfuse
from conftest import FIXTURE, MODULES


def assert_close(got, ref, atol, rtol, what=""):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, what
    diff = np.abs(got - ref)
    bad = diff > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: {bad.sum()} elements off, max |diff| {diff.max():.3g}"
    return float(diff.max())


def bias_of(base, m):
    return base[m + ".bias"] if m + ".bias" in base.names() else None


def test_version_and_info(rt):
    assert re.fullmatch(r"\d+\.\d+\.\d+", rankfuse.version())
    assert rankfuse.abi_version() == rankfuse.ABI_VERSION
    info = rt.info()
    assert info["version"] == rankfuse.version()
    assert info["threads"] == 2
    json.dumps(info)


@pytest.mark.parametrize("adapter", ["lora-r8", "rslora-pattern", "lora-r64"])
def test_parity_f32(rt, base, io, adapter):
    a = rt.load_peft(FIXTURE / "adapters" / adapter)
    assert sorted(a.modules()) == sorted(MODULES)
    worst = 0.0
    for m in MODULES:
        x = io["x." + m]  # a zero-copy view of the mapping
        y = rt.linear(x, base[m + ".weight"], bias_of(base, m), [a[m]])
        worst = max(worst, assert_close(y, io[f"y.{adapter}.{m}"], 1e-4, 1e-4, m))
        # numpy-owned input, explicit output array
        out = np.full((x.shape[0], base[m + ".weight"].shape[0]), np.nan, dtype=np.float32)
        r = rt.linear(np.array(x), base[m + ".weight"], bias_of(base, m), [a[m]], out=out)
        assert r is out
        np.testing.assert_array_equal(out, y)
    print(f"{adapter}: 14 modules, max |y - y_peft| = {worst:.3g}")


def test_half_precision_bases(rt, io):
    a = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
    with rt.open_weights(FIXTURE / "base-bf16.safetensors") as b16, rt.open_weights(
        FIXTURE / "base-f16.safetensors"
    ) as f16:
        for m in MODULES:
            x = io["x." + m]
            wb = b16[m + ".weight"]
            assert wb.dtype == np.uint16  # bf16 bits
            # bf16 base weights, f32 x and math: PEFT's y_bf16base within the f32 tolerance.
            y = rt.linear(x, wb, bias_of(b16, m), [a[m]])
            assert_close(y, io[f"y_bf16base.lora-r8.{m}"], 1e-4, 1e-4, "bf16 base " + m)
            # f16 base weights against the f32 reference.
            wf = f16[m + ".weight"]
            assert wf.dtype == np.float16
            y = rt.linear(x, wf, bias_of(f16, m), [a[m]])
            assert_close(y, io[f"y.lora-r8.{m}"], 2e-3, 2e-3, "f16 base " + m)
            # Everything bf16 (x, W, bias in bf16; bf16 output).
            yb = rt.linear(rankfuse.f32_to_bf16(x), wb, bias_of(b16, m), [a[m]], dtype=np.uint16)
            assert yb.dtype == np.uint16
            assert_close(rankfuse.bf16_to_f32(yb), io[f"y.lora-r8.{m}"], 5e-2, 2e-2, "bf16 " + m)


def test_bf16_conversion_round_trip():
    x = np.array([1.0, -2.5, 3.1415927, 1e-3, 0.0, 65504.0], dtype=np.float32)
    back = rankfuse.bf16_to_f32(rankfuse.f32_to_bf16(x))
    assert_close(back, x, 0, 2**-8, "bf16 round trip")
    assert rankfuse.f32_to_bf16(np.float32(1.0)) == 0x3F80
    special = rankfuse.bf16_to_f32(rankfuse.f32_to_bf16(np.array([np.inf, -np.inf, np.nan], np.float32)))
    assert special[0] == np.inf and special[1] == -np.inf and np.isnan(special[2])


def test_strided_views(rt, base, io):
    m = "layers.1.mlp.down_proj"
    a = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
    x = io["x." + m]
    wide = np.zeros((x.shape[0], x.shape[1] + 7), dtype=np.float32)
    wide[:, : x.shape[1]] = x
    out_wide = np.zeros((x.shape[0], 256 + 3), dtype=np.float32)
    rt.linear(wide[:, : x.shape[1]], base[m + ".weight"], None, [a[m]], out=out_wide[:, :256])
    assert_close(out_wide[:, :256], io[f"y.lora-r8.{m}"], 1e-4, 1e-4, "ld > cols")
    assert not out_wide[:, 256:].any(), "wrote past cols"


def test_mixed_batch(rt, base, io):
    m = "layers.0.self_attn.v_proj"
    r8 = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
    rs = rt.load_peft(FIXTURE / "adapters" / "rslora-pattern")
    row_slot = [1, -1, 0, 0, 1]
    y = rt.linear(io["x." + m], base[m + ".weight"], base[m + ".bias"], [r8[m], rs[m]], row_slot)
    refs = {0: io[f"y.lora-r8.{m}"], 1: io[f"y.rslora-pattern.{m}"], -1: io["y_base." + m]}
    for i, s in enumerate(row_slot):
        assert_close(y[i], refs[s][i], 1e-4, 1e-4, f"row {i}")
    # An empty slot and a scaled slot: None contributes nothing, scale_mult 0 cancels the adapter.
    y0 = rt.linear(io["x." + m], base[m + ".weight"], base[m + ".bias"], [None, rankfuse.Slot(r8[m], 0, 0.0)])
    assert_close(y0, io["y_base." + m], 1e-4, 1e-4, "no adapter")


def test_lora_info_and_truncation(rt, base, io):
    rs = rt.load_peft(FIXTURE / "adapters" / "rslora-pattern")
    info = rs["layers.0.self_attn.q_proj"].info()
    assert (info.in_features, info.out_features, info.capacity, info.rank) == (256, 64, 4, 4)
    assert info.scaling == rankfuse.Scaling.RSLORA and info.dtype == rankfuse.DType.F32
    assert info.alpha == 16 and info.scale == pytest.approx(8.0)

    a = rt.load_peft(FIXTURE / "adapters" / "lora-r64")
    m = "layers.0.mlp.gate_proj"
    lora = a[m]
    for b in (1, 8, 32):
        ref = io[f"y.lora-r64.trunc{b}.{m}"]
        lora.rank = b
        assert lora.rank == b
        assert_close(rt.linear(io["x." + m], base[m + ".weight"], None, [lora]), ref, 1e-4, 1e-4)
        lora.rank = 64
        y = rt.linear(io["x." + m], base[m + ".weight"], None, [rankfuse.Slot(lora, rank=b)])
        assert_close(y, ref, 1e-4, 1e-4, f"slot rank {b}")


def test_save_and_reload(rt, base, io, tmp_path):
    a = rt.load_peft(FIXTURE / "adapters" / "rslora-pattern")
    a.save_peft(tmp_path / "saved")
    back = rt.load_peft(tmp_path / "saved")
    assert back.modules() == a.modules()
    for m in ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"):
        y = rt.linear(io["x." + m], base[m + ".weight"], bias_of(base, m), [back[m]])
        assert_close(y, io[f"y.rslora-pattern.{m}"], 1e-4, 1e-4, m)


def test_threads_share_runtime_weights_and_adapter(rt, base, io):
    """ctypes drops the GIL during rf_linear: several threads run it at once on shared objects."""
    from concurrent.futures import ThreadPoolExecutor

    a = rt.load_peft(FIXTURE / "adapters" / "lora-r8")

    def job(m):
        y = rt.linear(io["x." + m], base[m + ".weight"], bias_of(base, m), [a[m]])
        return assert_close(y, io[f"y.lora-r8.{m}"], 1e-4, 1e-4, m)

    with ThreadPoolExecutor(4) as ex:
        worst = max(ex.map(job, MODULES * 4))
    assert worst < 1e-4


def test_packed_base_weights(rt, io):
    """Packed W (Runtime.pack) gives PEFT's outputs in every dtype, stacked and mixed."""
    r8 = rt.load_peft(FIXTURE / "adapters" / "lora-r8")
    rs = rt.load_peft(FIXTURE / "adapters" / "rslora-pattern")
    kernels = rt.info()["isa"]
    for fname, tol in (("base.safetensors", 1e-4), ("base-bf16.safetensors", 1e-4), ("base-f16.safetensors", 2e-3)):
        with rt.open_weights(FIXTURE / fname) as b:
            for m in MODULES:
                w = b[m + ".weight"]
                pw = rt.pack(np.array(w))  # a copy: the pack must not depend on it
                info = pw.info()
                assert (info.rows, info.cols) == w.shape and info.kernels == kernels
                assert info.bytes >= w.nbytes and info.panel_cols > 0
                x = io["x." + m]
                ref = io[("y_bf16base" if "bf16" in fname else "y") + f".lora-r8.{m}"]
                y = rt.linear(x, pw, bias_of(b, m), [r8[m]])
                assert_close(y, ref, tol, tol, f"packed {fname} {m}")
                # Mixed rows: r8, base only, rslora; the same as unpacked W.
                row_slot = [i % 3 - 1 for i in range(x.shape[0])]
                yp = rt.linear(x, pw, bias_of(b, m), [r8[m], rs[m]], row_slot)
                yu = rt.linear(x, w, bias_of(b, m), [r8[m], rs[m]], row_slot)
                assert_close(yp, yu, 1e-5, 1e-5, f"packed mixed {fname} {m}")
                pw.close()
                with pytest.raises(rankfuse.Error):
                    pw.info()


def test_adapter_store(rt, base, io):
    """A store with room for about one adapter: loads on first use, serves PEFT's outputs,
    evicts the least recently used released adapter, never one that is held."""
    m = "layers.0.self_attn.q_proj"
    x, w = io["x." + m], base[m + ".weight"]
    with rt.load_peft(FIXTURE / "adapters" / "lora-r64") as big:
        budget = sum(a.nbytes for l in big for a in big[l].weights()) + 1
    st = rt.store(budget)
    for name in ("lora-r8", "rslora-pattern", "lora-r64"):
        st.register(name, FIXTURE / "adapters" / name)
    with pytest.raises(rankfuse.Error):
        st.register("lora-r8", FIXTURE / "adapters" / "lora-r8")
    with pytest.raises(rankfuse.Error):
        st.acquire("nope")
    for name in ("lora-r8", "rslora-pattern", "lora-r8", "lora-r64"):
        with st.acquire(name) as a:
            y = rt.linear(x, w, bias_of(base, m), [a[m]])
            assert_close(y, io[f"y.{name}.{m}"], 1e-4, 1e-4, f"store {name}")
    s = st.stats()
    assert (s.registered, s.loads, s.hits, s.in_use) == (3, 3, 1, 0)
    assert s.evictions >= 1 and s.bytes_resident <= budget and s.budget_bytes == budget
    held = st.acquire("lora-r8")  # held: survives every later load
    st.pin("rslora-pattern")
    with st.acquire("rslora-pattern"), st.acquire("lora-r64"):
        pass
    assert st.stats().in_use == 1
    st.close()  # a held adapter outlives its store
    y = rt.linear(x, w, bias_of(base, m), [held[m]])
    assert_close(y, io[f"y.lora-r8.{m}"], 1e-4, 1e-4, "held after store close")
    held.close()


def test_store_versions(rt, base, io):
    m = "layers.1.mlp.up_proj"
    x, w = io["x." + m], base[m + ".weight"]
    st = rt.store()
    st.register("live", FIXTURE / "adapters" / "lora-r8")
    old = st.acquire("live")
    ident, g0 = old.version()
    assert ident != 0 and g0 == 0
    assert st.publish_peft("live", FIXTURE / "adapters" / "rslora-pattern") == 1
    mem = rt.load_peft(FIXTURE / "adapters" / "lora-r64")
    assert mem.version() == (0, 0)
    with st.acquire("live") as a:
        assert a.version() == (ident, 1)
        assert_close(rt.linear(x, w, bias_of(base, m), [a[m]]), io[f"y.rslora-pattern.{m}"], 1e-4, 1e-4, "gen 1")
    assert st.publish("live", mem) == 2
    with pytest.raises(rankfuse.Error):
        mem.modules()
    with st.acquire("live") as a:
        assert a.version() == (ident, 2)
        assert_close(rt.linear(x, w, bias_of(base, m), [a[m]]), io[f"y.lora-r64.{m}"], 1e-4, 1e-4, "gen 2")
    # The version acquired first is still whole.
    assert_close(rt.linear(x, w, bias_of(base, m), [old[m]]), io[f"y.lora-r8.{m}"], 1e-4, 1e-4, "gen 0 held")
    old.close()
    assert st.stats().publishes == 2
    st.close()
