"""Tokenizer: special tokens, round trips, the derived delimiter and the error messages."""

import pathlib

import pytest
import sentencepiece

from nxtp_jax.tokenizer import EMPTY_TOKEN, IMAGE_TOKEN, Tokenizer, train_sentencepiece

TINY_VOCAB = 400  # the size conftest.sp_model_path trains


@pytest.fixture(scope="module")
def tok(sp_model_path: pathlib.Path) -> Tokenizer:
    return Tokenizer(sp_model_path)


def test_ids_and_sizes(tok: Tokenizer) -> None:
    assert tok.num_base == TINY_VOCAB
    assert tok.vocab_size == TINY_VOCAB + 2
    assert (tok.image_id, tok.empty_id) == (TINY_VOCAB, TINY_VOCAB + 1)
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.sp.pad_id() == -1
    # The pad id wraps around to the last row of a V + 2 table: <|empty|>.
    assert list(range(tok.vocab_size))[tok.pad_id] == tok.empty_id


def test_delimiter_is_the_comma_piece(tok: Tokenizer) -> None:
    assert tok.sp.id_to_piece(tok.delimiter_id) == ","
    ids = tok.encode("dog, cat", bos=False, eos=False)
    assert ids == [tok.sp.piece_to_id("▁dog"), tok.delimiter_id, tok.sp.piece_to_id("▁cat")]


def test_specials_inside_text_become_their_ids(tok: Tokenizer) -> None:
    sp = tok.sp
    text = "<|image|>The objects<|empty|> dog<|image|>"
    expected = [1, TINY_VOCAB] + sp.encode("The objects") + [TINY_VOCAB + 1] + sp.encode(" dog") + [TINY_VOCAB, 2]
    assert tok.encode(text, bos=True, eos=True) == expected
    assert tok.encode(IMAGE_TOKEN, bos=False, eos=False) == [TINY_VOCAB]
    assert tok.encode(EMPTY_TOKEN + EMPTY_TOKEN, bos=False, eos=False) == [TINY_VOCAB + 1] * 2


def test_bos_eos_flags(tok: Tokenizer) -> None:
    plain = tok.sp.encode("red circle")
    assert tok.encode("red circle", bos=False, eos=False) == plain
    assert tok.encode("red circle", bos=True, eos=False) == [1] + plain
    assert tok.encode("red circle", bos=False, eos=True) == plain + [2]
    assert tok.encode("", bos=True, eos=True) == [1, 2]


def test_each_segment_gets_its_own_dummy_prefix(tok: Tokenizer) -> None:
    # As in the original, the text after a special is encoded alone, so "The" is "▁The".
    ids = tok.encode("<|image|>The", bos=False, eos=False)
    assert ids == [TINY_VOCAB, tok.sp.piece_to_id("▁The")]


@pytest.mark.parametrize(
    "text",
    [
        "The objects in the image are cloud, sky, red circle",
        "<|image|>The objects in the image are cloud, sky",
        "<|image|><|empty|>dog, cat<|image|>",
        "a blue square<|empty|>green triangle",
    ],
)
def test_decode_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_decode_drops_bos_eos_and_keeps_specials(tok: Tokenizer) -> None:
    ids = [TINY_VOCAB, 1] + tok.sp.encode("dog, cat") + [2]
    assert tok.decode(ids) == "<|image|>dog, cat"


def test_decode_rejects_padding(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"\[0, 402\).*-1"):
        tok.decode([5, -1])


def test_missing_file_error_names_the_path(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.model"):
        Tokenizer(missing)


def test_model_without_comma_piece_is_rejected(tmp_path: pathlib.Path) -> None:
    prefix = tmp_path / "nocomma"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["dog cat red blue circle square"] * 20),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=290,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="delimiter ','.*not"):
        Tokenizer(f"{prefix}.model")


def test_train_sentencepiece_is_deterministic_and_llama_like(tmp_path: pathlib.Path) -> None:
    texts = ["a dog, a cat", "the red circle, the blue square", "clouds in the sky, logo"] * 5
    a = train_sentencepiece(texts, tmp_path / "a.model", 300)
    b = train_sentencepiece(texts, tmp_path / "b" / "b.model", 300)
    assert a == tmp_path / "a.model"
    assert a.read_bytes() == b.read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(a))
    assert sp.vocab_size() == 300
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    # Byte fallback: an unseen character becomes its UTF-8 bytes, not <unk>.
    assert sp.encode("é", out_type=str)[-2:] == ["<0xC3>", "<0xA9>"]
    assert sp.id_to_piece(sp.piece_to_id(",")) == ","


def test_train_sentencepiece_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="vocabulary of 5000 pieces"):
        train_sentencepiece(["a dog, a cat"], tmp_path / "big.model", 5000)
    with pytest.raises(ValueError, match="non-empty text"):
        train_sentencepiece(["", ""], tmp_path / "empty.model", 300)
