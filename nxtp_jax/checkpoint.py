"""Self-describing model checkpoints: a directory that later code loads with no other input.

    DIR/config.json      model dimensions, layer count, special-token ids, provenance
    DIR/tokenizer.model  the sentencepiece model the ids refer to
    DIR/params/          the Flax params (orbax)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nxtp_jax.models.config import ModelConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"
FORMAT = "nxtp_jax.checkpoint/1"


def save(ckpt_dir: str | os.PathLike, params: Any, config: ModelConfig, tokenizer_path: str | os.PathLike, **info: Any) -> pathlib.Path:
    """Writes params, config and tokenizer. `info` (JSON-able) records provenance, e.g. sources."""
    ckpt_dir = pathlib.Path(ckpt_dir).absolute()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if (ckpt_dir / PARAMS_DIR).exists():
        raise FileExistsError(f"{ckpt_dir / PARAMS_DIR} already exists; choose a new output directory")
    shutil.copyfile(tokenizer_path, ckpt_dir / TOKENIZER_FILE)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt_dir / PARAMS_DIR, params)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "model": config.to_dict(), "tokenizer": TOKENIZER_FILE, **info}
    (ckpt_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return ckpt_dir


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not an nxtp_jax checkpoint directory "
            "(make one with `python convert/from_torch.py ... --out DIR`)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_dict(read_meta(ckpt_dir)["model"])


def tokenizer_path(ckpt_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(ckpt_dir) / read_meta(ckpt_dir)["tokenizer"]


def load_params(ckpt_dir: str | os.PathLike, abstract_params: Any) -> Any:
    """Restores params into the dtypes and shardings of `abstract_params` (ShapeDtypeStructs)."""
    path = pathlib.Path(ckpt_dir).absolute() / PARAMS_DIR
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint at {ckpt_dir} has no params")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract_params)


def abstract_params(model, mesh=None, rules=None) -> Any:
    """ShapeDtypeStructs (with shardings) of `model`'s params, without allocating them."""
    from nxtp_jax import sharding
    from nxtp_jax.models.recognizer import init_params

    mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
    return jax.eval_shape(lambda k: init_params(model, k, mesh, rules), jax.random.key(0))
