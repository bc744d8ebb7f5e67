"""The torch-free `.pth` reader against torch.load, and the converter with torch hidden."""

from __future__ import annotations

import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch

import torch_layouts as tl
from nxtp_jax.errors import WeightImportError
from nxtp_jax.weights import convert
from nxtp_jax.weights.pth import PthTensor, read_pth


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny released-layout checkpoint (fp16 `module.` params, AdamW and scheduler state) and its torch.load."""
    path = tmp_path_factory.mktemp("pth") / "ckpt_epoch_03_iter_0021360.pth"
    tl.write_nxtp_checkpoint(path, tl.random_nxtp_model_state(n_layers=2))
    return path, torch.load(path, map_location="cpu", weights_only=True)


def test_read_pth_gives_torch_loads_tensors_bit_for_bit_and_its_plain_values(released):
    path, reference = released
    found = read_pth(path)
    assert found.keys() == reference.keys()
    assert (found["epoch"], found["global_step"]) == (3, 21360)
    assert found["model"].keys() == reference["model"].keys()
    for key, tensor in reference["model"].items():
        got = found["model"][key]
        assert isinstance(got, PthTensor) and got.dtype == np.float16 and got.shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(got.numpy(), tensor.detach().numpy(), err_msg=key)
    step = reference["optimizer"]["state"][0]["exp_avg"]
    np.testing.assert_array_equal(found["optimizer"]["state"][0]["exp_avg"].numpy(), step.numpy())
    assert found["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)


def test_read_pth_reads_a_strided_view_as_torch_does(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"t": base.t(), "row": base[2, 1:5]}, tmp_path / "v.pth")
    found = read_pth(tmp_path / "v.pth")
    np.testing.assert_array_equal(found["t"].numpy(), base.t().numpy())
    np.testing.assert_array_equal(found["row"].numpy(), [13, 14, 15, 16])


def test_read_pth_refuses_a_pickle_that_names_a_function(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"model": Evil()}, protocol=4))
    with pytest.raises(WeightImportError, match="builtins.print, which is not part of a tensor state"):
        read_pth(path)


def test_read_pth_names_a_truncated_storage(released, tmp_path):
    path, _ = released
    cut = tmp_path / "cut.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cut, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item.filename.endswith("/data/0") else data)
    tensor = next(t for t in read_pth(cut)["model"].values() if t.storage.entry.endswith("/data/0"))
    with pytest.raises(WeightImportError, match="data/0 holds .* the file is damaged"):
        tensor.numpy()


def test_convert_without_torch_gives_the_torch_paths_params(released, sp_model_path, tmp_path, monkeypatch):
    path, _ = released
    tl.write_openai_clip_torchscript(tmp_path / "clip.pt", width=128, layers=2, patch=4, resolution=16)
    tl.write_meta_llama_dir(tmp_path / "llama", dim=64, n_layers=2, n_heads=4, vocab_size=400, multiple_of=32,
                            write_weights=False)
    kw = dict(clip_path=tmp_path / "clip.pt", tokenizer_path=sp_model_path, llama_dir=tmp_path / "llama",
              nxtp_ckpt=path)
    with_torch = convert(**kw)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    without = convert(**kw)
    flat_a = dict(_flat(with_torch.params))
    flat_b = dict(_flat(without.params))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
    assert without.info["nxtp_global_step"] == 21360


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield prefix + k, v
