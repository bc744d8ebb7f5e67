"""Cross-entropy against hand computations and torch F.cross_entropy(ignore_index=-1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nxtp_jax.objective import cross_entropy_sum, token_mean_cross_entropy


def torch_ce(logits: np.ndarray, targets: np.ndarray, reduction: str) -> float:
    v = logits.shape[-1]
    return F.cross_entropy(
        torch.from_numpy(np.array(logits)).reshape(-1, v).double(),
        torch.from_numpy(targets).reshape(-1).long(),
        ignore_index=-1,
        reduction=reduction,
    ).item()


def test_hand_computation() -> None:
    logits = np.array([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]], np.float32)
    targets = np.array([[1, 0, -1]], np.int32)
    total, count = cross_entropy_sum(logits, targets)
    expected = -math.log(3 / 4) + math.log(2)
    assert total.dtype == jnp.float32 and count.dtype == jnp.float32
    assert total.shape == () and count.shape == ()
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    assert float(count) == 2.0
    np.testing.assert_allclose(float(token_mean_cross_entropy(logits, targets)), expected / 2, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_matches_torch_on_random_logits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((4, 9, 37))).astype(np.float32)
    targets = rng.integers(0, 37, size=(4, 9)).astype(np.int32)
    targets[rng.random((4, 9)) < 0.4] = -1
    total, count = cross_entropy_sum(logits, targets)
    np.testing.assert_allclose(float(total), torch_ce(logits, targets, "sum"), rtol=1e-5)
    assert float(count) == float((targets >= 0).sum())
    np.testing.assert_allclose(
        float(token_mean_cross_entropy(logits, targets)), torch_ce(logits, targets, "mean"), rtol=1e-5
    )


def test_token_mean_not_per_sample_mean() -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 4, 11)).astype(np.float32)
    targets = np.array([[3, -1, -1, -1], [1, 2, 3, 4]], np.int32)
    per_token = [torch_ce(logits[0, :1], targets[0, :1], "sum")] + [
        torch_ce(logits[1, i : i + 1], targets[1, i : i + 1], "sum") for i in range(4)
    ]
    token_mean = sum(per_token) / 5
    sample_mean = (per_token[0] + sum(per_token[1:]) / 4) / 2
    assert abs(token_mean - sample_mean) > 1e-3  # the data must tell the two apart
    np.testing.assert_allclose(float(token_mean_cross_entropy(logits, targets)), token_mean, rtol=1e-5)


def test_micro_batches_combine_exactly() -> None:
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 5, 13)).astype(np.float32)
    targets = rng.integers(0, 13, size=(6, 5)).astype(np.int32)
    targets[0, 1:] = -1
    targets[4, :3] = -1
    parts = [cross_entropy_sum(logits[i : i + 2], targets[i : i + 2]) for i in (0, 2, 4)]
    combined = sum(float(t) for t, _ in parts) / sum(float(c) for _, c in parts)
    np.testing.assert_allclose(combined, torch_ce(logits, targets, "mean"), rtol=1e-5)


def test_bf16_logits_are_computed_in_fp32() -> None:
    rng = np.random.default_rng(5)
    logits = jnp.asarray(20 * rng.standard_normal((3, 7, 29)), dtype=jnp.bfloat16)
    targets = rng.integers(0, 29, size=(3, 7)).astype(np.int32)
    total, count = cross_entropy_sum(logits, targets)
    assert total.dtype == jnp.float32
    upcast = np.asarray(logits.astype(jnp.float32))
    np.testing.assert_allclose(float(total), torch_ce(upcast, targets, "sum"), rtol=1e-6)


def test_no_targets_gives_zero() -> None:
    logits = np.zeros((2, 3, 5), np.float32)
    targets = np.full((2, 3), -1, np.int32)
    total, count = cross_entropy_sum(logits, targets)
    assert float(total) == 0.0 and float(count) == 0.0
    assert float(token_mean_cross_entropy(logits, targets)) == 0.0


def test_gradient_matches_torch() -> None:
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((2, 6, 17)).astype(np.float32)
    targets = rng.integers(0, 17, size=(2, 6)).astype(np.int32)
    targets[1, 3:] = -1
    got = jax.jit(jax.grad(token_mean_cross_entropy))(logits, targets)
    t = torch.from_numpy(logits).requires_grad_()
    F.cross_entropy(t.reshape(-1, 17), torch.from_numpy(targets).reshape(-1).long(), ignore_index=-1).backward()
    np.testing.assert_allclose(np.asarray(got), t.grad.numpy(), atol=1e-6)


def test_shape_mismatch_error() -> None:
    with pytest.raises(ValueError, match="leading shape equal to targets"):
        cross_entropy_sum(np.zeros((2, 4, 5), np.float32), np.zeros((2, 3), np.int32))
