"""Meta LLaMA decoder, truncated to its first `layers` blocks, in Meta's parameter layout.

Attention takes an explicit boolean mask (True = may attend), so the recognizer's
non-causal label mask and the sampler's shared-prefix KV cache are both just masks.

The KV cache is a tuple of (k, v) per layer, each [B, C, kv_heads, head_dim]. A call
writes its T new keys at `cache_index` (contiguous slots) and attends over all C
slots, the mask deciding which are visible. Prefill, one-token decoding and the
one-shot sampler's k branches per image are all this one operation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nxtp_jax.models.config import DecoderConfig
from nxtp_jax.models.layers import Activations, RMSNorm, constrain, dense, scan_blocks

Cache = tuple[tuple[jax.Array, jax.Array], ...]
RESIDUAL = ("batch", "length", "embed")  # the residual stream at block boundaries


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Meta's RoPE: rotate consecutive pairs (x[2i], x[2i+1]) by position * theta^(-2i/d), in fp32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention probabilities [B, H, T, S] in fp32 (for inspection, not the fast path)."""
    groups = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) / jnp.sqrt(q.shape[-1])
    return jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)


class Attention(nn.Module):
    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None  # None (XLA) or "cudnn" (flash attention on NVIDIA GPUs)
    activations: Activations | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=0, capture_attention=False):
        cfg = self.config
        b, t, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, kv_heads = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")
        q = dense(cfg.n_heads * cfg.head_dim, ("embed", "heads"), name="wq", **kw)(x)
        k = dense(cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), name="wk", **kw)(x)
        v = dense(cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), name="wv", **kw)(x)
        q = constrain(apply_rope(q.reshape(b, t, cfg.n_heads, cfg.head_dim), positions, cfg.rope_theta), heads, self.activations)
        k = constrain(apply_rope(k.reshape(b, t, cfg.kv_heads, cfg.head_dim), positions, cfg.rope_theta), kv_heads, self.activations)
        v = constrain(v.reshape(b, t, cfg.kv_heads, cfg.head_dim), kv_heads, self.activations)

        if cache is not None:
            ck, cv = cache
            ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            cache = (ck, cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)

        if capture_attention:
            self.sow("intermediates", "attention_weights", attention_weights(q, k, mask))
        o = constrain(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation), heads, self.activations)
        out = dense(cfg.dim, ("heads", "embed"), name="wo", **kw)(o.reshape(b, t, cfg.n_heads * cfg.head_dim))
        return out, cache


class FeedForward(nn.Module):
    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    activations: Activations | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(cfg.hidden_dim, ("embed", "mlp"), name="w1", **kw)(x)
        up = dense(cfg.hidden_dim, ("embed", "mlp"), name="w3", **kw)(x)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"), self.activations)
        return dense(cfg.dim, ("mlp", "embed"), name="w2", **kw)(hidden)


class TransformerBlock(nn.Module):
    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    activations: Activations | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=0, capture_attention=False):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, activations=self.activations)
        h, cache = Attention(cfg, implementation=self.implementation, name="attention", **kw)(
            RMSNorm(cfg.norm_eps, self.param_dtype, name="attention_norm")(x),
            positions,
            mask,
            cache,
            cache_index,
            capture_attention,
        )
        h = constrain(x + h, RESIDUAL, self.activations)
        out = h + FeedForward(cfg, name="feed_forward", **kw)(RMSNorm(cfg.norm_eps, self.param_dtype, name="ffn_norm")(h))
        return constrain(out, RESIDUAL, self.activations), cache


class Decoder(nn.Module):
    """Token embeddings, the kept blocks, the final norm and the output head."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    activations: Activations | None = None
    scan: bool = False  # one lax.scan over the blocks without a cache (see layers.scan_blocks): same params, same results

    def setup(self):
        cfg = self.config
        block = nn.remat(TransformerBlock, static_argnums=(6,)) if self.remat else TransformerBlock
        self.tok_embeddings = nn.Embed(
            cfg.vocab_size,
            cfg.dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        )
        self.layers = [
            block(cfg, self.dtype, self.param_dtype, self.implementation, self.activations, name=f"layers_{i}")
            for i in range(cfg.layers)
        ]
        self.norm = RMSNorm(cfg.norm_eps, self.param_dtype)
        self.output = dense(cfg.vocab_size, ("embed", "vocab"), dtype=self.dtype, param_dtype=self.param_dtype, name="output")

    def embed(self, ids: jax.Array) -> jax.Array:
        # The pad id -1 indexes the last row (<|empty|>), as torch's negative indexing did.
        return self.tok_embeddings(jnp.where(ids < 0, ids + self.config.vocab_size, ids))

    def __call__(self, h, positions, mask, cache: Cache | None = None, cache_index=0, capture_attention: bool = False):
        """Embeddings [B, T, D] -> final-normed hidden states [B, T, D] and the updated cache."""
        h = constrain(h, RESIDUAL, self.activations)
        if self.scan and cache is None and not capture_attention and not self.is_initializing():
            cfg = self.config
            params = [self.variables["params"][f"layers_{i}"] for i in range(cfg.layers)]
            block = TransformerBlock(cfg, self.dtype, self.param_dtype, self.implementation, self.activations, parent=None)
            h = scan_blocks(block, params, h, lambda m, p, x: m.apply({"params": p}, x, positions, mask)[0], self.remat)
            return self.norm(h), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            h, c = layer(h, positions, mask, None if cache is None else cache[i], cache_index, capture_attention)
            new_cache.append(c)
        return self.norm(h), (None if cache is None else tuple(new_cache))

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.output(hidden)


def init_cache(config: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> Cache:
    shape = (batch, length, config.kv_heads, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.layers))
