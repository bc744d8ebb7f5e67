"""A `torch.save` zip file (the released `ckpt_epoch_03_iter_*.pth`) read as data, without torch.

`torchscript.py`'s restricted unpickler (`TensorStateUnpickler`): `data.pkl` may name only what
rebuilds tensors (`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, the storage
classes, `collections.OrderedDict`); any other global is refused. Tensors come back as
`PthTensor`s that know their shape and dtype and read their bytes from the zip only when
asked, so the optimizer state next to the model params is never read.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import numpy as np

from nxtp_jax.errors import WeightImportError
from nxtp_jax.weights.torchscript import TensorStateUnpickler


class _Storage:
    """One `data/N` entry of the archive, not yet read."""

    def __init__(self, path: str, entry: str, dtype: np.dtype, numel: int):
        self.path, self.entry, self.dtype, self.numel = path, entry, dtype, numel

    def read(self) -> np.ndarray:
        with zipfile.ZipFile(self.path) as archive:
            raw = archive.read(self.entry)
        if len(raw) != self.numel * self.dtype.itemsize:
            raise WeightImportError(
                f"{self.path}: storage {self.entry} holds {len(raw)} bytes, data.pkl says {self.numel} elements of "
                f"{self.dtype}; the file is damaged, download it again"
            )
        return np.frombuffer(raw, dtype=self.dtype)


class PthTensor:
    """A tensor of the file: shape and dtype at once, values (a numpy copy) from `numpy()`."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if offset < 0 or any(s < 0 for s in stride) or last >= storage.numel:
            raise WeightImportError(
                f"{storage.path}: a tensor of size {size}, stride {stride}, offset {offset} reaches past its storage "
                f"of {storage.numel} elements; the file is damaged"
            )
        self.storage, self.offset, self.shape, self.stride = storage, offset, size, stride
        self.dtype = storage.dtype

    def numpy(self) -> np.ndarray:
        flat = self.storage.read()
        itemsize = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape, tuple(s * itemsize for s in self.stride))
        return np.array(view)


class _Unpickler(TensorStateUnpickler):
    """A torch.save zip's data.pkl: tensors as `PthTensor`s over storages read on demand."""

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None) -> "PthTensor":
        return PthTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))

    def load_storage(self, key: str, dtype: np.dtype, numel: int) -> "_Storage":
        return _Storage(self.path, f"{self.prefix}data/{key}", dtype, numel)


def read_pth(path: str | os.PathLike) -> Any:
    """The object `torch.load(path, weights_only=True)` returns, with `PthTensor`s in place of tensors.

    Only torch's zip format (the default since torch 1.6) is read; the storages' entries are
    checked to exist, their bytes are read when a tensor's `numpy()` is called.
    """
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise WeightImportError(f"{path}: expected one <name>/data.pkl in the torch.save zip, found {sorted(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
            if order != "little":
                raise WeightImportError(f"{path}: tensors are stored {order}-endian; expected little-endian")
            with archive.open(pickles[0]) as f:
                unpickler = _Unpickler(f, path, prefix)
                obj = unpickler.load()
    except WeightImportError:
        raise
    except zipfile.BadZipFile as e:
        raise WeightImportError(
            f"{path}: not a torch.save zip ({e}); reading it needs torch: `pip install 'nxtp_jax[convert]'`, or download it again"
        ) from e
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise WeightImportError(f"{path}: cannot read the checkpoint's tensors ({type(e).__name__}: {e})") from e
    missing = sorted(s.entry for s in unpickler.storages.values() if s.entry not in names)
    if missing:
        raise WeightImportError(f"{path}: data.pkl names storages the file lacks ({missing[:3]}); the file is truncated or damaged")
    return obj
