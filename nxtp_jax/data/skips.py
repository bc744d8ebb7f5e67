"""Drop skipped samples from a stream and carry their counts on the next good element.

Each element gets `"skipped"` (bad samples dropped just before it) and `"skipped_by_kind"`
(the same, per kind in `samples.SKIP_KINDS`). Summing them over batches gives exact totals
even across grain worker processes, so the trainer can log them with its metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import grain
import numpy as np

from nxtp_jax.data.samples import SKIP_KINDS, Skip

log = logging.getLogger(__name__)


def skip_fields(counts: Mapping[str, int]) -> dict[str, Any]:
    """The `skipped` and `skipped_by_kind` fields for the given per-kind counts."""
    by_kind = {kind: np.int32(counts.get(kind, 0)) for kind in SKIP_KINDS}
    return {"skipped": np.int32(sum(by_kind.values())), "skipped_by_kind": by_kind}


def skip_summary(batch: Mapping[str, Any]) -> dict[str, int]:
    """Per-kind and total skip counts of a batch (or of one element), as Python ints."""
    by_kind = {kind: int(np.sum(batch["skipped_by_kind"][kind])) for kind in SKIP_KINDS}
    return {"skipped": int(np.sum(batch["skipped"])), **{f"skipped/{k}": v for k, v in by_kind.items()}}


class SkipCountingIterDataset(grain.IterDataset):
    """Drops `samples.Skip` items, logs the first of each kind, counts the rest."""

    def __init__(self, parent: grain.IterDataset, max_consecutive_skips: int = 10_000):
        super().__init__(parent)
        self.max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> "SkipCountingIterator":
        return SkipCountingIterator(self._parent.__iter__(), self.max_consecutive_skips)

    def __str__(self) -> str:
        return f"SkipCountingIterDataset(max_consecutive_skips={self.max_consecutive_skips})"


class SkipCountingIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int):
        super().__init__(parent)
        self._max = max_consecutive_skips
        self._pending = {kind: 0 for kind in SKIP_KINDS}
        self._warned: set[str] = set()

    def __next__(self) -> dict[str, Any]:
        while True:
            item = next(self._parent)
            if not isinstance(item, Skip):
                item.update(skip_fields(self._pending))
                self._pending = {kind: 0 for kind in SKIP_KINDS}
                return item
            if item.kind not in self._pending:
                raise ValueError(f"expected a skip kind in {SKIP_KINDS}, found {item.kind!r}")
            self._pending[item.kind] += 1
            if item.kind not in self._warned:
                self._warned.add(item.kind)
                log.warning(
                    "skipping bad sample (%s) %s: %s. Further '%s' samples are counted in the "
                    "batch field 'skipped_by_kind', not logged.",
                    item.kind, item.where, item.message, item.kind,
                )
            if sum(self._pending.values()) > self._max:
                raise RuntimeError(
                    f"{sum(self._pending.values())} bad samples in a row (last: {item.kind} at "
                    f"{item.where}: {item.message}); the data is broken, not noisy. Check it "
                    "with `python -m nxtp_jax.data.check SHARD_DIR`."
                )

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "pending": [self._pending[k] for k in SKIP_KINDS]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = {kind: int(n) for kind, n in zip(SKIP_KINDS, state["pending"])}
