"""Tagger.load's default dtypes: bfloat16 weights on a TPU or GPU, float32 on a CPU."""

import jax
import jax.numpy as jnp
import numpy as np

from nxtp_jax.data import shapes
from nxtp_jax.inference import tagger as tagger_module
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.training.loop import train
from tiny_models import demo_config, random_images

K = 5


def _dtypes(tagger):
    return {x.dtype for x in jax.tree.leaves(tagger.params)}


def _first_step(tagger, images):
    """The k branch-starting tokens and their probabilities (the one-shot's top-k step), [B, k] each."""
    sampled = tagger.sample(jnp.asarray(tagger.preprocess(images)), K)
    return np.asarray(sampled["tokens"])[:, :, 0], np.asarray(sampled["probs"])[:, :, 0]


def test_load_keeps_bfloat16_weights_on_an_accelerator_with_the_float32_weights_choices(tiny_ckpt, monkeypatch):
    """On an accelerator the compute was already bfloat16; storing the weights in bfloat16 too moves the
    top-k step's probabilities by under 0.01. The tiny model has random weights, so its later tokens are
    near-ties that any rounding reorders: the tokens compared are those of ranks more than 0.02 apart."""
    images = list(random_images(4, 40, seed=5))
    assert _dtypes(Tagger.load(tiny_ckpt)) == {jnp.dtype(jnp.float32)}  # on this CPU
    monkeypatch.setattr(tagger_module.jax, "default_backend", lambda: "tpu")  # what a TPU or GPU host reports
    float32_weights = Tagger.load(tiny_ckpt, param_dtype=jnp.float32)  # an explicit dtype wins
    assert _dtypes(float32_weights) == {jnp.dtype(jnp.float32)}
    want_tokens, want_probs = _first_step(float32_weights, images)
    on_accelerator = Tagger.load(tiny_ckpt)
    assert _dtypes(on_accelerator) == {jnp.dtype(jnp.bfloat16)}
    tokens, probs = _first_step(on_accelerator, images)
    np.testing.assert_allclose(probs, want_probs, atol=1e-2)
    gaps = -np.diff(want_probs, axis=1, append=0.0)  # rank r to rank r + 1 (the last to nothing)
    separated = (gaps > 2e-2) & (np.concatenate([np.full((len(images), 1), np.inf), gaps[:, :-1]], axis=1) > 2e-2)
    assert separated.sum() >= len(images)  # the check compares some tokens
    np.testing.assert_array_equal(tokens[separated], want_tokens[separated])


def test_trained_demo_keeps_its_labels_with_bfloat16_weights_and_probabilities_within_0_01(tmp_path, monkeypatch):
    """The tiny demo trained for 300 steps (10 to 15 s here; after its own 40 the labels are still word pieces),
    tagging the 16 held-out scenes of its val split (make_shapes draws scene i of split 1 from [seed 0, 1, i]):
    Tagger.load's accelerator default, bfloat16 weights, against float32 weights, both with bfloat16 compute."""
    fields = {"mode": "train", "mesh.data": 1, "mesh.fsdp": 1, "total_steps": 300, "log_every_steps": 100,
              "checkpoint.save_interval_steps": 300}
    train(demo_config(tmp_path / "data", **fields), tmp_path / "demo")
    scenes = [shapes.render_sample(np.random.default_rng([0, 1, i]), 32) for i in range(16)]
    images = [pixels for pixels, _, _, _ in scenes]
    monkeypatch.setattr(tagger_module.jax, "default_backend", lambda: "tpu")  # what a TPU or GPU host reports
    want = Tagger.load(tmp_path / "demo", param_dtype=jnp.float32).predict(images, 3)
    on_accelerator = Tagger.load(tmp_path / "demo")
    assert _dtypes(on_accelerator) == {jnp.dtype(jnp.bfloat16)}
    got = on_accelerator.predict(images, 3)
    # A trained model, so that equal labels mean something: most scenes' first label is one of their three.
    assert sum(labels[0][0] in truth for labels, (_, _, truth, _) in zip(want, scenes)) >= 8
    assert [[label for label, _ in x] for x in got] == [[label for label, _ in x] for x in want]
    np.testing.assert_allclose([p for x in got for _, p in x], [p for x in want for _, p in x], atol=1e-2)
