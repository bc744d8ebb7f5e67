"""Attention masks: docs/method.md §3 written out by hand, and a slow per-delimiter reference."""

import functools

import jax
import numpy as np
import pytest

from nxtp_jax.models.mask import generation_mask, label_mask, prefix_mask

D = 7  # delimiter id in these synthetic sequences; other ids only need to differ from it
I, S, P, A, X, E = 50, 1, 11, 12, 13, 2  # <|image|>, BOS, prompt word, "are", label token, EOS


def grid(rows: list[str]) -> np.ndarray:
    """'1' = may attend, '.' = masked; one string per query row."""
    return np.array([[c == "1" for c in r.replace(" ", "")] for r in rows])


@functools.partial(jax.jit, static_argnames=("n",))
def _jitted(tokens: jax.Array, answer_pos: jax.Array, n: int) -> jax.Array:
    return label_mask(tokens, answer_pos, delimiter_id=D, num_image_tokens=n)


def build(tokens: list[list[int]], answer_pos: list[int], n: int) -> np.ndarray:
    return np.asarray(_jitted(np.array(tokens, np.int32), np.array(answer_pos, np.int32), n))


def test_prefix_mask_by_hand() -> None:
    expected = grid([
        "11...",
        "11...",
        "111..",
        "1111.",
        "11111",
    ])
    m = np.asarray(prefix_mask(2, 5))
    assert m.shape == (1, 1, 5, 5) and m.dtype == bool
    np.testing.assert_array_equal(m[0, 0], expected)


def test_one_label_without_delimiter() -> None:
    # full positions: 0-1 image, 2 <|image|>, 3 BOS, 4 prompt, 5 "are" (a), 6-7 label, 8 EOS
    expected = grid([
        "11.......",
        "11.......",
        "111......",
        "1111.....",
        "11111....",
        "111111...",
        "111111...",  # the only label is the last one: its tokens never see each other
        "111111...",
        "111111...",
    ])
    m = build([[I, S, P, A, X, X, E]], [3], n=2)
    assert m.shape == (1, 1, 9, 9) and m.dtype == bool
    np.testing.assert_array_equal(m[0, 0], expected)


def test_many_multi_token_labels() -> None:
    # 0-1 image, 2 <|image|>, 3 BOS, 4 "are" (a), 5-6 label 1, 7 ",", 8 label 2, 9 ",",
    # 10-11 label 3 (last, no delimiter), 12 EOS.  B_1 = [4, 7], B_2 = [8, 9].
    expected = grid([
        "11...........",
        "11...........",
        "111..........",
        "1111.........",
        "11111........",
        "111111.......",
        "1111111......",
        "11111111.....",  # the delimiter of label 1 sees label 1 and predicts label 2
        "11111...1....",
        "11111...11...",
        "11111........",
        "11111........",
        "11111........",
    ])
    m = build([[I, S, A, X, X, D, X, D, X, X, E]], [2], n=2)
    np.testing.assert_array_equal(m[0, 0], expected)


def test_batch_with_padding_and_different_label_counts() -> None:
    n = 3
    tokens = [
        [I, S, A, X, D, X, E, -1, -1],  # two labels, padded
        [I, S, A, X, D, X, D, X, E],  # three labels
        [I, S, P, A, X, D, X, E, -1],  # longer prompt: a is later
        [I, S, D, A, X, D, X, E, -1],  # a delimiter inside the prompt does not count
        [I, S, A, X, D, -1, -1, -1, -1],  # truncated right after a delimiter
    ]
    answer_pos = [2, 2, 3, 3, 2]
    # Up to position 7 (image, I, S, a and at most the first label with its delimiter) every
    # sample's rows are plain causal; the samples differ from row 8 on.
    head = [
        "111.........",
        "111.........",
        "111.........",
        "1111........",
        "11111.......",
        "111111......",
        "1111111.....",
        "11111111....",
    ]
    # 0-2 image, 3 I, 4 S, 5 a, 6 X, 7 D, 8 X, 9 E, 10-11 pad; sample 4 (5 a, 6 X, 7 D, 8-11 pad)
    # is the same mask: the truncated label is the last one either way.
    two_labels = grid(head + [
        "111111......",
        "111111......",
        "111111......",
        "111111......",
    ])
    three_labels = grid(head + [  # 5 a, 6 X, 7 D, 8 X, 9 D, 10 X, 11 E
        "111111..1...",
        "111111..11..",
        "111111......",
        "111111......",
    ])
    # 6 a, 7 X, 8 D, 9 X, 10 E, 11 pad; sample 3 is the same mask (its "," at 5 is in the prompt).
    late_answer = grid(head + [
        "111111111...",
        "1111111.....",
        "1111111.....",
        "1111111.....",
    ])
    expected = [two_labels, three_labels, late_answer, late_answer, two_labels]
    m = build(tokens, answer_pos, n=n)
    assert m.shape == (5, 1, 12, 12)
    for b in range(5):
        np.testing.assert_array_equal(m[b, 0], expected[b], err_msg=f"sample {b}")


