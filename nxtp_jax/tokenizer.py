"""LLaMA sentencepiece tokenizer with the two special tokens appended after the base vocabulary.

`<|image|>` gets id V and `<|empty|>` id V + 1, where V is the sentencepiece vocabulary size.
Special-token strings inside a text are cut out before sentencepiece sees the rest, and every
plain segment is encoded on its own, as the original does (so each segment gets its own
dummy-prefix whitespace).
"""

from __future__ import annotations

import io
import os
import pathlib
import re
from typing import Iterable, Sequence

import sentencepiece

IMAGE_TOKEN = "<|image|>"
EMPTY_TOKEN = "<|empty|>"
# The order fixes the ids: IMAGE_TOKEN = V, EMPTY_TOKEN = V + 1.
SPECIAL_TOKENS = (IMAGE_TOKEN, EMPTY_TOKEN)
LLAMA2_PIECES = 32000  # sentencepiece pieces of LLaMA-2's tokenizer.model
DELIMITER = ","

_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def _path(path: str | os.PathLike) -> pathlib.Path:
    """An `etils.epath` path (local, gs:// and the other backends); where etils is not installed
    (the ONNX runner's environment: onnxruntime, numpy, pillow, sentencepiece) a local path."""
    try:
        from etils import epath
    except ImportError:
        return pathlib.Path(path)
    return epath.Path(path)


class Tokenizer:
    """Sentencepiece model plus `<|image|>` and `<|empty|>`; pad id -1 indexes the last row."""

    pad_id: int = -1

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = _path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"expected a sentencepiece model file at {self.model_path}, found nothing there; "
                "pass the path of LLaMA's tokenizer.model (or one made with train_sentencepiece)"
            )
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"expected a sentencepiece model at {self.model_path}, found a file sentencepiece cannot read "
                f"({str(e).strip()[:200]}); pass LLaMA's tokenizer.model (or one made with train_sentencepiece)"
            ) from e
        self.num_base = self.sp.vocab_size()
        self.vocab_size = self.num_base + len(SPECIAL_TOKENS)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.image_id = self.num_base
        self.empty_id = self.num_base + 1
        self._special_to_id = {t: self.num_base + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: t for t, i in self._special_to_id.items()}
        self.delimiter_id = self.sp.piece_to_id(DELIMITER)
        if self.sp.is_unknown(self.delimiter_id):
            raise ValueError(
                f"expected the delimiter {DELIMITER!r} to be a piece of the sentencepiece model "
                f"{self.model_path}, found it is not (it maps to <unk>); use a LLaMA tokenizer or "
                "one made with train_sentencepiece, which always has it"
            )

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Ids of `text`; special-token strings become their ids, the rest goes to sentencepiece."""
        ids: list[int] = [self.bos_id] if bos else []
        # re.split with a capturing group keeps the specials at the odd indices.
        for i, segment in enumerate(_SPECIAL_SPLIT.split(text)):
            if i % 2:
                ids.append(self._special_to_id[segment])
            elif segment:
                ids.extend(self.sp.encode(segment))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: specials become their strings, each run between them is decoded alone."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"expected token ids in [0, {self.vocab_size}), found {bad[:5]}; "
                f"drop padding ({self.pad_id}) before decoding"
            )
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._id_to_special:
                parts.append(self.sp.decode(run))
                parts.append(self._id_to_special[i])
                run = []
            else:
                run.append(i)
        parts.append(self.sp.decode(run))
        return "".join(parts)


def train_sentencepiece(
    texts: Iterable[str], out_path: str | os.PathLike, vocab_size: int
) -> pathlib.Path:
    """Train a small LLaMA-like BPE model (unk=0, bos=1, eos=2, no pad, byte fallback) on `texts`.

    "," is a user-defined piece so that it is always a token of its own, as the delimiter must
    be. Training runs on one thread over all texts in order, so the model is deterministic.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(
            "expected at least one non-empty text to train the tokenizer on, found none"
        )
    out_path = _path(out_path)
    buf = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            # LLaMA's normaliser: no rewriting of the text, whitespace kept as is.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            user_defined_symbols=[DELIMITER],
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"expected sentencepiece to train a vocabulary of {vocab_size} pieces on "
            f"{len(texts)} texts, found it failed: {e}. With byte fallback the vocabulary needs "
            "more than 259 pieces, and a small corpus caps it: change vocab_size or add text"
        ) from e
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(buf.getvalue())
    return out_path
