"""From sampled tokens to ranked labels (docs/method.md §4 steps 5-7, and §5: Appendix A of the paper).

A *group* is the tokens of one label including its closing delimiter, with the
probabilities they were sampled with. Groups that decode to the same text are merged,
and the labels are ranked by one of:

- `prob` (default, Eq. A.2): sum over the merged groups of the product of their probabilities;
- `ppl` (Eq. A.3): per group exp(mean log p), the minimum over the merged groups, sorted
  ascending, exactly as the original code does;
- `sim` (Eq. A.4/A.5): similarity between the label's token embeddings and the image tokens,
  averaged over the merged groups (`mean` reduction on Euclidean distances, or `max`);
- `none`: the order in which the labels were first sampled.

(`clip` re-ranking needs the CLIP towers and lives with the evaluation.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from nxtp_jax.choices import RANKINGS
from nxtp_jax.tokenizer import Tokenizer



@dataclasses.dataclass(frozen=True)
class Group:
    tokens: tuple[int, ...]  # the label's tokens and its delimiter
    probs: tuple[float, ...]  # one per sampled token; a forced delimiter has none (factor 1)


def groups_from_branches(tokens: np.ndarray, probs: np.ndarray, delimiter_id: int) -> list[Group]:
    """One-shot branches [k, U] -> one group per branch, cut at its first delimiter.

    A branch with no delimiter among its U sampled tokens gets a forced one. A branch whose
    first token is -1 does not exist (a closed vocabulary with fewer than k first tokens).
    """
    groups = []
    for toks, ps in zip(np.asarray(tokens).tolist(), np.asarray(probs).tolist()):
        if toks[0] < 0:
            continue
        if delimiter_id in toks:
            end = toks.index(delimiter_id) + 1
            groups.append(Group(tuple(toks[:end]), tuple(ps[:end])))
        else:
            groups.append(Group(tuple(toks) + (delimiter_id,), tuple(ps)))
    return groups


def groups_from_stream(tokens: Sequence[int], probs: Sequence[float], delimiter_id: int) -> list[Group]:
    """A generated stream (greedy / beam) -> groups split at delimiters; a trailing unfinished label is dropped."""
    groups, start = [], 0
    for i, t in enumerate(tokens):
        if t == delimiter_id:
            groups.append(Group(tuple(tokens[start : i + 1]), tuple(probs[start : i + 1])))
            start = i + 1
    return groups


def check_num_labels(num_labels: Any) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"expected num_labels >= 1 (labels per image), found {num_labels!r}")


def check_predict(images: Any, num_labels: Any, min_prob: float, method: str) -> None:
    """What every tagger's `predict` checks before any work: a sequence of images (not one image),
    `num_labels` and `min_prob` (`check_threshold`)."""
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        raise TypeError("expected a sequence of images; wrap a single image in a list")
    check_num_labels(num_labels)
    check_threshold(min_prob, method)


def check_threshold(min_prob: float, method: str) -> None:
    """Raises ValueError unless `min_prob` is a probability, and 0 for rankings whose scores are not probabilities."""
    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float, np.floating, np.integer)) or not 0 <= min_prob <= 1:
        raise ValueError(f"expected min_prob in [0, 1], found {min_prob!r}")
    if min_prob > 0 and method != "prob":
        raise ValueError(f"expected min_prob 0 with ranking {method!r} (its scores are not probabilities), found {min_prob}; rank by 'prob'")


def threshold(ranked: Sequence[tuple[str, float]], num_labels: int | None, min_prob: float = 0.0) -> list[tuple[str, float]]:
    """The first `num_labels` (None: all) ranked labels, less those scored below `min_prob` (> 0: ranking 'prob')."""
    kept = [(label, score) for label, score in ranked if score >= min_prob] if min_prob > 0 else list(ranked)
    return kept[:num_labels]


def rank(
    groups: Sequence[Group],
    tokenizer: Tokenizer,
    method: str = "prob",
    *,
    image_tokens: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    sim_reduction: str = "mean",
    sim_euclidean: bool = True,
    sim_fscore: bool = False,
) -> list[tuple[str, float]]:
    """Merges groups by decoded text and ranks them. Returns [(label, score)], best first.

    `image_tokens` [N, D] (the projected image tokens) and `embeddings` (the token
    embedding table) are needed by `sim` only.
    """
    if method not in RANKINGS:
        raise ValueError(f"unknown ranking {method!r}; expected one of {RANKINGS} (or 'clip' in evaluation)")
    merged: dict[str, list[Group]] = {}
    for g in groups:
        merged.setdefault(tokenizer.decode(list(g.tokens)), []).append(g)

    if method == "prob":
        scores = {key: float(sum(np.prod(np.asarray(g.probs, np.float32)) for g in gs)) for key, gs in merged.items()}
        order = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    elif method == "ppl":
        scores = {
            key: float(min(np.exp(np.mean(np.log(np.asarray(g.probs, np.float32)))) for g in gs))
            for key, gs in merged.items()
        }
        order = sorted(scores.items(), key=lambda kv: kv[1])
    elif method == "sim":
        if image_tokens is None or embeddings is None:
            raise ValueError("ranking 'sim' needs image_tokens and embeddings")
        if sim_reduction == "mean" and not sim_euclidean:
            raise ValueError("the 'mean' reduction needs Euclidean distances (sim_euclidean=True), as in the original")
        scores = {
            key: float(
                np.mean([_similarity(embeddings[list(g.tokens)], image_tokens, sim_reduction, sim_euclidean, sim_fscore) for g in gs])
            )
            for key, gs in merged.items()
        }
        # Distances rank ascending, cosine similarities descending.
        order = sorted(scores.items(), key=lambda kv: kv[1], reverse=not sim_euclidean)
    else:
        order = [(key, 0.0) for key in merged]
    return [(key.replace(",", ""), score) for key, score in order]


def _similarity(label_emb: np.ndarray, image_tokens: np.ndarray, reduction: str, euclidean: bool, fscore: bool) -> float:
    t = label_emb / np.linalg.norm(label_emb, axis=-1, keepdims=True)
    v = image_tokens / np.linalg.norm(image_tokens, axis=-1, keepdims=True)
    m = t.astype(np.float32) @ v.astype(np.float32).T  # [n label tokens, N image tokens]
    if euclidean:
        m = np.sqrt(np.maximum(2 - 2 * m, 0)) / 2  # in [0, 1], 0 = identical
    if reduction == "mean":
        return float(m.mean())
    recall = m.max(axis=1).mean()
    if not fscore:
        return float(recall)
    precision = m.max(axis=0).mean()
    return float(2 * precision * recall / (precision + recall))
