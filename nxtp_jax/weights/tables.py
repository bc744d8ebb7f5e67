"""Key tables: every source key is consumed by a rule or dropped by a named rule, nothing else.

A `Rule` maps one source key (with its expected shape) to one Flax param path (slash
separated, e.g. `language_decoder/layers_0/attention/wq/kernel`) through a transform.
`apply_table` checks the whole source against the table before reading any tensor, so
a wrong file fails fast and names the key, the expected shape and the found shape.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from nxtp_jax.errors import WeightImportError
from nxtp_jax.weights.sources import TensorSource

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax kernel [in, out]."""
    return x.T


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
    return x.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str
    shape: tuple[int, ...]
    transform: Transform = identity


@dataclasses.dataclass
class Table:
    """Rules, plus the keys dropped on purpose: exact keys and regular expressions, each with its reason."""

    rules: list[Rule] = dataclasses.field(default_factory=list)
    drops: dict[str, str] = dataclasses.field(default_factory=dict)
    drop_patterns: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def extend(self, other: "Table") -> "Table":
        self.rules += other.rules
        self.drops.update(other.drops)
        self.drop_patterns += other.drop_patterns
        return self

    def drop_reason(self, key: str) -> str | None:
        if key in self.drops:
            return self.drops[key]
        for pattern, reason in self.drop_patterns:
            if re.fullmatch(pattern, key):
                return reason
        return None


@dataclasses.dataclass
class SourceReport:
    """What one source gave: kept keys (-> Flax path) and dropped keys (-> reason)."""

    name: str
    files: list[str]
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)

    def drop_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.dropped.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: Flax's nested param dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _first(items: list[str], n: int = 8) -> str:
    more = f" ... ({len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def apply_table(
    source: TensorSource,
    table: Table,
    *,
    superseded: Mapping[str, str] | None = None,
    require_all: bool = True,
) -> tuple[dict[str, np.ndarray], SourceReport]:
    """Reads the params `table` maps from `source` as float32 numpy arrays, keyed by Flax path.

    `superseded` maps Flax paths that another source provides to that source's name: their
    source keys are validated but not read, and reported as dropped. With `require_all`,
    every rule whose target is not superseded must find its key.
    """
    superseded = superseded or {}
    keys = set(source.keys())
    by_source: dict[str, Rule] = {}
    for rule in table.rules:
        if rule.source in by_source:
            raise AssertionError(f"importer table maps {rule.source} twice")
        by_source[rule.source] = rule

    missing = [r for r in table.rules if r.source not in keys and r.target not in superseded]
    if require_all and missing:
        raise WeightImportError(
            f"{source.name}: {len(missing)} expected key(s) not found ({source.where}): "
            + _first([f"{r.source} {r.shape} for {r.target}" for r in missing])
            + f". Check that this is the {source.name} checkpoint the model needs"
        )

    unknown = sorted(k for k in keys if k not in by_source and table.drop_reason(k) is None)
    if unknown:
        raise WeightImportError(
            f"{source.name}: {len(unknown)} key(s) belong nowhere in the model and match no drop rule "
            f"({source.where}): " + _first(unknown)
            + ". Expected only the keys of the layout this importer reads; check the file and the flags"
        )

    bad = [
        f"{k}: expected shape {by_source[k].shape}, found {source.shape(k)}"
        for k in sorted(keys & by_source.keys())
        if source.shape(k) != by_source[k].shape
    ]
    if bad:
        raise WeightImportError(
            f"{source.name}: shape mismatch ({source.where}): " + _first(bad)
            + ". The checkpoint does not match the configuration inferred for it; check the files and the flags"
        )

    report = SourceReport(source.name, list(source.files))
    params: dict[str, np.ndarray] = {}
    for key in sorted(keys):
        rule = by_source.get(key)
        if rule is None:
            report.dropped[key] = table.drop_reason(key) or ""
        elif rule.target in superseded:
            report.dropped[key] = f"superseded by {superseded[rule.target]}"
        else:
            params[rule.target] = rule.transform(source.read(key))
            report.kept[key] = rule.target
    return params, report
