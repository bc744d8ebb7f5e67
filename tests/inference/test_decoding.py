"""Greedy decoding and beam search against straightforward re-statements of the original's loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nxtp_jax import prompts
from nxtp_jax.inference import decoding, sampling
from nxtp_jax.models import mask
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import random_images, tiny_recognizer


@pytest.fixture(scope="module")
def setup(sp_model_path):
    tok = Tokenizer(sp_model_path)
    model, params = tiny_recognizer(tok, delimiter_boost=2.0)
    images = jnp.asarray(Tagger(model, params, tok).preprocess(random_images(2, 32, seed=5)))
    return tok, model, params, images, jnp.asarray(prompts.inference_prompt(tok))


def reference_greedy(model, params, images, prompt, tok, steps, penalty):
    """Python loop: grow the sequence, rebuild the generation mask, take the argmax."""
    h = sampling.prefix_embeddings(model, params, images, prompt)
    n = model.config.vision.num_patches
    b, p = h.shape[0], prompt.shape[0]
    text = np.tile(np.asarray(prompt), (b, 1))
    out = []
    seen = np.zeros((b, model.config.decoder.vocab_size), bool)

    @jax.jit  # the mask too: built eagerly, its ops would compile one by one at every length
    def last_logits(h, text):
        m = mask.generation_mask(text, jnp.full(b, p - 1), delimiter_id=tok.delimiter_id, num_image_tokens=n)
        hidden, _ = model.apply({"params": params}, h, jnp.arange(h.shape[1])[None], m, method=Recognizer.decode)
        return model.apply({"params": params}, hidden[:, -1], method=Recognizer.logits)

    for _ in range(steps):
        logits = np.asarray(last_logits(h, text))
        logits = np.where(seen, logits / penalty, logits)
        nxt = logits.argmax(-1)
        seen[np.arange(b), nxt] = True
        out.append(nxt)
        text = np.concatenate([text, nxt[:, None]], axis=1)
        emb = model.apply({"params": params}, jnp.asarray(nxt[:, None]), method=Recognizer.embed)
        h = jnp.concatenate([h, emb], axis=1)
    return np.stack(out, 1)


def test_greedy_matches_reference_loop(setup):
    tok, model, params, images, prompt = setup
    tokens, probs = decoding.greedy(model, params, images, prompt, jax.random.key(0), delimiter_id=tok.delimiter_id, max_gen_len=8)
    want = reference_greedy(model, params, images, prompt, tok, 8, 1.2)
    np.testing.assert_array_equal(np.asarray(tokens), want)
    assert np.all((np.asarray(probs) > 0) & (np.asarray(probs) <= 1))
    assert (np.asarray(tokens) == tok.delimiter_id).any()  # the generation mask is exercised


def test_sampling_variants_run_and_are_seeded(setup):
    tok, model, params, images, prompt = setup
    for kw in (dict(func="top_k", top_k=5), dict(func="top_p", top_p=0.9, temperature=0.7)):
        a = decoding.greedy(model, params, images, prompt, jax.random.key(1), delimiter_id=tok.delimiter_id, max_gen_len=6, **kw)
        b = decoding.greedy(model, params, images, prompt, jax.random.key(1), delimiter_id=tok.delimiter_id, max_gen_len=6, **kw)
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_beam_of_one_is_greedy_until_eos(setup):
    tok, model, params, images, prompt = setup
    greedy, _ = decoding.greedy(model, params, images, prompt, jax.random.key(0), delimiter_id=tok.delimiter_id,
                                max_gen_len=10, penalty=0.0)
    beams = decoding.beam_search(model, params, images, prompt, eos_id=tok.eos_id, beam_size=1, penalty=0.0, max_gen_len=10)
    for g, bm in zip(np.asarray(greedy).tolist(), beams):
        stop = g.index(tok.eos_id) if tok.eos_id in g else len(g)
        assert bm[:stop] == g[:stop]


def test_tagger_strategies(setup, sp_model_path):
    tok, model, params, _, _ = setup
    tagger = Tagger(model, params, tok)
    imgs = random_images(2, 32, seed=5)
    for strategy, rank in (("greedy", "prob"), ("beam", "none"), ("one_shot", "ppl"), ("one_shot", "sim")):
        out = tagger.predict(imgs, num_labels=5, strategy=strategy, ranking_method=rank, **({"max_gen_len": 8} if strategy != "one_shot" else {}))
        assert len(out) == 2 and all(len(r) <= 5 for r in out)
    with pytest.raises(ValueError, match="beam search records no probabilities"):
        tagger.predict(imgs, strategy="beam", ranking_method="prob")
