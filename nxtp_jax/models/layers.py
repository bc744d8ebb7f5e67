"""Small building blocks shared by the encoder and the decoder.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...);
the config's rules map them to mesh axes, so parallelism is a config change.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = Sequence[str | None]

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
