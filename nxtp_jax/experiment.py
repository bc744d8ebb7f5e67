"""An experiment config (configs/*.py): loading, the one `validate`, and the values derived from it.

Configs store each fact once; everything computed from them (the ModelConfig, step
counts, per-process batch, dtypes) is computed here, never written back.
"""

from __future__ import annotations

import os
import re
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from ml_collections import config_dict

from nxtp_jax import checkpoint, sharding
from nxtp_jax.configs import base as base_config
from nxtp_jax.choices import (
    COMPILE_PROGRAMS, COMPILE_SEARCHES, DTYPES, EMBEDDERS, EVAL_RANKINGS, INITS, LABEL_SOURCES, MODES, SCHEDULES, STRATEGIES, SYNTHETIC
)
from nxtp_jax.data import registry
from nxtp_jax.errors import NxtpError
from nxtp_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, VisionConfig
from nxtp_jax.params import ALL_ROWS
from nxtp_jax.sharding import MESH_AXES
from nxtp_jax.tokenizer import LLAMA2_PIECES, SPECIAL_TOKENS, Tokenizer

CONVERT_HINT = (
    f"make it with `{checkpoint.CONVERT_COMMAND}` "
    "(CLIP: https://github.com/openai/CLIP, LLaMA-2: https://llama.meta.com/llama-downloads) "
    "and pass --config.model.checkpoint=DIR"
)


def dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"expected a dtype in {DTYPES}, found {name!r}")
    return jnp.dtype(name)


def _nxtp_config(config: config_dict.ConfigDict, tokenizer: Tokenizer) -> ModelConfig:
    """CLIP ViT + LLaMA blocks from every field of config.model.vision / .decoder; vocabulary and special ids from the tokenizer."""
    return ModelConfig(
        vision=VisionConfig(**config.model.vision.to_dict()),
        decoder=DecoderConfig(**config.model.decoder.to_dict(), vocab_size=tokenizer.vocab_size),
        special_tokens=SpecialTokens(image=tokenizer.image_id, empty=tokenizer.empty_id),
    )


# config.model.name -> the architecture built from the config: where a second architecture joins.
ARCHITECTURES = {"nxtp": _nxtp_config}


def model_config(config: config_dict.ConfigDict, tokenizer: Tokenizer) -> ModelConfig:
    """The architecture config.model.name names, sized by the config and the tokenizer."""
    return ARCHITECTURES[config.model.name](config, tokenizer)


def full_size(layers: int | None = None, image_size: int | None = None) -> ModelConfig:
    """The paper's architecture as configs/base.py writes it (ViT-L/14 + LLaMA-2 7B blocks) with
    LLaMA-2's 32000-piece vocabulary, for random-weight benchmarks; `layers` decoder blocks if given."""
    config = base_config.get_config()
    if layers is not None:
        config.model.decoder.layers = layers
    if image_size is not None:
        config.model.vision.image_size = image_size
    return model_config(config, sized_vocabulary(config))


def sized_vocabulary(config: config_dict.ConfigDict) -> types.SimpleNamespace:
    """What model_config and the train step need of a tokenizer, from the config alone (no file):
    LLaMA-2's pieces for a checkpoint init, tokenizer.vocab_size from scratch, then the special tokens.
    The delimiter is some ordinary piece; shapes and cost do not depend on which."""
    base = LLAMA2_PIECES if config.model.init == "checkpoint" else config.tokenizer.vocab_size
    return types.SimpleNamespace(vocab_size=base + len(SPECIAL_TOKENS), image_id=base, empty_id=base + 1, delimiter_id=base - 1)


def num_image_tokens(config: config_dict.ConfigDict) -> int:
    return VisionConfig(**config.model.vision.to_dict()).num_patches


def text_length(config: config_dict.ConfigDict) -> int:
    """Text tokens per sample: what is left of max_seq_len after the image tokens."""
    return config.max_seq_len - num_image_tokens(config)


