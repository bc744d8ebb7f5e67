"""Small building blocks shared by the encoder and the decoder.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...),
and so do the activations at block boundaries (`batch`, `length`, `embed`, ...); the
config's rules map them to mesh axes, so parallelism is a config change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

Axes = Sequence[str | None]


@dataclasses.dataclass(frozen=True)
class Activations:
    """Where activations live: a mesh, and the logical-axis rules that place them on it."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]

    def __post_init__(self):
        # Hashable whatever the config held (lists after a JSON round trip).
        rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in self.rules)
        object.__setattr__(self, "rules", rules)


def constrain(x: jax.Array, axes: Axes, activations: Activations | None) -> jax.Array:
    """Pins `x`'s layout by logical axis names, as MaxText does; a no-op without a mesh (`activations` None).

    An axis name without a rule is an error. A name whose mesh axis an earlier name
    already took (the activations' `embed` after `batch` took `fsdp`) is replicated.
    """
    if activations is None:
        return x
    from nxtp_jax import sharding  # models stay importable without the training stack

    sharding.check_rules(PartitionSpec(*axes), activations.rules)
    return nn.with_logical_constraint(x, tuple(axes), rules=activations.rules, mesh=activations.mesh)


def scan_blocks(block: nn.Module, layer_params: Sequence[Any], x: jax.Array, call: Callable, remat: bool) -> jax.Array:
    """Runs identical blocks as one `lax.scan`: compile time stops growing with depth.

    The per-layer params (the checkpoints' `layers_{i}` / `resblocks_{i}`) are stacked on
    a leading axis inside the forward pass, so checkpoints, importers, the trainable
    patterns and the optimizer state keep the per-layer layout; the gradient flows back
    through the stack. `call(block, params, x)` applies one block.
    """
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_params)

    def body(h, params):
        return call(block, params, h), None

    x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, stacked)
    return x

default_kernel_init = nn.initializers.lecun_normal()


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int], axes: Axes, dtype=None):
    dtype = dtype or getattr(module, "param_dtype", jnp.float32)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def dense(
    features: int,
    axes: Axes,
    *,
    use_bias: bool = False,
    kernel_init=default_kernel_init,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str,
) -> nn.Dense:
    """A Dense layer whose kernel [in, out] (and bias [out]) carry logical axes."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        name=name,
    )


class LayerNorm(nn.Module):
    """CLIP's LayerNorm: eps 1e-5, computed in fp32 (the output stays fp32)."""

    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), ("norm",))
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalised in fp32, cast back to the input dtype, then scaled."""

    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = param_with_axes(self, "weight", nn.initializers.ones, (x.shape[-1],), ("norm",))
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)).astype(x.dtype)
        return y * weight.astype(x.dtype)
