"""TF SavedModel (convert/to_savedmodel.py, nxtp_jax/cli/savedmodel.py): TF's outputs equal JAX's, the cache included.

The expected values come from the Recognizer directly (image tokens, and the decoder without a
cache over the whole sequence), not from the exported graph functions.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from export_helpers import in_process, run, tiny_checkpoint
from nxtp_jax.cli.savedmodel import savedmodel_command
from nxtp_jax.models import mask
from nxtp_jax.inference import sampling
from nxtp_jax.data import preprocess
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.inference.tagger import Tagger
from tiny_models import random_images


def test_savedmodel_outputs_equal_jax(tmp_path, sp_model_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", sp_model_path, seed=2)
    res = in_process(savedmodel_command, f"--ckpt={ckpt}", f"--out={tmp_path / 'sm'}")
    assert res.returncode == 0, res.stderr
    diffs = [float(d) for d in re.findall(r"TF vs JAX, .*: max abs diff (\S+)", res.stdout)]
    assert len(diffs) == 5 and max(diffs) < 1e-4

    tagger = Tagger.load(ckpt)
    model, params, cfg = tagger.model, tagger.checkpoint_params(), tagger.model.config
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    images = random_images(2, 40, seed=5)
    pixels = np.stack([preprocess.resize_center_crop(preprocess.load_image(x), 32) for x in images])
    got = loaded.signatures["encode"](images=tf.constant(pixels))["image_tokens"].numpy()
    np.testing.assert_allclose(got, tagger.image_tokens(tagger.preprocess(images)), rtol=0, atol=1e-5)

    # Prefill, then one step through the SavedModel's cache, against the decoder run over the
    # whole sequence at once without a cache.
    h = np.asarray(sampling.prefix_embeddings(model, params, jnp.asarray(tagger.preprocess(images)), tagger.prompt))
    b, t0, _ = h.shape
    n, layers = cfg.vision.num_patches, cfg.decoder.layers
    nxt = np.asarray(model.apply({"params": params}, jnp.asarray([[5], [9]]), method=Recognizer.embed))
    full = np.concatenate([h, nxt], axis=1)
    hidden, _ = model.apply({"params": params}, full, jnp.arange(t0 + 1)[None], mask.prefix_mask(n, t0 + 1), method=Recognizer.decode)
    want = np.asarray(model.apply({"params": params}, hidden, method=Recognizer.logits))

    decode = loaded.signatures["decode"]
    prefix = np.pad(np.asarray(mask.prefix_mask(n, t0)), ((0, 0), (0, 0), (0, 0), (0, 1)))
    cache = np.zeros((layers, 2, b, t0 + 1, cfg.decoder.kv_heads, cfg.decoder.head_dim), np.float32)
    out = decode(embeddings=tf.constant(h), positions=tf.constant(np.arange(t0, dtype=np.int32)[None]),
                 mask=tf.constant(prefix), cache_index=tf.constant(0), logit_index=tf.constant([t0 - 1]), cache=tf.constant(cache))
    np.testing.assert_allclose(out["logits"].numpy()[:, 0], want[:, t0 - 1], rtol=0, atol=1e-4)
    out = decode(embeddings=tf.constant(nxt), positions=tf.constant([[t0]]), mask=tf.ones((1, 1, 1, t0 + 1), tf.bool),
                 cache_index=tf.constant(t0), logit_index=tf.constant([0]), cache=out["cache"])
    np.testing.assert_allclose(out["logits"].numpy()[:, 0], want[:, t0], rtol=0, atol=1e-4)


def test_savedmodel_command_without_jax2onnx_refuses_a_non_empty_directory(tmp_path, sp_model_path):
    """In a process where jax2onnx and onnx cannot be imported: the savedmodel extra alone runs the command."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", sp_model_path)
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "x").write_text("")
    script = (
        "import sys; sys.modules['jax2onnx'] = sys.modules['onnx'] = None\n"
        "from nxtp_jax.cli.savedmodel import savedmodel_command\n"
        "sys.exit(savedmodel_command(sys.argv[1:]))\n"
    )
    res = run(["-c", script, f"--ckpt={ckpt}", f"--out={tmp_path / 'sm'}"])
    assert res.returncode == 1 and "not empty" in res.stderr and "Traceback" not in res.stderr, res.stderr
