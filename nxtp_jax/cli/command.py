"""One way to run a command: its own absl flags, one error handler, exit codes.

Every console entry point is a `Command` in this package. It parses its flags into a fresh
`absl.flags.FlagValues` (so commands never collide and tests can run them in process), then
calls its body with the parsed flags and the positional arguments. The body is thin: it
turns flags into explicit arguments of library functions.

Exit codes: 0 success, 1 a failure (`errors.USER_ERRORS`: a bad file, checkpoint, config),
2 a usage error (an unknown or invalid flag, a missing argument), 130 on Ctrl-C. Each error
is one `error: ...` line on stderr; `--verbose` adds the traceback.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import flags, logging

from nxtp_jax import errors

HELP_FLAGS = ("--help", "-h", "--helpfull", "-help")


class UsageError(Exception):
    """The command line itself is wrong: exit status 2."""


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's, grain's and JAX's INFO records (per checkpoint save, data read, backend probe); their warnings pass."""

    _PACKAGES = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "grain", "jax"))  # jax: backend probing

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in self._PACKAGES)


def setup_logging(level: str, verbose: bool) -> None:
    """absl logging at `level` without orbax's and grain's INFO chatter (`--verbose` shows all of it)."""
    logging.set_verbosity(level)
    logging.use_absl_handler()  # on the root logger before a library's logging.info installs a basicConfig handler there
    handler = logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _QuietLibraries)]:
        handler.removeFilter(f)
    if not verbose:
        handler.addFilter(_QuietLibraries())


@dataclasses.dataclass(frozen=True)
class Command:
    """A console command: `define(fv, argv)` declares its flags, `body(fv, args)` runs it.

    `body` returns the exit status (None means 0). `args` are the positional arguments;
    a command that takes none gets a usage error for any.
    """

    prog: str
    doc: str
    define: Callable[[flags.FlagValues, list[str]], None]
    body: Callable[[flags.FlagValues, list[str]], int | None]
    positional: str = ""  # e.g. "IMAGE [IMAGE ...]"; "" = the command takes no positional arguments
    log_level: str = "warning"

    def flag_values(self, argv: Sequence[str]) -> flags.FlagValues:
        fv = flags.FlagValues()
        flags.DEFINE_bool("verbose", False, "On an error, print its traceback too (and the libraries' INFO logs).", flag_values=fv)
        self.define(fv, [self.prog, *argv])
        return fv

    def help(self) -> str:
        fv = self.flag_values([])
        usage = f"usage: {self.prog} [flags]{' ' + self.positional if self.positional else ''}"
        # absl groups flags under the module that defined them; one list reads better.
        lines = [line for line in fv.get_help(include_special_flags=False).splitlines() if line.startswith("  ")]
        return f"{usage}\n\n{self.doc.strip()}\n\nflags:\n" + "\n".join(lines) + "\n"

    def __call__(self, argv: Sequence[str] | None = None) -> int:
        """Runs the command on `argv` (without the program name); returns the exit status."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if any(a in HELP_FLAGS for a in argv):
            print(self.help())
            return 0
        verbose = "--verbose" in argv
        try:
            fv = self.flag_values(argv)
            args = fv([self.prog, *argv])[1:]
            if args and not self.positional:
                raise UsageError(f"unexpected arguments {args}")
        except (flags.Error, UsageError) as e:
            return _usage(self.prog, e, verbose)
        except (KeyError, AttributeError, ValueError, TypeError) as e:  # a --config.FIELD override that does not fit
            return _usage(self.prog, e, verbose)
        flags.FLAGS.mark_as_parsed()  # grain's workers and absl logging read the global flags
        setup_logging(self.log_level, fv.verbose)
        try:
            return int(self.body(fv, args) or 0)
        except UsageError as e:
            return _usage(self.prog, e, fv.verbose)
        except errors.USER_ERRORS as e:
            return errors.report(e, fv.verbose)
        except ImportError as e:  # an optional dependency; etils.epath raises this for gs:// without gcsfs
            if "gcsfs" in str(e):
                e = errors.NxtpError(f'gs:// paths need gcsfs ({e}); run: pip install -e ".[gcs]"')
            return errors.report(e, fv.verbose)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr, flush=True)
            return 130

    def entry(self) -> NoReturn:
        """The console script: runs on sys.argv and exits with the status."""
        try:
            status = self()
            sys.stdout.flush()
        except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status = 0
        sys.exit(status)


def _usage(prog: str, error: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error) or type(error).__name__
    print(f"error: {message.strip()} (see {prog} --help)", file=sys.stderr, flush=True)
    return 2
