"""Semantic F-score (docs/method.md §6): label-set recall, precision and F1 under embedding similarity.

Per image, with S the [targets x predictions] similarity matrix:
    R = mean over targets of the row max,  P = mean over predictions of the column max,
    F = 2RP / (R + P), and 0 when R + P == 0.
The diversity of an image is the mean and the unbiased (N-1) std of the strict upper
triangle of the [predictions x predictions] similarities; a mean over no pair and a std
over fewer than two pairs are 0, as the original's `nan_to_num(0)` made them.
Dataset numbers are plain means of the per-image numbers.

An empty prediction list counts as [""]. So does an empty target list: the original
derived targets as `",".join(nouns).split(",")`, which is [""] for a caption with no noun.
Duplicates are kept on both sides: they weigh in the means as often as they occur.

Distributed evaluation: every host runs its own `SemanticFScore` on its images and sends
`state()` (five float64 arrays, one entry per image) to one host, which calls `merge`
for each and then `compute()`. Sums use `math.fsum`, so the result is the same as one
metric over all images, whatever the order of the images and of the merges.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from nxtp_jax.evaluation.embedders import Embedder, make_embedder

STATE_KEYS = ("recall", "precision", "f1", "div_avg", "div_std")


def fscore(sim: np.ndarray) -> tuple[float, float, float]:
    """(R, P, F) of one [targets x predictions] similarity matrix."""
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"expected a non-empty [targets, predictions] matrix, found shape {sim.shape}")
    recall = float(sim.max(axis=1).mean())
    precision = float(sim.max(axis=0).mean())
    total = recall + precision
    return recall, precision, (2.0 * recall * precision / total if total != 0.0 else 0.0)


def diversity(sim: np.ndarray) -> tuple[list[float], float, float]:
    """(pair similarities, mean, unbiased std) from the strict upper triangle of [N x N]."""
    values = sim[np.triu_indices(sim.shape[0], k=1)]
    mean = float(values.mean()) if values.size >= 1 else 0.0
    std = float(values.std(ddof=1)) if values.size >= 2 else 0.0
    return values.tolist(), mean, std


def summarize(state: Mapping[str, Sequence[float]]) -> dict:
    """Dataset means of a `SemanticFScore.state()`."""
    n = len(state["recall"])
    if n == 0:
        raise ValueError("expected at least one image in the metric state, found none; call update() first")
    out = {key: math.fsum(state[key]) / n for key in STATE_KEYS}
    out["num_images"] = n
    return out


def _check_label_lists(name: str, lists: Sequence[Sequence[str]]) -> None:
    if isinstance(lists, str):
        raise TypeError(f"expected {name} as a list of label lists (one per image), found a str")
    for i, labels in enumerate(lists):
        if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
            raise TypeError(
                f"expected {name}[{i}] to be a list of str labels, found {labels!r}; "
                "pass one list of labels per image"
            )


class SemanticFScore:
    """Accumulates the Semantic F-score over images; embeddings are cached per string.

    `embedder` is "minilm" (the paper's all-MiniLM-L6-v2), "exact" (string equality),
    "clip" (OpenAI CLIP text tower; needs `clip_archive`) or an `Embedder`. Only strings
    not seen before are embedded, in batches of `batch_size` (sorted by length, which
    keeps padding short). The model embedders run on `device` (a jax.Device or platform
    name; None: the default backend's first device).
    """

    def __init__(
        self,
        embedder: str | Embedder = "minilm",
        *,
        batch_size: int = 256,
        device: Any = None,
        clip_archive: str | os.PathLike | None = None,
        bpe_path: str | os.PathLike | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, found {batch_size}")
        if isinstance(embedder, str):
            embedder = make_embedder(embedder, device=device, clip_archive=clip_archive, bpe_path=bpe_path)
        elif not isinstance(embedder, Embedder):
            raise TypeError(
                f"expected embedder as a name or an nxtp_jax.evaluation.embedders.Embedder, found {type(embedder).__name__}"
            )
        self.embedder = embedder
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}
        self.num_embedded = 0
        self.reset()

    def reset(self) -> None:
        """Forget the images seen so far (the embedding cache stays)."""
        self._state: dict[str, list[float]] = {key: [] for key in STATE_KEYS}

    @property
    def num_images(self) -> int:
        return len(self._state["recall"])

    def _embed_new(self, texts: set[str]) -> None:
        new = sorted((t for t in texts if t not in self._cache), key=lambda t: (len(t), t))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start : start + self.batch_size]
            rows = self.embedder.embed(chunk)
            self._cache.update(zip(chunk, rows))
        self.num_embedded += len(new)

    def _rows(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._cache[t] for t in texts])

    def update(self, predictions: Sequence[Sequence[str]], targets: Sequence[Sequence[str]]) -> list[dict]:
        """Scores one batch of images and adds them to the state; returns one record per image.

        A record holds the `targets` and `predictions` as scored (empty lists replaced by
        [""]), `recall`, `precision`, `f1`, `scores` (the [targets][predictions] matrix as
        nested lists), `div_scores` (the strict upper-triangle pair similarities, row by
        row), `div_avg` and `div_std`.
        """
        _check_label_lists("predictions", predictions)
        _check_label_lists("targets", targets)
        if len(predictions) != len(targets):
            raise ValueError(
                f"expected one prediction list per target list, found {len(predictions)} "
                f"prediction lists and {len(targets)} target lists"
            )
        preds = [list(p) if len(p) else [""] for p in predictions]
        tgts = [list(t) if len(t) else [""] for t in targets]
        self._embed_new({s for labels in preds + tgts for s in labels})

        records = []
        for p, t in zip(preds, tgts):
            x_p, x_t = self._rows(p), self._rows(t)
            sim = self.embedder.similarity(x_t, x_p)
            recall, precision, f1 = fscore(sim)
            div_scores, div_avg, div_std = diversity(self.embedder.similarity(x_p, x_p))
            records.append(
                {
                    "targets": t,
                    "predictions": p,
                    "recall": recall,
                    "precision": precision,
                    "f1": f1,
                    "scores": sim.tolist(),
                    "div_scores": div_scores,
                    "div_avg": div_avg,
                    "div_std": div_std,
                }
            )
        for record in records:
            for key in STATE_KEYS:
                self._state[key].append(record[key])
        return records

    def compute(self) -> dict:
        """Means over all images: recall, precision, f1, div_avg, div_std, and num_images."""
        return summarize(self._state)

    def state(self) -> dict[str, np.ndarray]:
        """Per-image float64 arrays under STATE_KEYS, in update order; what `merge` takes."""
        return {key: np.asarray(values, dtype=np.float64) for key, values in self._state.items()}

    def merge(self, other: SemanticFScore | Mapping[str, Sequence[float]]) -> None:
        """Adds the images of another metric, or of a `state()` from another host."""
        state = other.state() if isinstance(other, SemanticFScore) else other
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise KeyError(f"expected a metric state with keys {list(STATE_KEYS)}, missing {missing}")
        lengths = {key: len(state[key]) for key in STATE_KEYS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"expected one entry per image under every key, found lengths {lengths}")
        for key in STATE_KEYS:
            self._state[key].extend(float(v) for v in state[key])
