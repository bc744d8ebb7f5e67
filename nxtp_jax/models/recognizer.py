"""The recognizer: CLIP ViT image tokens, inserted in front of the text, read by the LLaMA decoder.

    [img_1 .. img_N] [<|image|>] [BOS] [The objects in the image are] [labels ...]

The top-level parameter names are those of the released checkpoints
(`vision_encoder`, `language_decoder`), so importing them is a table.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nxtp_jax import sharding
from nxtp_jax.models.clip import VisionTransformer
from nxtp_jax.models.config import ModelConfig
from nxtp_jax.models.layers import Activations
from nxtp_jax.models.llama import Cache, Decoder


class Recognizer(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False
    activations: Activations | None = None  # mesh + rules for activation constraints; None: no constraints
    scan_layers: bool = False  # run each tower's blocks as one lax.scan (params stay per layer)

    def setup(self):
        cfg = self.config
        self.vision_encoder = VisionTransformer(
            cfg.vision, cfg.decoder.dim, self.dtype, self.param_dtype, activations=self.activations, scan=self.scan_layers
        )
        self.language_decoder = Decoder(
            cfg.decoder, self.dtype, self.param_dtype, self.attention_impl, self.remat, self.activations, self.scan_layers
        )

    def encode_images(self, images: jax.Array) -> jax.Array:
        """Normalised images [B, R, R, 3] -> image tokens [B, N, D] (CLS dropped)."""
        return self.vision_encoder(images)[:, 1:]

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.language_decoder.embed(ids)

    def decode(self, h, positions, mask, cache: Cache | None = None, cache_index=0, capture_attention: bool = False):
        return self.language_decoder(h, positions, mask, cache, cache_index, capture_attention)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_decoder.logits(hidden)

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Training forward: logits [B, L, V] at the text positions only.

        images [B, R, R, 3]; tokens [B, L] text ids (pad -1); mask [B, 1, N+L, N+L].
        """
        img = self.encode_images(images)
        h = jnp.concatenate([img, self.embed(tokens).astype(img.dtype)], axis=1)
        positions = jnp.arange(h.shape[1])[None]
        hidden, _ = self.decode(h, positions, mask)
        return self.logits(hidden[:, img.shape[1] :])


def init_variables(model: Recognizer, key: jax.Array) -> dict:
    """`model.init` on inputs of the right shapes: boxed variables that carry logical axes."""
    cfg = model.config
    r, n = cfg.vision.image_size, cfg.vision.num_patches
    images = jnp.zeros((1, r, r, 3), jnp.float32)
    tokens = jnp.zeros((1, 2), jnp.int32)
    mask = jnp.ones((1, 1, n + 2, n + 2), bool)
    return model.init(key, images, tokens, mask)


def init_params(model: Recognizer, rng: jax.Array, mesh=None, rules=None) -> dict:
    """Randomly initialised params, created directly in their shardings (see `sharding.init_sharded`)."""
    mesh = mesh if mesh is not None else sharding.one_device_mesh()
    init_fn = functools.partial(init_variables, model)
    return sharding.init_sharded(init_fn, rng, mesh, rules or sharding.LOGICAL_AXIS_RULES)["params"]
