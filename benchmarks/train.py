"""Training throughput for a config and mesh: step time, samples/s, tokens/s and MFU; or the sharded memory.

    python -m benchmarks.train --config=configs/g3m.py --config.batch_size=16 [--steps=10]
    python -m benchmarks.train --config=configs/g3m.py --memory --cpu_devices=8 \
        --config.mesh.data=1 --config.mesh.fsdp=8

Weights are random (the config's architecture, trainable set and dtypes; the init checkpoint
is not read) and batches are synthetic with the real shapes (text padded to max_seq_len,
the paper's label mask), so nothing needs downloading. FLOPs are XLA's count for the
compiled step (per device, backward and optimizer included); MFU divides them by the
device's peak: the bf16 dense peak of known accelerators, or on CPU the fp32 matmul rate
this script measures (so CPU MFU says how close the step gets to the machine's best GEMM).
`--chip=v5e` (a TPU generation as `nxtp_jax/aot/topologies.py` names it) takes that chip's
published peak instead, so a step timed elsewhere is set against the chip it is meant for.

`--memory` only builds the sharded state with eval_shape and prints the bytes each device
holds: parameters (trainable, frozen) and optimizer state.
"""

from __future__ import annotations

import os
import sys
import time
import types

from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from nxtp_jax.aot import topologies

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_MEMORY = flags.DEFINE_bool("memory", False, "Only report per-device bytes of the sharded state (eval_shape).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Fake this many CPU devices (for mesh checks on a laptop).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU; 0 = known table / measured on CPU.")
_CHIP = flags.DEFINE_enum(
    "chip", None, sorted([*topologies.CHIPS, *topologies.ALIASES]), "MFU against this TPU chip's published bf16 peak; default: this device's."
)
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "Sentencepiece vocabulary (the 2 special tokens are added).")

# bf16 dense peak TFLOP/s per device, by jax device_kind prefix.
PEAK_TFLOPS = {
    "NVIDIA H100": 989.4,
    "NVIDIA H200": 989.4,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
}


def peak_tflops(device, chip: str | None = None, given: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): `given`, else the `chip`'s published figure, else `device`'s."""
    import jax
    import jax.numpy as jnp

    if given > 0:
        return given, "given"
    if chip is not None:
        figures = topologies.CHIPS[topologies.ALIASES.get(chip, chip)]
        return figures.peak_flops / 1e12, f"TPU {figures.generation} bf16 dense peak, {figures.source}"
    for prefix, tflops in PEAK_TFLOPS.items():
        if device.device_kind.startswith(prefix):
            return tflops, f"{prefix} bf16 dense peak"
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        out = f(a)
    out.block_until_ready()
    return 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e12, f"measured fp32 {n}x{n} matmul"


def vocabulary():
    """What the model config needs from a tokenizer: LLaMA's sizes, no file."""
    v = _VOCAB.value
    # Synthetic labels only need some ordinary piece to split on; cost does not depend on which.
    return types.SimpleNamespace(vocab_size=v + 2, image_id=v, empty_id=v + 1, delimiter_id=v - 1)


def synthetic_batch(config, model_cfg, rng):
    import numpy as np

    from nxtp_jax import experiment

    b, text_len = config.batch_size, experiment.text_length(config)
    size = model_cfg.vision.image_size
    tokens = rng.integers(3, model_cfg.decoder.vocab_size - 2, size=(b, text_len)).astype(np.int32)
    prompt = 10
    tokens[:, prompt + 2 :: 3] = vocabulary().delimiter_id  # a label of two tokens, then a delimiter
    targets = np.concatenate([tokens[:, 1:], np.full((b, 1), -1, np.int32)], axis=1)
    return {
        "image": rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8),
        "tokens": tokens,
        "targets": targets,
        "answer_pos": np.full((b,), prompt - 1, np.int32),
        "skipped": np.zeros((b,), np.int32),
    }


