"""Writing WebDataset tar shards atomically, for the packer scripts, and keeping their paths in bounds.

Every output path must resolve under `--out`, every input path under `--root`/`--images`,
and keys are made safe for WebDataset (`safe_key`). An `--out` that already holds files is
refused unless `--overwrite`, which first removes the shards in it (`prepare_out`).
"""

from __future__ import annotations

import argparse
import io
import os
import posixpath
import tarfile
from typing import Callable, Iterable, Sequence, TypeVar

from etils import epath
from tqdm import tqdm

from nxtp_jax.errors import USER_ERRORS, NxtpError, report

T = TypeVar("T")
Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


class PackError(NxtpError, ValueError):
    """A packer input or output outside its folder, an unsafe or repeated key, or an `--out` in the way."""


def _resolved(path: str | os.PathLike) -> str:
    """A local path with symlinks and `..` resolved; a remote one (gs://...) normalised as text."""
    text = os.fspath(path)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(text)


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def inside(root: str | os.PathLike, relative: str, what: str) -> str:
    """`root/relative`, or PackError if `relative` is absolute or climbs out of `root` (`../`).

    Checked on the text, so that symlinks the folder's owner put inside `root` still work.
    """
    if not isinstance(relative, str):
        raise PackError(f"{what} must be a string, found {relative!r:.80}")
    if not relative or os.path.isabs(relative) or "://" in relative:
        raise PackError(f"{what} {relative!r} must be a path relative to {os.fspath(root)!r}; found an absolute or empty path")
    if posixpath.normpath(relative).split("/")[0] == "..":
        raise PackError(f"{what} {relative!r} climbs out of {os.fspath(root)!r}; expected a path inside it")
    return os.path.join(os.fspath(root), relative)


def output_path(out_dir: str | os.PathLike, name: str) -> str:
    """`out_dir/name`, or PackError unless it resolves to a path under `out_dir`."""
    path = os.path.join(os.fspath(out_dir), name)
    if not _is_under(_resolved(path), _resolved(out_dir)) or _resolved(path) == _resolved(out_dir):
        raise PackError(f"output {name!r} would be written at {path!r}, outside --out {os.fspath(out_dir)!r}; use a plain name")
    return path


def safe_key(name: str) -> str:
    """`name` as a WebDataset key: '%' and '.' escaped (%25, %2E), since a key ends at its first dot.

    Distinct names give distinct keys. 'a.b' would otherwise be read as key 'a', extension 'b'.
    """
    return name.replace("%", "%25").replace(".", "%2E")


def key_problem(key: str) -> str | None:
    """Why `key` cannot be written (empty, a dot in its base name, absolute, `..`), or None."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", "..") for part in parts):
        return f"expected a relative key without empty or '..' parts, found {key!r}"
    if "." in parts[-1]:
        return f"expected a key without '.' in its base name (see writer.safe_key), found {key!r}"
    return None


def prepare_out(out_dir: str | os.PathLike, overwrite: bool) -> int:
    """Make `out_dir` ready for a fresh set of shards; returns how many stale shards were removed.

    A folder that holds anything is refused (PackError) unless `overwrite`, which removes
    every `*.tar` (and unfinished `*.tar.tmp*`) under it; other files are left alone.
    """
    out = epath.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {os.fspath(out_dir)!r} is a file; expected a folder for the shards")
    if not out.exists():
        out.mkdir(parents=True)
        return 0
    entries = sorted(out.iterdir())
    if not entries:
        return 0
    if not overwrite:
        raise PackError(
            f"--out {os.fspath(out_dir)!r} is not empty ({len(entries)} entries, e.g. {entries[0].name!r}); "
            "pass --overwrite to replace its shards, or choose an empty folder"
        )
    removed = 0
    for path in _files_under(out):
        if path.name.endswith(".tar") or ".tar.tmp" in path.name:
            path.unlink()
            removed += 1
    return removed


def _files_under(directory: epath.Path) -> list[epath.Path]:
    # epath's rglob() refuses "**" on object stores. Symlinked folders are not entered, so
    # --overwrite never deletes outside --out.
    files: list[epath.Path] = []
    for child in sorted(directory.iterdir()):
        files += _files_under(child) if child.is_dir() and not os.path.islink(os.fspath(child)) else [child]
    return files


def write_shard(path: str | os.PathLike, samples: Iterable[Sample]) -> int:
    """Write one shard; the file appears under its name only once complete. Returns the sample count.

    Members are written as `key.ext`, in sample order, with fixed metadata so that the same
    samples always give the same bytes.
    """
    path = epath.Path(path)  # local, or any epath backend (gs://...)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    count = 0
    try:
        with tmp.open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                problem = key_problem(key)
                if problem:
                    raise PackError(problem)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mode = 0o644
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def shard_path(out_dir: str | os.PathLike, prefix: str, index: int) -> str:
    """`out_dir/<prefix>-<index>.tar`; PackError if the prefix leads outside `out_dir`."""
    return output_path(out_dir, f"{prefix}-{index:06d}.tar" if prefix else f"{index:06d}.tar")


def pack(
    items: Sequence[T],
    make_sample: Callable[[int, T], Sample | None],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "",
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    desc: str = "packing",
    progress: bool = True,
) -> list[str]:
    """Pack `items` into shards of `samples_per_shard`; item i goes to shard i // samples_per_shard.

    `make_sample(i, item)` returns (key, members), or None to leave the item out; two items
    with one key are a PackError. `out_dir` must be empty unless `overwrite` (see
    prepare_out). Returns all shard paths in order.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"expected samples_per_shard > 0, found {samples_per_shard}")
    num_shards = -(-len(items) // samples_per_shard)
    paths = [shard_path(out_dir, prefix, s) for s in range(num_shards)]
    prepare_out(out_dir, overwrite)
    seen: set[str] = set()
    with tqdm(total=len(items), desc=desc, unit="sample", disable=not progress) as bar:
        for s, path in enumerate(paths):
            lo, hi = s * samples_per_shard, min(len(items), (s + 1) * samples_per_shard)

            def samples(lo: int = lo, hi: int = hi) -> Iterable[Sample]:
                for i in range(lo, hi):
                    sample = make_sample(i, items[i])
                    bar.update(1)
                    if sample is None:
                        continue
                    if sample[0] in seen:
                        raise PackError(f"item {i} gives the key {sample[0]!r} a previous item has; keys must be unique")
                    seen.add(sample[0])
                    yield sample

            write_shard(path, samples())
    return paths


def packer_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
    errors: tuple[type[BaseException], ...] = USER_ERRORS,
) -> int:
    """A packer script's main: adds the flags every packer has, parses `argv`, returns `run(args)`.

    An error among `errors` is one `error: ...` line (after its traceback with --verbose), exit status 1.
    """
    parser.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty --out")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="on an error, print its traceback too")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except errors as e:
        return report(e, args.verbose)