def total_steps(config: config_dict.ConfigDict) -> int:
    if config.total_steps > 0:
        return config.total_steps
    return config.epochs * (registry.total_length(config.data.train, config.data.registry) // config.batch_size)


def warmup_steps(config: config_dict.ConfigDict) -> int:
    """max(warmup_ratio % of the total, optim.warmup_steps), as the original."""
    return max(int(config.optim.warmup_ratio * 0.01 * total_steps(config)), config.optim.warmup_steps)


def last_step(config: config_dict.ConfigDict) -> int:
    """The step this run stops at: stop_at_step if set, else total_steps."""
    return config.stop_at_step or total_steps(config)


def per_process_batch(config: config_dict.ConfigDict, process_count: int | None = None) -> int:
    n = jax.process_count() if process_count is None else process_count
    return config.batch_size // n


def mesh_shape(config: config_dict.ConfigDict) -> dict[str, int]:
    return {axis: int(config.mesh[axis]) for axis in MESH_AXES}


def make_mesh(config: config_dict.ConfigDict, devices=None):
    """config.mesh over `devices` (default all of jax.devices(); a TPU topology's for the compile
    check), or over the first ones when every size is given and they are fewer."""
    shape = mesh_shape(config)
    devices = jax.devices() if devices is None else list(devices)
    if -1 not in shape.values():
        devices = devices[: int(np.prod(list(shape.values())))]
    return sharding.make_mesh(shape, devices=devices)


def tokenizer_path(config: config_dict.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
    """config.tokenizer.path, else the init checkpoint's, else <workdir>/tokenizer.model (scratch)."""
    if config.tokenizer.path:
        return epath.Path(config.tokenizer.path)
    if config.model.init == "checkpoint":
        return checkpoint.tokenizer_path(config.model.checkpoint)
    return epath.Path(workdir) / checkpoint.TOKENIZER_FILE


def embedding_row_ids(config: config_dict.ConfigDict, tokenizer: Tokenizer) -> list[int] | None:
    """Ids of the embedding rows that train, or None for all rows."""
    if tuple(config.embedding_rows) == (ALL_ROWS,):
        return None
    return [tokenizer.encode(token, bos=False, eos=False)[0] for token in config.embedding_rows]


class ConfigError(NxtpError, ValueError):
    """The experiment config cannot run; the message lists every problem found."""


def validate(config: config_dict.ConfigDict, *, process_count: int | None = None, device_count: int | None = None) -> None:
    """Checks the whole config once, before anything expensive, and reports all problems together."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def one_of(value: Any, allowed: tuple, field: str) -> None:
        need(value in allowed, f"{field}: expected one of {allowed}, found {value!r}")

    one_of(config.mode, MODES, "mode")
    one_of(config.model.name, tuple(ARCHITECTURES), "model.name")
    one_of(config.model.init, INITS, "model.init")
    one_of(config.model.dtype, DTYPES, "model.dtype")
    one_of(config.model.param_dtype, DTYPES, "model.param_dtype")
    one_of(config.model.attention_impl, ("", "cudnn"), "model.attention_impl")
    one_of(config.optim.schedule, SCHEDULES, "optim.schedule")
    one_of(config.data.synthesize, SYNTHETIC, "data.synthesize")
    one_of(config.eval.strategy, STRATEGIES, "eval.strategy")
    one_of(config.eval.ranking, EVAL_RANKINGS, "eval.ranking")
    one_of(config.eval.embedder, EMBEDDERS, "eval.embedder")
    one_of(config.compile.search, COMPILE_SEARCHES, "compile.search")
    programs = config.compile.programs.split(",")
    need(
        bool(programs) and all(p in COMPILE_PROGRAMS for p in programs),
        f"compile.programs: expected a comma-separated subset of {COMPILE_PROGRAMS}, found {config.compile.programs!r}",
    )
    need(config.compile.num_slices >= 1, f"compile.num_slices: expected >= 1, found {config.compile.num_slices}")
    _check_model(config, need)
    _check_data(config, need)
    _check_training(config, need, process_count, device_count)
    regexes = {"trainable": config.trainable, "optim.no_decay": config.optim.no_decay, "optim.force_decay": config.optim.force_decay}
    for field, patterns in regexes.items():
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                problems.append(f"{field}: {pattern!r} is not a regular expression ({e})")
    rows = tuple(config.embedding_rows)
    need(
        rows == (ALL_ROWS,) or all(r in SPECIAL_TOKENS for r in rows),
        f"embedding_rows: expected special tokens from {SPECIAL_TOKENS} or ('*',), found {rows}",
    )
    rule_names = [r[0] for r in config.logical_axis_rules]
    need(len(rule_names) == len(set(rule_names)), f"logical_axis_rules: a logical axis appears twice in {rule_names}")
    for name, target in config.logical_axis_rules:
        targets = target if isinstance(target, (tuple, list)) else (target,)
        need(
            all(t is None or t in MESH_AXES for t in targets),
            f"logical_axis_rules: {name!r} maps to {target!r}; expected mesh axes from {MESH_AXES} or None",
        )
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _check_model(config, need) -> None:
    v, d = config.model.vision, config.model.decoder
    need(v.width % 64 == 0, f"model.vision.width: expected a multiple of 64 (heads = width // 64), found {v.width}")
    need(
        v.image_size % v.patch_size == 0,
        f"model.vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}",
    )
    need(d.dim % d.n_heads == 0, f"model.decoder.dim {d.dim} is not a multiple of n_heads {d.n_heads}")
    kv = d.n_kv_heads or d.n_heads
    need(d.n_heads % kv == 0, f"model.decoder.n_heads {d.n_heads} is not a multiple of n_kv_heads {kv}")
    need(
        text_length(config) >= 16,
        f"max_seq_len {config.max_seq_len} leaves {text_length(config)} text tokens after "
        f"{num_image_tokens(config)} image tokens; expected at least 16 (prompt + labels)",
    )
    if config.model.init == "checkpoint" and config.mode != "compile":  # compiling needs only the sizes
        ckpt = config.model.checkpoint
        if not ckpt:
            need(False, f"model.checkpoint: model.init is 'checkpoint' but no directory is given; {CONVERT_HINT}")
        elif not (epath.Path(ckpt) / checkpoint.CONFIG_FILE).is_file():
            need(False, f"model.checkpoint: expected the CLIP + LLaMA checkpoint {epath.Path(ckpt) / checkpoint.CONFIG_FILE}, found nothing; {CONVERT_HINT}")
    need(
        config.model.init == "checkpoint" or not config.model.checkpoint,
        f"model.checkpoint: {config.model.checkpoint!r} is given but model.init is {config.model.init!r}, which would ignore "
        "it; set --config.model.init=checkpoint to start from it, or drop model.checkpoint",
    )
    if config.tokenizer.path:
        need(
            epath.Path(config.tokenizer.path).is_file(),
            f"tokenizer.path: expected a sentencepiece model at {config.tokenizer.path}, found nothing",
        )


def _check_data(config, need) -> None:
    registry = config.data.registry
    names = list(config.data.train) if config.mode != "eval" else []
    names += [config.eval.dataset] if config.mode != "train" else []
    for name in names:
        if name.lower() not in registry:
            need(False, f"data: dataset {name!r} is not in data.registry ({sorted(registry)})")
        elif not config.data.synthesize and config.mode != "compile":
            root = epath.Path(config.data.root) / registry[name.lower()]["root"]
            need(
                root.is_dir(),
                f"data: dataset {name!r} expected shards under {root}, found no such directory; "
                "set --config.data.root, or pack the dataset as docs/data.md describes",
            )
    need(
        config.data.label_source in LABEL_SOURCES,
        f"data.label_source: expected one of {LABEL_SOURCES}, found {config.data.label_source!r}",
    )
    need(config.data.worker_count >= 0, f"data.worker_count: expected >= 0, found {config.data.worker_count}")


def _check_training(config, need, process_count, device_count) -> None:
    processes = jax.process_count() if process_count is None else process_count
    devices = jax.device_count() if device_count is None else device_count
    need(config.batch_size > 0, f"batch_size: expected > 0, found {config.batch_size}")
    need(config.grad_accum_steps >= 1, f"grad_accum_steps: expected >= 1, found {config.grad_accum_steps}")
    shape = mesh_shape(config)
    known = 1
    for size in shape.values():
        known *= size if size > 0 else 1
    # One process may use the first devices only (e.g. one CPU device); several must use all.
    fits = devices % known == 0 if -1 in shape.values() else (devices == known or (processes == 1 and known < devices))
    need(
        list(shape.values()).count(-1) <= 1 and fits,
        f"mesh: {shape} does not fit the {devices} devices of {processes} process(es); the sizes must multiply "
        "to the device count (use -1 for one axis to take the rest)",
    )
    sizes = {axis: (devices // known if size == -1 else size) for axis, size in shape.items()}
    batch_shards = sizes["data"] * sizes["fsdp"]
    unit = config.grad_accum_steps * batch_shards
    need(
        config.batch_size % unit == 0 and config.batch_size % processes == 0,
        f"batch_size {config.batch_size}: expected a multiple of grad_accum_steps x (data x fsdp devices) = "
        f"{config.grad_accum_steps} x {batch_shards} and of the {processes} processes",
    )
    need(config.epochs > 0 or config.total_steps > 0, "epochs / total_steps: expected one of them > 0")
    need(config.epochs >= 0, f"epochs: expected >= 0, found {config.epochs}")
    need(config.total_steps >= 0, f"total_steps: expected >= 0 (0 = derive from epochs), found {config.total_steps}")
    o = config.optim
    need(o.lr > 0, f"optim.lr: expected > 0, found {o.lr}")
    need(o.lr_min >= 0, f"optim.lr_min: expected >= 0, found {o.lr_min}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps: expected >= 0, found {o.warmup_steps}")
    need(0 <= o.warmup_ratio <= 1, f"optim.warmup_ratio: expected between 0 and 1, found {o.warmup_ratio}")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1, optim.b2: expected in [0, 1), found {o.b1}, {o.b2}")
    need(o.eps > 0, f"optim.eps: expected > 0, found {o.eps}")
    need(o.weight_decay >= 0, f"optim.weight_decay: expected >= 0, found {o.weight_decay}")
    need(o.grad_clip >= 0, f"optim.grad_clip: expected >= 0 (0 = none), found {o.grad_clip}")
    need(config.max_seq_len > 0, f"max_seq_len: expected > 0, found {config.max_seq_len}")
    need(config.eval.k >= 1, f"eval.k: expected >= 1 (labels per image), found {config.eval.k}")
    need(config.eval.batch_size >= 1, f"eval.batch_size: expected >= 1, found {config.eval.batch_size}")
    need(config.eval.max_images >= 0, f"eval.max_images: expected >= 0 (0 = all), found {config.eval.max_images}")
    need(config.stop_at_step >= 0, f"stop_at_step: expected >= 0, found {config.stop_at_step}")
    need(config.log_every_steps >= 1, f"log_every_steps: expected >= 1, found {config.log_every_steps}")
    need(config.checkpoint.save_interval_steps >= 1, "checkpoint.save_interval_steps: expected >= 1")
    need(config.checkpoint.keep >= 1, "checkpoint.keep: expected >= 1")
    need(config.weight_loss_obj >= 0 and config.weight_loss_cap >= 0, "weight_loss_obj / weight_loss_cap: expected >= 0")
    need(config.weight_loss_obj + config.weight_loss_cap > 0, "weight_loss_obj + weight_loss_cap: expected > 0")
    if config.optim.schedule == "original":
        need(
            config.optim.warmup_steps >= 1 or config.optim.warmup_ratio > 0,
            "optim: the original schedule needs a warmup of at least one step (warmup_steps >= 1)",
        )
