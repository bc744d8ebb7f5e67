"""Next-token cross-entropy with ignored targets (-1), summed so token means stay exact.

Returning the sum and the count separately lets micro-batches and devices be combined before
the one division, which gives the token mean over the whole batch that the original computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of targets) as fp32 scalars.

    logits [..., V] in any dtype (upcast to fp32); targets [...] int, -1 = ignore.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"expected logits [..., V] with leading shape equal to targets, found logits "
            f"{logits.shape} and targets {targets.shape}; align the text positions of both"
        )
    logits = logits.astype(jnp.float32)
    valid = targets >= 0
    safe = jnp.where(valid, targets, 0)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
    total = jnp.sum(jnp.where(valid, losses, 0.0), dtype=jnp.float32)
    count = jnp.sum(valid, dtype=jnp.float32)
    return total, count


def token_mean_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over all target tokens of the batch; 0 when there are none."""
    total, count = cross_entropy_sum(logits, targets)
    return total / jnp.maximum(count, 1.0)
