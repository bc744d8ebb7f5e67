"""`nxtp-check` (or `python -m nxtp_jax.data.check`): check WebDataset shards.

    nxtp-check [--strict] PATH [PATH ...]

Every sample is read and its image fully decoded, as training would. Prints each shard's
count of valid samples and every problem (member, kind, reason), then a total line
`valid=N skipped=M shards=S`.

Exit status: 1 if a path cannot be opened or is not a readable tar shard at all (it breaks
before its first sample: a text file, a gzip, a shard cut inside its first header); with
`--strict`, also 1 if any sample was skipped; else 0.
"""

from __future__ import annotations

from absl import flags

from nxtp_jax.cli.command import Command, UsageError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_bool("strict", False, "Also exit 1 when any sample was skipped.", flag_values=fv)


def body(fv: flags.FlagValues, paths: list[str]) -> int:
    from nxtp_jax.data.check import check_paths

    if not paths:
        raise UsageError("give at least one .tar shard or directory of shards")
    return check_paths(paths, strict=fv.strict)


check_command = Command("nxtp-check", __doc__, define, body, positional="PATH [PATH ...]")
