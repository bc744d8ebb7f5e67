"""The exported graphs as pure functions `f(params, *arrays)`; exporters bind the params as weights.

- encoder: uint8 pixels [B, R, R, 3] (resized and cropped) -> image tokens [B, N, D]; the CLIP
  normalisation is part of the graph.
- decoder: one graph for the prefill and for every one-shot step. It takes input embeddings
  [B, T, D], their positions [1, T], a mask [1, 1, T, C], the slot `cache_index` at which the T
  new keys are written, the positions `logit_index` [Q] whose logits are wanted, and the KV cache
  (k, v per layer, [B, C, kv_heads, head_dim]). It returns float32 logits [B, Q, V] and the
  updated cache. The prefill asks for the last position only, a step for all k branches.

The token embedding table stays outside the graphs: the caller embeds ids (the prefill feeds
image tokens and prompt embeddings together). `load` gives both exporters (ONNX, SavedModel)
the checkpoint's model in an export dtype; nothing here imports jax2onnx or TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from nxtp_jax import checkpoint
from nxtp_jax.choices import EXPORT_DTYPES
from nxtp_jax.data import preprocess
from nxtp_jax.models.config import ModelConfig
from nxtp_jax.models.recognizer import Recognizer

ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("image_tokens",)
DECODER_ARGS = ("embeddings", "positions", "mask", "cache_index", "logit_index")


def load(ckpt_dir: str | os.PathLike, dtype: str = "float32") -> tuple[Recognizer, Any]:
    """The checkpoint's model and params, with the weights in `dtype` and float32 activations.

    float16 weights halve the files; the graphs cast them to float32 where they are used (ONNX
    Runtime folds those casts when it loads the graph), because neither ONNX Runtime's CPU
    kernels nor XLA's CPU backend multiply float16 matrices.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"expected dtype in {EXPORT_DTYPES}, found {dtype!r}")
    config = checkpoint.load_config(ckpt_dir)
    model = Recognizer(config, dtype=jnp.float32, param_dtype=jnp.dtype(dtype))
    return model, checkpoint.load_params(ckpt_dir, checkpoint.abstract_params(model))


def cache_names(layers: int, prefix: str) -> list[str]:
    """[prefix_k_0, prefix_v_0, prefix_k_1, ...]: the flat order of the cache inputs / outputs."""
    return [f"{prefix}_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]


def decoder_io_names(layers: int) -> tuple[list[str], list[str]]:
    return list(DECODER_ARGS) + cache_names(layers, "cache"), ["logits"] + cache_names(layers, "present")


def encoder_fn(model: Recognizer) -> Callable[[Any, jax.Array], jax.Array]:
    def encode(params: Any, images: jax.Array) -> jax.Array:
        return model.apply({"params": params}, preprocess.normalize(images), method=Recognizer.encode_images)

    return encode


def decoder_fn(model: Recognizer) -> Callable[..., tuple[jax.Array, ...]]:
    layers = model.config.decoder.layers

    def decode(params, embeddings, positions, mask, cache_index, logit_index, *cache):
        pairs = tuple((cache[2 * i], cache[2 * i + 1]) for i in range(layers))
        hidden, pairs = model.apply(
            {"params": params}, embeddings, positions, mask, pairs, cache_index, method=Recognizer.decode
        )
        logits = model.apply({"params": params}, jnp.take(hidden, logit_index, axis=1), method=Recognizer.logits)
        return (logits.astype(jnp.float32),) + tuple(x for kv in pairs for x in kv)

    return decode


def encoder_specs(config: ModelConfig) -> list[jax.ShapeDtypeStruct]:
    (b,) = jax_export.symbolic_shape("B")
    r = config.vision.image_size
    return [jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8)]


def decoder_specs(config: ModelConfig, dtype: Any) -> list[jax.ShapeDtypeStruct]:
    """Symbolic B (batch), T (new tokens), C (cache slots, at least T) and Q (logit positions)."""
    cfg = config.decoder
    b, t, c, q = jax_export.symbolic_shape("B, T, C, Q", constraints=["C >= T"])
    cache = jax.ShapeDtypeStruct((b, c, cfg.kv_heads, cfg.head_dim), dtype)
    return [
        jax.ShapeDtypeStruct((b, t, cfg.dim), dtype),
        jax.ShapeDtypeStruct((1, t), jnp.int32),
        jax.ShapeDtypeStruct((1, 1, t, c), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((q,), jnp.int32),
    ] + [cache] * (2 * cfg.layers)


def check_inputs(config: ModelConfig, dtype: Any, seed: int = 0) -> tuple[np.ndarray, dict[str, list[np.ndarray]], list[np.ndarray]]:
    """Random inputs to compare an exported graph with JAX: pixels, decoder calls, an empty cache.

    The calls are a prefill (T=5 into a cache of 9 slots) and a 3-token step written at slot 5,
    both under a causal mask; each list lacks the cache, which the step takes from the prefill.
    """
    rng = np.random.default_rng(seed)
    dec = config.decoder
    r = config.vision.image_size
    pixels = rng.integers(0, 256, size=(2, r, r, 3), dtype=np.uint8)
    b, c = 2, 9
    calls = {}
    for name, index, length, logit_index in (("prefill", 0, 5, [4]), ("step", 5, 3, [0, 1, 2])):
        calls[name] = [
            rng.normal(size=(b, length, dec.dim)).astype(dtype),
            np.arange(index, index + length, dtype=np.int32)[None],
            (np.arange(c)[None, :] <= index + np.arange(length)[:, None])[None, None],
            np.asarray(index, np.int32),
            np.asarray(logit_index, np.int32),
        ]
    cache = [np.zeros((b, c, dec.kv_heads, dec.head_dim), dtype)] * (2 * dec.layers)
    return pixels, calls, cache


def max_abs_diff(got: Any, want: Any) -> float:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise AssertionError(f"the exported graph returned shape {got.shape}, JAX {want.shape}")
    return float(np.max(np.abs(got.astype(np.float32) - want.astype(np.float32))))