def reference_mask(tokens: np.ndarray, answer_pos: np.ndarray, delimiter_id: int, n: int) -> np.ndarray:
    """The original's construction: additive -inf mask, one lower triangle per delimiter.

    Unlike the original it takes each sample's own answer position (the original used the
    last sample's for the whole batch) and skips delimiters at or before it.
    """
    batch, text_len = tokens.shape
    t = n + text_len
    full = np.concatenate([np.full((batch, n), -1), tokens], axis=1)
    mask = np.triu(np.full((batch, t, t), -np.inf), k=1)
    mask[:, :n, :n] = 0.0
    for b in range(batch):
        a = n + int(answer_pos[b])
        mask[b, :, a + 1 :] = -np.inf
        prev = a
        for d in np.nonzero(full[b] == delimiter_id)[0]:
            if d <= a:
                continue
            end = d + 1
            size = end - prev
            rows, cols = np.tril_indices(size)
            mask[b, prev + rows, prev + cols] = 0.0
            prev = end
    return (mask == 0.0)[:, None]


@pytest.mark.parametrize("seed", range(6))
def test_matches_slow_reference_on_random_batches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch, text_len, n = 6, int(rng.integers(6, 20)), int(rng.integers(1, 5))
    tokens = rng.choice([5, 6, D, 8], size=(batch, text_len), p=[0.3, 0.2, 0.3, 0.2]).astype(np.int32)
    answer_pos = rng.integers(1, text_len - 1, size=batch).astype(np.int32)
    for b in range(batch):
        length = int(rng.integers(answer_pos[b] + 1, text_len + 1))
        tokens[b, length:] = -1
    got = build(tokens.tolist(), answer_pos.tolist(), n=n)
    np.testing.assert_array_equal(got, reference_mask(tokens, answer_pos, D, n))


def test_eager_matches_reference() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.choice([5, D, 8, -1], size=(4, 10)).astype(np.int32)
    answer_pos = np.array([1, 2, 3, 4], np.int32)
    got = label_mask(tokens, answer_pos, delimiter_id=D, num_image_tokens=3)
    np.testing.assert_array_equal(np.asarray(got), reference_mask(tokens, answer_pos, D, 3))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"one answer position per sample"):
        label_mask(np.zeros((2, 5), np.int32), np.zeros((3,), np.int32), delimiter_id=D, num_image_tokens=2)


def reference_generation_mask(tokens: np.ndarray, answer_pos: np.ndarray, delimiter_id: int, n: int) -> np.ndarray:
    """The original's inference branch (is_train=False): from the second delimiter on, the rows
    after the previous delimiter lose the columns from `a` up to it."""
    batch, text_len = tokens.shape
    t = n + text_len
    full = np.concatenate([np.full((batch, n), -1), tokens], axis=1)
    mask = np.triu(np.full((batch, t, t), -np.inf), k=1)
    mask[:, :n, :n] = 0.0
    for b in range(batch):
        a = n + int(answer_pos[b])
        prev = a
        for d in np.nonzero(full[b] == delimiter_id)[0]:
            if d <= a:
                continue
            if prev != a:
                mask[b, prev:, a:prev] = -np.inf
            prev = d + 1
    return (mask == 0.0)[:, None]


def test_generation_mask_by_hand() -> None:
    # n=1 image token, text [I, S, A, X, D, X, D, X]: a = 3; labels X | X | X (last one in progress).
    m = np.asarray(generation_mask(np.array([[I, S, A, X, D, X, D, X]]), np.array([2]), delimiter_id=D, num_image_tokens=1))
    expected = grid([
        "1........",
        "11.......",
        "111......",
        "1111.....",  # a
        "11111....",  # label 1
        "111111...",  # its delimiter
        "111...1..",  # label 2: no longer sees a..d_1
        "111...11.",  # its delimiter
        "111...111",  # label 3 still sees label 2: no delimiter closes it yet
    ])
    np.testing.assert_array_equal(m[0, 0], expected)


@pytest.mark.parametrize("seed", range(4))
def test_generation_mask_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch, text_len, n = 5, int(rng.integers(6, 24)), int(rng.integers(1, 4))
    tokens = rng.choice([5, 6, D, 8], size=(batch, text_len), p=[0.3, 0.2, 0.3, 0.2]).astype(np.int32)
    answer_pos = rng.integers(1, text_len - 1, size=batch).astype(np.int32)
    got = generation_mask(tokens, answer_pos, delimiter_id=D, num_image_tokens=n)
    np.testing.assert_array_equal(np.asarray(got), reference_generation_mask(tokens, answer_pos, D, n))
