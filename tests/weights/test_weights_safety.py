"""The converter never runs code from its inputs, and refuses damaged weights (NaN, integer, complex).

A TorchScript archive is read as data under --clip and refused under every other flag; a
pickle that calls a function on load is refused everywhere. Each planted side effect is
first shown to be live (torch.jit.load / pickle.loads run it), so these tests can fail.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import torch_layouts as tl
from nxtp_jax import checkpoint
from nxtp_jax.cli.convert import convert_command
from nxtp_jax.errors import CheckpointError
from nxtp_jax.weights import WeightImportError, convert
from nxtp_jax.weights.torchscript import read_state_dict

DIMS = dict(dim=64, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=32)
CLIP = dict(width=128, layers=2, patch=4, resolution=16)
PLANTED = "PLANTED-SETSTATE-RAN"


class _Planted(nn.Module):
    """An activation whose TorchScript `__setstate__` prints: torch.jit.load runs it."""

    def __init__(self):
        super().__init__()
        self.armed = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)

    @torch.jit.export
    def __getstate__(self):
        return (self.armed, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]):
        print("PLANTED-SETSTATE-RAN")
        self.armed = state[0]
        self.training = state[1]


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): a file appears if anything unpickles it freely."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_planted_clip(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """A CLIP TorchScript archive like `write_openai_clip_torchscript`'s whose first MLP activation runs code on load."""
    model = tl._CLIP(CLIP["width"], CLIP["layers"], CLIP["patch"], CLIP["resolution"], 32, 64, 1, 8, 50)
    tl.randomize(model, 1)
    model.visual.transformer.resblocks[0].mlp.gelu = _Planted()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        scripted = torch.jit.script(model.eval())
        torch.jit.save(scripted, str(path))
    return {k: v.detach().clone() for k, v in scripted.state_dict().items()}


def replace_data_pkl(src: pathlib.Path, dst: pathlib.Path, payload: bytes) -> None:
    """A copy of the zip `src` whose <name>/data.pkl is `payload`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = payload if item.filename.endswith("/data.pkl") else zin.read(item)
            zout.writestr(item, data)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    marker = root / "marker-written-by-unpickling"
    payload = pickle.dumps(_OpensAFile(marker), protocol=2)
    clip_state = write_planted_clip(root / "clip_setstate.pt")
    replace_data_pkl(root / "clip_setstate.pt", root / "clip_reduce.pt", payload)
    torch.save({"w": torch.ones(2)}, root / "plain.pth")
    replace_data_pkl(root / "plain.pth", root / "plain_reduce.pth", payload)
    return dict(root=root, marker=marker, payload=payload, clip_state=clip_state)


def test_planted_side_effects_are_live(planted, capfd):
    """The controls: what the converter must never do does run the plants."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.load(str(planted["root"] / "clip_setstate.pt"))
    assert PLANTED in capfd.readouterr().out
    pickle.loads(planted["payload"]).close()
    assert planted["marker"].exists()
    planted["marker"].unlink()


def test_clip_archive_is_read_as_data_without_running_its_code(planted, capfd):
    state = read_state_dict(str(planted["root"] / "clip_setstate.pt"))
    assert sorted(state) == sorted(planted["clip_state"])
    for key, value in planted["clip_state"].items():
        assert str(state[key].dtype) == str(value.dtype).removeprefix("torch.") and np.array_equal(state[key], value.numpy()), key
    assert PLANTED not in capfd.readouterr().out


def test_clip_archive_reads_without_torch_installed(planted, tmp_path):
    """`ranking=clip` / `embedder=clip` need no torch: the archive's tensors come back as numpy with torch unimportable."""
    expected = {k: v.numpy() for k, v in planted["clip_state"].items()}
    np.savez(tmp_path / "expected.npz", **{k.replace(".", "__"): v for k, v in expected.items()})
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from nxtp_jax.weights.clip import open_openai_clip\n"
        f"source = open_openai_clip({str(planted['root'] / 'clip_setstate.pt')!r})\n"
        f"expected = np.load({str(tmp_path / 'expected.npz')!r})\n"
        "assert sorted(k.replace('.', '__') for k in source.keys()) == sorted(expected.files)\n"
        "for k in source.keys():\n"
        "    v = expected[k.replace('.', '__')]\n"
        "    if v.dtype.kind == 'f': assert np.array_equal(source.read(k), v.astype(np.float32)), k\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('read', len(source.keys()))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == f"read {len(expected)}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    tl.write_meta_llama_dir(root / "meta", n_layers=2, seed=2, **DIMS)
    return root / "meta"


@pytest.fixture(scope="module")
def good_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    tl.write_openai_clip_torchscript(path, seed=1, **CLIP)
    return path


def _flag_inputs(name: str, bad_file: pathlib.Path, tmp_path: pathlib.Path, llama: pathlib.Path, good_clip: pathlib.Path):
    """convert() keyword arguments that pass `bad_file` as the input of one converter flag."""
    if name == "clip":
        return dict(clip_path=bad_file, llama_dir=llama, layers=1)
    if name == "nxtp_ckpt":
        return dict(clip_path=good_clip, llama_dir=llama, nxtp_ckpt=bad_file, layers=1)
    if name == "llama_dir":
        shard_dir = tmp_path / "meta"
        shutil.copytree(llama, shard_dir)
        shutil.copyfile(bad_file, shard_dir / "consolidated.00.pth")
        return dict(clip_path=good_clip, llama_dir=shard_dir, layers=1)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=400, intermediate_size=192, rms_norm_eps=1e-5,
    )))
    shutil.copyfile(bad_file, hf / "pytorch_model.bin")
    return dict(clip_path=good_clip, llama_hf_dir=hf, layers=1)


