"""Prompts and text batches: token layout, swap, targets, padding, truncation, shuffling."""

import pathlib

import numpy as np
import pytest

from nxtp_jax.prompts import (
    CAPTION_TEMPLATES,
    OBJECT_TEMPLATES,
    caption_batch,
    choose_template,
    inference_prompt,
    object_batch,
)
from nxtp_jax.tokenizer import Tokenizer

IMG, BOS, EOS, PAD = 400, 1, 2, -1  # ids of the tiny conftest tokenizer (vocab 400)
FIRST = "The objects in the image are"


@pytest.fixture(scope="module")
def tok(sp_model_path: pathlib.Path) -> Tokenizer:
    return Tokenizer(sp_model_path)


def piece(tok: Tokenizer, p: str) -> int:
    i = tok.sp.piece_to_id(p)
    assert not tok.sp.is_unknown(i), f"{p!r} is not a piece of the tiny tokenizer"
    return i


@pytest.fixture(scope="module")
def words(tok: Tokenizer) -> dict[str, int]:
    return {w: piece(tok, "▁" + w) for w in ("cloud", "sky", "dog", "cat", "red", "circle", "are")}


def test_templates() -> None:
    assert len(OBJECT_TEMPLATES) == 10 and len(set(OBJECT_TEMPLATES)) == 10
    assert len(CAPTION_TEMPLATES) == 10 and len(set(CAPTION_TEMPLATES)) == 10
    assert OBJECT_TEMPLATES[0] == FIRST
    assert OBJECT_TEMPLATES[9] == "The items represented in the image are"
    assert CAPTION_TEMPLATES[0] == "A brief description of the given image is that"
    assert CAPTION_TEMPLATES[6] == "A brief, clear account of the picture shown is that"
    for t in OBJECT_TEMPLATES:
        assert t.split(" ")[-1] == "are"
    for t in CAPTION_TEMPLATES:
        assert t.endswith(" is that")


def test_choose_template() -> None:
    assert choose_template(None, OBJECT_TEMPLATES) == FIRST
    draws = [choose_template(np.random.default_rng(s), OBJECT_TEMPLATES) for s in range(200)]
    assert set(draws) == set(OBJECT_TEMPLATES)
    again = [choose_template(np.random.default_rng(s), OBJECT_TEMPLATES) for s in range(200)]
    assert draws == again
    with pytest.raises(ValueError, match="at least one template"):
        choose_template(None, ())


def test_inference_prompt_layout(tok: Tokenizer, words: dict[str, int]) -> None:
    p = inference_prompt(tok)
    assert p.dtype == np.int32
    body = tok.sp.encode(FIRST)
    assert p.tolist() == [IMG, BOS] + body
    assert p[-1] == words["are"]
    # No trailing space at inference: the last token is "▁are", not a lone "▁".
    assert tok.decode(p[2:].tolist()) == FIRST


def test_object_batch_exact_layout(tok: Tokenizer, words: dict[str, int]) -> None:
    body = tok.sp.encode(FIRST)
    w, d = words, tok.delimiter_id
    b = object_batch(tok, [["cloud", "sky", "red circle"]], max_text_len=64, template=FIRST, rng=None)
    labels = [w["cloud"], d, w["sky"], d, w["red"], w["circle"]]
    assert b.tokens.dtype == np.int32 and b.targets.dtype == np.int32 and b.answer_pos.dtype == np.int32
    assert b.tokens.tolist() == [[IMG, BOS] + body + labels + [EOS]]
    # BOS is predicted from <|image|>, the prompt and labels are targets, EOS and beyond are not.
    assert b.targets.tolist() == [[BOS] + body + labels + [PAD, PAD]]
    assert b.answer_pos.tolist() == [1 + len(body)]
    assert b.tokens[0, b.answer_pos[0]] == w["are"]
    assert b.targets[0, b.answer_pos[0]] == w["cloud"]


def test_caption_batch_keeps_eos(tok: Tokenizer) -> None:
    tpl = CAPTION_TEMPLATES[0]
    b = caption_batch(tok, ["a dog next to the cat"], max_text_len=64, template=tpl)
    body = tok.sp.encode(tpl)
    cap = tok.sp.encode("a dog next to the cat")
    assert b.tokens.tolist() == [[IMG, BOS] + body + cap + [EOS]]
    assert b.targets.tolist() == [[BOS] + body + cap + [EOS, PAD]]
    assert b.answer_pos.tolist() == [1 + len(body)]
    assert tok.decode([b.tokens[0, b.answer_pos[0]]]) == "that"


