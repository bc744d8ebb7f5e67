"""Merging and ranking of sampled labels, on hand-written groups."""

import numpy as np
import pytest

from nxtp_jax.inference.ranking import Group, groups_from_stream, rank
from nxtp_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


def _group(tok, word, probs):
    ids = tok.encode(word, bos=False, eos=False) + [tok.delimiter_id]
    assert len(ids) == len(probs), (word, ids)
    return Group(tuple(ids), tuple(probs))


def _probs(tok, word, first, rest=1.0):
    n = len(tok.encode(word, bos=False, eos=False)) + 1
    return [first] + [rest] * (n - 1)


def test_prob_sums_duplicates_and_sorts(tok):
    # Each "cat" branch alone scores below "dog"; only their sum puts "cat" first.
    groups = [
        _group(tok, "cat", _probs(tok, "cat", 0.25, 0.95)),
        _group(tok, "dog", _probs(tok, "dog", 0.3)),
        _group(tok, "cat", _probs(tok, "cat", 0.2, 0.95)),
    ]
    n_cat = len(groups[0].probs)
    cat = (0.25 + 0.2) * 0.95 ** (n_cat - 1)
    assert 0.25 * 0.95 ** (n_cat - 1) < 0.3 < cat
    out = rank(groups, tok, "prob")
    assert [label for label, _ in out] == ["cat", "dog"]
    assert out[0][1] == pytest.approx(cat)
    assert out[1][1] == pytest.approx(0.3)


def test_ppl_is_min_geometric_mean_ascending(tok):
    a = _group(tok, "sky", _probs(tok, "sky", 0.5, 0.5))
    b = _group(tok, "sky", _probs(tok, "sky", 0.9, 0.9))
    c = _group(tok, "tree", _probs(tok, "tree", 0.8, 0.8))
    out = rank([a, b, c], tok, "ppl")
    assert out[0] == ("sky", pytest.approx(0.5))
    assert out[1] == ("tree", pytest.approx(0.8))


def test_none_keeps_first_sampled_order(tok):
    groups = [_group(tok, w, _probs(tok, w, p)) for w, p in [("tree", 0.1), ("cat", 0.9), ("tree", 0.5)]]
    assert [label for label, _ in rank(groups, tok, "none")] == ["tree", "cat"]


def test_sim_mean_euclidean(tok):
    d = 4
    emb = np.zeros((tok.vocab_size, d), np.float32)
    cat = _group(tok, "cat", _probs(tok, "cat", 0.5))
    dog = _group(tok, "dog", _probs(tok, "dog", 0.5))
    image = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0]], np.float32)
    for t in cat.tokens:
        emb[t] = [1.0, 0, 0, 0]  # identical to the image tokens: distance 0
    for t in dog.tokens:
        emb[t] = [0, 1.0, 0, 0]  # orthogonal: distance sqrt(2)/2
    emb[tok.delimiter_id] = [1.0, 0, 0, 0]
    out = rank([dog, cat], tok, "sim", image_tokens=image, embeddings=emb)
    assert out[0][0] == "cat"
    n_dog = len(dog.tokens)
    assert out[1][1] == pytest.approx((n_dog - 1) / n_dog * np.sqrt(2) / 2)


def test_stream_drops_unfinished_label(tok):
    d = tok.delimiter_id
    groups = groups_from_stream([5, 6, d, 7, d, 8], [0.1] * 6, d)
    assert [g.tokens for g in groups] == [(5, 6, d), (7, d)]


def test_unknown_ranking(tok):
    with pytest.raises(ValueError, match="unknown ranking"):
        rank([], tok, "bleu")
