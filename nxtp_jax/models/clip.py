"""OpenAI CLIP ViT image encoder, and CLIP's text tower, in OpenAI's parameter layout.

Differences from CLIP's own visual tower, all from the paper:
- `ln_post` is applied to every token, not only CLS;
- CLIP's `proj` is replaced by a new bias-free projection to the decoder width.

Parameter names follow OpenAI's state dict (`conv1`, `class_embedding`,
`transformer/resblocks_{i}/attn/in_proj`, ...), so the importer is a table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nxtp_jax.models.config import VisionConfig
from nxtp_jax.models.layers import Activations, LayerNorm, constrain, dense, param_with_axes, scan_blocks

RESIDUAL = ("batch", "length", "vit_embed")  # the residual stream at block boundaries


class Attention(nn.Module):
    """torch.nn.MultiheadAttention: a fused `in_proj` [W, 3W] and an `out_proj`; `causal` for the text tower."""

    heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    activations: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, w = x.shape
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * w, ("vit_embed", "vit_qkv"), name="in_proj", **kw)(x)
        heads = ("batch", "length", "vit_heads", "head_dim")
        qkv = jnp.split(qkv.reshape(b, t, 3 * self.heads, w // self.heads), 3, axis=2)
        q, k, v = (constrain(a, heads, self.activations) for a in qkv)
        o = constrain(jax.nn.dot_product_attention(q, k, v, is_causal=self.causal), heads, self.activations)
        return dense(w, ("vit_heads", "vit_embed"), name="out_proj", **kw)(o.reshape(b, t, w))


class MLP(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    activations: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = x.shape[-1]
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(4 * w, ("vit_embed", "vit_mlp"), name="c_fc", **kw)(x)
        h = h * jax.nn.sigmoid(1.702 * h)  # QuickGELU, as OpenAI trained it
        h = constrain(h, ("batch", "length", "vit_mlp"), self.activations)
        return dense(w, ("vit_mlp", "vit_embed"), name="c_proj", **kw)(h)


class ResidualAttentionBlock(nn.Module):
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = False
    activations: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, activations=self.activations)
        ln_1 = LayerNorm(param_dtype=self.param_dtype, name="ln_1")
        ln_2 = LayerNorm(param_dtype=self.param_dtype, name="ln_2")
        x = x + Attention(self.heads, self.causal, name="attn", **kw)(ln_1(x).astype(self.dtype))
        x = constrain(x, RESIDUAL, self.activations)
        return constrain(x + MLP(name="mlp", **kw)(ln_2(x).astype(self.dtype)), RESIDUAL, self.activations)


class Transformer(nn.Module):
    layers: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = False
    activations: Activations | None = None
    scan: bool = False  # one lax.scan over the blocks (see layers.scan_blocks): same params, same results

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, RESIDUAL, self.activations)
        args = (self.heads, self.dtype, self.param_dtype, self.causal, self.activations)
        if self.scan and not self.is_initializing():
            params = [self.variables["params"][f"resblocks_{i}"] for i in range(self.layers)]
            block = ResidualAttentionBlock(*args, parent=None)
            return scan_blocks(block, params, x, lambda m, p, h: m.apply({"params": p}, h), remat=False)
        for i in range(self.layers):
            x = ResidualAttentionBlock(*args, name=f"resblocks_{i}")(x)
        return x


class VisionTransformer(nn.Module):
    """Images [B, R, R, 3] (normalised, channels last) -> tokens [B, 1 + N, out_dim], CLS first."""

    config: VisionConfig
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    activations: Activations | None = None
    scan: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        w, p = cfg.width, cfg.patch_size
        scale = w**-0.5
        x = nn.Conv(
            w,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "vit_embed")
            ),
            name="conv1",
        )(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, w)

        cls = param_with_axes(self, "class_embedding", nn.initializers.normal(scale), (w,), ("vit_embed",))
        pos = param_with_axes(
            self, "positional_embedding", nn.initializers.normal(scale), (cfg.num_patches + 1, w), ("vit_pos", "vit_embed")
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], axis=1)
        x = LayerNorm(param_dtype=self.param_dtype, name="ln_pre")(x + pos.astype(x.dtype)).astype(self.dtype)
        x = Transformer(
            cfg.layers, cfg.heads, self.dtype, self.param_dtype, activations=self.activations, scan=self.scan, name="transformer"
        )(x)
        x = LayerNorm(param_dtype=self.param_dtype, name="ln_post")(x).astype(self.dtype)
        return dense(
            self.out_dim,
            ("vit_embed", "embed"),
            kernel_init=nn.initializers.normal(scale),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)


class TextTransformer(nn.Module):
    """CLIP's text tower, as OpenAI's `CLIP.encode_text`: ids [B, T] (T <= context) -> features [B, embed_dim].

    Causal blocks, `ln_final`, then the token at the end-of-text id (the vocabulary's
    largest, so argmax finds it) times `text_projection`. With the causal mask, positions
    after end-of-text change nothing, so ids may be cut to any T past it.
    """

    vocab_size: int
    context_length: int
    width: int
    layers: int
    embed_dim: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        w = self.width
        token = self.param("token_embedding", nn.initializers.normal(0.02), (self.vocab_size, w))
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (self.context_length, w))
        x = token[ids] + pos[: ids.shape[1]]
        # Heads are width // 64, as OpenAI's build_model sets them.
        x = Transformer(self.layers, w // 64, causal=True, name="transformer")(x)
        x = LayerNorm(name="ln_final")(x)
        x = x[jnp.arange(x.shape[0]), ids.argmax(-1)]
        return x @ self.param("text_projection", nn.initializers.normal(w**-0.5), (w, self.embed_dim))
