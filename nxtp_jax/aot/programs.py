"""The programs the compile check lowers: the real train step and one-shot sampler, on abstract inputs.

Every input is a ShapeDtypeStruct carrying its NamedSharding on a mesh of the target's devices,
built by the same functions a run uses (model, shardings, optimizer, `inputs.batch_spec`), so
nothing is allocated and the shapes cannot drift from the real pipeline's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_dict

from nxtp_jax import checkpoint, experiment, prompts, sharding
from nxtp_jax.inference import sampling
from nxtp_jax.inference.tagger import default_dtype
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.params import ALL_ROWS
from nxtp_jax.tokenizer import SPECIAL_TOKENS
from nxtp_jax.training import inputs, optim
from nxtp_jax.training.step import StepOptions, abstract_state, jit_train_step, make_train_step
from nxtp_jax.training.loop import build_model


@dataclasses.dataclass
class Program:
    """A jitted function and the abstract arguments to lower it with."""

    name: str  # train | eval | tag
    fn: Any
    args: tuple
    kwargs: dict
    mesh: dict[str, int]  # axis -> size
    global_batch: int
    num_chips: int  # chips the program runs on
    param_dtype: str
    # A sampler's decode loop body on its own, and the most times the loop runs it: cost_analysis counts a loop body once.
    loop_step: Program | None = None
    loop_steps: int = 0

    def lower(self):
        return self.fn.lower(*self.args, **self.kwargs)


def _abstract(tree: Any, sharding_of) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def train(config: config_dict.ConfigDict, devices: Sequence[Any]) -> Program:
    """The train step of `loop.setup` with the config's mesh, batch, dtypes, remat, scan and accumulation."""
    mesh = experiment.make_mesh(config, devices)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    vocab = experiment.sized_vocabulary(config)
    model = build_model(config, experiment.model_config(config, vocab), mesh)
    schedule, make_tx = optim.from_config(config)
    state, frozen, tx = abstract_state(checkpoint.abstract_params(model, mesh, rules), tuple(config.trainable), make_tx, mesh)
    rows = None
    if tuple(config.embedding_rows) != (ALL_ROWS,):
        # sized_vocabulary puts the special tokens in SPECIAL_TOKENS order after the ordinary pieces.
        ids = [vocab.image_id + SPECIAL_TOKENS.index(token) for token in config.embedding_rows]
        rows = jnp.asarray(optim.embedding_row_mask(vocab.vocab_size, ids))
    opts = StepOptions.from_config(config, model.config, vocab.delimiter_id)
    step = make_train_step(model, tx, schedule, opts, rows)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    spec = inputs.batch_spec(
        config.batch_size,
        image_size=config.model.vision.image_size,
        text_len=experiment.text_length(config),
        captions=config.weight_loss_cap > 0,
    )
    batch = _abstract(spec, lambda _: batch_sharding)
    fn = jit_train_step(step, state, frozen, batch_sharding, mesh)
    return Program(
        "train", fn, (state, frozen, batch), {}, dict(mesh.shape), config.batch_size, mesh.devices.size, config.model.param_dtype
    )


def _sampler(
    name: str, config: config_dict.ConfigDict, mesh, *, dtype: Any, param_dtype: Any, batch: int, k: int
) -> Program:
    """`sampling.one_shot` as `Tagger.sample` runs it: normalised float32 images split over the mesh's batch axes."""
    vocab = experiment.sized_vocabulary(config)
    model = Recognizer(experiment.model_config(config, vocab), dtype=dtype, param_dtype=param_dtype)
    params = checkpoint.abstract_params(model, mesh)
    size = config.model.vision.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=sharding.batch_sharding(mesh))
    # [<|image|>, BOS, template words]: about one token per word; the cost hardly depends on the exact count.
    prompt = jax.ShapeDtypeStruct((2 + len(prompts.OBJECT_TEMPLATES[0].split()),), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    kwargs = {"k": k, "delimiter_id": vocab.delimiter_id}
    step = _decode_step(f"{name} decode step", model, params, images, prompt, mesh, **kwargs)
    return Program(
        name,
        sampling.one_shot,
        (model, params, images, prompt),
        kwargs,
        dict(mesh.shape),
        batch,
        mesh.devices.size,
        jnp.dtype(param_dtype).name,
        loop_step=step,
        loop_steps=sampling.decode_steps(),
    )


def _decode_step(name: str, model: Recognizer, params, images, prompt, mesh, *, k: int, delimiter_id: int) -> Program:
    """`sampling.decode_step`, the body of `one_shot`'s decode loop, on the loop state that `one_shot` builds for
    these images, prompt and k: the batch dimension over the mesh's batch axes, as the images."""
    b, t0, _ = jax.eval_shape(functools.partial(sampling.prefix_embeddings, model), params, images, prompt).shape
    first = functools.partial(sampling.first_state, model, k=k, delimiter_id=delimiter_id)
    state = jax.eval_shape(first, params, images, prompt)
    batch_sharding, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    state = _abstract(state, lambda x: batch_sharding if x.shape else replicated)
    fn = jax.jit(sampling.decode_step, static_argnums=0, static_argnames=("t0", "delimiter_id"))
    return Program(
        name, fn, (model, params, state), {"t0": t0, "delimiter_id": delimiter_id}, dict(mesh.shape), b, mesh.devices.size,
        jnp.dtype(model.param_dtype).name,
    )


def evaluate(config: config_dict.ConfigDict, devices: Sequence[Any]) -> Program:
    """The eval job's one-shot sampler: one host's devices (`sharding.local_mesh` with the config's fsdp and
    tensor), eval.batch_size images, eval.k branches, the config's dtypes."""
    if config.eval.strategy != "one_shot" or config.eval.quantize != "none":
        raise ValueError(
            f"the compile check builds the one-shot sampler without quantization; found eval.strategy "
            f"{config.eval.strategy!r}, eval.quantize {config.eval.quantize!r} (drop eval from compile.programs)"
        )
    host = [d for d in devices if d.process_index == devices[0].process_index]
    mesh = sharding.local_mesh(int(config.mesh.fsdp), int(config.mesh.tensor), devices=host)
    return _sampler(
        "eval",
        config,
        mesh,
        dtype=experiment.dtype(config.model.dtype),
        param_dtype=experiment.dtype(config.model.param_dtype),
        batch=config.eval.batch_size,
        k=config.eval.k,
    )


def tag(config: config_dict.ConfigDict, devices: Sequence[Any], batch: int, k: int) -> Program:
    """The tagging service's sampler on one chip, with `Tagger.load`'s accelerator dtypes (bf16 params)."""
    dtype = default_dtype("tpu")
    return _sampler("tag", config, sharding.local_mesh(devices=devices[:1]), dtype=dtype, param_dtype=dtype, batch=batch, k=k)