def build(config, mesh, rules, abstract_only: bool):
    import jax

    from nxtp_jax import checkpoint, experiment, params as ptree, sharding
    from nxtp_jax.training import loop, optim, step

    model_cfg = experiment.model_config(config, vocabulary())
    model = loop.build_model(config, model_cfg, mesh)
    schedule, make_tx = optim.from_config(config)
    if abstract_only:
        abstract = checkpoint.abstract_params(model, mesh, rules)
        return model, step.abstract_state(abstract, tuple(config.trainable), make_tx, mesh)
    params = checkpoint.scratch_params(model, config.seed, mesh, rules)
    state, frozen, tx = step.create(params, tuple(config.trainable), make_tx, mesh)
    del params
    opts = step.StepOptions.from_config(config, model_cfg, vocabulary().delimiter_id)
    rows = None
    if tuple(config.embedding_rows) != (ptree.ALL_ROWS,):
        rows = jax.numpy.asarray(optim.embedding_row_mask(model_cfg.decoder.vocab_size, [vocabulary().image_id]))
    train_step = step.make_train_step(model, tx, schedule, opts, rows)
    spec = sharding.batch_sharding(mesh, rules)
    return model, (state, frozen, step.jit_train_step(train_step, state, frozen, spec, mesh), spec)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def report_memory(config, mesh, rules) -> None:
    import jax
    import numpy as np

    from nxtp_jax.training import step

    _, (state, frozen, _) = build(config, mesh, rules, abstract_only=True)

    def total(tree):
        return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    def count(tree):
        return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))

    n_params = count(state.params) + count(frozen)
    print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} devices")
    print(f"parameters: {n_params / 1e9:.3f} B ({count(state.params) / 1e9:.3f} B trainable), param dtype {config.model.param_dtype}")
    rows = [
        ("trainable params", state.params),
        ("frozen params", frozen),
        ("optimizer state", state.opt_state),
        ("all", (state, frozen)),
    ]
    print(f"{'':18s} {'total':>11s} {'per device':>11s} {'ratio':>7s}")
    for name, tree in rows:
        t, d = total(tree), step.per_device_bytes(tree)
        print(f"{name:18s} {gib(t):>11s} {gib(d):>11s} {t / max(d, 1):7.2f}x")


def measure(config, mesh, rules, steps: int, warmup: int) -> dict:
    """Builds, compiles and times the train step: the figures as a dict (benchmarks.accelerator reuses it)."""
    import jax
    import numpy as np

    from nxtp_jax.training import inputs as train_inputs

    t0 = time.perf_counter()
    model, (state, frozen, step_fn, spec) = build(config, mesh, rules, abstract_only=False)
    rng = np.random.default_rng(0)
    batch = train_inputs.global_batch(synthetic_batch(config, model.config, rng), spec)
    compiled = step_fn.lower(state, frozen, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    build_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / steps
    peak, source = peak_tflops(jax.devices()[0], _CHIP.value, _PEAK.value)
    return {
        "build_s": build_s,
        "tflop_per_device_step": flops / 1e12,
        "step_ms": dt * 1e3,
        "samples_per_s": config.batch_size / dt,
        "tflops_per_device": flops / dt / 1e12,
        "mfu": flops / dt / (peak * 1e12),
        "peak_tflops": peak,
        "peak_source": source,
        "loss": float(metrics["loss"]),
    }


def bench(config, mesh, rules) -> None:
    import jax

    from nxtp_jax import experiment

    r = measure(config, mesh, rules, _STEPS.value, _WARMUP.value)
    print(common.machine())
    print(f"built and compiled in {r['build_s']:.1f} s; XLA counts {r['tflop_per_device_step']:.3f} TFLOP per device per step")
    device = jax.devices()[0]
    samples = r["samples_per_s"]
    print(
        f"{device.device_kind} x{mesh.devices.size}, mesh {dict(mesh.shape)}, batch {config.batch_size}, "
        f"seq {config.max_seq_len} ({experiment.num_image_tokens(config)} image + {experiment.text_length(config)} text), "
        f"{config.model.dtype} compute, {config.model.param_dtype} params"
    )
    print(
        f"step {r['step_ms']:.1f} ms | {samples:.1f} samples/s ({samples / mesh.devices.size:.1f} per device) | "
        f"{samples * config.max_seq_len:.0f} tokens/s | {r['tflops_per_device']:.2f} TFLOP/s per device | "
        f"MFU {r['mfu']:.1%} of {r['peak_tflops']:.1f} TFLOP/s ({r['peak_source']}) | loss {r['loss']:.3f}"
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CPU_DEVICES.value:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}"
    import jax

    from nxtp_jax import experiment

    if _CPU_DEVICES.value:
        jax.config.update("jax_platforms", "cpu")
    config = _CONFIG.value
    mesh = experiment.make_mesh(config)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    if _MEMORY.value:
        report_memory(config, mesh, rules)
    else:
        bench(config, mesh, rules)


if __name__ == "__main__":
    sys.exit(app.run(main))
