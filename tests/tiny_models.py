"""Tiny recognizers with random weights, and the tiny demo experiment, shared by the tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nxtp_jax.configs import demo
from nxtp_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, VisionConfig
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.tokenizer import Tokenizer


def tiny_config(tok: Tokenizer, *, image_size: int = 32, patch: int = 8, layers: int = 2) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(width=64, layers=2, patch_size=patch, image_size=image_size),
        decoder=DecoderConfig(dim=64, layers=layers, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=16),
        special_tokens=SpecialTokens(image=tok.image_id, empty=tok.empty_id),
    )


@functools.lru_cache(maxsize=None)
def _random_params(config: ModelConfig, seed: int):
    return init_params(Recognizer(config), jax.random.key(seed))


def tiny_recognizer(tok: Tokenizer, *, seed: int = 0, delimiter_boost: float = 0.0, **kw):
    """(model, params). `delimiter_boost` > 0 makes the delimiter likely, so branches end early."""
    config = tiny_config(tok, **kw)
    params = _random_params(config, seed)
    if delimiter_boost:
        params = jax.tree_util.tree_map(lambda x: x, params)
        out = params["language_decoder"]["output"]["kernel"]
        rng = np.random.default_rng(seed)
        boost = jnp.asarray(rng.normal(size=out.shape[0]).astype(np.float32)) * delimiter_boost
        params["language_decoder"]["output"]["kernel"] = out.at[:, tok.delimiter_id].add(boost)
    return Recognizer(config), params


def random_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size + 7 * i, size + 3 * i, 3), dtype=np.uint8) for i in range(n)]


def demo_config(data_root, **fields):
    """configs/demo.py's "tiny" variant with data under `data_root`, and `fields` set by dotted name."""
    config = demo.get_config("tiny")
    config.data.root = str(data_root)
    config.update_from_flattened_dict(fields)
    return config
