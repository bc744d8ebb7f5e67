"""Closed vocabularies: constrained one-shot sampling against a brute-force reference, thresholds, bad values."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nxtp_jax import prompts
from nxtp_jax.inference import sampling, vocabulary
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.inference.vocabulary import Vocabulary
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import random_images, tiny_recognizer

# Shared prefixes at word level ("red" / "red circle") and below it ("zebra" / "zebu" are
# byte and letter pieces sharing three); eight first tokens for k = 4 branches.
LABELS = ["red", "red circle", "red square", "blue circle", "cat", "car", "cloud", "sky", "green tree", "zebra", "zebu"]
# Three first tokens, fewer than k = 4 branches.
FEW = ["red", "red circle", "blue circle", "zebra", "zebu"]
K = 4


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


@pytest.fixture(scope="module")
def tagger(tok):
    model, params = tiny_recognizer(tok)
    return Tagger(model, params, tok, batch_size=2)


@pytest.fixture(scope="module")
def images():
    return random_images(2, 32, seed=3)


def _label_ids(tok, label):
    """A label's ids as training writes it after the prompt (the object text), without the EOS."""
    text = prompts.object_batch(tok, [[label]], max_text_len=64, template=prompts.OBJECT_TEMPLATES[0], rng=None)
    a = int(text.answer_pos[0])
    ids = text.tokens[0].tolist()
    return tuple(ids[a + 1 : ids.index(tok.eos_id)])


MAX_ENTRIES, MAX_ENTRY_TOKENS = 12, 8


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, images, text, mask):
    """The recognizer's full-sequence forward (no KV cache): logits at every text position."""
    return model.apply({"params": params}, images, text, mask)


def _brute_force(tagger, images, labels, k):
    """Per image, every entry scored as a branch with full-sequence forward passes (no KV cache).

    At each step the allowed tokens are those continuing some entry from the branch's prefix,
    plus the delimiter where the prefix is an entry; the model's softmax is renormalised over
    them. An entry is a branch's result when its first token is among the top k allowed first
    tokens and each later token (and its delimiter) is the argmax of its step.
    """
    tok, model, params = tagger.tokenizer, tagger.model, tagger.params
    delim = tok.delimiter_id
    entries = {}
    for label in labels:
        entries.setdefault(_label_ids(tok, label), label)
    seqs = list(entries)

    def allowed(prefix):
        nxt = {s[len(prefix)] for s in seqs if len(s) > len(prefix) and s[: len(prefix)] == prefix}
        return sorted(nxt | ({delim} if prefix in entries else set()))

    # One teacher-forced forward per (image, entry); fixed shapes, so that one compile serves every call.
    prompt = prompts.inference_prompt(tok).tolist()
    assert len(seqs) <= MAX_ENTRIES and max(len(s) for s in seqs) <= MAX_ENTRY_TOKENS
    text = np.full((MAX_ENTRIES, len(prompt) + MAX_ENTRY_TOKENS), -1, np.int32)  # padding after an entry: unseen (causal)
    for i, s in enumerate(seqs):
        text[i, : len(prompt) + len(s)] = prompt + list(s)
    x = tagger.preprocess(images)
    x = np.repeat(x, MAX_ENTRIES, axis=0)
    n = model.config.vision.num_patches
    length = n + text.shape[1]
    row, col = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = ((col <= row) | ((row < n) & (col < n)))[None, None]
    logits = _forward(model, params, jnp.asarray(x), jnp.asarray(np.tile(text, (len(images), 1))), jnp.asarray(mask))
    logits = np.asarray(logits, np.float64).reshape(len(images), MAX_ENTRIES, text.shape[1], -1)

    results = []
    for image_logits in logits:
        p_all = np.exp(image_logits - image_logits.max(-1, keepdims=True))
        p_all /= p_all.sum(-1, keepdims=True)
        roots = allowed(())
        q_root = p_all[0, len(prompt) - 1, roots] / p_all[0, len(prompt) - 1, roots].sum()
        chosen = {roots[j] for j in sorted(range(len(roots)), key=lambda j: (-q_root[j], roots[j]))[:k]}
        scored = []
        for i, s in enumerate(seqs):
            if s[0] not in chosen:
                continue
            score, greedy = 1.0, True
            for step, token in enumerate(s + (delim,)):
                options = allowed(s[:step])
                p = p_all[i, len(prompt) - 1 + step, options]
                q = p / p.sum()
                score *= q[options.index(token)]
                greedy &= step == 0 or options[int(np.argmax(q))] == token
            if greedy:
                scored.append((entries[s], score))
        results.append(sorted(scored, key=lambda ls: -ls[1]))
    return results


@pytest.mark.parametrize("labels", [LABELS, FEW], ids=["top_k_of_more", "fewer_than_k"])
def test_constrained_sampling_equals_brute_force(tagger, images, labels):
    got = tagger.predict(images, num_labels=K, vocab=labels)
    want = _brute_force(tagger, images, labels, K)
    for g, w in zip(got, want):
        assert [label for label, _ in g] == [label for label, _ in w]
        np.testing.assert_allclose([p for _, p in g], [p for _, p in w], rtol=1e-5)
    # Each branch ends in its own entry: as many labels as first tokens chosen.
    first_tokens = {_label_ids(tagger.tokenizer, label)[0] for label in labels}
    assert all(len(g) == min(K, len(first_tokens)) for g in got)


