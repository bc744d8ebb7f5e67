"""Prompt templates and the text side of a batch: token ids, next-token targets, answer position.

Text layout after the swap of the first two ids (docs/method.md §2):
    [<|image|>] [BOS] [template ... are] [label_1 , label_2 , ... label_k] [EOS]
The N image embeddings go in front of it; they are not part of these arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from nxtp_jax.tokenizer import DELIMITER, IMAGE_TOKEN, Tokenizer

OBJECT_TEMPLATES: tuple[str, ...] = (
    "The objects in the image are",
    "The items present in the picture are",
    "The elements depicted in the image are",
    "The objects shown in the photograph are",
    "The items visible in the image are",
    "The objects that appear in the picture are",
    "The elements featured in the image are",
    "The items captured in the photograph are",
    "The elements seen in the picture are",
    "The items represented in the image are",
)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "A brief description of the given image is that",
    "A succinct explanation of the picture presented is that",
    "The visual content of the image in one sentence is that",
    "A short and clear explanation of the subsequent image is that",
    "A concise interpretation of the image provided is that",
    "A compact description of the photo's key features is that",
    "A brief, clear account of the picture shown is that",
    "A clear and concise summary of the photo is that",
    "A terse but informative summary of the picture is that",
    "A compact narrative representing the image presented is that",
)


@dataclasses.dataclass
class TextBatch:
    """Text ids, their next-token targets (-1 = ignored) and the answer position per sample."""

    tokens: np.ndarray
    targets: np.ndarray
    answer_pos: np.ndarray


def choose_template(rng: np.random.Generator | None, templates: Sequence[str]) -> str:
    """One template drawn with `rng`, or the first one when `rng` is None (no augmentation)."""
    if not templates:
        raise ValueError("expected at least one template, found an empty sequence")
    if rng is None:
        return templates[0]
    return templates[int(rng.integers(len(templates)))]


def _swap_image_and_bos(tok: Tokenizer, ids: list[int]) -> list[int]:
    if ids[:2] != [tok.bos_id, tok.image_id]:
        raise ValueError(
            f"expected the text to start with [BOS={tok.bos_id}, <|image|>={tok.image_id}], "
            f"found {ids[:2]}; build texts as <|image|> + template and encode them with bos=True"
        )
    return [ids[1], ids[0]] + ids[2:]


def inference_prompt(tok: Tokenizer, template: str = OBJECT_TEMPLATES[0]) -> np.ndarray:
    """int32 [P]: [<|image|>, BOS, template...]; the answer is predicted from position P - 1."""
    ids = tok.encode(IMAGE_TOKEN + template, bos=True, eos=False)
    return np.asarray(_swap_image_and_bos(tok, ids), dtype=np.int32)


def _build(
    tok: Tokenizer,
    bodies: Sequence[str],
    *,
    template: str,
    max_text_len: int,
    pad_to: int | None,
    eos_is_target: bool,
) -> TextBatch:
    prompt = inference_prompt(tok, template).tolist()
    if max_text_len < len(prompt):
        raise ValueError(
            f"expected max_text_len >= {len(prompt)} (the prompt {template!r} alone takes "
            f"{len(prompt)} tokens), found {max_text_len}; raise max_text_len"
        )
    # Training appends " " + body even when body is empty; inference has no trailing space.
    seqs = []
    for body in bodies:
        ids = tok.encode(IMAGE_TOKEN + template + " " + body, bos=True, eos=True)[:max_text_len]
        ids = _swap_image_and_bos(tok, ids)
        if ids[: len(prompt)] != prompt:
            raise ValueError(
                f"expected the ids of {template + ' ' + body!r} to start with the ids of the "
                f"prompt {template!r} ({prompt}), found {ids[: len(prompt)]}; the tokenizer "
                "merges the prompt's last token with the text after it, so the answer position "
                "cannot be found"
            )
        seqs.append(ids)

    longest = max((len(s) for s in seqs), default=0)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(
            f"expected pad_to >= {longest} (the longest text in the batch), found {pad_to}; "
            f"use pad_to >= max_text_len ({max_text_len})"
        )
    tokens = np.full((len(seqs), length), tok.pad_id, dtype=np.int32)
    targets = np.full((len(seqs), length), tok.pad_id, dtype=np.int32)
    for b, ids in enumerate(seqs):
        tokens[b, : len(ids)] = ids
        targets[b, : len(ids) - 1] = ids[1:]
    if not eos_is_target:
        targets[targets == tok.eos_id] = tok.pad_id
    answer_pos = np.full((len(seqs),), len(prompt) - 1, dtype=np.int32)
    return TextBatch(tokens=tokens, targets=targets, answer_pos=answer_pos)


def object_batch(
    tok: Tokenizer,
    labels: Sequence[Sequence[str]],
    *,
    max_text_len: int,
    template: str,
    rng: np.random.Generator | None,
    pad_to: int | None = None,
) -> TextBatch:
    """Object branch: template + " " + ", ".join(labels), EOS appended but not a target.

    With `rng`, each sample's labels are shuffled (one draw per sample, in batch order);
    with None they keep the given order.
    """
    if isinstance(labels, str) or any(isinstance(ls, str) for ls in labels):
        raise TypeError(
            "expected labels as one sequence of label strings per sample, found a plain string; "
            'wrap it, e.g. [["dog", "cat"]]'
        )
    bodies = []
    for sample in labels:
        sample = list(sample)
        bad = [label for label in sample if DELIMITER in label]
        if bad:
            raise ValueError(
                f"expected labels without the delimiter {DELIMITER!r}, found {bad}; "
                "split them into separate labels"
            )
        if rng is not None:
            sample = [sample[i] for i in rng.permutation(len(sample))]
        bodies.append(", ".join(sample))
    return _build(
        tok,
        bodies,
        template=template,
        max_text_len=max_text_len,
        pad_to=pad_to,
        eos_is_target=False,
    )


def caption_batch(
    tok: Tokenizer,
    captions: Sequence[str],
    *,
    max_text_len: int,
    template: str,
    pad_to: int | None = None,
) -> TextBatch:
    """Caption branch: template + " " + caption, with EOS kept as a target."""
    if isinstance(captions, str):
        raise TypeError(f"expected a sequence of captions, found the string {captions!r}; wrap it")
    return _build(
        tok,
        list(captions),
        template=template,
        max_text_len=max_text_len,
        pad_to=pad_to,
        eos_is_target=True,
    )
