"""The training state, its sharded creation, and the pure train step (docs/method.md §3).

The state holds only what changes: the step, the trainable params (fp32 master copies)
and their optimizer state. Frozen params are a separate, never-donated argument, so
they get no gradient and no optimizer state. Every array is created straight into its
sharding (eval_shape first), so the full model never sits on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nxtp_jax import objective
from nxtp_jax.models import mask
from nxtp_jax import params as ptree
from nxtp_jax.training import optim
from nxtp_jax.data import preprocess
from nxtp_jax.models.recognizer import Recognizer

Batch = dict[str, jax.Array]
TEXT_KEYS = ("tokens", "targets", "answer_pos")
CAPTION_KEYS = ("cap_tokens", "cap_targets")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32, updates done
    params: Any  # trainable params
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static settings of the train step."""

    num_image_tokens: int
    delimiter_id: int
    grad_accum_steps: int = 1
    weight_loss_obj: float = 1.0
    weight_loss_cap: float = 0.0

    @classmethod
    def from_config(cls, config: Any, model_config: Any, delimiter_id: int) -> "StepOptions":
        return cls(
            num_image_tokens=model_config.vision.num_patches,
            delimiter_id=delimiter_id,
            grad_accum_steps=config.grad_accum_steps,
            weight_loss_obj=config.weight_loss_obj,
            weight_loss_cap=config.weight_loss_cap,
        )


def state_shardings(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, state)


def create(
    params: Any,
    trainable_patterns: tuple[str, ...],
    make_tx: Callable[[Any], optax.GradientTransformation],
    mesh: Mesh,
) -> tuple[TrainState, Any, optax.GradientTransformation]:
    """(state at step 0, frozen params, optimizer) from full sharded params.

    `make_tx(trainable)` builds the optimizer (it may depend on the trainable tree, e.g.
    for the weight-decay mask). Its state is created directly in the params' shardings.
    """
    trainable, frozen = ptree.split(params, trainable_patterns)
    tx = make_tx(trainable)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
    return TrainState(step=step, params=trainable, opt_state=opt_state), frozen, tx


def opt_state_shardings(tx: optax.GradientTransformation, trainable: Any, mesh: Mesh) -> Any:
    """Shardings of `tx`'s state: a param's moments like the param, everything else (counts) replicated.

    `trainable` may hold arrays or ShapeDtypeStructs that carry shardings.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, trainable),
        jax.tree.map(lambda x: x.sharding, trainable),
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def abstract_state(
    abstract_params: Any, trainable_patterns: tuple[str, ...], make_tx, mesh: Mesh
) -> tuple[TrainState, Any, optax.GradientTransformation]:
    """`create` without allocating: (state, frozen) as ShapeDtypeStructs with their shardings, from sharded
    abstract params, and the optimizer."""
    trainable, frozen = ptree.split(abstract_params, trainable_patterns)
    tx = make_tx(trainable)
    opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, trainable),
        opt_state_shardings(tx, trainable, mesh),
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return TrainState(step=step, params=trainable, opt_state=opt), frozen, tx


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` (arrays or sharded ShapeDtypeStructs) held by the device with the largest share."""
    totals: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        nbytes = int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for device in x.sharding.device_set:
            totals[device] = totals.get(device, 0) + nbytes
    return max(totals.values(), default=0)


def _loss(model: Recognizer, opts: StepOptions, trainable, frozen, batch: Batch, counts):
    """The micro-batch's share of the batch loss: its token-loss sums over the whole batch's counts."""
    params = ptree.merge(trainable, frozen)
    images = preprocess.normalize(batch["image"])
    n = opts.num_image_tokens
    obj_mask = mask.label_mask(batch["tokens"], batch["answer_pos"], delimiter_id=opts.delimiter_id, num_image_tokens=n)
    logits = model.apply({"params": params}, images, batch["tokens"], obj_mask)
    obj_sum, _ = objective.cross_entropy_sum(logits, batch["targets"])
    sums = {"objs": obj_sum}
    loss = opts.weight_loss_obj * obj_sum / counts["objs"]
    if opts.weight_loss_cap > 0:
        length = n + batch["cap_tokens"].shape[1]
        logits = model.apply({"params": params}, images, batch["cap_tokens"], mask.prefix_mask(n, length))
        cap_sum, _ = objective.cross_entropy_sum(logits, batch["cap_targets"])
        sums["caps"] = cap_sum
        loss = loss + opts.weight_loss_cap * cap_sum / counts["caps"]
    return loss, sums


def _micro_batches(batch: Batch, accum: int) -> Batch:
    """[B, ...] -> [accum, B/accum, ...], micro-batch j taking rows j, j+accum, ...

    Strided rows keep every micro-batch spread over all devices of the batch axis.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(
    model: Recognizer,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], jax.Array],
    opts: StepOptions,
    embedding_rows: jax.Array | None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """The pure step: (state, frozen, batch) -> (new state, metrics).

    The loss is the token mean over the whole global batch (all devices and all
    micro-batches): sums are divided by the batch's target counts, known up front.
    """
    loss_keys = TEXT_KEYS + ("image",) + (CAPTION_KEYS if opts.weight_loss_cap > 0 else ())

    def step_fn(state: TrainState, frozen, batch: Batch):
        inputs = {k: batch[k] for k in loss_keys}
        counts = {"objs": jnp.maximum(jnp.sum(batch["targets"] >= 0, dtype=jnp.float32), 1.0)}
        if opts.weight_loss_cap > 0:
            counts["caps"] = jnp.maximum(jnp.sum(batch["cap_targets"] >= 0, dtype=jnp.float32), 1.0)
        grad_fn = jax.value_and_grad(lambda p, mb: _loss(model, opts, p, frozen, mb, counts), has_aux=True)

        if opts.grad_accum_steps == 1:
            (loss, sums), grads = grad_fn(state.params, inputs)
        else:

            def body(carry, micro):
                (loss, sums), grads = grad_fn(state.params, micro)
                return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in counts}
            (loss, sums, grads), _ = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), zero_sums, zeros), _micro_batches(inputs, opts.grad_accum_steps)
            )

        grads = optim.mask_embedding_grads(grads, embedding_rows)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "loss_objs": sums["objs"] / counts["objs"],
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
            "target_tokens": counts["objs"],
            "skipped": jnp.sum(batch["skipped"]),
        }
        if "caps" in sums:
            metrics["loss_caps"] = sums["caps"] / counts["caps"]
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


def jit_train_step(step_fn, state: TrainState, frozen: Any, batch_spec: NamedSharding, mesh: Mesh):
    """`step_fn` jitted with the state donated and every sharding pinned (no re-layout between steps)."""
    shardings = state_shardings(state)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, frozen), batch_spec),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
