"""Serving kernels (models/quantize.py): rounding bounds, the tiled and transposed products, and the Tagger's labels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nxtp_jax import prompts
from nxtp_jax.inference import sampling
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.models import quantize
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import random_images, tiny_recognizer

IS_KERNEL = lambda x: isinstance(x, quantize.SERVING_KERNELS)  # noqa: E731


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


def dequantized(params):
    """The same params with every serving kernel expanded back to a [K, N] array (a plain model)."""
    return jax.tree.map(lambda x: x.dequantize() if IS_KERNEL(x) else x, params, is_leaf=IS_KERNEL)


def scores(results):
    return [score for labels in results for _, score in labels]


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_error_is_at_most_half_a_step(bits):
    w = np.random.default_rng(0).standard_normal((256, 300)).astype(np.float32)
    got = np.asarray(quantize.quantize_kernel(w, bits).dequantize())
    if bits == 8:  # one step per column: max |w| / 127
        step = np.abs(w).max(axis=0) / 127
    else:  # one step per column and group of 128 rows: max |w| / 7
        step = np.repeat(np.abs(w.reshape(2, 128, 300)).max(axis=1) / 7, 128, axis=0)
    assert np.all(np.abs(got - w) <= step / 2 * (1 + 1e-6))


@pytest.mark.parametrize("bits, k", [(8, 256), (4, 256), (4, 200)])  # int4 K=200: two groups of 100, one per packed half
def test_tiled_product_equals_the_dequantized_matmul(bits, k, monkeypatch):
    monkeypatch.setattr(quantize, "TILE_ROWS", 24)  # 13 tiles, the last one padded
    w = np.random.default_rng(1).standard_normal((k, 300)).astype(np.float32)
    kernel = quantize.quantize_kernel(w, bits)
    assert kernel.q.shape[:2] == (13, 24)
    assert kernel.scale.shape[-1] == (1 if bits == 8 else 2)
    x = np.random.default_rng(2).standard_normal((3, 5, k)).astype(np.float32)
    want = x @ np.asarray(kernel.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(jax.jit(quantize.matmul)(x, kernel)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "transposed"])
def test_only_the_decoder_dense_kernels_are_replaced(tok, mode):
    _, params = tiny_recognizer(tok)
    q = quantize.quantize_params(params, mode) if mode == "int8" else quantize.transpose_params(params)
    paths = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=IS_KERNEL)[0] if IS_KERNEL(x)]
    assert len(paths) == 2 * 7 + 1  # wq wk wv wo w1 w2 w3 per block, and the output layer
    assert all(p.startswith("['language_decoder']") for p in paths)
    assert not any("tok_embeddings" in p for p in paths)
    assert quantize.quantize_params(params, "none") is params
    with pytest.raises(ValueError, match="expected quantize in"):
        quantize.quantize_params(params, "int3")


@pytest.mark.parametrize("mode", ["int8", "int4", "transposed"])
def test_served_tagger_equals_fp32_on_the_dequantized_weights(tok, mode):
    # The tiled int path computes exactly the fp32 model whose weights are the rounded ones; the
    # transposed one the fp32 model itself.
    model, params = tiny_recognizer(tok, delimiter_boost=3.0)
    q = quantize.quantize_params(params, mode) if mode != "transposed" else quantize.transpose_params(params)
    images = random_images(3, 32, seed=1)
    got = Tagger(model, q, tok).predict(images, 5)
    want = Tagger(model, dequantized(q), tok).predict(images, 5)
    assert [[label for label, _ in r] for r in got] == [[label for label, _ in r] for r in want]
    np.testing.assert_allclose(scores(got), scores(want), rtol=1e-5, atol=1e-6)


def test_int8_labels_equal_fp32_at_top_k(tok):
    # int8 moves each weight by at most max|column| / 254; on this tiny random model (width 64, steep
    # logits from the delimiter boost) label scores moved by up to 0.083, so 0.1 absolute.
    model, params = tiny_recognizer(tok, delimiter_boost=3.0)
    images = random_images(4, 32, seed=1)
    want = Tagger(model, params, tok).predict(images, 5)
    got = Tagger(model, quantize.quantize_params(params, "int8"), tok).predict(images, 5)
    assert [[label for label, _ in r] for r in got] == [[label for label, _ in r] for r in want]
    np.testing.assert_allclose(scores(got), scores(want), atol=0.1)


def test_sampler_keeps_the_weights_in_int8_inside_the_loop(tok, monkeypatch):
    # XLA hoists a loop-invariant convert out of the while loop: a whole-weight fp32 copy
    # f32[tiles, tn, K] in the compiled sampler would mean fp32 reads at every step. Several
    # tiles per weight, as at full size (a one-tile scan is inlined, and its convert hoisted).
    monkeypatch.setattr(quantize, "TILE_ROWS", 8)
    model, params = tiny_recognizer(tok)
    q = quantize.quantize_params(params, "int8")
    images = jnp.asarray(Tagger(model, q, tok).preprocess(random_images(1, 32)))
    prompt = jnp.asarray(prompts.inference_prompt(tok))
    with quantize.dequantizing():
        hlo = sampling.one_shot.lower(model, q, images, prompt, k=3, delimiter_id=tok.delimiter_id).compile().as_text()
    stacked = {"f32[{}]".format(",".join(map(str, x.q.shape))) for x in jax.tree.leaves(q, is_leaf=IS_KERNEL) if IS_KERNEL(x)}
    assert "s8[" in hlo
    found = set(re.findall(r"f32\[[0-9,]+\]", hlo)) & stacked
    assert not found, f"fp32 copies of whole quantized weights in the compiled sampler: {found}"


def test_load_on_one_cpu_transposes_the_decoder_kernels_and_keeps_the_labels(tiny_ckpt):
    tagger = Tagger.load(tiny_ckpt)
    leaves = jax.tree.leaves(tagger.params, is_leaf=IS_KERNEL)
    assert sum(isinstance(x, quantize.TransposedKernel) for x in leaves) == 2 * 7 + 1
    plain = Tagger(tagger.model, tagger.checkpoint_params(), tagger.tokenizer)
    assert not any(IS_KERNEL(x) for x in jax.tree.leaves(plain.params, is_leaf=IS_KERNEL))
    images = random_images(3, 32, seed=3)
    got, want = tagger.predict(images, 5), plain.predict(images, 5)
    assert [[label for label, _ in r] for r in got] == [[label for label, _ in r] for r in want]
    np.testing.assert_allclose(scores(got), scores(want), rtol=1e-5, atol=1e-6)


def test_load_refuses_an_unknown_mode(tok, tmp_path):
    with pytest.raises(ValueError, match="expected quantize in"):
        Tagger.load(tmp_path, quantize="fp8")
