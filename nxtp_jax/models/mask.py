"""Attention masks over the full decoder sequence [N image tokens][text] (True = may attend).

`label_mask` is the training mask of docs/method.md §3: causal, a bidirectional image block, every column
after the answer position `a` closed, and each label reopened as its own lower-triangular
block (B_1 = [a, d_1], B_j = [d_{j-1}+1, d_j]). It is built from per-position block starts
found with cumulative maxima, so it needs no loop over delimiters and each sample keeps its
own answer position and label count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prefix_mask(num_image_tokens: int, length: int) -> jax.Array:
    """bool [1, 1, T, T]: causal, plus the image block [0, N) x [0, N) open both ways."""
    pos = jnp.arange(length)
    row, col = pos[:, None], pos[None, :]
    mask = (col <= row) | ((row < num_image_tokens) & (col < num_image_tokens))
    return mask[None, None]


def _delimiters(tokens, answer_pos, delimiter_id: int, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The preamble of both masks: positions [T], `a` [B, 1] and the delimiters after it [B, T].

    Positions are full-sequence coordinates (N image tokens first, T = N + L).
    """
    tokens = jnp.asarray(tokens)
    answer_pos = jnp.asarray(answer_pos)
    if tokens.ndim != 2 or answer_pos.shape != tokens.shape[:1]:
        raise ValueError(
            f"expected tokens [B, L] and answer_pos [B], found {tokens.shape} and "
            f"{answer_pos.shape}; pass one answer position per sample"
        )
    batch, text_len = tokens.shape
    pos = jnp.arange(n + text_len)
    a = (answer_pos.astype(jnp.int32) + n)[:, None]
    is_delim = (tokens == delimiter_id) & (pos[None, n:] > a)
    is_delim = jnp.concatenate([jnp.zeros((batch, n), dtype=bool), is_delim], axis=1)
    return pos, a, is_delim


def label_mask(
    tokens: jax.Array, answer_pos: jax.Array, *, delimiter_id: int, num_image_tokens: int
) -> jax.Array:
    """bool [B, 1, N+L, N+L] training mask for text `tokens` [B, L] (pad -1) and `answer_pos` [B].

    `answer_pos` indexes `tokens` (the last prompt token); delimiters count only after it.
    """
    n = num_image_tokens
    pos, a, is_delim = _delimiters(tokens, answer_pos, delimiter_id, n)

    # Block start of a row = one past the closest delimiter strictly before it, else a.
    after_delim = jnp.where(is_delim, pos[None, :] + 1, a)
    start = jax.lax.cummax(jnp.concatenate([a, after_delim[:, :-1]], axis=1), axis=1)
    # A row is inside a label block if it is at or after a and some delimiter is at or after it.
    delim_ahead = jax.lax.cummax(is_delim.astype(jnp.int32), axis=1, reverse=True) > 0
    in_block = (pos[None, :] >= a) & delim_ahead

    row = pos[None, :, None]
    col = pos[None, None, :]
    causal = col <= row
    image_block = (row < n) & (col < n)
    prompt_cols = causal & (col <= a[:, :, None])
    label_block = in_block[:, :, None] & causal & (col >= start[:, :, None])
    return (image_block | prompt_cols | label_block)[:, None]


def generation_mask(
    tokens: jax.Array, answer_pos: jax.Array, *, delimiter_id: int, num_image_tokens: int
) -> jax.Array:
    """bool [B, 1, N+L, N+L]: the original's mask while greedy decoding generates several labels.

    Causal plus the image block; then, for every delimiter d_i after `a` that has a later
    delimiter, the rows after d_i lose the columns [a, d_i]. A label being generated thus
    sees the one before it but none earlier, and no row past the first label sees `a`.
    """
    n = num_image_tokens
    pos, a, is_delim = _delimiters(tokens, answer_pos, delimiter_id, n)
    batch = is_delim.shape[0]
    later = jax.lax.cummax(is_delim[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]  # a delimiter at or after p
    has_later = jnp.concatenate([later[:, 1:], jnp.zeros((batch, 1), jnp.int32)], axis=1) > 0
    closing = is_delim & has_later
    # For row r: one past the last closing delimiter strictly before r (or a: nothing closed).
    ends = jnp.where(closing, pos[None, :] + 1, a)
    end = jax.lax.cummax(jnp.concatenate([a, ends[:, :-1]], axis=1), axis=1)  # [B, T]

    row, col = pos[None, :, None], pos[None, None, :]
    base = (col <= row) | ((row < n) & (col < n))
    closed = (col >= a[:, :, None]) & (col < end[:, :, None])
    return (base & ~closed)[:, None]
