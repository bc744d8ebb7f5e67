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

from nxtp_jax import params as ptree
from nxtp_jax.errors import CheckpointError
from nxtp_jax.models.config import ModelConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"
FORMAT = "nxtp_jax.checkpoint/1"


def check_new_dir(ckpt_dir: str | os.PathLike) -> pathlib.Path:
    """`ckpt_dir` as an absolute path, if it is absent or an empty directory; a checkpoint is never written over files."""
    ckpt_dir = pathlib.Path(ckpt_dir).absolute()
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise CheckpointError(f"expected a new output directory at {ckpt_dir}, found a file; choose another --out")
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise CheckpointError(f"expected a new or empty output directory at {ckpt_dir}, found files in it; choose another --out")
    return ckpt_dir


def save(ckpt_dir: str | os.PathLike, params: Any, config: ModelConfig, tokenizer_path: str | os.PathLike, **info: Any) -> pathlib.Path:
    """Writes params, config and tokenizer. `info` (JSON-able) records provenance, e.g. sources.

    Everything is written to a temporary sibling directory renamed into place at the end,
    so `ckpt_dir` is either absent (or empty) or complete.
    """
    ckpt_dir = check_new_dir(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        meta = {"format": FORMAT, "model": config.to_dict(), "tokenizer": TOKENIZER_FILE, **info}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        check_new_dir(ckpt_dir)  # nothing appeared there meanwhile
        if ckpt_dir.is_dir():
            ckpt_dir.rmdir()
        tmp.rename(ckpt_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt_dir


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not an nxtp_jax checkpoint directory "
            "(make one with `python convert/from_torch.py ... --out DIR`)"
        )
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: expected the checkpoint's JSON description, found unreadable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r}")
    for key, kind in (("model", dict), ("tokenizer", str)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: expected a {kind.__name__} under {key!r}, found {meta.get(key)!r}")
    return meta


def load_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    model = read_meta(ckpt_dir)["model"]
    try:
        return ModelConfig.from_dict(model)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{pathlib.Path(ckpt_dir) / CONFIG_FILE}: its 'model' entry is not a model config ({type(e).__name__}: {e})"
        ) from e


def tokenizer_path(ckpt_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(ckpt_dir) / read_meta(ckpt_dir)["tokenizer"]


@jax.jit
def _finite_leaves(tree: Any) -> list:
    return [jax.numpy.all(jax.numpy.isfinite(x)) for x in jax.tree.leaves(tree)]


def check_finite(params: Any, where: str | os.PathLike) -> None:
    """Raises CheckpointError naming the first param holding NaN or inf."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, _), ok in zip(flat, _finite_leaves(params)):
        if not bool(ok):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise CheckpointError(f"{where}: param {name} holds non-finite values (NaN or inf); the checkpoint is damaged")


def restore_params(path: pathlib.Path, abstract: Any) -> Any:
    """Restores an orbax params item into `abstract` (ShapeDtypeStructs); float and finite, or CheckpointError."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            saved = jax.tree_util.tree_flatten_with_path(ckptr.metadata(path).item_metadata.tree)[0]
            bad = [
                f"{'/'.join(str(getattr(k, 'key', k)) for k in p)} ({leaf.dtype})"
                for p, leaf in saved
                if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
            ]
            if bad:
                raise CheckpointError(f"{path}: expected floating-point params, found {', '.join(bad[:5])}")
            params = ckptr.restore(path, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for a damaged directory
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"{path}: cannot restore the params ({type(e).__name__}: {first}); the checkpoint is incomplete or damaged"
        ) from e
    check_finite(params, path)
    return params


def load_params(ckpt_dir: str | os.PathLike, abstract_params: Any) -> Any:
    """Restores params into the dtypes and shardings of `abstract_params` (ShapeDtypeStructs)."""
    path = pathlib.Path(ckpt_dir).absolute() / PARAMS_DIR
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint at {ckpt_dir} has no params")
    return restore_params(path, abstract_params)


def abstract_params(model, mesh=None, rules=None) -> Any:
    """ShapeDtypeStructs of `model`'s params carrying their NamedShardings on `mesh`, so a restore lands sharded.

    Nothing is allocated. The default mesh is this process's first device.
    """
    import functools

    import flax.linen as nn

    from nxtp_jax import sharding
    from nxtp_jax.models.recognizer import init_variables

    mesh = mesh if mesh is not None else sharding.one_device_mesh()
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
    return path.is_file() and TRAINING_KEY in read_meta(ckpt_dir)


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
    return restore_params(pathlib.Path(workdir).absolute() / FROZEN_DIR, abstract_frozen)


def load_training_params(workdir: str | os.PathLike, model, mesh=None, rules=None, step: int | None = None) -> Any:
    """Full params of a training workdir: the trained ones of `step` (default: the latest) merged with the frozen ones."""
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
    abstract_trainable, abstract_frozen = ptree.split(abstract, training["trainable"])
    item = pathlib.Path(workdir).absolute() / STEPS_DIR / str(step) / TRAINABLE_ITEM
    trainable = restore_params(item, abstract_trainable)
    if not jax.tree_util.tree_leaves(abstract_frozen):
        return trainable
    if training["init"]["kind"] == "checkpoint":
        frozen = ptree.split(load_params(training["init"]["path"], abstract), training["trainable"])[1]
    else:
        frozen = load_frozen(workdir, abstract_frozen)
    return ptree.merge(trainable, frozen)
