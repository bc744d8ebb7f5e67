"""How the trainable parameters train: weight-decay groups, embedding-row gradients, the learning-rate schedule, AdamW.

Parameters are selected by regexes over their paths (`nxtp_jax.params`); trainable and
frozen parameters live in two separate trees, so frozen ones get neither gradients nor
optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nxtp_jax import experiment, params as ptree
from nxtp_jax.choices import SCHEDULES

EMBEDDING_PATH = "language_decoder/tok_embeddings/embedding"


def decay_mask(trainable: Mapping[str, Any], no_decay: Sequence[str], force_decay: Sequence[str]) -> dict:
    """True where AdamW decays: >= 2-D params not matched by `no_decay`, plus those matched by `force_decay`."""
    flat = ptree.flat(trainable)
    excluded = ptree.matches(list(flat), no_decay, "config.optim.no_decay")
    forced = ptree.matches(list(flat), force_decay, "config.optim.force_decay")
    return ptree.unflat({k: bool((np.ndim(v) >= 2 and k not in excluded) or k in forced) for k, v in flat.items()})


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
    flat = ptree.flat(grads)
    if EMBEDDING_PATH not in flat:
        return grads
    flat[EMBEDDING_PATH] = flat[EMBEDDING_PATH] * row_mask.astype(flat[EMBEDDING_PATH].dtype)
    return ptree.unflat(flat)


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


def from_config(config: Any) -> tuple[Callable[[Any], jax.Array], Callable[[Any], optax.GradientTransformation]]:
    """The schedule of `config.optim` and `make_tx(trainable)`, its AdamW over a trainable tree."""
    o = config.optim
    schedule = lr_schedule(
        lr=o.lr, lr_min=o.lr_min, total_steps=experiment.total_steps(config), warmup=experiment.warmup_steps(config), kind=o.schedule
    )

    def make_tx(trainable: Mapping[str, Any]) -> optax.GradientTransformation:
        decay = decay_mask(trainable, tuple(o.no_decay), tuple(o.force_decay))
        return adamw(schedule, decay, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip)

    return schedule, make_tx
