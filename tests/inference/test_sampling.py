"""One-shot sampling with the KV cache against the original's recompute strategy, and its rules."""

import jax.numpy as jnp
import numpy as np
import pytest

from nxtp_jax import prompts
from nxtp_jax.inference import ranking, sampling
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import random_images, tiny_recognizer


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


def _branch_groups(tokens, probs, delimiter_id):
    return [ranking.groups_from_branches(t, p, delimiter_id) for t, p in zip(np.asarray(tokens), np.asarray(probs))]


# The capped case at a cap of 8: the recompute compiles once per length, and 8 lengths show the same.
@pytest.mark.parametrize("boost, cap", [(0.0, 8), (3.0, sampling.MAX_UPDATES)], ids=["capped", "delimited"])
def test_kv_cache_matches_recompute(tok, boost, cap):
    model, params = tiny_recognizer(tok, delimiter_boost=boost)
    images = jnp.asarray(Tagger(model, params, tok).preprocess(random_images(2, 32)))
    prompt = jnp.asarray(prompts.inference_prompt(tok))
    kw = dict(k=4, delimiter_id=tok.delimiter_id, max_updates=cap)
    cached = sampling.one_shot(model, params, images, prompt, **kw)
    naive = sampling.one_shot_recompute(model, params, images, prompt, **kw)
    got = _branch_groups(*cached, tok.delimiter_id)
    want = _branch_groups(*naive, tok.delimiter_id)
    for g_img, w_img in zip(got, want):
        for g, w in zip(g_img, w_img):
            assert g.tokens == w.tokens
            np.testing.assert_allclose(g.probs, w.probs, rtol=1e-5, atol=1e-7)
    lengths = {len(g.tokens) for img in got for g in img}
    if boost == 0.0:
        # A random model rarely emits the delimiter: the cap forces it after cap - 1 sampled tokens.
        assert max(lengths) == cap
    else:
        assert min(lengths) < 5


def test_cap_and_first_token_delimiter(tok):
    d = tok.delimiter_id
    tokens = np.full((3, 19), 7)
    probs = np.full((3, 19), 0.5, np.float32)
    tokens[1, 0] = d  # the top-k token itself is the delimiter: empty label, its own probability
    tokens[2, 2] = d
    groups = ranking.groups_from_branches(tokens, probs, d)
    assert groups[0].tokens == (7,) * 19 + (d,) and len(groups[0].probs) == 19  # forced delimiter: factor 1
    assert groups[1].tokens == (d,) and groups[1].probs == (0.5,)
    assert groups[2].tokens == (7, 7, d) and len(groups[2].probs) == 3
    ranked = dict(ranking.rank(groups, tok, "prob"))
    assert ranked[""] == pytest.approx(0.5)


def test_batched_prediction_equals_per_image(tok):
    model, params = tiny_recognizer(tok, delimiter_boost=3.0)
    tagger = Tagger(model, params, tok, batch_size=4)
    images = random_images(3, 32, seed=1)
    batched = tagger.predict(images, num_labels=5)
    single = [tagger.predict([img], num_labels=5)[0] for img in images]
    for b, s in zip(batched, single):
        assert [label for label, _ in b] == [label for label, _ in s]
        # XLA's fp32 kernels round differently for batch 3 and batch 1 (~1e-6 per logit); a label
        # score multiplies up to 19 probabilities, so relative differences reach ~1e-5.
        np.testing.assert_allclose([p for _, p in b], [p for _, p in s], rtol=1e-4)
    assert all(0 < len(r) <= 5 for r in batched)
    assert all(r == sorted(r, key=lambda lp: -lp[1]) for r in batched)
