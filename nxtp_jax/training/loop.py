"""The training run: data, tokenizer, sharded state, the loop, checkpoints, preemption, logs.

    train(config, workdir)

Resume is automatic: the latest checkpoint in <workdir>/checkpoints (trainable params,
optimizer state, step, the grain iterator state and the config) is restored, and the
run continues with exactly the batches and updates it would have had. A step that does not
restore is moved aside (`<step>.unrestorable`) and the one before it is used. Before that,
the workdir is checked writable and locked (`checkpoint.py`'s guards), and a resume with
another model shape stops before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from etils import epath
from ml_collections import config_dict

from nxtp_jax import checkpoint, experiment, prompts, sharding
from nxtp_jax.training import inputs, optim
from nxtp_jax.training.step import StepOptions, TrainState, create, jit_train_step, make_train_step
from nxtp_jax.data import pipeline, registry, tar
from nxtp_jax.data.samples import load_json, read_texts
from nxtp_jax.models.config import ModelConfig
from nxtp_jax.models.layers import Activations
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.errors import WorkdirError
from nxtp_jax.training.preemption import PreemptionWatch
from nxtp_jax.tokenizer import Tokenizer, train_sentencepiece
from nxtp_jax.training.log import MetricsLogger

TRAIN_CONFIG_FILE = "train_config.json"


@dataclasses.dataclass
class TrainResult:
    step: int  # the step the run stopped at
    preempted: bool
    last_loss: float


def _is_main() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def config_json(config: config_dict.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


# -- data and tokenizer --


def _has_shards(root: epath.Path) -> bool:
    try:
        return bool(registry.find_shards(root))
    except FileNotFoundError:
        return False


def prepare_data(config: config_dict.ConfigDict) -> list[str]:
    """Training shard paths; synthesizes the shapes dataset first if the config asks and it is absent."""
    if config.data.synthesize == "shapes":
        roots = [epath.Path(config.data.root) / config.data.registry[n.lower()]["root"] for n in config.data.train]
        if _is_main() and not all(_has_shards(r) for r in roots):
            from nxtp_jax.data.shapes import make_shapes

            out = epath.Path(config.data.root) / "shapes"
            print(f"writing the synthetic shapes dataset to {out} (once) ...", flush=True)
            make_shapes(
                out,
                num_train=config.data.synthetic_train,
                num_val=config.data.synthetic_val,
                image_size=config.model.vision.image_size,
            )
        _sync("synthesize")
    return registry.resolve_shards(list(config.data.train), config.data.root, config.data.registry)


def tokenizer_corpus(shards: list[str], max_texts: int) -> list[str]:
    """Label lists and captions of the first training samples, in shard order, plus the templates.

    Every training text starts with a template, so the templates are repeated to weigh as
    much as the samples; otherwise their words would be split into bytes.
    """
    texts: list[str] = []
    samples = 0
    for shard in shards:
        if samples >= max_texts:
            break
        with tar.walk(shard) as (fd, groups):
            for group in groups:
                if samples >= max_texts:
                    break
                if isinstance(group, tar.TarFormatError):
                    continue
                members = read_texts(fd, group.key, group.members)  # size-capped; bad json is None
                if tar.CAPTION_EXT in members:
                    texts.append(members[tar.CAPTION_EXT].decode("utf-8", errors="ignore"))
                if tar.JSON_EXT in members:
                    meta = load_json(members[tar.JSON_EXT] or b"{}")
                    if isinstance(meta, dict) and isinstance(meta.get("labels"), list):
                        texts.append(", ".join(str(label) for label in meta["labels"]))
                samples += 1
    templates = list(prompts.OBJECT_TEMPLATES) + list(prompts.CAPTION_TEMPLATES)
    return templates * max(1, samples // len(templates)) + texts


def prepare_tokenizer(config: config_dict.ConfigDict, workdir: epath.Path, shards: list[str]) -> Tokenizer:
    """The configured tokenizer; from scratch without one, trains <workdir>/tokenizer.model once."""
    path = experiment.tokenizer_path(config, workdir)
    if not path.is_file() and config.model.init == "scratch" and not config.tokenizer.path:
        if _is_main():
            print(f"training a {config.tokenizer.vocab_size}-piece sentencepiece tokenizer on the training data ...", flush=True)
            train_sentencepiece(tokenizer_corpus(shards, config.tokenizer.max_texts), path, config.tokenizer.vocab_size)
        _sync("tokenizer")
    return Tokenizer(path)


# -- model and state --


def build_model(config: config_dict.ConfigDict, model_cfg: ModelConfig, mesh=None) -> Recognizer:
    """The training model; with a mesh, its activations are constrained by the config's logical_axis_rules."""
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    return Recognizer(
        model_cfg,
        dtype=experiment.dtype(config.model.dtype),
        param_dtype=experiment.dtype(config.model.param_dtype),
        attention_impl=config.model.attention_impl or None,
        remat=config.model.remat,
        activations=None if mesh is None else Activations(mesh, rules),
        scan_layers=config.model.scan_layers,
    )


