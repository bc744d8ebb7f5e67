"""The tiny release's names and its model card: the g3m card's form, hashes computed here from the files."""

from __future__ import annotations

import hashlib
import json
import pathlib

from fake_hub import COMMIT

CKPT_FILE = "ckpt_epoch_03_iter_0021360.pth"
CLIP_SHA = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"  # the real URL's folder
CLIP_PATH = f"/clip/models/{CLIP_SHA}/ViT-L-14.pt"
LLAMA = "meta-llama/Llama-2-7b-hf"
# Llama-2-7b-hf's config.json, shrunk to the tiny decoder (64 wide, 2 blocks, 4 heads, vocab 400).
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 192, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 400,
}


def make_card(release_files, path: pathlib.Path, endpoint: str, **changes) -> pathlib.Path:
    """The g3m card's form for the tiny release, its hashes computed here from the files."""
    md5 = hashlib.md5(release_files["checkpoint"].read_bytes()).hexdigest()
    sha = hashlib.sha256(release_files["clip"].read_bytes()).hexdigest()
    card = {
        "name": "tiny", "license": "CC-BY-NC 4.0 (test release)", "layers": 2,
        "checkpoint": {"hub": "kaiyuyue/nxtp", "file": CKPT_FILE, "revision": "main", "md5_prefix": md5[:6]},
        "clip": {"url": endpoint + CLIP_PATH, "sha256": sha},
        "tokenizer": {"hub": LLAMA, "file": "tokenizer.model", "revision": COMMIT},
        "llama_config": {"hub": LLAMA, "file": "config.json", "revision": COMMIT},
    }
    for key, value in changes.items():
        card[key] = {**card[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(card))
    return path
