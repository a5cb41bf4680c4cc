"""Training and merge wrappers on a module built with Runtime.new_adapter: weights round trip,
merge/unmerge against the fused linear, backward's dx against numpy, masks, and AdamW steps
that lower a loss."""

import numpy as np
import pytest

import rankfuse

M, K, N, CAP = 6, 7, 5, 4


@pytest.fixture
def trainable(rt):
    rng = np.random.default_rng(3)
    with rt.new_adapter("py-train") as a:
        lora = a.add_lora("layer", K, N, CAP, alpha=8.0, seed=7)
        A = rng.uniform(-0.5, 0.5, (CAP, K)).astype(np.float32)
        B = rng.uniform(-0.5, 0.5, (N, CAP)).astype(np.float32)
        yield a, lora, A, B, rng


def test_new_module_and_weights(trainable):
    a, lora, A, B, _ = trainable
    info = lora.info()
    assert (info.capacity, info.rank, info.scale, info.in_features) == (CAP, CAP, 2.0, K)
    a0, b0 = lora.weights()
    assert a0.shape == (CAP, K) and b0.shape == (N, CAP)
    assert not b0.any(), "B starts at zero (PEFT init)"
    assert np.abs(a0).max() <= 1 / np.sqrt(K) and a0.any()
    lora.set_weights(A, B)
    a1, b1 = lora.weights()
    np.testing.assert_array_equal(a1, A)
    np.testing.assert_array_equal(b1, B)
    assert a.modules() == ["layer"]


def test_merge_matches_fused_and_unmerge_restores(rt, trainable):
    _, lora, A, B, rng = trainable
    lora.set_weights(A, B)
    W = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    fused = rt.linear(x, W, slots=[lora])
    merged = rt.merge(lora, W.copy())
    np.testing.assert_allclose(merged, W + 2.0 * B @ A, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rt.linear(x, merged), fused, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rt.unmerge(lora, merged), W, rtol=1e-5, atol=1e-6)
    with pytest.raises(rankfuse.Error) as e:
        rt.merge(lora, np.zeros((K, K), dtype=np.float32))
    assert e.value.status == rankfuse.Status.SHAPE


def test_backward_dx_and_training_lowers_loss(rt, trainable):
    a, lora, A, B, rng = trainable
    lora.set_weights(A, B)
    W = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    dy = rng.standard_normal((M, N)).astype(np.float32)
    dx = rt.backward(lora, x, W, dy, dx=True)
    np.testing.assert_allclose(dx, dy @ W + 2.0 * (dy @ B) @ A, rtol=1e-5, atol=1e-5)
    assert a.clip_grad_norm(1e9) > 0

    lora.mask = [True, False, True, True]
    assert lora.mask.tolist() == [True, False, True, True]
    lora.mask = [True] * CAP

    target = rng.standard_normal((M, N)).astype(np.float32)

    def loss():
        y = rt.linear(x, W, slots=[lora])
        return 0.5 * float(((y - target) ** 2).sum()), y - target

    first, _ = loss()
    for step in range(30):
        _, g = loss()
        lora.zero_grad()
        assert rt.backward(lora, x, W, g) is None
        (lora.adamw_step if step % 2 == 0 else a.adamw_step)(lr=1e-2)
    last, _ = loss()
    assert last < 0.9 * first, f"loss {first} -> {last}"
    a.zero_grad()
    lora.enable_gains(1.0)
