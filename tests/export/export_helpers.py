"""Helpers shared by the export tests: tiny checkpoints, images, and running the CLIs."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from nxtp_jax import checkpoint
from nxtp_jax.cli.export import export_command
from nxtp_jax.cli.tag import tag_command
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import random_images, tiny_recognizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


Result = collections.namedtuple("Result", "returncode stdout stderr")


def run(cmd: list, python: str = sys.executable, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([python, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def in_process(command, *args) -> Result:
    """A command of nxtp_jax.cli run in this process: its exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = command([str(a) for a in args])
    return Result(status, out.getvalue(), err.getvalue())


def tiny_checkpoint(out: pathlib.Path, sp_model_path, **kw) -> pathlib.Path:
    tok = Tokenizer(sp_model_path)
    model, params = tiny_recognizer(tok, **kw)
    return checkpoint.save(out, params, model.config, sp_model_path)


def write_images(directory: pathlib.Path, n: int, size: int, seed: int = 3) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(random_images(n, size, seed=seed)):
        paths.append(str(directory / f"img{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


def export(ckpt: pathlib.Path, out: pathlib.Path, *extra: str) -> Result:
    res = in_process(export_command, f"--ckpt={ckpt}", f"--out={out}", *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def tag(ckpt: pathlib.Path, *args) -> Result:
    """nxtp-tag --ckpt=CKPT ARGS in this process: the JAX reference the runner must print."""
    res = in_process(tag_command, f"--ckpt={ckpt}", *args)
    assert res.returncode == 0, res.stderr
    return res


def infer_json(python: str, script_args: list) -> list[dict]:
    res = run(script_args, python=python)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def assert_same_predictions(got: list[dict], want: list[dict], atol: float = 1e-4) -> None:
    """Same images, same labels in the same order, every probability within `atol`."""
    assert [g["image"] for g in got] == [w["image"] for w in want]
    for g, w in zip(got, want):
        assert [x["label"] for x in g["labels"]] == [x["label"] for x in w["labels"]], g["image"]
        np.testing.assert_allclose([x["prob"] for x in g["labels"]], [x["prob"] for x in w["labels"]], rtol=0, atol=atol)
