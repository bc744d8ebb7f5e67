"""Acceptance: a checkpoint converted from tiny torch weights in the released layouts (OpenAI CLIP
TorchScript, Meta LLaMA-2 directory, nxtp pickle) exports, and the JAX-free runner prints the
labels `nxtp-tag` prints, every probability within 1e-4."""

from __future__ import annotations

import json

import torch_layouts as tl
from export_helpers import ROOT, assert_same_predictions, export, in_process, infer_json, tag, write_images
from nxtp_jax.cli.convert import convert_command

DIMS = dict(dim=64, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=32)
CLIP = dict(width=128, layers=2, patch=4, resolution=16)


def test_released_layouts_end_to_end(tmp_path, sp_model_path, ort_python):
    tl.write_openai_clip_torchscript(tmp_path / "ViT-T-4.pt", seed=1, **CLIP)
    tl.write_meta_llama_dir(tmp_path / "llama", n_layers=32, write_weights=False, **DIMS)
    state = tl.random_nxtp_model_state(trained_vision_blocks=(1,), n_layers=2, n_kv_heads=2, vocab_size=402, seed=4)
    tl.write_nxtp_checkpoint(tmp_path / "ckpt_epoch_03_iter_0021360.pth", state)
    ckpt = tmp_path / "ckpt"
    res = in_process(convert_command, f"--clip={tmp_path / 'ViT-T-4.pt'}", f"--llama_dir={tmp_path / 'llama'}",
                     f"--tokenizer={sp_model_path}", f"--nxtp_ckpt={tmp_path / 'ckpt_epoch_03_iter_0021360.pth'}", f"--out={ckpt}")
    assert res.returncode == 0, res.stderr

    export(ckpt, tmp_path / "onnx")
    images = write_images(tmp_path / "images", 2, 24)
    got = infer_json(ort_python, [ROOT / "convert" / "onnx_infer.py", "--onnx_dir", tmp_path / "onnx", "--num_labels", 6, "--json", *images])
    want = json.loads(tag(ckpt, "--num_labels=6", "--json", *images).stdout)
    assert_same_predictions(got, want)
    assert all(len(g["labels"]) >= 2 for g in got)
