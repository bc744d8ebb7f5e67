"""Host side of a training batch: label shuffling, tokenisation, and the global arrays.

Randomness is stateless, so a resumed or re-sharded run draws the same: each sample's
label order comes from (seed, key, epoch) and each batch's prompt template from
(seed, step), the same on every process.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from nxtp_jax import prompts
from nxtp_jax.data import pipeline
from nxtp_jax.tokenizer import Tokenizer

LABEL_SEPARATOR = ","


def split_labels(field: Any) -> list[str]:
    """The pipeline's comma-joined label string -> labels (empty ones dropped)."""
    return [label for label in str(field).split(LABEL_SEPARATOR) if label]


def shuffle_labels(element: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """sample_transform: permutes the sample's labels with a generator seeded by (seed, key, epoch)."""
    labels = split_labels(element["labels"])
    order = pipeline.sample_rng(element, seed).permutation(len(labels))
    return {**element, "labels": LABEL_SEPARATOR.join(labels[i] for i in order)}


def template_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, 0x7E3])


def batch_spec(batch_size: int, *, image_size: int, text_len: int, captions: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every array of a train-step batch: `model_inputs` builds its arrays to it, and
    the compile check (nxtp_jax/aot) compiles against it, so the two cannot drift apart."""
    rows, text = (batch_size,), (batch_size, text_len)
    shapes = {
        "image": ((batch_size, image_size, image_size, 3), np.uint8),
        "skipped": (rows, np.int32),
        "tokens": (text, np.int32),
        "targets": (text, np.int32),
        "answer_pos": (rows, np.int32),
    }
    if captions:
        shapes.update(cap_tokens=(text, np.int32), cap_targets=(text, np.int32))
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def model_inputs(
    tokenizer: Tokenizer,
    batch: Mapping[str, Any],
    *,
    step: int,
    seed: int,
    augment: bool,
    text_len: int,
    captions: bool,
) -> dict[str, np.ndarray]:
    """The arrays the train step takes, from one process-local pipeline batch, as `batch_spec` says.

    One prompt template per batch (drawn from seed and step if `augment`); labels keep the
    order they arrive in (shuffled upstream by `shuffle_labels`); every text array is padded
    to `text_len`, so all batches have one static shape. The caption branch's arrays too if `captions`.
    """
    rng = template_rng(seed, step) if augment else None
    template = prompts.choose_template(rng, prompts.OBJECT_TEMPLATES)
    labels = [split_labels(field) for field in batch["labels"]]
    obj = prompts.object_batch(tokenizer, labels, max_text_len=text_len, template=template, rng=None, pad_to=text_len)
    arrays = {
        "image": batch["image"], "skipped": batch["skipped"],
        "tokens": obj.tokens, "targets": obj.targets, "answer_pos": obj.answer_pos,
    }
    if captions:
        cap_template = prompts.choose_template(rng, prompts.CAPTION_TEMPLATES)
        cap = prompts.caption_batch(
            tokenizer, [str(c) for c in batch["caption"]], max_text_len=text_len, template=cap_template, pad_to=text_len
        )
        arrays.update(cap_tokens=cap.tokens, cap_targets=cap.targets)
    image = np.shape(batch["image"])
    spec = batch_spec(image[0], image_size=image[1], text_len=text_len, captions=captions)
    out = {k: np.asarray(arrays[k], s.dtype) for k, s in spec.items()}
    wrong = {k: v.shape for k, v in out.items() if v.shape != spec[k].shape}
    if wrong:
        raise ValueError(f"expected batch arrays of shapes {({k: spec[k].shape for k in wrong})}, found {wrong}")
    return out


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Process-local rows -> global arrays over the batch sharding (every process calls this)."""
    n = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
        for k, v in local.items()
    }
