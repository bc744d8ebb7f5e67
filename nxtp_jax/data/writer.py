"""Writing WebDataset tar shards, atomically and resumably, for the packer scripts."""

from __future__ import annotations

import io
import os
import tarfile
from typing import Callable, Iterable, Sequence, TypeVar

from etils import epath
from tqdm import tqdm

T = TypeVar("T")
Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


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
                if "." in os.path.basename(key) or not key:
                    raise ValueError(f"expected a non-empty key without '.', found {key!r}")
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
    name = f"{prefix}-{index:06d}.tar" if prefix else f"{index:06d}.tar"
    return os.path.join(os.fspath(out_dir), name)


def pack(
    items: Sequence[T],
    make_sample: Callable[[int, T], Sample | None],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "",
    samples_per_shard: int = 1000,
    desc: str = "packing",
    progress: bool = True,
) -> list[str]:
    """Pack `items` into shards of `samples_per_shard`; item i goes to shard i // samples_per_shard.

    `make_sample(i, item)` returns (key, members), or None to leave the item out. Shards
    already on disk are kept, so an interrupted run resumes where it stopped. Returns all
    shard paths in order.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"expected samples_per_shard > 0, found {samples_per_shard}")
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(items) // samples_per_shard)
    paths = [shard_path(out_dir, prefix, s) for s in range(num_shards)]
    with tqdm(total=len(items), desc=desc, unit="sample", disable=not progress) as bar:
        for s, path in enumerate(paths):
            lo, hi = s * samples_per_shard, min(len(items), (s + 1) * samples_per_shard)
            if epath.Path(path).exists():
                bar.update(hi - lo)
                continue

            def samples(lo: int = lo, hi: int = hi) -> Iterable[Sample]:
                for i in range(lo, hi):
                    sample = make_sample(i, items[i])
                    bar.update(1)
                    if sample is not None:
                        yield sample

            write_shard(path, samples())
    return paths
