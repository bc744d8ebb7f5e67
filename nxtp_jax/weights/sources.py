"""Lazy access to tensors in torch / safetensors files: shapes first, data only when read.

torch pickles are opened with `weights_only=True` and, for zip-format files, `mmap=True`,
so the blocks a truncated model drops are never read from a 13 GB file. OpenAI's CLIP
archives are TorchScript: they are read as data (`torchscript.read_state_dict`), never
with `torch.jit.load`, and only where a CLIP archive is expected. Without torch, zip-format
torch files are read as data too (`pth.read_pth`), so the released checkpoint converts
with `pip install nxtp_jax` alone. No input runs code.
"""

from __future__ import annotations

import abc
import os
import pathlib
import pickle
import zipfile
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from nxtp_jax.errors import WeightImportError
from nxtp_jax.weights.pth import PthTensor, read_pth
from nxtp_jax.weights.torchscript import read_state_dict


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading PyTorch checkpoints needs torch, which is not installed; "
            "install it with `pip install 'nxtp_jax[convert]'`"
        ) from e
    return torch


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _to_numpy(tensor: Any, key: str, where: str) -> np.ndarray:
    """A float tensor (torch, numpy or PthTensor) as float32 numpy; integer, complex or non-finite weights are refused, naming the tensor."""
    if isinstance(tensor, PthTensor):
        tensor = tensor.numpy()
    if isinstance(tensor, np.ndarray):
        floating = tensor.dtype.kind == "f" or tensor.dtype == ml_dtypes.bfloat16
    else:
        floating = tensor.is_floating_point()
    if not floating:
        raise WeightImportError(
            f"{where}: {key} is {str(tensor.dtype).removeprefix('torch.')}; expected floating-point weights. "
            "The file is not a weights file of this model, or it is damaged"
        )
    array = tensor.astype(np.float32) if isinstance(tensor, np.ndarray) else tensor.detach().to(_torch().float32).numpy()
    finite = np.isfinite(array)
    if not finite.all():
        raise WeightImportError(
            f"{where}: {key} holds {array.size - int(finite.sum())} non-finite values (NaN or inf) of {array.size}; "
            "refusing to convert damaged weights. Download the file again"
        )
    return array


def require_file(path: str | os.PathLike, what: str) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected {what} at {path}, found no such file; check the path")
    return path


def is_torchscript(path: str | os.PathLike) -> bool:
    """TorchScript archives are zips with a `constants.pkl`; torch.save files have none."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in z.namelist())
    except zipfile.BadZipFile:
        return False  # a damaged zip: torch.load reports it


def load_torch(path: str | os.PathLike, what: str, *, torchscript: bool = False) -> Any:
    """The object in a torch file, read with weights_only; with `torchscript`, also a TorchScript archive's tensors."""
    path = require_file(path, what)
    if is_torchscript(path):
        if not torchscript:
            raise WeightImportError(
                f"expected {what} at {path}, found a TorchScript archive; only --clip takes one. "
                "Pass the torch.save state dict (.pth / .bin) or a .safetensors file"
            )
        return read_state_dict(str(path))  # numpy arrays: no torch needed
    if zipfile.is_zipfile(path) and not _torch_installed():
        return read_pth(path)  # PthTensors, read as data
    torch = _torch()
    try:
        # mmap needs the zip format; legacy pickles are read whole.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise WeightImportError(f"expected {what} at {path}, found a pickle that needs more than tensors to load; refused ({first})") from e
    except (EOFError, OSError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
        raise WeightImportError(
            f"expected {what} at {path}, found a file torch cannot read ({type(e).__name__}: {str(e).strip()[:200] or 'empty or truncated'})"
        ) from e


class TensorSource(abc.ABC):
    """Named tensors from one or more files of one source (the CLIP archive, the LLaMA weights, ...)."""

    def __init__(self, name: str, files: Sequence[str]):
        self.name = name
        self.files = [str(f) for f in files]

    @property
    def where(self) -> str:
        """Where the tensors come from, for error messages."""
        return ", ".join(self.files)

    @abc.abstractmethod
    def keys(self) -> list[str]: ...

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def read(self, key: str) -> np.ndarray:
        """The tensor as a float32 numpy array (source dtypes fp16 / bf16 are widened exactly).

        Integer, complex and non-finite tensors raise WeightImportError naming the key.
        """


class EmptySource(TensorSource):
    """A source whose weight files are absent (allowed when another source supersedes all its params)."""

    def __init__(self, name: str, missing: str):
        super().__init__(name, [])
        self.missing = missing

    @property
    def where(self) -> str:
        return self.missing

    def keys(self) -> list[str]:
        return []

    def shape(self, key: str) -> tuple[int, ...]:
        raise KeyError(key)

    def read(self, key: str) -> np.ndarray:
        raise KeyError(key)


class StateDictSource(TensorSource):
    """A state dict of torch tensors (possibly mmap-backed) or numpy arrays, or several merged (sharded HF .bin)."""

    def __init__(self, name: str, tensors: Mapping[str, Any], files: Sequence[str]):
        super().__init__(name, files)
        bad = sorted(k for k, v in tensors.items() if not hasattr(v, "shape"))
        if bad:
            raise TypeError(
                f"{name}: expected a state dict of tensors in {', '.join(self.files)}, "
                f"found non-tensor entries {bad[:5]}; pass the weights file itself"
            )
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def read(self, key: str) -> np.ndarray:
        return _to_numpy(self.tensors[key], key, self.where)


class SafetensorsSource(TensorSource):
    """One or more `.safetensors` files; each tensor is read from its file when asked for."""

    def __init__(self, name: str, files: Sequence[str | os.PathLike]):
        super().__init__(name, files)
        from safetensors import safe_open

        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    if k in self._file_of:
                        raise ValueError(f"{name}: key {k} is in both {self._file_of[k]} and {f}; expected each once")
                    self._file_of[k] = f
                    self._shapes[k] = tuple(st.get_slice(k).get_shape())

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def read(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self._file_of[key], framework="pt") as st:
            return _to_numpy(st.get_tensor(key), key, self._file_of[key])


class ConcatSource(TensorSource):
    """Model-parallel shards of one state dict, joined along `concat_dim(key)` (None: replicated)."""

    def __init__(self, name: str, shards: Sequence[Mapping[str, Any]], files: Sequence[str], concat_dim: Callable[[str], int | None]):
        super().__init__(name, files)
        first = set(shards[0])
        for shard, f in zip(shards[1:], self.files[1:]):
            if set(shard) != first:
                diff = sorted(first.symmetric_difference(shard))
                raise ValueError(
                    f"{name}: expected every shard to hold the same keys as {self.files[0]}, "
                    f"found {f} differs in {diff[:5]}; the shard files do not belong together"
                )
        self.shards = shards
        self.concat_dim = concat_dim

    def keys(self) -> list[str]:
        return list(self.shards[0])

    def shape(self, key: str) -> tuple[int, ...]:
        shape = list(self.shards[0][key].shape)
        dim = self.concat_dim(key)
        if dim is not None:
            shape[dim] = sum(s[key].shape[dim] for s in self.shards)
        return tuple(shape)

    def read(self, key: str) -> np.ndarray:
        dim = self.concat_dim(key)
        if dim is None:
            return _to_numpy(self.shards[0][key], key, self.files[0])
        return np.concatenate([_to_numpy(s[key], key, f) for s, f in zip(self.shards, self.files)], axis=dim)
