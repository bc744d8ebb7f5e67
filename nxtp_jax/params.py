"""Parameter trees addressed by path: select, split and merge by regex.

A parameter's path is its '/'-joined key (`vision_encoder/proj/kernel`,
`language_decoder/layers_0/attention/wq/kernel`, ...); patterns must match the whole
path, and a pattern that matches nothing is an error (a typo), never a silent no-op.
Training, checkpoints and the experiment config all select parameters through here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from flax import traverse_util

ALL_ROWS = "*"  # config.embedding_rows: every token-embedding row trains


def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflat(leaves: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(leaves), sep="/")


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: expected a regular expression, found {p!r} ({e})") from e
    return compiled


def select(paths: Sequence[str], patterns: Sequence[str], what: str) -> set[str]:
    """Paths fully matched by any pattern; a pattern that matches nothing is an error (a typo)."""
    compiled = _compile(patterns, what)
    chosen = set()
    for pattern in compiled:
        hits = {p for p in paths if pattern.fullmatch(p)}
        if not hits:
            raise ValueError(
                f"{what}: the pattern {pattern.pattern!r} matches no parameter; expected it to match "
                f"a full path such as {sorted(paths)[0]!r}; fix the pattern or remove it"
            )
        chosen |= hits
    return chosen


def split(params: Mapping[str, Any], trainable: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested trees; together they hold every leaf of `params` once."""
    leaves = flat(params)
    chosen = select(list(leaves), trainable, "config.trainable")
    return (
        unflat({k: v for k, v in leaves.items() if k in chosen}),
        unflat({k: v for k, v in leaves.items() if k not in chosen}),
    )


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """The full parameter tree from the two halves made by `split`."""
    return unflat({**flat(frozen), **flat(trainable)})


def paths(tree: Mapping[str, Any]) -> list[str]:
    return sorted(flat(tree))


def matches(keys: list[str], patterns: Sequence[str], what: str) -> set[str]:
    compiled = _compile(patterns, what)
    return {k for k in keys if any(p.fullmatch(k) for p in compiled)}
