"""A TorchScript archive (OpenAI's `ViT-L-14.pt`) read as data: its named tensors, no code run.

`torch.jit.load` runs the archive's TorchScript (a `__setstate__` method, for one). Here
`data.pkl` goes through an unpickler that knows only what rebuilds tensors: the module
objects (`__torch__.*` classes) become plain attribute holders, TorchScript's typed lists
plain lists, storages are numpy views of the archive's `data/N` entries, and any other
global is refused. The tensors come back as numpy arrays named as `state_dict()` names
them (the module attributes' dotted paths), so reading needs no torch at all.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from nxtp_jax.errors import WeightImportError


class ModuleState:
    """A `__torch__` object from the pickle: only the attributes its state sets (nothing runs)."""

    attributes: dict[str, Any] = {}  # replaced, never mutated, by __setstate__

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.attributes = dict(state)


def _module_class(qualname: str) -> type:
    return type(qualname, (ModuleState,), {})


# torch storage classes -> numpy dtypes (bfloat16 through ml_dtypes, which JAX ships).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}


class _StorageType:
    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """The tensor as a numpy array of its own (offset, size and stride count elements of `storage`)."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if offset < 0 or any(s < 0 for s in stride) or last >= storage.size:
        raise ValueError(f"a tensor of size {size}, stride {stride}, offset {offset} reaches past its storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _identity(value, *type_tag):
    return value


# TorchScript's typed containers (`torch.jit._pickle`): each returns its first argument.
_JIT_CONTAINERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")


class TensorStateUnpickler(pickle.Unpickler):
    """Unpickles a `data.pkl` that may name only what rebuilds tensors: torch's tensor and parameter
    rebuilders, the storage classes, `collections.OrderedDict`, and what a subclass's `extra_class`
    adds; any other global is refused. Subclasses build tensors (`rebuild_tensor`) and storages
    (`load_storage`, once per key)."""

    expected = "tensors, storages and plain containers"  # for the refusal's message

    def __init__(self, file, path: str, prefix: str):
        super().__init__(file)
        self.path, self.prefix = path, prefix
        self.storages: dict[str, Any] = {}

    def extra_class(self, module: str, name: str) -> Any:
        return None

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self.rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        found = self.extra_class(module, name)
        if found is None:
            raise WeightImportError(
                f"{self.path}: data.pkl refers to {module}.{name}, which is not part of a tensor state; refusing to "
                f"load it (expected only {self.expected})"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise WeightImportError(f"{self.path}: unexpected persistent id {pid!r} in data.pkl; not a tensor storage")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            self.storages[key] = self.load_storage(key, storage_type.dtype, int(numel))
        return self.storages[key]


class _Unpickler(TensorStateUnpickler):
    """A TorchScript archive's data.pkl: its `__torch__` modules and typed containers too, storages read at once."""

    expected = "__torch__ modules, tensors and storages"

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file, path, prefix)
        self.archive = archive

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None) -> np.ndarray:
        return _rebuild_tensor_v2(storage, offset, size, stride)

    def extra_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _module_class(f"{module}.{name}")
        if module == "torch.jit._pickle" and name in _JIT_CONTAINERS:
            return _identity
        return None

    def load_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        entry = f"{self.prefix}data/{key}"
        try:
            raw = bytearray(self.archive.read(entry))
        except KeyError:
            raise WeightImportError(f"{self.path}: data.pkl names the storage {entry}, which the archive lacks") from None
        if len(raw) != numel * dtype.itemsize:
            raise WeightImportError(
                f"{self.path}: storage {entry} holds {len(raw)} bytes, data.pkl says {numel} elements of "
                f"{dtype}; the archive is damaged"
            )
        return np.frombuffer(raw, dtype=dtype)


def _collect(obj: Any, prefix: str, out: dict[str, Any], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in obj.attributes.items():
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif isinstance(value, ModuleState):
            _collect(value, f"{prefix}{name}.", out, seen)


def read_state_dict(path: str) -> dict[str, Any]:
    """The named tensors of a TorchScript archive, as `torch.jit.load(path).state_dict()` has them, in numpy."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise WeightImportError(f"{path}: expected one <name>/data.pkl in the TorchScript archive, found {pickles}")
            prefix = pickles[0][: -len("data.pkl")]
            with archive.open(pickles[0]) as f:
                root = _Unpickler(f, archive, prefix, path).load()
    except WeightImportError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise WeightImportError(f"{path}: cannot read the TorchScript archive's tensors ({type(e).__name__}: {e})") from e
    if not isinstance(root, ModuleState):
        raise WeightImportError(f"{path}: expected a TorchScript module in data.pkl, found {type(root).__name__}")
    out: dict[str, Any] = {}
    _collect(root, "", out, set())
    return out