def check_init_checkpoint(ckpt: str, expected: ModelConfig) -> None:
    diffs = checkpoint.model_differences(expected, checkpoint.load_config(ckpt), "config", "checkpoint")
    if diffs:
        raise ValueError(
            f"model.checkpoint {ckpt} does not match config.model: {'; '.join(diffs)}. Set the config's "
            "model fields to the checkpoint's (see its config.json), or convert a matching checkpoint"
        )


def init_params(config: config_dict.ConfigDict, model: Recognizer, mesh, rules) -> Any:
    if config.model.init == "checkpoint":
        check_init_checkpoint(config.model.checkpoint, model.config)
        return checkpoint.load_params(config.model.checkpoint, checkpoint.abstract_params(model, mesh, rules))
    return checkpoint.scratch_params(model, config.seed, mesh, rules)


def init_meta(config: config_dict.ConfigDict) -> dict:
    if config.model.init == "checkpoint":
        return {"kind": "checkpoint", "path": os.fspath(checkpoint.as_path(config.model.checkpoint))}
    return {"kind": "scratch", "seed": config.seed}


@dataclasses.dataclass
class Setup:
    """Everything a run builds before its first step."""

    mesh: Any
    model: Recognizer
    tokenizer: Tokenizer
    state: TrainState
    frozen: Any
    step_fn: Any  # the jitted train step
    batch_sharding: NamedSharding
    schedule: Any
    total_steps: int
    warmup_steps: int


def setup(config: config_dict.ConfigDict, workdir: epath.Path, shards: list[str]) -> Setup:
    mesh = experiment.make_mesh(config)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    tok = prepare_tokenizer(config, workdir, shards)
    model = build_model(config, experiment.model_config(config, tok), mesh)
    schedule, make_tx = optim.from_config(config)
    state, frozen, tx = create(init_params(config, model, mesh, rules), tuple(config.trainable), make_tx, mesh)
    rows = experiment.embedding_row_ids(config, tok)
    row_mask = optim.embedding_row_mask(tok.vocab_size, rows)
    opts = StepOptions.from_config(config, model.config, tok.delimiter_id)
    step = make_train_step(model, tx, schedule, opts, None if row_mask is None else jnp.asarray(row_mask))
    batch_spec = sharding.batch_sharding(mesh, rules)
    step_fn = jit_train_step(step, state, frozen, batch_spec, mesh)
    return Setup(mesh, model, tok, state, frozen, step_fn, batch_spec, schedule, experiment.total_steps(config), experiment.warmup_steps(config))


# -- checkpoints --


