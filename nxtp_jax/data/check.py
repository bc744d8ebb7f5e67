"""Check WebDataset shards as training would read them: the library of `nxtp-check` (nxtp_jax/cli/check.py).

`check_paths` decodes every sample of every shard and prints each shard's count of valid
samples and each problem; `python -m nxtp_jax.data.check` is the same command.
"""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

from nxtp_jax.data.registry import find_shards
from nxtp_jax.data.samples import Skip, broken_sample, decode_sample, read_sample
from nxtp_jax.data.tar import ShardOpenError, TarFormatError, walk


class NotATarShard(Exception):
    """The file breaks before its first sample: it is not a tar shard (or not one any more)."""


def check_shard(shard: str) -> tuple[int, list[Skip]]:
    """(valid sample count, problems) of one shard.

    Raises ShardOpenError if it cannot be opened, NotATarShard if it breaks before its first sample.
    """
    valid, problems = 0, []
    with walk(shard) as (fd, groups):
        for i, group in enumerate(groups):
            if isinstance(group, TarFormatError):
                if i == 0:
                    raise NotATarShard(f"not a readable tar shard: {group}")
                raw = broken_sample(group)
            else:
                raw = read_sample(fd, group.key, group.members)
            result = decode_sample(raw, image_size=None, label_source="none")
            if isinstance(result, Skip):
                problems.append(result)
            else:
                valid += 1
    return valid, problems


def check_paths(paths: Sequence[str], *, strict: bool = False, out: TextIO | None = None) -> int:
    """Checks every shard of `paths` (shards or directories), printing to `out`; returns the exit status."""
    out = out or sys.stdout
    total_valid = total_skipped = num_shards = 0
    ok = True
    for path in paths:
        try:
            shards = find_shards(path)
        except OSError as e:  # missing, unreadable, a symlink loop
            print(f"{path}: cannot open: {e}", file=out)
            ok = False
            continue
        for shard in shards:
            num_shards += 1
            try:
                valid, problems = check_shard(shard)
            except ShardOpenError as e:
                print(f"{shard}: cannot open: {e}", file=out)
                ok = False
                continue
            except NotATarShard as e:
                print(f"{shard}: {e}", file=out)
                ok = False
                continue
            print(f"{shard}: valid={valid} skipped={len(problems)}", file=out)
            for p in problems:
                print(f"  {p.where}: {p.kind}: {p.message}", file=out)
            total_valid += valid
            total_skipped += len(problems)
    print(f"valid={total_valid} skipped={total_skipped} shards={num_shards}", file=out)
    if strict and total_skipped:
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    from nxtp_jax.cli.check import check_command

    check_command.entry()
