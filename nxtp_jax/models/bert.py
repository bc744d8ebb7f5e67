"""BERT encoder with mean pooling: all-MiniLM-L6-v2, the metric's text embedder (docs/method.md §6).

Computes what Hugging Face's `BertModel` followed by sentence-transformers' mean pooling
computes: word + position + token-type (always 0) embeddings, LayerNorm, then post-norm
blocks (self-attention, GELU MLP), and the mean of the last hidden states over the
attention mask. Parameter names follow the Hugging Face keys, so the importer
(`nxtp_jax/weights/bert.py`) is a table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from nxtp_jax.models.layers import LayerNorm


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    width: int = 384
    layers: int = 6
    heads: int = 12
    mlp_width: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "BertConfig":
        """From a Hugging Face `config.json` of a BERT model with absolute positions and GELU."""
        kind = (config.get("model_type"), config.get("hidden_act"), config.get("position_embedding_type", "absolute"))
        if kind != ("bert", "gelu", "absolute"):
            raise ValueError(
                "expected a BERT config.json with hidden_act 'gelu' and absolute positions, found "
                f"model_type={kind[0]!r}, hidden_act={kind[1]!r}, position_embedding_type={kind[2]!r}"
            )
        return cls(
            vocab_size=config["vocab_size"],
            width=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            mlp_width=config["intermediate_size"],
            max_positions=config["max_position_embeddings"],
            type_vocab_size=config["type_vocab_size"],
            eps=config["layer_norm_eps"],
        )


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, w = x.shape
        heads = lambda name: nn.Dense(w, name=name)(x).reshape(b, t, cfg.heads, w // cfg.heads)
        o = jax.nn.dot_product_attention(heads("query"), heads("key"), heads("value"), mask=mask)
        x = LayerNorm(cfg.eps, name="attention_norm")(x + nn.Dense(w, name="attention_out")(o.reshape(b, t, w)))
        h = jax.nn.gelu(nn.Dense(cfg.mlp_width, name="intermediate")(x), approximate=False)
        return LayerNorm(cfg.eps, name="output_norm")(x + nn.Dense(w, name="output")(h))


class BertMeanPool(nn.Module):
    """ids, attention_mask [B, T] -> the masked mean of the last hidden states [B, width], float32."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        embed = lambda name, rows: self.param(name, nn.initializers.normal(0.02), (rows, cfg.width))
        t = ids.shape[1]
        x = embed("word_embeddings", cfg.vocab_size)[ids]
        x = x + embed("position_embeddings", cfg.max_positions)[:t] + embed("token_type_embeddings", cfg.type_vocab_size)[0]
        x = LayerNorm(cfg.eps, name="embeddings_norm")(x)
        keep = attention_mask.astype(bool)
        mask = keep[:, None, None, :]  # keys only, as BERT's extended attention mask
        for i in range(cfg.layers):
            x = BertLayer(cfg, name=f"layer_{i}")(x, mask)
        weights = keep.astype(x.dtype)[..., None]
        # sentence-transformers clamps the token count at 1e-9; a row with no token gives zeros.
        return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
