"""A Cloud Storage stand-in inside the test process: fsspec's in-memory filesystem mounted under gs://.

etils.epath sends gs:// paths to fsspec's "gcs" filesystem (or to tf.io.gfile when TensorFlow
is installed; EPATH_USE_TF=false turns that off). Registering an in-memory filesystem under
that protocol makes every epath read and write of a gs:// path land in a dict of this process.
Orbax's arrays go through tensorstore, which talks to GCS by itself and never sees this.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import fsspec
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry

PROTOCOLS = ("gs", "gcs")


class FakeGCS(MemoryFileSystem):
    """In-memory object store keyed by 'bucket/path' (its own store, apart from fsspec's memory://)."""

    protocol = PROTOCOLS
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for protocol in PROTOCOLS:
            if path.startswith(f"{protocol}://"):
                path = path[len(protocol) + 3 :]
        return path.rstrip("/")


def _forget_filesystems() -> None:
    backend.fsspec_backend._get_filesystem.cache_clear()  # etils caches the filesystem per protocol
    FakeGCS.clear_instance_cache()


@contextlib.contextmanager
def fake_gcs(monkeypatch) -> Iterator[type[FakeGCS]]:
    """gs:// served from memory for the duration; the store starts and ends empty."""
    monkeypatch.setenv("EPATH_USE_TF", "false")
    for protocol in PROTOCOLS:
        fsspec.register_implementation(protocol, FakeGCS, clobber=True)
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    _forget_filesystems()
    try:
        yield FakeGCS
    finally:
        for protocol in PROTOCOLS:
            _registry.pop(protocol, None)  # back to fsspec's lazily imported gcsfs
        FakeGCS.store.clear()
        _forget_filesystems()
