"""A tiny release in the real repos' file names and layouts, served by a local Hub, and a card for it."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from huggingface_hub import constants

import torch_layouts as tl
from fake_hub import FakeHub
from tiny_release import CKPT_FILE, CLIP_PATH, LLAMA, LLAMA_CONFIG, make_card
from nxtp_jax import pretrained


@pytest.fixture(scope="session")
def release_files(sp_model_path, tmp_path_factory) -> dict[str, pathlib.Path]:
    """The four inputs on disk: an fp16 `module.` checkpoint, an fp16 CLIP TorchScript archive, tokenizer, config."""
    root = tmp_path_factory.mktemp("release")
    tl.write_nxtp_checkpoint(root / CKPT_FILE, tl.random_nxtp_model_state(
        vision_width=128, trained_vision_blocks=(1,), dim=64, n_layers=2, n_heads=4, vocab_size=402, multiple_of=32))
    tl.write_openai_clip_torchscript(root / "ViT-L-14.pt", width=128, layers=2, patch=4, resolution=16, dtype=torch.float16)
    (root / "config.json").write_text(json.dumps(LLAMA_CONFIG, indent=2))
    return {"checkpoint": root / CKPT_FILE, "clip": root / "ViT-L-14.pt", "tokenizer": sp_model_path,
            "llama_config": root / "config.json"}


@pytest.fixture
def hub(release_files, tmp_path, monkeypatch):
    """The fake Hub serving the release, with huggingface_hub's endpoint, HF_HOME, HOME and NXTP_JAX_CACHE in tmp."""
    server = FakeHub()
    server.repos[("kaiyuyue/nxtp", CKPT_FILE)] = release_files["checkpoint"].read_bytes()
    server.repos[(LLAMA, "tokenizer.model")] = release_files["tokenizer"].read_bytes()
    server.repos[(LLAMA, "config.json")] = release_files["llama_config"].read_bytes()
    server.plain[CLIP_PATH] = release_files["clip"].read_bytes()
    # HF_ENDPOINT as huggingface_hub reads it at import
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NXTP_JAX_CACHE", str(tmp_path / "nxtp"))
    monkeypatch.setattr(pretrained, "_licensed", set())
    yield server
    server.close()


@pytest.fixture
def card(hub, release_files, tmp_path) -> pathlib.Path:
    return make_card(release_files, tmp_path / "tiny.json", hub.url)
