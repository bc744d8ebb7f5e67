"""End to end: `nxtp-convert` turns torch checkpoints in the released layouts into a
checkpoint directory that `nxtp_jax.checkpoint` loads back with no other input."""

from __future__ import annotations

import collections
import pathlib
import shlex
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import torch_layouts as tl
from nxtp_jax import checkpoint
from nxtp_jax.cli.convert import convert_command
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.weights import WeightImportError, convert

V = 400
DIMS = dict(dim=64, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32)
CLIP = dict(width=128, layers=2, patch=4, resolution=16)


Result = collections.namedtuple("Result", "returncode stdout stderr")


def run_cli(capsys, **flags) -> Result:
    """nxtp-convert --NAME=VALUE ... in process: its exit status and what it printed."""
    status = convert_command([f"--{name}={value}" for name, value in flags.items()])
    out = capsys.readouterr()
    return Result(status, out.out, out.err)


def load(ckpt_dir, param_dtype=jnp.float32) -> tuple:
    config = checkpoint.load_config(ckpt_dir)
    params = checkpoint.load_params(ckpt_dir, checkpoint.abstract_params(Recognizer(config, param_dtype=param_dtype)))
    return config, params


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def expected_clip(state, blocks) -> dict[tuple[str, ...], np.ndarray]:
    """Our params from OpenAI's names, written out here (independent of the importer's table)."""
    out = {
        ("conv1", "kernel"): f32(state["visual.conv1.weight"]).transpose(2, 3, 1, 0),
        ("class_embedding",): f32(state["visual.class_embedding"]),
        ("positional_embedding",): f32(state["visual.positional_embedding"]),
        ("ln_pre", "scale"): f32(state["visual.ln_pre.weight"]),
        ("ln_pre", "bias"): f32(state["visual.ln_pre.bias"]),
        ("ln_post", "scale"): f32(state["visual.ln_post.weight"]),
        ("ln_post", "bias"): f32(state["visual.ln_post.bias"]),
    }
    for i in blocks:
        p, b = f"visual.transformer.resblocks.{i}.", ("transformer", f"resblocks_{i}")
        out[b + ("attn", "in_proj", "kernel")] = f32(state[p + "attn.in_proj_weight"]).T
        out[b + ("attn", "in_proj", "bias")] = f32(state[p + "attn.in_proj_bias"])
        out[b + ("attn", "out_proj", "kernel")] = f32(state[p + "attn.out_proj.weight"]).T
        out[b + ("attn", "out_proj", "bias")] = f32(state[p + "attn.out_proj.bias"])
        out[b + ("mlp", "c_fc", "kernel")] = f32(state[p + "mlp.c_fc.weight"]).T
        out[b + ("mlp", "c_fc", "bias")] = f32(state[p + "mlp.c_fc.bias"])
        out[b + ("mlp", "c_proj", "kernel")] = f32(state[p + "mlp.c_proj.weight"]).T
        out[b + ("mlp", "c_proj", "bias")] = f32(state[p + "mlp.c_proj.bias"])
        for ln in ("ln_1", "ln_2"):
            out[b + (ln, "scale")] = f32(state[p + f"{ln}.weight"])
            out[b + (ln, "bias")] = f32(state[p + f"{ln}.bias"])
    return out


def expected_decoder(state, layers, prefix="") -> dict[tuple[str, ...], np.ndarray]:
    out = {("norm", "weight"): f32(state[prefix + "norm.weight"])}
    for i in range(layers):
        p, b = f"{prefix}layers.{i}.", (f"layers_{i}",)
        for name in ("wq", "wk", "wv", "wo"):
            out[b + ("attention", name, "kernel")] = f32(state[p + f"attention.{name}.weight"]).T
        for name in ("w1", "w2", "w3"):
            out[b + ("feed_forward", name, "kernel")] = f32(state[p + f"feed_forward.{name}.weight"]).T
        out[b + ("attention_norm", "weight")] = f32(state[p + "attention_norm.weight"])
        out[b + ("ffn_norm", "weight")] = f32(state[p + "ffn_norm.weight"])
    return out


