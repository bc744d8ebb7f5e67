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
    """ShapeDtypeStructs of `model`'s params carrying their NamedShardings on `mesh`, so a restore lands sharded.

    Nothing is allocated. The default mesh is this process's first device.
    """
    import functools

    import flax.linen as nn

    from nxtp_jax import sharding
    from nxtp_jax.models.recognizer import init_variables

    mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.local_devices()[:1])
    boxed = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh, rules or sharding.DEFAULT_RULES)["params"]
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed)["params"], shardings
    )


# -- training workdirs --
#
# A training workdir is also a checkpoint directory: its config.json has the model and
# tokenizer like any other, plus a "training" entry saying where the weights are:
#     WORKDIR/config.json, WORKDIR/tokenizer.model
#     WORKDIR/checkpoints/<step>/params/   the trainable params only (orbax CheckpointManager)
#     WORKDIR/frozen_params/               from scratch: the random init of the frozen params
# The frozen params come from the init checkpoint, or (from scratch) from frozen_params/.

TRAINING_KEY = "training"
STEPS_DIR = "checkpoints"
TRAINABLE_ITEM = "params"
FROZEN_DIR = "frozen_params"


def write_training_meta(
    workdir: str | os.PathLike,
    config: ModelConfig,
    tokenizer_path: str | os.PathLike,
    *,
    init: dict[str, Any],
    trainable: list[str],
) -> pathlib.Path:
    """Makes `workdir` loadable by `Tagger.load`. `init` is {"kind": "checkpoint", "path": DIR} or {"kind": "scratch", "seed": S}.

    From scratch, frozen params (if any) must be saved with `save_frozen`.
    """
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if init.get("kind") not in ("checkpoint", "scratch"):
        raise ValueError(f'expected init {{"kind": "checkpoint" | "scratch", ...}}, found {init}')
    target = workdir / TOKENIZER_FILE
    if pathlib.Path(tokenizer_path).absolute() != target:
        shutil.copyfile(tokenizer_path, target)
    training = {"init": init, "trainable": list(trainable), "steps_dir": STEPS_DIR}
    meta = {"format": FORMAT, "model": config.to_dict(), "tokenizer": TOKENIZER_FILE, TRAINING_KEY: training}
    (workdir / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return workdir


def is_training_workdir(ckpt_dir: str | os.PathLike) -> bool:
    path = pathlib.Path(ckpt_dir) / CONFIG_FILE
    return path.is_file() and TRAINING_KEY in json.loads(path.read_text())


def training_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps with a finished checkpoint (orbax renames a step folder into place when it is complete)."""
    root = pathlib.Path(workdir) / STEPS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def scratch_params(model, seed: int, mesh=None, rules=None) -> Any:
    """The random init of a from-scratch run."""
    from nxtp_jax.models.recognizer import init_params

    return init_params(model, jax.random.key(seed), mesh, rules)


def save_frozen(workdir: str | os.PathLike, frozen: Any) -> None:
    """Keeps a from-scratch run's frozen params (random values that depend on the mesh); every process calls it."""
    if not jax.tree_util.tree_leaves(frozen):
        return
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(pathlib.Path(workdir).absolute() / FROZEN_DIR, frozen, force=True)
        ckptr.wait_until_finished()


def load_frozen(workdir: str | os.PathLike, abstract_frozen: Any) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(workdir).absolute() / FROZEN_DIR, abstract_frozen)


def load_training_params(workdir: str | os.PathLike, model, mesh=None, rules=None, step: int | None = None) -> Any:
    """Full params of a training workdir: the trained ones of `step` (default: the latest) merged with the frozen ones."""
    from nxtp_jax.training import optim

    meta = read_meta(workdir)
    training = meta[TRAINING_KEY]
    steps = training_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"{workdir} is a training workdir without any finished checkpoint in {STEPS_DIR}/; "
            "train longer than checkpoint.save_interval_steps, or until the end of the run"
        )
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{workdir}: expected a checkpoint of step {step}, found steps {steps}")
    abstract = abstract_params(model, mesh, rules)
    abstract_trainable, abstract_frozen = optim.split(abstract, training["trainable"])
    item = pathlib.Path(workdir).absolute() / STEPS_DIR / str(step) / TRAINABLE_ITEM
    with ocp.StandardCheckpointer() as ckptr:
        trainable = ckptr.restore(item, abstract_trainable)
    if not jax.tree_util.tree_leaves(abstract_frozen):
        return trainable
    if training["init"]["kind"] == "checkpoint":
        frozen = optim.split(load_params(training["init"]["path"], abstract), training["trainable"])[1]
    else:
        frozen = load_frozen(workdir, abstract_frozen)
    return optim.merge(trainable, frozen)