FLAGS = ("clip", "nxtp_ckpt", "llama_dir", "llama_hf_dir")


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("plant", ["clip_setstate.pt", "clip_reduce.pt", "plain_reduce.pth"])
def test_no_converter_flag_runs_code_from_its_input(flag, plant, planted, llama, good_clip, sp_model_path, tmp_path, capfd):
    kwargs = _flag_inputs(flag, planted["root"] / plant, tmp_path, llama, good_clip)
    if flag == "clip" and plant == "clip_setstate.pt":
        conv = convert(tokenizer_path=sp_model_path, **kwargs)  # a TorchScript CLIP is data under --clip
        assert conv.origin["vision_encoder/conv1/kernel"] == "clip"
    else:
        with pytest.raises(WeightImportError) as info:
            convert(tokenizer_path=sp_model_path, **kwargs)
        message = str(info.value)
        if plant == "plain_reduce.pth":  # torch.save format: weights_only refuses the call
            assert "needs more than tensors to load; refused" in message
        elif flag == "clip":  # the restricted reader refuses the call
            assert "refers to" in message and "open, which is not part of a tensor state" in message
        else:
            assert "found a TorchScript archive; only --clip takes one" in message
        assert "\n" not in message
    assert PLANTED not in capfd.readouterr().out
    assert not planted["marker"].exists()


def _llama_with(llama: pathlib.Path, out: pathlib.Path, key: str, value: torch.Tensor) -> pathlib.Path:
    shutil.copytree(llama, out)
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    state[key] = value
    torch.save(state, out / "consolidated.00.pth")
    return out


@pytest.mark.parametrize(
    "make,found",
    [
        (lambda w: torch.where(torch.arange(w.numel()).reshape(w.shape) == 77, float("nan"), w), "1 non-finite values"),
        (lambda w: torch.full_like(w, float("inf")), "non-finite values"),
        (lambda w: w.to(torch.int32), "is int32; expected floating-point weights"),
        (lambda w: w.to(torch.complex64), "is complex64; expected floating-point weights"),
    ],
)
def test_damaged_weights_are_refused_naming_the_tensor(make, found, llama, good_clip, sp_model_path, tmp_path):
    key = "layers.0.attention.wq.weight"
    original = torch.load(llama / "consolidated.00.pth", weights_only=True)[key]
    bad = _llama_with(llama, tmp_path / "bad", key, make(original))
    with pytest.raises(WeightImportError, match=found) as info:
        convert(clip_path=good_clip, tokenizer_path=sp_model_path, llama_dir=bad, layers=1)
    assert key in str(info.value)


def test_cli_nan_weights_and_unusable_out_are_one_line_errors(llama, good_clip, sp_model_path, tmp_path, capsys):
    key = "layers.0.feed_forward.w1.weight"
    original = torch.load(llama / "consolidated.00.pth", weights_only=True)[key]
    bad = _llama_with(llama, tmp_path / "nan", key, torch.full_like(original, float("nan")))
    common = [f"--clip={good_clip}", f"--tokenizer={sp_model_path}", "--layers=1"]
    assert convert_command([*common, f"--llama_dir={bad}", f"--out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith("error: ") and key in err and "non-finite" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))

    (tmp_path / "a_file").write_text("x")
    assert convert_command([*common, f"--llama_dir={llama}", f"--out={tmp_path / 'a_file'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "found a file" in err, err
    assert len(err.strip().splitlines()) == 1 and (tmp_path / "a_file").read_text() == "x"


def test_checkpoint_save_refuses_a_non_empty_dir_and_writes_whole(sp_model_path, tmp_path):
    import numpy as np

    from tiny_models import tiny_config
    from nxtp_jax.tokenizer import Tokenizer

    config = tiny_config(Tokenizer(sp_model_path))
    params = {"a": np.ones(3, np.float32)}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    with pytest.raises(CheckpointError, match="found files in it"):
        checkpoint.save(tmp_path / "full", params, config, sp_model_path)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep"]
    out = checkpoint.save(tmp_path / "new", params, config, sp_model_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params", "tokenizer.model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "new"]


def test_empty_truncated_and_garbage_inputs_are_one_line_errors(llama, good_clip, sp_model_path, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(good_clip.read_bytes()[:-100])
    (tmp_path / "garbage.model").write_bytes(b"\x00not a sentencepiece model" * 8)
    cases = [
        (dict(clip_path=good_clip, llama_dir=llama, nxtp_ckpt=tmp_path / "empty.pth"), "found a file torch cannot read (EOFError"),
        (dict(clip_path=tmp_path / "cut.pt", llama_dir=llama), "found a file torch cannot read"),
    ]
    for kwargs, message in cases:
        with pytest.raises(WeightImportError, match=message.replace("(", r"\(")) as info:
            convert(tokenizer_path=sp_model_path, layers=1, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="found a file sentencepiece cannot read"):
        convert(clip_path=good_clip, llama_dir=llama, tokenizer_path=tmp_path / "garbage.model", layers=1)
