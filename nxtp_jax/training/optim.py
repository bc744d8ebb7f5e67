"""What trains and how: trainable selection, weight-decay groups, the learning-rate schedule, AdamW.

Parameters are addressed by their '/'-joined path (`vision_encoder/proj/kernel`,
`language_decoder/layers_0/attention/wq/kernel`, ...) and selected with regexes that must
match the whole path. Trainable and frozen parameters are kept in two separate trees, so
frozen ones get neither gradients nor optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

SCHEDULES = ("original", "warmup_cosine")
EMBEDDING_PATH = "language_decoder/tok_embeddings/embedding"
ALL_ROWS = "*"


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: expected a regular expression, found {p!r} ({e})") from e
    return compiled


def select(paths: Sequence[str], patterns: Sequence[str], what: str) -> set[str]:
    """Paths fully matched by any pattern; a pattern that matches nothing is an error (a typo)."""
    compiled = _compile(patterns, what)
    chosen = set()
    for pattern in compiled:
        hits = {p for p in paths if pattern.fullmatch(p)}
        if not hits:
            raise ValueError(
                f"{what}: the pattern {pattern.pattern!r} matches no parameter; expected it to match "
                f"a full path such as {sorted(paths)[0]!r}; fix the pattern or remove it"
            )
        chosen |= hits
    return chosen


def split(params: Mapping[str, Any], trainable: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested trees; together they hold every leaf of `params` once."""
    flat = _flat(params)
    chosen = select(list(flat), trainable, "config.trainable")
    return (
        _unflat({k: v for k, v in flat.items() if k in chosen}),
        _unflat({k: v for k, v in flat.items() if k not in chosen}),
    )


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """The full parameter tree from the two halves made by `split`."""
    return _unflat({**_flat(frozen), **_flat(trainable)})


def paths(tree: Mapping[str, Any]) -> list[str]:
    return sorted(_flat(tree))


def decay_mask(trainable: Mapping[str, Any], no_decay: Sequence[str], force_decay: Sequence[str]) -> dict:
    """True where AdamW decays: >= 2-D params not matched by `no_decay`, plus those matched by `force_decay`."""
    flat = _flat(trainable)
    excluded = _matches(list(flat), no_decay, "config.optim.no_decay")
    forced = _matches(list(flat), force_decay, "config.optim.force_decay")
    return _unflat({k: bool((np.ndim(v) >= 2 and k not in excluded) or k in forced) for k, v in flat.items()})


def _matches(keys: list[str], patterns: Sequence[str], what: str) -> set[str]:
    compiled = _compile(patterns, what)
    return {k for k in keys if any(p.fullmatch(k) for p in compiled)}


def embedding_row_mask(vocab_size: int, row_ids: Sequence[int] | None) -> np.ndarray | None:
    """float32 [V, 1], 1 on the rows whose gradient is kept; None keeps every row."""
    if row_ids is None:
        return None
    bad = [r for r in row_ids if not 0 <= r < vocab_size]
    if bad:
        raise ValueError(f"expected embedding rows in [0, {vocab_size}), found {bad}")
    mask = np.zeros((vocab_size, 1), np.float32)
    mask[list(row_ids)] = 1.0
    return mask


def mask_embedding_grads(grads: dict, row_mask: jax.Array | None) -> dict:
    """Zeroes the gradient of every embedding row outside `row_mask` (as the original's grad hook)."""
    if row_mask is None:
        return grads
    flat = _flat(grads)
    if EMBEDDING_PATH not in flat:
        return grads
    flat[EMBEDDING_PATH] = flat[EMBEDDING_PATH] * row_mask.astype(flat[EMBEDDING_PATH].dtype)
    return _unflat(flat)


def warmup_steps(total_steps: int, warmup_ratio: float, min_warmup_steps: int) -> int:
    """max(warmup_ratio % of the total, min_warmup_steps), as the original."""
    return max(int(warmup_ratio * 0.01 * total_steps), min_warmup_steps)


def lr_schedule(*, lr: float, lr_min: float, total_steps: int, warmup: int, kind: str) -> Callable[[Any], jax.Array]:
    """Learning rate of update k (k = updates done before it, 0 for the first).

    "original" reproduces the PyTorch loop exactly. It sets the rate *after* each update,
    from the count before it, so update 0 runs at the optimizer's initial rate `lr`,
    update k in [1, W+1] at lr*(k-1)/W, and update k >= W+2 at the cosine (torch's
    CosineAnnealingLR, T_max = total - W) of epoch k-W-1. "warmup_cosine" is the clean
    version: lr*(k+1)/W for k < W, then the cosine of epoch k-W.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"expected a schedule in {SCHEDULES}, found {kind!r}")
    if warmup < 1 and kind == "original":
        raise ValueError(f"the original schedule divides by the warmup length; expected warmup >= 1, found {warmup}")
    span = max(total_steps - warmup, 1)

    def cosine(epoch):
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / span))

    def original(k):
        k = jnp.asarray(k, jnp.float32)
        ramp = lr * (k - 1.0) / warmup
        return jnp.where(k == 0, lr, jnp.where(k <= warmup + 1, ramp, cosine(k - warmup - 1.0)))

    def warmup_cosine(k):
        k = jnp.asarray(k, jnp.float32)
        ramp = lr * (k + 1.0) / max(warmup, 1)
        return jnp.where(k < warmup, ramp, cosine(k - warmup))

    return original if kind == "original" else warmup_cosine


def adamw(
    schedule: Callable[[Any], jax.Array],
    decay: Mapping[str, Any],
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip: float,
) -> optax.GradientTransformation:
    """torch.optim.AdamW (decoupled decay, eps outside the sqrt) with optional global-norm clipping."""
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx
