"""User errors: bad files, flags and workdirs. The command-line tools print them as one line.

    NxtpError          the base; its message says what was expected, what was found, what to do
      CheckpointError  a checkpoint directory or workdir that cannot be read (config.json, tokenizer, params)
      WorkdirError     a workdir that cannot be used: unwritable, locked by another run, another model
      WeightImportError  a source checkpoint the converter cannot import
      ConfigError        (experiment.py) an experiment config that cannot run
    (and, elsewhere: BadImageError and a bad tokenizer file, ValueErrors)

Every command (nxtp_jax/cli) prints `error: <message>` for these, and for ValueError /
OSError, and exits 1; `--verbose` adds the traceback.
"""

from __future__ import annotations

import sys
import traceback


class NxtpError(Exception):
    """A user error that the command-line tools report as one line."""


class CheckpointError(NxtpError, ValueError):
    """A checkpoint directory (or a training workdir) whose config, tokenizer or params cannot be read."""


class WorkdirError(NxtpError):
    """A training workdir that this run cannot use."""


class WeightImportError(NxtpError, ValueError):
    """A source checkpoint does not match what the importer expects."""


# What the entry points print as one line instead of a traceback.
USER_ERRORS = (NxtpError, ValueError, OSError)


def report(error: BaseException, verbose: bool = False) -> int:
    """Prints `error: <message>` to stderr (after the traceback if `verbose`); returns the exit status 1."""
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {str(error) or type(error).__name__}", file=sys.stderr, flush=True)
    return 1