def get(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def assert_params(tree, expected: dict, what: str):
    for path, value in expected.items():
        np.testing.assert_array_equal(get(tree, path), value, err_msg=f"{what}/{'/'.join(path)}")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, sp_model_path):
    root = tmp_path_factory.mktemp("sources")
    clip_state = tl.write_openai_clip_torchscript(root / "ViT-T-4.pt", seed=1, **CLIP)
    meta_state = tl.write_meta_llama_dir(root / "llama", n_layers=3, seed=2, **DIMS)
    return dict(root=root, tokenizer=sp_model_path, clip=root / "ViT-T-4.pt", clip_state=clip_state,
                llama=root / "llama", meta_state=meta_state)


def test_nxtp_convert_console_script_meta_llama_and_openai_clip(sources, tmp_path):
    out = tmp_path / "ckpt"
    args = [f"--clip={sources['clip']}", f"--llama_dir={sources['llama']}", f"--tokenizer={sources['tokenizer']}", "--layers=2",
            "--seed=7", f"--out={out}"]
    res = subprocess.run([str(pathlib.Path(sys.executable).with_name("nxtp-convert")), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "clip: kept 31 keys, dropped 22" in res.stdout
    assert "llama: kept 21 keys, dropped 10" in res.stdout
    assert "truncated: blocks >= 2" in res.stdout and "vision_encoder/proj/kernel: N(0, 128^-0.5)" in res.stdout

    config, params = load(out)
    assert (config.vision.width, config.vision.layers, config.vision.patch_size, config.vision.image_size) == (128, 2, 4, 16)
    d = config.decoder
    assert (d.dim, d.layers, d.n_heads, d.kv_heads, d.vocab_size, d.hidden_dim) == (64, 2, 4, 2, V + 2, 192)
    assert (config.special_tokens.image, config.special_tokens.empty) == (V, V + 1)
    assert (out / "tokenizer.model").read_bytes() == pathlib.Path(sources["tokenizer"]).read_bytes()

    assert_params(params["vision_encoder"], expected_clip(sources["clip_state"], range(2)), "vision_encoder")
    assert_params(params["language_decoder"], expected_decoder(sources["meta_state"], 2), "language_decoder")
    emb = get(params, ("language_decoder", "tok_embeddings", "embedding"))
    out_kernel = get(params, ("language_decoder", "output", "kernel"))
    np.testing.assert_array_equal(emb[:V], f32(sources["meta_state"]["tok_embeddings.weight"]))
    np.testing.assert_array_equal(out_kernel[:, :V], f32(sources["meta_state"]["output.weight"]).T)
    np.testing.assert_array_equal(out_kernel[:, V + 1], np.zeros(64))
    assert np.abs(out_kernel[:, V]).max() <= 1 / 8 and np.abs(out_kernel[:, V]).max() > 0
    assert get(params, ("vision_encoder", "proj", "kernel")).shape == (128, 64)

    meta = checkpoint.read_meta(out)["provenance"]
    assert meta["origin"]["vision_encoder/transformer/resblocks_1/attn/in_proj/kernel"] == "clip"
    assert meta["origin"]["language_decoder/layers_1/attention/wq/kernel"] == "llama"
    assert meta["origin"]["vision_encoder/proj/kernel"] == "fresh"
    assert meta["sources"]["llama"]["files"] == [str(sources["llama"] / "consolidated.00.pth")]
    assert meta["seed"] == 7


def test_cli_released_nxtp_checkpoint_over_clip_with_params_json_only(sources, tmp_path, capsys):
    llama_dir = tmp_path / "llama-params-only"
    tl.write_meta_llama_dir(llama_dir, n_layers=32, write_weights=False, **DIMS)
    assert not list(llama_dir.glob("*.pth"))
    nxtp_state = tl.random_nxtp_model_state(trained_vision_blocks=(1,), n_layers=2, n_kv_heads=2, vocab_size=V + 2, seed=4)
    written = tl.write_nxtp_checkpoint(tmp_path / "ckpt_epoch_03_iter_0021360.pth", nxtp_state)
    assert all(k.startswith("module.") for k in written)

    out = tmp_path / "ckpt"
    res = run_cli(capsys, clip=sources["clip"], llama_dir=llama_dir, tokenizer=sources["tokenizer"], nxtp_ckpt=tmp_path / "ckpt_epoch_03_iter_0021360.pth", out=out)
    assert res.returncode == 0, res.stderr
    assert f"nxtp: kept {len(nxtp_state)} keys, dropped 0" in res.stdout
    assert "llama: kept 0 keys, dropped 0 (no weight files read)" in res.stdout
    assert "initialised fresh: nothing" in res.stdout

    config, params = load(out)
    assert config.decoder.layers == 2
    trained = {k.removeprefix("module."): v.half().float() for k, v in written.items()}
    clip_from_nxtp = {"visual." + k.removeprefix("vision_encoder."): v for k, v in trained.items() if k.startswith("vision_encoder.")}
    assert_params(params["vision_encoder"], expected_clip({**sources["clip_state"], **clip_from_nxtp}, range(2)), "vision_encoder")
    np.testing.assert_array_equal(get(params, ("vision_encoder", "proj", "kernel")), f32(trained["vision_encoder.proj.weight"]).T)
    assert_params(params["language_decoder"], expected_decoder(trained, 2, prefix="language_decoder."), "language_decoder")
    np.testing.assert_array_equal(get(params, ("language_decoder", "tok_embeddings", "embedding")),
                                  f32(trained["language_decoder.tok_embeddings.weight"]))
    np.testing.assert_array_equal(get(params, ("language_decoder", "output", "kernel")),
                                  f32(trained["language_decoder.output.weight"]).T)

    meta = checkpoint.read_meta(out)["provenance"]
    assert meta["origin"]["vision_encoder/transformer/resblocks_1/attn/in_proj/kernel"] == "nxtp"
    assert meta["origin"]["vision_encoder/transformer/resblocks_0/attn/in_proj/kernel"] == "clip"
    assert meta["nxtp_global_step"] == 21360
    assert meta["sources"]["clip"]["dropped"]["superseded by nxtp"] == 12 + 2


def test_nxtp_checkpoint_missing_a_decoder_param_needs_the_llama_weights(sources, tmp_path):
    llama_dir = tmp_path / "llama-params-only"
    tl.write_meta_llama_dir(llama_dir, n_layers=3, write_weights=False, **DIMS)
    state = tl.random_nxtp_model_state(trained_vision_blocks=(1,), n_layers=2, n_kv_heads=2, vocab_size=V + 2)
    del state["language_decoder.norm.weight"]
    tl.write_nxtp_checkpoint(tmp_path / "ckpt.pth", state)
    with pytest.raises(WeightImportError, match=r"no consolidated.*pth in .*norm\.weight"):
        convert(clip_path=sources["clip"], tokenizer_path=sources["tokenizer"], llama_dir=llama_dir,
                nxtp_ckpt=tmp_path / "ckpt.pth")
    # With the LLaMA weights present, the missing param comes from them.
    conv = convert(clip_path=sources["clip"], tokenizer_path=sources["tokenizer"], llama_dir=sources["llama"],
                   nxtp_ckpt=tmp_path / "ckpt.pth")
    assert conv.origin["language_decoder/norm/weight"] == "llama"
    assert conv.origin["language_decoder/layers_0/attention/wq/kernel"] == "nxtp"
    np.testing.assert_array_equal(conv.params["language_decoder"]["norm"]["weight"], f32(sources["meta_state"]["norm.weight"]))


def test_cli_hf_layout_in_bfloat16(sources, tmp_path, capsys):
    hf_state = tl.write_hf_llama_dir(tmp_path / "hf", n_layers=2, n_kv_heads=2, seed=6)
    out = tmp_path / "ckpt"
    res = run_cli(capsys, clip=sources["clip"], llama_hf_dir=tmp_path / "hf", tokenizer=sources["tokenizer"], layers=1, dtype="bfloat16", out=out)
    assert res.returncode == 0, res.stderr
    _, params = load(out, param_dtype=jnp.bfloat16)
    wv = get(params, ("language_decoder", "layers_0", "attention", "wv", "kernel"))
    assert wv.dtype == ml_dtypes.bfloat16
    ref = f32(hf_state["model.layers.0.self_attn.v_proj.weight"]).T.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(wv, ref)
    assert "layers_1" not in params["language_decoder"]


def test_cli_llama_dir_pointed_at_a_hugging_face_folder_reads_it_as_one(sources, tmp_path, capsys):
    hf_state = tl.write_hf_llama_dir(tmp_path / "hf", n_layers=2, n_kv_heads=2, seed=6)
    assert not (tmp_path / "hf" / "params.json").exists()
    out = tmp_path / "ckpt"
    res = run_cli(capsys, clip=sources["clip"], llama_dir=tmp_path / "hf", tokenizer=sources["tokenizer"], layers=1, out=out)
    assert res.returncode == 0, res.stderr
    assert "reading it as the Hugging Face layout (--llama_hf_dir)" in res.stderr
    _, params = load(out)
    wq = get(params, ("language_decoder", "layers_0", "attention", "wq", "kernel"))
    meta_wq = tl.hf_to_meta_state(hf_state, n_heads=4, n_kv_heads=2)["layers.0.attention.wq.weight"]
    np.testing.assert_array_equal(wq, f32(meta_wq).T)


def test_other_image_size_gets_a_fresh_positional_embedding(sources):
    conv = convert(clip_path=sources["clip"], tokenizer_path=sources["tokenizer"], llama_dir=sources["llama"],
                   layers=1, image_size=32)
    assert conv.config.vision.image_size == 32
    assert conv.params["vision_encoder"]["positional_embedding"].shape == (65, 128)
    assert conv.origin["vision_encoder/positional_embedding"] == "fresh"
    assert "vision_encoder/positional_embedding" in conv.fresh


def test_cli_errors_are_reported_without_traceback(sources, tmp_path, capsys):
    res = run_cli(capsys, clip=tmp_path / "missing.pt", llama_dir=sources["llama"], tokenizer=sources["tokenizer"], layers=1, out=tmp_path / "ckpt")
    assert res.returncode == 1 and "missing.pt" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(capsys, clip=sources["clip"], llama_dir=sources["llama"], tokenizer=sources["tokenizer"], out=tmp_path / "ckpt")
    assert res.returncode == 1 and "--layers" in res.stderr


def test_cli_usage_errors_exit_2_without_writing(sources, tmp_path, capsys):
    common = dict(clip=sources["clip"], tokenizer=sources["tokenizer"], layers=1, out=tmp_path / "ckpt")
    res = run_cli(capsys, **common, llama_dir=sources["llama"], llama_hf_dir=sources["llama"])
    assert res.returncode == 2 and "llama_dir" in res.stderr and "llama_hf_dir" in res.stderr, res.stderr
    res = run_cli(capsys, **common)
    assert res.returncode == 2 and "llama_dir" in res.stderr, res.stderr
    assert convert_command([f"--{k}={v}" for k, v in common.items()] + [f"--llama-dir={sources['llama']}"]) == 2
    assert "Unknown command line flag 'llama-dir'" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_the_convert_hint_is_a_command_line_the_converter_accepts(tmp_path, monkeypatch, capsys):
    prog, *args = shlex.split(checkpoint.CONVERT_COMMAND)
    assert prog == convert_command.prog
    fv = convert_command.flag_values(args)
    fv([prog, *args])  # raises on an unknown flag or a flag value that does not parse
    assert (fv.clip, fv.llama_dir, fv.llama_hf_dir, fv.tokenizer, fv.layers, fv.out) == (
        "ViT-L-14.pt", "llama-2-7b", None, "tokenizer.model", 6, "DIR")
    # Run where none of its files exist: past every usage check (exit 2), it fails on a missing input.
    monkeypatch.chdir(tmp_path)
    assert convert_command(args) == 1
    err = capsys.readouterr().err
    assert "found nothing" in err and any(name in err for name in ("ViT-L-14.pt", "llama-2-7b", "tokenizer.model")), err
    assert not (tmp_path / "DIR").exists()