def test_every_label_is_in_the_vocabulary_from_a_file_a_list_or_a_vocabulary(tagger, images, tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n\n")
    from_list = tagger.predict(images, num_labels=K, vocab=LABELS)
    assert tagger.predict(images, num_labels=K, vocab=str(path)) == from_list
    assert tagger.predict(images, num_labels=K, vocab=tagger.vocabulary(path)) == from_list
    assert all(len(labels) == K and all(label in LABELS for label, _ in labels) for labels in from_list)


def test_min_prob_drops_labels_below_it(tagger, images):
    full = tagger.predict(images, num_labels=K, vocab=LABELS)
    cut = float(np.median([p for labels in full for _, p in labels]))
    kept = tagger.predict(images, num_labels=K, vocab=LABELS, min_prob=cut)
    assert kept == [[(label, p) for label, p in labels if p >= cut] for labels in full]
    assert 0 < sum(map(len, kept)) < sum(map(len, full))
    assert tagger.predict(images, num_labels=K, vocab=LABELS, min_prob=1.0) == [[], []]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"min_prob": -0.1}, "min_prob in [0, 1]"),
        ({"min_prob": 1.5}, "min_prob in [0, 1]"),
        ({"min_prob": float("nan")}, "min_prob in [0, 1]"),
        ({"min_prob": "0.5"}, "min_prob in [0, 1]"),
        ({"min_prob": 0.5, "ranking_method": "sim"}, "min_prob 0 with ranking 'sim'"),
        ({"vocab": []}, "at least one label"),
        ({"vocab": ["", "  "]}, "non-empty vocabulary labels"),
        ({"vocab": 5}, "found int"),
        ({"vocab": {"red", "sky"}}, "found set"),
        ({"vocab": ["red", 3]}, "to be a string"),
        ({"vocab": ["red, sky"]}, "without the delimiter"),
        ({"vocab": ["red " * 30]}, "at most 18 tokens"),
        ({"vocab": "no/such/labels.txt"}, "found no file there"),
        ({"vocab": ["red"], "strategy": "greedy"}, "strategy 'one_shot' with a vocabulary"),
        ({"num_labels": 0}, "num_labels >= 1"),
    ],
)
def test_bad_values_raise_one_line_errors(tagger, images, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        tagger.predict(images[:1], **{"num_labels": K, **kw})
    assert "\n" not in str(e.value)


def test_empty_vocabulary_file_and_foreign_vocabulary_raise(tagger, tok, sp_model_path, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="at least one label"):
        tagger.vocabulary(empty)
    other = Vocabulary(["red"], tok, template=prompts.OBJECT_TEMPLATES[1])
    with pytest.raises(ValueError, match="built with this tagger's tokenizer and prompt"):
        tagger.vocabulary(other)


def test_entries_that_tokenize_identically_merge(tok):
    vocab = Vocabulary(["red circle", " red circle ", "sky"], tok)
    assert vocab.labels == ("red circle", "sky") and len(vocab) == 2
    assert "red circle" in vocab and "red" not in vocab


def test_numpy_steps_of_the_onnx_runner_match_the_device_steps(tok):
    """The JAX-free runner's constrained steps (numpy) pick what the compiled loop's steps pick."""
    vocab = Vocabulary(LABELS, tok)
    trie = sampling.Trie.from_vocabulary(vocab)
    logits = np.random.default_rng(0).normal(size=(3, K, tok.vocab_size)).astype(np.float32) * 4
    nodes = np.random.default_rng(1).integers(0, len(vocab.count), size=(3, K)).astype(np.int32)
    nodes[0, 0] = vocabulary.END  # a finished branch
    first = jax.jit(sampling._constrained_first, static_argnums=2)(trie, jnp.asarray(logits[:, 0]), K)
    for got, want in zip(vocabulary.first_step(vocab, logits[:, 0], K), first):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6)
    step = jax.jit(sampling._constrained_step, static_argnums=3)(trie, jnp.asarray(logits), jnp.asarray(nodes), tok.delimiter_id)
    for got, want in zip(vocabulary.select(vocab, logits, nodes), step):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6)


def test_vocabulary_file_in_utf8_with_bom_and_crlf_reads_as_plain_utf8(tok, tmp_path):
    plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
    plain.write_bytes("red circle\ncafé\nsky\n".encode())
    windows.write_bytes(b"\xef\xbb\xbf" + "red circle\r\ncafé\r\nsky".encode())  # Notepad: BOM, CRLF, no final newline
    assert Vocabulary.from_file(windows, tok).labels == Vocabulary.from_file(plain, tok).labels == ("red circle", "café", "sky")


@pytest.mark.parametrize("data, where", [
    ("red\ncafé\n".encode("latin-1"), "byte 0xe9 at line 2, column 4"),
    ("red\n".encode("utf-16"), "byte 0xff at line 1, column 1"),
])
def test_vocabulary_file_in_another_encoding_names_file_line_and_byte(tok, tmp_path, data, where):
    path = tmp_path / "labels.txt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(f"expected UTF-8 text in {path}, found {where}")):
        Vocabulary.from_file(path, tok)
