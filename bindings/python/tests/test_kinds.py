"""KRAdapter and EigenLoRAx modules next to LoRA (mirrors tests/c/kinds.c): a basis built from
three LoRA adapters with random weights, one adapter per kind, a few AdamW steps each (the loss
goes down), one mixed batch (LoRA, KRAdapter, EigenLoRAx and base-only rows), save (adapters and
basis), close, reload, and the same outputs bit for bit; plus the kind query, the shapes info
reports, and loadings refused on another basis or without one."""

import numpy as np
import pytest

import rankfuse
from rankfuse import EigenBasis, ModuleKind, Slot, Status

IN, OUT, M, MT, CAP = 48, 40, 12, 8, 4
MOD = "layers.0.q_proj"


def train(rt, lora, w, b, rng, steps=6):
    """A few AdamW steps of `lora` alone on the layer (w, b) towards a random linear target;
    returns the mean squared error before and after."""
    x = rng.uniform(-1, 1, (MT, IN)).astype(np.float32)
    target = rng.uniform(-1, 1, (MT, OUT)).astype(np.float32)
    losses = []
    for step in range(steps + 1):
        y = rt.linear(x, w, b, slots=[lora])
        d = y - target
        losses.append(float(np.mean(d.astype(np.float64) ** 2)))
        if step == steps:
            break
        dy = (2.0 * d / d.size).astype(np.float32)
        lora.zero_grad()
        rt.backward(lora, x, w, dy)
        lora.adamw_step(lr=0.05, weight_decay=0.0)
    return losses[0], losses[-1]


def serve(rt, lora, kr, eig, x, w, b):
    row_slot = [i % 4 - 1 for i in range(M)]  # base, LoRA, KRAdapter, EigenLoRAx, ...
    return rt.linear(x, w, b, slots=[lora, Slot(kr, scale_mult=0.5), eig], row_slot=row_slot)


@pytest.fixture
def sources(rt):
    rng = np.random.default_rng(88)
    srcs = []
    for i in range(3):
        a = rt.new_adapter(f"src{i}")
        l = a.add_lora(MOD, IN, OUT, CAP, alpha=8.0, seed=10 + i)
        l.set_weights(
            rng.uniform(-0.3, 0.3, (CAP, IN)).astype(np.float32),
            rng.uniform(-0.3, 0.3, (OUT, CAP)).astype(np.float32),
        )
        srcs.append(a)
    yield srcs
    for a in srcs:
        a.close()


def test_kinds_train_serve_save_reload(rt, sources, tmp_path):
    rng = np.random.default_rng(7)
    w = rng.uniform(-0.2, 0.2, (OUT, IN)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, OUT).astype(np.float32)
    x = rng.uniform(-1, 1, (M, IN)).astype(np.float32)

    basis = EigenBasis.build(sources, components=6, augment=2, seed=7)
    other = EigenBasis.build(sources[:2], components=6, augment=2, seed=8)

    al, ak, ae = rt.new_adapter("lora"), rt.new_adapter("kr"), rt.new_adapter("eig")
    lora = al.add_lora(MOD, IN, OUT, CAP, alpha=8.0, seed=1)
    kr = ak.add_kradapter(MOD, IN, OUT, scale=2.0, seed=2)
    eig = ae.add_eigenlorax(basis, MOD, rank=3, scale=1.0, seed=3)

    assert lora.kind == ModuleKind.LORA
    assert kr.kind == ModuleKind.KRADAPTER
    assert eig.kind == ModuleKind.EIGENLORAX
    ki, ei = kr.info(), eig.info()
    assert (ki.in_features, ki.out_features) == (IN, OUT)
    assert (ei.in_features, ei.out_features) == (IN, OUT)
    assert (ei.rank, ei.capacity) == (8, 3), "rank = the basis' 6 + 2 components, capacity = loadings"

    for name, mod in (("LoRA", lora), ("KRAdapter", kr), ("EigenLoRAx", eig)):
        before, after = train(rt, mod, w, b, rng)
        assert after < before, f"{name}: loss {before} -> {after}"
    eig.set_rank(7)  # the first 7 of 8 basis components
    assert eig.rank == 7

    y0 = serve(rt, lora, kr, eig, x, w, b)
    base = rt.linear(x, w, b)
    for i in range(M):
        same = np.array_equal(y0[i], base[i])
        assert same == (i % 4 == 0), f"row {i}: adapter rows differ from the base, base rows do not"

    for name, a in (("lora", al), ("kr", ak), ("eig", ae)):
        a.save_peft(tmp_path / name)
        a.close()
    basis.save(tmp_path / "basis")
    basis.close()
    with pytest.raises(rankfuse.Error, match="closed"):
        eig.info()

    basis = rt.load_eigen_basis(tmp_path / "basis")
    al = rt.load_peft(tmp_path / "lora")
    ak = rt.load_peft(tmp_path / "kr")
    ae = rt.load_eigenlorax(basis, tmp_path / "eig")
    assert ak[MOD].kind == ModuleKind.KRADAPTER and ae[MOD].kind == ModuleKind.EIGENLORAX
    assert ae[MOD].rank == 7, "the rank in use is saved"
    with pytest.raises(rankfuse.Error, match="basis") as e:
        rt.load_eigenlorax(other, tmp_path / "eig")
    assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(rankfuse.Error, match="rf_adapter_load_eigenlorax") as e:
        rt.load_peft(tmp_path / "eig")
    assert e.value.status == Status.INVALID_ARGUMENT

    y1 = serve(rt, al[MOD], ak[MOD], ae[MOD], x, w, b)
    assert np.array_equal(y0, y1), f"max |y0 - y1| = {np.abs(y0 - y1).max()}"

    for h in (al, ak, ae, basis, other):
        h.close()


def test_build_needs_open_adapters(rt, sources):
    sources[1].close()
    with pytest.raises(rankfuse.Error, match="closed"):
        EigenBasis.build(sources, components=2)
    with pytest.raises(rankfuse.Error) as e:
        EigenBasis.build([], components=2)
    assert e.value.status != Status.OK
