"""Rows for the special tokens appended after the sentencepiece vocabulary (docs/method.md §1).

When the decoder starts from LLaMA weights, `tok_embeddings` and `output` grow from V to
V + 2 rows (`<|image|>` = V, `<|empty|>` = V + 1):
- new embedding rows ~ N(0, 1);
- new output rows ~ kaiming-uniform(a=sqrt 5) = U(-1/sqrt(D), 1/sqrt(D)), except `<|empty|>`,
  whose row is zero.
The LLaMA rows are copied unchanged. Each tensor draws from its own seeded stream.
"""

from __future__ import annotations

import zlib

import numpy as np

from nxtp_jax.models.config import SpecialTokens


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _check(rows: np.ndarray, specials: SpecialTokens) -> None:
    v = rows.shape[0]
    if (specials.image, specials.empty) != (v, v + 1):
        raise ValueError(
            f"expected the special tokens right after the {v} vocabulary rows (<|image|> = {v}, <|empty|> = {v + 1}), "
            f"found <|image|> = {specials.image}, <|empty|> = {specials.empty}; use the tokenizer of these weights"
        )


def extend_embedding(rows: np.ndarray, specials: SpecialTokens, seed: int) -> np.ndarray:
    """[V, D] LLaMA embedding -> [V + 2, D] with N(0, 1) rows for the special tokens."""
    _check(rows, specials)
    new = _rng(seed, "tok_embeddings").standard_normal((2, rows.shape[1]), dtype=np.float32)
    return np.concatenate([rows.astype(np.float32, copy=False), new])


def extend_output(rows: np.ndarray, specials: SpecialTokens, seed: int) -> np.ndarray:
    """[V, D] LLaMA output weight -> [V + 2, D]: U(-1/sqrt(D), 1/sqrt(D)) for <|image|>, zeros for <|empty|>."""
    _check(rows, specials)
    d = rows.shape[1]
    bound = 1.0 / np.sqrt(d)
    new = np.zeros((2, d), np.float32)
    new[0] = _rng(seed, "output").uniform(-bound, bound, d)
    return np.concatenate([rows.astype(np.float32, copy=False), new])


def describe(specials: SpecialTokens, dim: int) -> dict[str, str]:
    """How the special rows were initialised, keyed by Flax path, for the conversion report."""
    return {
        "language_decoder/tok_embeddings/embedding": f"rows {specials.image} (<|image|>), {specials.empty} (<|empty|>): N(0, 1)",
        "language_decoder/output/kernel": (
            f"column {specials.image} (<|image|>): U(-1/sqrt({dim}), 1/sqrt({dim})); column {specials.empty} (<|empty|>): zeros"
        ),
    }