def test_padding_and_pad_to(tok: Tokenizer, words: dict[str, int]) -> None:
    n = len(tok.sp.encode(FIRST)) + 2
    b = object_batch(tok, [["dog"], ["dog", "cat"]], max_text_len=64, template=FIRST, rng=None)
    assert b.tokens.shape == (2, n + 4)
    assert b.tokens[0, n:].tolist() == [words["dog"], EOS, PAD, PAD]
    assert b.targets[0, n - 1 :].tolist() == [words["dog"], PAD, PAD, PAD, PAD]
    assert b.tokens[1, n:].tolist() == [words["dog"], tok.delimiter_id, words["cat"], EOS]
    assert b.answer_pos.tolist() == [n - 1, n - 1]

    padded = object_batch(tok, [["dog"], ["dog", "cat"]], max_text_len=64, template=FIRST, rng=None, pad_to=20)
    assert padded.tokens.shape == padded.targets.shape == (2, 20)
    np.testing.assert_array_equal(padded.tokens[:, : n + 4], b.tokens)
    np.testing.assert_array_equal(padded.targets[:, : n + 4], b.targets)
    assert (padded.tokens[:, n + 4 :] == PAD).all() and (padded.targets[:, n + 4 :] == PAD).all()
    with pytest.raises(ValueError, match=f"pad_to >= {n + 4}"):
        object_batch(tok, [["dog", "cat"]], max_text_len=64, template=FIRST, rng=None, pad_to=n + 3)


def test_truncation(tok: Tokenizer, words: dict[str, int]) -> None:
    n = len(tok.sp.encode(FIRST)) + 2
    b = object_batch(tok, [["dog", "cat"]], max_text_len=n + 2, template=FIRST, rng=None)
    assert b.tokens.shape == (1, n + 2)
    assert b.tokens[0, n:].tolist() == [words["dog"], tok.delimiter_id]
    assert b.targets[0, n - 1 :].tolist() == [words["dog"], tok.delimiter_id, PAD]
    c = caption_batch(tok, ["a dog"], max_text_len=n, template=FIRST)
    assert c.tokens[0].tolist() == inference_prompt(tok).tolist()
    assert c.targets[0, -1] == PAD
    with pytest.raises(ValueError, match=f"max_text_len >= {n}"):
        object_batch(tok, [["dog"]], max_text_len=n - 1, template=FIRST, rng=None)


def test_empty_label_list_keeps_the_trailing_space(tok: Tokenizer) -> None:
    b = object_batch(tok, [[]], max_text_len=64, template=FIRST, rng=None)
    assert b.tokens[0].tolist() == [IMG, BOS] + tok.sp.encode(FIRST + " ") + [EOS]


def label_order(tok: Tokenizer, tokens: np.ndarray, answer_pos: int) -> list[str]:
    text = tok.decode([int(t) for t in tokens[answer_pos + 1 :] if t not in (PAD, EOS)])
    return text.split(", ")


def test_shuffling(tok: Tokenizer) -> None:
    labels = [["cloud", "sky", "logo", "dog", "cat", "red"], ["tree", "car", "house", "bird", "water"]]
    kept = object_batch(tok, labels, max_text_len=64, template=FIRST, rng=None)
    for i in range(2):
        assert label_order(tok, kept.tokens[i], kept.answer_pos[i]) == labels[i]

    orders = []
    for seed in range(8):
        b = object_batch(tok, labels, max_text_len=64, template=FIRST, rng=np.random.default_rng(seed))
        again = object_batch(tok, labels, max_text_len=64, template=FIRST, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(b.tokens, again.tokens)
        got = [label_order(tok, b.tokens[i], b.answer_pos[i]) for i in range(2)]
        for i in range(2):
            assert sorted(got[i]) == sorted(labels[i])
        orders.append(tuple(map(tuple, got)))
    # 6! * 5! orders: eight seeds giving fewer than six distinct ones means no real shuffling.
    assert len(set(orders)) >= 6
    assert any(list(o[0]) != labels[0] for o in orders)
    assert any(list(o[1]) != labels[1] for o in orders)


@pytest.mark.parametrize("template", OBJECT_TEMPLATES)
def test_answer_position_for_every_template(tok: Tokenizer, template: str) -> None:
    b = object_batch(tok, [["dog", "cat"]], max_text_len=64, template=template, rng=None)
    p = inference_prompt(tok, template)
    assert b.answer_pos.tolist() == [len(p) - 1]
    assert b.tokens[0, : len(p)].tolist() == p.tolist()
    assert tok.decode([b.tokens[0, b.answer_pos[0]]]) == "are"


def test_bad_labels(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="without the delimiter"):
        object_batch(tok, [["dog, cat"]], max_text_len=64, template=FIRST, rng=None)
    with pytest.raises(TypeError, match="one sequence of label strings per sample"):
        object_batch(tok, ["dog"], max_text_len=64, template=FIRST, rng=None)


class MergingTokenizer(Tokenizer):
    """Fuses "▁are" with the token after it, as a tokenizer that merges across spaces might."""

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = super().encode(text, bos, eos)
        are = self.sp.piece_to_id("▁are")
        if not text.endswith("are") and are in ids:
            i = ids.index(are)
            ids = ids[:i] + [self.sp.piece_to_id("▁sky")] + ids[i + 2 :]
        return ids


def test_prompt_not_a_prefix_is_an_error(sp_model_path: pathlib.Path) -> None:
    tok = MergingTokenizer(sp_model_path)
    with pytest.raises(ValueError, match="answer position cannot be found"):
        object_batch(tok, [["dog"]], max_text_len=64, template=FIRST, rng=None)
