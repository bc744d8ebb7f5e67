"""CLIP re-ranking (Eq. A.1) against OpenAI's own CLIP code on a tiny random CLIP."""

import importlib.util

import numpy as np
import pytest

from nxtp_jax.evaluation import job
from nxtp_jax.evaluation.clip_rerank import ClipReranker
from nxtp_jax.data import preprocess
from nxtp_jax.evaluation.embedders import find_clip_bpe
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import tiny_recognizer

CLIP_RES = 32


def _openai_clip_module(name: str):
    """A module of the installed openai-clip package, loaded by file (its __init__ needs torchvision)."""
    spec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", find_clip_bpe().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = _openai_clip_module("model").CLIP(
        embed_dim=32, image_resolution=CLIP_RES, vision_layers=2, vision_width=64, vision_patch_size=8,
        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1,
    ).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _reference_tokens(texts):
    import torch

    tok = _openai_clip_module("simple_tokenizer").SimpleTokenizer(str(find_clip_bpe()))
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.encoder["<|startoftext|>"]] + tok.encode(text) + [tok.encoder["<|endoftext|>"]]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@pytest.mark.parametrize("size", [24, CLIP_RES, 48])
def test_image_features_match_openai_encode_image(tiny_clip, size):
    import torch
    import torch.nn.functional as F

    model, path = tiny_clip
    pixels = np.random.default_rng(size).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    x = preprocess.normalize(pixels)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(CLIP_RES, CLIP_RES), mode="bilinear", align_corners=False)
        expected = model.encode_image(t).numpy()
    ours = np.asarray(ClipReranker(path).image_features(x))
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-4)


def test_rerank_is_the_softmax_of_scaled_cosines_over_unique_candidates(tiny_clip):
    import torch

    model, path = tiny_clip
    reranker = ClipReranker(path)
    assert reranker.logit_scale == pytest.approx(100.0, rel=1e-6)
    image = np.random.default_rng(0).normal(size=32).astype(np.float32)
    candidates = ["a dog", "hot_dog", "a dog", "traffic light", "x" * 100, ""]
    unique = ["a dog", "hot_dog", "traffic light", "x" * 100, ""]
    texts = ["a dog", "hot dog", "traffic light", "x" * 77, ""]
    with torch.no_grad():
        t = model.encode_text(_reference_tokens(texts))
        t = t / t.norm(dim=-1, keepdim=True)
        q = torch.from_numpy(image)[None]
        q = q / q.norm(dim=-1, keepdim=True)
        probs = (model.logit_scale.exp() * q @ t.T).softmax(dim=-1)[0].numpy()
    order = np.argsort(-probs)
    got = reranker.rerank(image, candidates, k=3)
    assert [label for label, _ in got] == [unique[i] for i in order[:3]]
    np.testing.assert_allclose([p for _, p in got], probs[order[:3]], atol=1e-5)

    everything = reranker.rerank(image, candidates, k=10)
    assert len(everything) == len(unique)
    assert sum(p for _, p in everything) == pytest.approx(1.0, abs=1e-6)
    assert reranker.rerank(image, [], k=3) == [("", 1.0)]


def test_eval_predictor_with_clip_ranking(tiny_clip, sp_model_path):
    model, path = tiny_clip
    tok = Tokenizer(sp_model_path)
    recognizer, params = tiny_recognizer(tok, delimiter_boost=3.0)
    tagger = Tagger(recognizer, params, tok)
    k = 4
    predictor = job.BatchPredictor(tagger, k=k, ranking_method="clip", reranker=ClipReranker(path))
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for pred in predictor.finish(predictor.launch(images)):
        sampled = [label for label, _ in pred.sampled]
        labels = [label for label, _ in pred.labels]
        probs = [p for _, p in pred.labels]
        assert 1 <= len(labels) <= k and set(labels) <= set(sampled)
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(score == 0.0 for _, score in pred.sampled)  # the model's own order ("none")
