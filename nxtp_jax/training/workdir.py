"""Guards of a training workdir, checked before a run writes anything or waits at a barrier.

- `check_writable`: the workdir and its checkpoint dir exist (or can be made) and take a file.
- `Lock`: WORKDIR/run.lock holds {host, pid, time}; a second run on the workdir stops. A
  lock whose pid is dead on this host is stale: it is reported and taken over.
- `check_same_model`: a resume with another model shape (or other trainable params) stops,
  listing the differing fields, before config.json is rewritten.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from typing import Any

from etils import epath

from nxtp_jax import checkpoint
from nxtp_jax.errors import WorkdirError
from nxtp_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


def check_writable(*dirs: str | os.PathLike) -> None:
    """Makes each directory and writes a probe file in it, or raises WorkdirError naming it."""
    for d in dirs:
        d = epath.Path(d)  # local, or any epath backend (gs://...)
        if d.exists() and not d.is_dir():
            raise WorkdirError(f"expected a directory at {d}, found a file; pass another --workdir")
        probe = d / f".write_probe.{socket.gethostname()}.{os.getpid()}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise WorkdirError(
                f"cannot write in {d} ({e.strerror or e}); fix its permissions or pass another --workdir"
            ) from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


class Lock:
    """WORKDIR/run.lock for the lifetime of a run (process 0 only); `release` removes it."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.held = False

    def acquire(self) -> "Lock":
        for _ in range(2):
            try:
                self._create()
            except FileExistsError:
                self._take_over_if_stale()
                continue
            self.held = True
            return self
        raise WorkdirError(f"cannot take the lock {self.path}: another run took it at the same time")

    def _create(self) -> None:
        """Writes the lock file, or raises FileExistsError: atomically on local disk; object stores
        (gs://...) offer no exclusive create through epath, so there a check precedes the write."""
        if "://" in os.fspath(self.path):
            if self.path.exists():
                raise FileExistsError(self.path)
            self.path.write_text(json.dumps(self.info))
            return
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            host, pid, since = owner["host"], int(owner["pid"]), owner.get("time", "?")
        except (OSError, ValueError, KeyError, TypeError):
            raise WorkdirError(
                f"{self.path} exists but is not a lock this code wrote; if no run uses this workdir, delete it"
            ) from None
        if host == self.info["host"] and not _pid_alive(pid):
            log.warning("taking over the stale lock %s: its run (pid %d on %s, since %s) is gone", self.path, pid, host, since)
            print(f"warning: taking over the stale lock {self.path} of pid {pid} (no longer running)", flush=True)
            self.path.unlink(missing_ok=True)
            return
        raise WorkdirError(
            f"{self.path.parent} is in use by another run (pid {pid} on {host}, since {since}); wait for it to end, "
            f"or, if that run is gone, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_same_model(workdir: str | os.PathLike, model: ModelConfig, trainable: list[str]) -> None:
    """Raises WorkdirError if `workdir` holds a run of another model shape or trainable set; a new workdir passes."""
    if not checkpoint.is_training_workdir(workdir):
        return
    meta = checkpoint.read_meta(workdir)
    saved, ours = meta["model"], model.to_dict()
    diffs = [
        f"model.{part}.{k}: saved {saved.get(part, {}).get(k)!r}, now {ours[part][k]!r}"
        for part in ours
        for k in ours[part]
        if saved.get(part, {}).get(k) != ours[part][k]
    ]
    saved_trainable = meta[checkpoint.TRAINING_KEY].get("trainable")
    if saved_trainable != list(trainable):
        diffs.append(f"trainable: saved {saved_trainable!r}, now {list(trainable)!r}")
    if diffs:
        raise WorkdirError(
            f"{workdir} holds a run of another model ({'; '.join(diffs)}); its checkpoints cannot resume this config. "
            "Use a new --workdir, or restore the saved config (config.json, train_config.json)"
        )


def describe(error: Any) -> str:
    """The first line of an exception, for a one-line warning."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
