"""Dataset names to shard lists: a registry `name -> {"root", "length"}` kept in the config."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from etils import epath


def _real(path: epath.Path) -> str:
    """A local path with its symlinks resolved; a remote one (gs://...) as it is."""
    text = os.fspath(path)
    return text if "://" in text else os.path.realpath(text)


def _tars_under(directory: epath.Path, seen: set[str]) -> list[str]:
    # Not epath's walk(): on fsspec backends it drops the gs:// scheme from the roots it yields.
    # A directory reached again through a symlink (a cycle, or two links to one folder) is
    # walked once.
    real = _real(directory)
    if real in seen:
        return []
    seen.add(real)
    found: list[str] = []
    for child in sorted(directory.iterdir()):
        if child.is_dir():
            found += _tars_under(child, seen)
        elif child.name.endswith(".tar"):
            found.append(os.fspath(child))
    return found


def find_shards(path: str | os.PathLike) -> list[str]:
    """A `.tar` file itself, or every `*.tar` under a directory (recursively, sorted); local or any epath backend (gs://...).

    Symlinks are followed, each directory once, and a shard reachable by several paths is
    listed once (under the first path found), so no shard is read twice per epoch.
    """
    path = os.fspath(path)
    if epath.Path(path).is_file():
        return [path]
    if not epath.Path(path).is_dir():
        raise FileNotFoundError(f"expected a .tar shard or a directory of them, found nothing at {path!r}")
    shards, reals = [], set()
    for shard in sorted(_tars_under(epath.Path(path), set())):
        real = _real(epath.Path(shard))
        if real not in reals:
            reals.add(real)
            shards.append(shard)
    if not shards:
        raise FileNotFoundError(f"expected *.tar shards under {path!r}, found none; see docs/data.md to pack some")
    return shards


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _entry(name: str, registry: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
    key = name.lower()
    if key not in registry:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(registry)} (add it to the config's registry)")
    entry = registry[key]
    if "root" not in entry or "length" not in entry:
        raise ValueError(f'registry entry {name!r} must have "root" and "length", found {dict(entry)}')
    return entry


def resolve_shards(
    names: str | Sequence[str], data_root: str | os.PathLike, registry: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """All shards of the named datasets (mixed in one list), under `data_root/<root>`."""
    shards: list[str] = []
    for name in _names(names):
        root = os.path.join(os.fspath(data_root), _entry(name, registry)["root"])
        if not epath.Path(root).is_dir():
            raise FileNotFoundError(
                f"dataset {name!r}: expected a directory of *.tar shards at {root!r}, found none; "
                "check data_root, or pack the dataset as described in docs/data.md"
            )
        shards.extend(find_shards(root))
    return shards


def total_length(names: str | Sequence[str], registry: Mapping[str, Mapping[str, Any]]) -> int:
    """Number of samples of the named datasets together, as the registry states it."""
    return sum(int(_entry(name, registry)["length"]) for name in _names(names))
