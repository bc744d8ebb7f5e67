"""Shared fixtures. The environment lines run before any test module imports jax."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from nxtp_jax import checkpoint  # noqa: E402
from nxtp_jax.prompts import CAPTION_TEMPLATES, OBJECT_TEMPLATES  # noqa: E402
from nxtp_jax.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from tiny_models import tiny_recognizer  # noqa: E402

LABEL_WORDS = (
    "cloud", "sky", "logo", "dog", "cat", "red", "blue", "green", "circle", "square",
    "triangle", "tree", "car", "house", "bird", "water", "grass", "road", "person", "table",
)


def tiny_corpus() -> list[str]:
    """Templates, label lists and captions covering the words the tests use."""
    texts = list(OBJECT_TEMPLATES) + list(CAPTION_TEMPLATES)
    for i in range(len(LABEL_WORDS)):
        texts.append(", ".join(LABEL_WORDS[i:] + LABEL_WORDS[:i]))
    texts += [f"a {w} next to the {v}" for w, v in zip(LABEL_WORDS, reversed(LABEL_WORDS))]
    return texts


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny LLaMA-like sentencepiece model (vocab 400) trained on `tiny_corpus()`."""
    return train_sentencepiece(tiny_corpus(), tmp_path_factory.mktemp("spm") / "tiny.model", 400)


@pytest.fixture(scope="session")
def tiny_ckpt(sp_model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A checkpoint directory of a tiny random recognizer whose delimiter is boosted, so branches end early."""
    model, params = tiny_recognizer(Tokenizer(sp_model_path), delimiter_boost=3.0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(out, params, model.config, sp_model_path)
    return out
