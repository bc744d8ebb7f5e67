"""Self-describing model checkpoints: a directory that later code loads with no other input.

    DIR/config.json      model dimensions, layer count, special-token ids, provenance
    DIR/tokenizer.model  the sentencepiece model the ids refer to
    DIR/params/          the Flax params (orbax)

Training workdirs are checkpoint directories too; their format (below) and the guards a run
checks before it writes in one (writable, locked, the same model) live here as well.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import socket
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

from nxtp_jax import params as ptree, sharding
from nxtp_jax.errors import CheckpointError, WorkdirError
from nxtp_jax.models.config import ModelConfig
from nxtp_jax.models.recognizer import init_params, init_variables

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"
FORMAT = "nxtp_jax.checkpoint/1"
# A first checkpoint from CLIP and LLaMA-2, as errors quote it; tests/weights parse it with nxtp-convert's flags.
CONVERT_COMMAND = "nxtp-convert --clip=ViT-L-14.pt --llama_dir=llama-2-7b --tokenizer=tokenizer.model --layers=6 --out=DIR"


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` on its etils.epath backend (local, gs://, ...); a local one made absolute, as orbax needs."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies a (small) file between any two epath backends."""
    epath.Path(dst).write_bytes(epath.Path(src).read_bytes())


def check_new_dir(ckpt_dir: str | os.PathLike) -> epath.Path:
    """`ckpt_dir` as an absolute path, if it is absent or an empty directory; a checkpoint is never written over files."""
    ckpt_dir = as_path(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise CheckpointError(f"expected a new output directory at {ckpt_dir}, found a file; choose another --out")
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise CheckpointError(f"expected a new or empty output directory at {ckpt_dir}, found files in it; choose another --out")
    return ckpt_dir


def save(ckpt_dir: str | os.PathLike, params: Any, config: ModelConfig, tokenizer_path: str | os.PathLike, **info: Any) -> epath.Path:
    """Writes params, config and tokenizer. `info` (JSON-able) records provenance, e.g. sources.

    Everything is written to a temporary sibling directory renamed into place at the end,
    so `ckpt_dir` is either absent (or empty) or complete.
    """
    ckpt_dir = check_new_dir(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-{os.getpid()}")
    tmp.rmtree(missing_ok=True)
    tmp.mkdir()
    try:
        copy_file(tokenizer_path, tmp / TOKENIZER_FILE)
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
        tmp.rmtree(missing_ok=True)
    return ckpt_dir


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    path = epath.Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not an nxtp_jax checkpoint directory "
            f"(make one with `{CONVERT_COMMAND}`)"
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
            f"{epath.Path(ckpt_dir) / CONFIG_FILE}: its 'model' entry is not a model config ({type(e).__name__}: {e})"
        ) from e


def model_differences(a: ModelConfig | dict, b: ModelConfig | dict, a_name: str, b_name: str) -> list[str]:
    """`model.PART.FIELD: <a_name> X, <b_name> Y` for every field where two model configs (or a
    config.json's "model" entry) differ; [] when they describe the same model."""

    def fields(config, prefix="model") -> dict:
        config = config.to_dict() if isinstance(config, ModelConfig) else config
        flat = {}
        for k, v in config.items():
            flat.update(fields(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
        return flat

    a, b = fields(a), fields(b)
    return [f"{k}: {a_name} {a.get(k)!r}, {b_name} {b.get(k)!r}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def tokenizer_path(ckpt_dir: str | os.PathLike) -> epath.Path:
    return epath.Path(ckpt_dir) / read_meta(ckpt_dir)["tokenizer"]


@jax.jit
def _finite_leaves(tree: Any) -> list:
    return [jax.numpy.all(jax.numpy.isfinite(x)) for x in jax.tree.leaves(tree)]


def non_finite_params(params: Any) -> list[str]:
    """The names (a/b/c) of the params holding NaN or inf, in tree order; one jitted pass, sharded params too."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        for (path, _), ok in zip(flat, _finite_leaves(params))
        if not bool(ok)
    ]


def check_finite(params: Any, where: str | os.PathLike) -> None:
    """Raises CheckpointError naming the first param holding NaN or inf."""
    bad = non_finite_params(params)
    if bad:
        raise CheckpointError(f"{where}: param {bad[0]} holds non-finite values (NaN or inf); the checkpoint is damaged")


def restore_params(path: epath.Path, abstract: Any) -> Any:
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
    path = as_path(ckpt_dir) / PARAMS_DIR
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint at {ckpt_dir} has no params")
    return restore_params(path, abstract_params)


def abstract_params(model, mesh=None, rules=None) -> Any:
    """ShapeDtypeStructs of `model`'s params carrying their NamedShardings on `mesh`, so a restore lands sharded.

    Nothing is allocated. The default mesh is this process's first device.
    """
    mesh = mesh if mesh is not None else sharding.one_device_mesh()
    boxed = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh, rules or sharding.LOGICAL_AXIS_RULES)["params"]
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed)["params"], shardings
    )


# -- training workdirs --
#
# A training workdir is also a checkpoint directory: its config.json has the model and
# tokenizer like any other, plus a "training" entry saying where the weights are:
#     WORKDIR/config.json, WORKDIR/tokenizer.model
#     WORKDIR/checkpoints/<step>/params/   the trainable params only (orbax CheckpointManager;
#                                          config.checkpoint.dir can put these steps elsewhere)
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
    steps_dir: str = STEPS_DIR,
) -> epath.Path:
    """Makes `workdir` loadable by `Tagger.load`. `init` is {"kind": "checkpoint", "path": DIR} or {"kind": "scratch", "seed": S}.

    From scratch, frozen params (if any) must be saved with `save_frozen`. `steps_dir` is
    where the step checkpoints are: relative to the workdir, absolute, or a URI.
    """
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if init.get("kind") not in ("checkpoint", "scratch"):
        raise ValueError(f'expected init {{"kind": "checkpoint" | "scratch", ...}}, found {init}')
    target = workdir / TOKENIZER_FILE
    if as_path(tokenizer_path) != target:
        copy_file(tokenizer_path, target)
    training = {"init": init, "trainable": list(trainable), "steps_dir": steps_dir}
    meta = {"format": FORMAT, "model": config.to_dict(), "tokenizer": TOKENIZER_FILE, TRAINING_KEY: training}
    (workdir / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return workdir


def is_training_workdir(ckpt_dir: str | os.PathLike) -> bool:
    path = epath.Path(ckpt_dir) / CONFIG_FILE
    return path.is_file() and TRAINING_KEY in read_meta(ckpt_dir)


def steps_path(workdir: str | os.PathLike, steps_dir: str | None = None) -> epath.Path:
    """The orbax step checkpoints' directory: `steps_dir` (default: the workdir's config.json says) under `workdir`, unless absolute or a URI."""
    if steps_dir is None:
        meta = read_meta(workdir) if is_training_workdir(workdir) else {}
        steps_dir = meta.get(TRAINING_KEY, {}).get("steps_dir", STEPS_DIR)
    if "://" in steps_dir or os.path.isabs(steps_dir):
        return as_path(steps_dir)
    return as_path(workdir) / steps_dir


def training_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps with a finished checkpoint, as orbax lists them."""
    with ocp.CheckpointManager(steps_path(workdir), options=ocp.CheckpointManagerOptions(create=False)) as manager:
        return sorted(manager.all_steps())


def scratch_params(model, seed: int, mesh=None, rules=None) -> Any:
    """The random init of a from-scratch run."""
    return init_params(model, jax.random.key(seed), mesh, rules)


def save_frozen(workdir: str | os.PathLike, frozen: Any) -> None:
    """Keeps a from-scratch run's frozen params (random values that depend on the mesh); every process calls it."""
    if not jax.tree_util.tree_leaves(frozen):
        return
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(as_path(workdir) / FROZEN_DIR, frozen, force=True)
        ckptr.wait_until_finished()


def load_frozen(workdir: str | os.PathLike, abstract_frozen: Any) -> Any:
    return restore_params(as_path(workdir) / FROZEN_DIR, abstract_frozen)


def load_training_params(workdir: str | os.PathLike, model, mesh=None, rules=None, step: int | None = None) -> Any:
    """Full params of a training workdir: the trained ones of `step` (default: the latest) merged with the frozen ones."""
    meta = read_meta(workdir)
    training = meta[TRAINING_KEY]
    steps = training_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"{workdir} is a training workdir without any finished checkpoint in {steps_path(workdir)}; "
            "train longer than checkpoint.save_interval_steps, or until the end of the run"
        )
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{workdir}: expected a checkpoint of step {step}, found steps {steps}")
    abstract = abstract_params(model, mesh, rules)
    abstract_trainable, abstract_frozen = ptree.split(abstract, training["trainable"])
    item = steps_path(workdir) / str(step) / TRAINABLE_ITEM
    trainable = restore_params(item, abstract_trainable)
    if not jax.tree_util.tree_leaves(abstract_frozen):
        return trainable
    if training["init"]["kind"] == "checkpoint":
        frozen = ptree.split(load_params(training["init"]["path"], abstract), training["trainable"])[1]
    else:
        frozen = load_frozen(workdir, abstract_frozen)
    return ptree.merge(trainable, frozen)


# -- guards of a training workdir, checked before a run writes anything or waits at a barrier --
#
# - `check_writable`: the workdir and its checkpoint dir exist (or can be made) and take a file.
# - `Lock`: WORKDIR/run.lock holds {host, pid, time}; a second run on the workdir stops. A
#   lock whose pid is dead on this host is stale: it is reported and taken over.
# - `check_same_model`: a resume with another model shape (or other trainable params) stops,
#   listing the differing fields, before config.json is rewritten.

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


def check_writable(*dirs: str | os.PathLike) -> None:
    """Makes each directory and writes a probe file in it, or raises WorkdirError naming it."""
    for d in dirs:
        d = epath.Path(d)  # local, or any epath backend (gs://...)
        if d.exists() and not d.is_dir():
            raise WorkdirError(f"expected a directory at {d}, found a file; pass another --workdir")
        probe = d / f".write_probe.{socket.gethostname()}.{os.getpid()}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise WorkdirError(
                f"cannot write in {d} ({e.strerror or e}); fix its permissions or pass another --workdir"
            ) from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


class Lock:
    """WORKDIR/run.lock for the lifetime of a run (process 0 only); `release` removes it."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.held = False

    def acquire(self) -> "Lock":
        for _ in range(2):
            try:
                self._create()
            except FileExistsError:
                self._take_over_if_stale()
                continue
            self.held = True
            return self
        raise WorkdirError(f"cannot take the lock {self.path}: another run took it at the same time")

    def _create(self) -> None:
        """Writes the lock file, or raises FileExistsError: atomically on local disk; object stores
        (gs://...) offer no exclusive create through epath, so there a check precedes the write."""
        if "://" in os.fspath(self.path):
            if self.path.exists():
                raise FileExistsError(self.path)
            self.path.write_text(json.dumps(self.info))
            return
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            host, pid, since = owner["host"], int(owner["pid"]), owner.get("time", "?")
        except (OSError, ValueError, KeyError, TypeError):
            raise WorkdirError(
                f"{self.path} exists but is not a lock this code wrote; if no run uses this workdir, delete it"
            ) from None
        if host == self.info["host"] and not _pid_alive(pid):
            log.warning("taking over the stale lock %s: its run (pid %d on %s, since %s) is gone", self.path, pid, host, since)
            print(f"warning: taking over the stale lock {self.path} of pid {pid} (no longer running)", flush=True)
            self.path.unlink(missing_ok=True)
            return
        raise WorkdirError(
            f"{self.path.parent} is in use by another run (pid {pid} on {host}, since {since}); wait for it to end, "
            f"or, if that run is gone, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_same_model(workdir: str | os.PathLike, model: ModelConfig, trainable: list[str]) -> None:
    """Raises WorkdirError if `workdir` holds a run of another model shape or trainable set; a new workdir passes."""
    if not is_training_workdir(workdir):
        return
    meta = read_meta(workdir)
    diffs = model_differences(meta["model"], model, "saved", "now")
    saved_trainable = meta[TRAINING_KEY].get("trainable")
    if saved_trainable != list(trainable):
        diffs.append(f"trainable: saved {saved_trainable!r}, now {list(trainable)!r}")
    if diffs:
        raise WorkdirError(
            f"{workdir} holds a run of another model ({'; '.join(diffs)}); its checkpoints cannot resume this config. "
            "Use a new --workdir, or restore the saved config (config.json, train_config.json)"
        )


def describe(error: Any) -> str:
    """The first line of an exception, for a one-line warning."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
