"""`nxtp-tag --model=CARD` in an environment without torch tags as the torch path does.

The tiny release is written and served here (this environment has torch, and converts the
reference with torch.load); the torch-free environment (`.ci/notorch_env.sh`, its python in
NXTP_NOTORCH_PYTHON) runs its own `nxtp-tag` console script on the same card, with its own
empty caches, so it downloads and converts the `.pth` with the data reader.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

from nxtp_jax.cli.tag import tag_command
from tiny_models import random_images

NOTORCH_PYTHON = os.environ.get("NXTP_NOTORCH_PYTHON")


@pytest.mark.skipif(not NOTORCH_PYTHON, reason="needs the torch-free environment: bash .ci/notorch_env.sh test")
def test_nxtp_tag_model_without_torch_gives_the_torch_paths_labels_and_probabilities(hub, card, tmp_path, capsys):
    images = []
    for seed in (1, 2):
        images.append(tmp_path / f"photo{seed}.png")
        Image.fromarray(random_images(1, 16, seed=seed)[0]).save(images[-1])
    args = [f"--model={card}", "--json", "--num_labels=8", *map(str, images)]
    assert tag_command(args) == 0
    expected = json.loads(capsys.readouterr().out)

    python = pathlib.Path(NOTORCH_PYTHON)
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, f"{python} can import torch"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-notorch"), "HOME": str(tmp_path / "home"),
           "NXTP_JAX_CACHE": str(tmp_path / "nxtp-notorch"), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([python.parent / "nxtp-tag", *args], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert "tiny: licence:" in run.stderr
    assert (tmp_path / "nxtp-notorch" / "tiny" / "config.json").is_file()  # it converted, not reused ours
    assert [[x["label"] for x in r["labels"]] for r in found] == [[x["label"] for x in r["labels"]] for r in expected]
    assert all(r["labels"] for r in found)
    for ours, reference in zip(found, expected):
        np.testing.assert_allclose([x["prob"] for x in ours["labels"]], [x["prob"] for x in reference["labels"]], atol=1e-6)
