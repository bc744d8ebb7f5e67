"""Export a checkpoint as a TF SavedModel through jax2tf, for TF Serving.

jax2tf only does native serialization now: each function becomes one `XlaCallModule` op
holding StableHLO. TF runs it (and TF Serving serves it), but tf2onnx cannot convert it, which
is why the ONNX export goes through jax2onnx instead. The weights are `tf.Variable`s passed to
the op, so the SavedModel has no 2 GB limit.

Signatures (the graphs of `graphs`, batch and lengths symbolic):
- `encode`: images uint8 [B, R, R, 3] -> image_tokens [B, N, D];
- `decode`: embeddings [B, T, D], positions int32 [1, T], mask bool [1, 1, T, C], cache_index
  int32 [], logit_index int32 [Q], cache [L, 2, B, C, kv_heads, head_dim] -> logits float32
  [B, Q, V], cache (updated). The cache is one stacked tensor, since a signature's inputs are flat.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf

from nxtp_jax.export import graphs
from nxtp_jax.models.recognizer import Recognizer


def _stacked_decoder(model: Recognizer):
    decode = graphs.decoder_fn(model)

    def fn(params, embeddings, positions, mask, cache_index, logit_index, cache):
        flat = [cache[i, j] for i in range(cache.shape[0]) for j in range(2)]
        logits, *present = decode(params, embeddings, positions, mask, cache_index, logit_index, *flat)
        return logits, jnp.stack([jnp.stack(present[2 * i : 2 * i + 2]) for i in range(cache.shape[0])])

    return fn


def build_module(model: Recognizer, params: Any) -> tf.Module:
    """A tf.Module with the weights as variables and `encode` / `decode` tf.functions."""
    cfg = model.config
    dec = cfg.decoder
    dtype = tf.as_dtype(jnp.dtype(model.dtype))
    r = cfg.vision.image_size
    module = tf.Module()
    module.params = jax.tree_util.tree_map(lambda x: tf.Variable(np.asarray(x), trainable=False), params)

    encode = jax2tf.convert(graphs.encoder_fn(model), polymorphic_shapes=[None, f"(B, {r}, {r}, 3)"], with_gradient=False)
    cache_shape = f"({dec.layers}, 2, B, C, {dec.kv_heads}, {dec.head_dim})"
    decode = jax2tf.convert(
        _stacked_decoder(model),
        polymorphic_shapes=[None, f"(B, T, {dec.dim})", "(1, T)", "(1, 1, T, C)", "()", "(Q,)", cache_shape],
        polymorphic_constraints=["C >= T"],
        with_gradient=False,
    )

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, r, r, 3], tf.uint8, name="images")])
    def encode_fn(images):
        return {"image_tokens": encode(module.params, images)}

    @tf.function(
        autograph=False,
        input_signature=[
            tf.TensorSpec([None, None, dec.dim], dtype, name="embeddings"),
            tf.TensorSpec([1, None], tf.int32, name="positions"),
            tf.TensorSpec([1, 1, None, None], tf.bool, name="mask"),
            tf.TensorSpec([], tf.int32, name="cache_index"),
            tf.TensorSpec([None], tf.int32, name="logit_index"),
            tf.TensorSpec([dec.layers, 2, None, None, dec.kv_heads, dec.head_dim], dtype, name="cache"),
        ],
    )
    def decode_fn(embeddings, positions, mask, cache_index, logit_index, cache):
        logits, present = decode(module.params, embeddings, positions, mask, cache_index, logit_index, cache)
        return {"logits": logits, "cache": present}

    module.encode, module.decode = encode_fn, decode_fn
    return module


def export_savedmodel(model: Recognizer, params: Any, out_dir: str | os.PathLike) -> pathlib.Path:
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new --out directory")
    module = build_module(model, params)
    tf.saved_model.save(module, os.fspath(out_dir), signatures={"encode": module.encode, "decode": module.decode})
    return out_dir


def check_savedmodel(model: Recognizer, params: Any, out_dir: str | os.PathLike, seed: int = 0) -> dict[str, float]:
    """Max abs differences between the reloaded SavedModel's signatures and JAX, per call."""
    loaded = tf.saved_model.load(os.fspath(out_dir))
    cfg = model.config
    pixels, calls, kv = graphs.check_inputs(cfg, np.dtype(jnp.dtype(model.dtype)), seed)
    got = loaded.signatures["encode"](images=tf.constant(pixels))["image_tokens"].numpy()
    diffs = {"encoder": graphs.max_abs_diff(got, jax.jit(graphs.encoder_fn(model))(params, pixels))}
    decode = jax.jit(graphs.decoder_fn(model))
    names = graphs.DECODER_ARGS
    for name, args in calls.items():
        want = decode(params, *args, *kv)
        stacked = np.stack([np.stack(kv[2 * i : 2 * i + 2]) for i in range(cfg.decoder.layers)])
        got = loaded.signatures["decode"](**{n: tf.constant(a) for n, a in zip(names, args)}, cache=tf.constant(stacked))
        diffs[f"decoder {name} logits"] = graphs.max_abs_diff(got["logits"].numpy(), want[0])
        present = got["cache"].numpy()
        flat = [present[i, j] for i in range(cfg.decoder.layers) for j in range(2)]
        diffs[f"decoder {name} cache"] = max(graphs.max_abs_diff(g, w) for g, w in zip(flat, want[1:]))
        kv = [np.asarray(x) for x in want[1:]]
    return diffs