def checkpoint_manager(config: config_dict.ConfigDict, workdir: epath.Path) -> ocp.CheckpointManager:
    """Orbax decides the interval saves (every save_interval_steps, and the first step of a fresh run)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint.save_interval_steps,
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
    )
    return ocp.CheckpointManager(checkpoint.steps_path(workdir, orbax_dir(config)), options=options)


def orbax_dir(config: config_dict.ConfigDict) -> str:
    """config.checkpoint.dir, or the default `checkpoints` under the workdir."""
    return config.checkpoint.dir or checkpoint.STEPS_DIR


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save(manager, step: int, state: TrainState, data_iter, config: config_dict.ConfigDict, *, force: bool) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            **{checkpoint.TRAINABLE_ITEM: ocp.args.StandardSave(state.params)},
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config_json(config)),
        ),
        force=force,
    )


def restore(manager, step: int, state: TrainState, data_iter, mesh) -> TrainState:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{checkpoint.TRAINABLE_ITEM: ocp.args.StandardRestore(_abstract(state.params))},
            opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
            data=grain.checkpoint.CheckpointRestore(data_iter),
        ),
    )
    step_array = jax.device_put(jnp.asarray(step, jnp.int32), NamedSharding(mesh, PartitionSpec()))
    return TrainState(step=step_array, params=restored[checkpoint.TRAINABLE_ITEM], opt_state=restored.opt_state)


# -- the loop --


def train_iterator(config: config_dict.ConfigDict, shards: list[str]):
    transform = functools.partial(inputs.shuffle_labels, seed=config.seed) if config.shuffle_labels else None
    return pipeline.build_train_iterator(
        shards,
        image_size=config.model.vision.image_size,
        batch_size=experiment.per_process_batch(config),
        seed=config.seed,
        worker_count=config.data.worker_count,
        sample_transform=transform,
        label_source=config.data.label_source,
        window_size=config.data.window_size,
        cycle_length=config.data.cycle_length,
    )


def lock_workdir(workdir: epath.Path, steps: epath.Path) -> checkpoint.Lock | None:
    """Every process checks that it can write; process 0 takes the lock, and all stop together if it cannot."""
    checkpoint.check_writable(workdir, steps)
    lock, error = None, None
    if _is_main():
        try:
            lock = checkpoint.Lock(workdir).acquire()
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1 and not bool(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        error = error or WorkdirError(f"process 0 could not lock {workdir}; see its log")
    if error is not None:
        raise error
    return lock


def resume(manager, state: TrainState, data_iter, mesh, workdir: epath.Path) -> tuple[int, TrainState]:
    """(step, state) of the latest checkpoint that restores, or (0, state) in a new workdir.

    A step that fails to restore (a truncated save) is moved aside to `<step>.unrestorable`
    with a warning naming it, and the previous one is tried.
    """
    steps_dir = manager.directory
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, restore(manager, step, state, data_iter, mesh)
        except Exception as e:  # orbax, tensorstore and grain raise many types for a damaged step
            aside = steps_dir / f"{step}.unrestorable"
            print(f"warning: checkpoint step {step} in {steps_dir} does not restore ({checkpoint.describe(e)}); "
                  f"moving it to {aside.name} and trying the previous step", flush=True)
            if _is_main():
                (steps_dir / str(step)).rename(aside)
            _sync(f"unrestorable_{step}")
            manager.reload()
    return 0, state


def train(config: config_dict.ConfigDict, workdir: str | os.PathLike) -> TrainResult:
    """Trains (or resumes) in `workdir` up to `experiment.last_step(config)`, or until preempted."""
    experiment.validate(config)
    workdir = checkpoint.as_path(workdir)  # local, or any epath backend (gs://...)
    lock = lock_workdir(workdir, checkpoint.steps_path(workdir, orbax_dir(config)))
    try:
        return _train(config, workdir)
    finally:
        if lock is not None:
            lock.release()


def _train(config: config_dict.ConfigDict, workdir: epath.Path) -> TrainResult:
    _sync("workdir")
    shards = prepare_data(config)
    # Before the params exist, and before config.json is rewritten.
    tok = prepare_tokenizer(config, workdir, shards)
    checkpoint.check_same_model(workdir, experiment.model_config(config, tok), list(config.trainable))
    s = setup(config, workdir, shards)
    if _is_main():
        checkpoint.write_training_meta(
            workdir,
            s.model.config,
            s.tokenizer.model_path,
            init=init_meta(config),
            trainable=list(config.trainable),
            steps_dir=orbax_dir(config),
        )
        (workdir / TRAIN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")

    data_iter = train_iterator(config, shards)
    manager = checkpoint_manager(config, workdir)
    start, state = resume(manager, s.state, data_iter, s.mesh, workdir)
    frozen = s.frozen
    if config.model.init == "scratch" and jax.tree.leaves(frozen):
        # Random values depend on the mesh: a resumed run keeps the ones it started with.
        if start:
            frozen = checkpoint.load_frozen(workdir, _abstract(frozen))
        else:
            checkpoint.save_frozen(workdir, frozen)
    if start:
        print(f"resumed from step {start} in {manager.directory}", flush=True)
    last = experiment.last_step(config)
    text_len = experiment.text_length(config)
    logger = MetricsLogger(
        workdir, resume_step=start, warmup=s.warmup_steps, tensorboard=config.tensorboard, enabled=_is_main()
    )
    if _is_main():
        print(
            f"training steps {start} -> {last} of {s.total_steps} (warmup {s.warmup_steps}), global batch "
            f"{config.batch_size}, mesh {dict(s.mesh.shape)}, {jax.process_count()} process(es)",
            flush=True,
        )

    def fetch(step: int):
        t0 = time.perf_counter()
        batch = next(data_iter)
        local = inputs.model_inputs(
            s.tokenizer,
            batch,
            step=step,
            seed=config.seed,
            augment=config.prompt_augmentation,
            text_len=text_len,
            captions=config.weight_loss_cap > 0,
        )
        epoch = int(np.max(batch["epoch"])) + 1
        return inputs.global_batch(local, s.batch_sharding), epoch, time.perf_counter() - t0

    watch = PreemptionWatch()
    step, preempted, loss = start, False, math.nan
    window_start, window_steps, window_skipped, skipped_total = time.perf_counter(), 0, 0, 0
    try:
        if step < last:
            batch, epoch, data_time = fetch(step)
        t_iter = time.perf_counter()
        while step < last:
            state, metrics = s.step_fn(state, frozen, batch)
            step += 1
            preempted = watch.reached(step)
            forced = preempted or step == last
            save_now = forced or manager.should_save(step)
            if not save_now:
                # Fetching here overlaps the host's data work with the device's step.
                next_batch = fetch(step)
            metrics = jax.device_get(metrics)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                manager.wait_until_finished()
                raise FloatingPointError(
                    f"loss is {loss} at step {step}; stopping without saving this state. The last good "
                    f"checkpoint is step {manager.latest_step()} in {manager.directory}. Lower "
                    "optim.lr, enable optim.grad_clip, or check the data around this step"
                )
            now = time.perf_counter()
            batch_time, t_iter = now - t_iter, now
            window_steps += 1
            window_skipped += int(metrics["skipped"])
            skipped_total += int(metrics["skipped"])
            if step % config.log_every_steps == 0 or step == start + 1 or step == last or preempted:
                elapsed = now - window_start
                record = {
                    "step": step,
                    "epoch": epoch,
                    **{k: float(v) for k, v in metrics.items() if k != "skipped"},
                    "skipped_samples": window_skipped,  # bad samples dropped since the previous record
                    "skipped_total": skipped_total,
                    "samples_per_sec": config.batch_size * window_steps / elapsed,
                    "tokens_per_sec": config.batch_size * window_steps * config.max_seq_len / elapsed,
                    "data_time": data_time,
                    "batch_time": batch_time,
                }
                logger.write(record)
                window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
            if save_now:
                non_finite = checkpoint.non_finite_params(state.params)
                if non_finite:
                    manager.wait_until_finished()
                    raise FloatingPointError(
                        f"the parameters became non-finite in the update of step {step} ({len(non_finite)} of them, first "
                        f"{non_finite[0]}; its loss, {loss}, was still finite); stopping without saving them. The last good checkpoint is step "
                        f"{manager.latest_step()}. Lower optim.lr or enable optim.grad_clip"
                    )
                save(manager, step, state, data_iter, config, force=forced)
                if preempted:
                    print(f"preempted: saved step {step}; run the same command again to resume", flush=True)
                    break
                if step < last:
                    next_batch = fetch(step)
            batch, epoch, data_time = next_batch if step < last else (None, epoch, 0.0)
        manager.wait_until_finished()
    finally:
        watch.close()
        logger.close()
        manager.close()
    return TrainResult(step=step, preempted=preempted, last_loss=loss)
