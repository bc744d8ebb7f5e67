"""CPU tagging at full size against this machine's floor: ONNX Runtime and JAX, fp32/int8/int4, worst and realistic case.

    python -m benchmarks.cpu --workdir /tmp/bench_onnx          # in the export environment (docs/export.md)
    python -m benchmarks.cpu --workdir /tmp/bench_small --layers 1 --vit_layers 2   # a quick small run
    python -m benchmarks.cpu --matmuls     # GFLOP/s of the decoder's products, per layout and engine
    python -m benchmarks.cpu --workdir /tmp/bench_onnx --recompute   # ORT: KV cache against recomputation
    python -m benchmarks.cpu --sampler     # JAX: the KV-cache sampler against recomputation (mid-size model)
    python -m benchmarks.cpu --init_memory bfloat16   # peak host memory of initialising the 1.78B model

One run, one table: top-k of one 224px image, each configuration in its own process (its peak
memory its own), each figure beside its floor (benchmarks/floor.py: bytes that must be
read over the measured bandwidth vs FLOPs over the measured matmul rate, per phase) and the
fraction floor / measured.

- worst case: random weights (seed 0) in WORKDIR/ckpt, exported once to WORKDIR/onnx (fp32);
  no branch emits the delimiter, so every branch runs 19 tokens (18 decode steps).
- realistic case: the same weights except the token embedding table. A row with a large
  component along one output-layer column makes that column's token the next argmax when the
  row's token is fed. Two chain tokens c2 -> c3 -> delimiter, and every other ordinary row points
  at the delimiter, c3 or c2 (a third each), so labels are 1-3 tokens and branches end after
  2-4 tokens, as a trained model's do. The decode steps run are counted and shown.
- quantized ONNX exports are made from WORKDIR/onnx by `onnx_export.quantize_decoder` (what
  `convert/to_onnx.py --quantize` does after exporting, at its default accuracy_level), in
  WORKDIR/onnx_int8 and onnx_int4.
- `--phases` times the fp32 encoder and prefill of each engine apart (best of 3), the profile
  behind docs/benchmarks.md's comparison of the two.
- `--recompute`: ONNX Runtime with its KV cache against the original's strategy (the whole
  sequence again at every update, about k prefills each), worst case. Recomputation runs only
  its first `--recompute_updates` updates; the rest are projected from the last one's time.
- `--sampler`: JAX's compiled KV-cache sampler against `sampling.one_shot_recompute`, same
  weights and images, a ViT-B/16 @224 + 2 x 2048-wide blocks model: ms/image, compiled peak
  memory, the speed-up, and whether both give the same labels.
- `--init_memory DTYPE`: peak host memory of `init_params` of the 1.78B model straight into
  DTYPE (eval_shape, then one jit with out_shardings, never fp32 first); "peak RSS / param
  bytes" is the figure to watch. Run each dtype in its own process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmarks import common, floor

CONFIGS = [  # (engine, quantize)
    ("onnxruntime", "none"), ("onnxruntime", "int8"), ("onnxruntime", "int4"),
    ("jax", "none"), ("jax", "int8"), ("jax", "int4"),
]
CASES = ("worst", "realistic")
REALISTIC_NORM = 4.0  # the added component, in units of a row's mean norm
BYTES_PER_WEIGHT = {"none": 4.0, "int8": 1.0 + 4 / 128, "int4": 0.5 + 4 / 128}  # + a float32 scale per block of 128


def sizes_and_table(args) -> None:
    """WORKDIR/sizes.json (parameter counts, prefix length) and WORKDIR/embeddings_realistic.npy."""
    import jax
    import jax.numpy as jnp

    from nxtp_jax import checkpoint, prompts
    from nxtp_jax.models.recognizer import Recognizer
    from nxtp_jax.tokenizer import Tokenizer

    work = pathlib.Path(args.workdir)
    ckpt = work / "ckpt"
    config = checkpoint.load_config(ckpt)
    model = Recognizer(config, dtype=jnp.float32)
    params = checkpoint.load_params(ckpt, checkpoint.abstract_params(model))
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
    dec = params["language_decoder"]
    tok = Tokenizer(checkpoint.tokenizer_path(ckpt))
    prompt = prompts.inference_prompt(tok)
    sizes = {
        "vision": count(params) - count(dec),
        "blocks": sum(count(v) for k, v in dec.items() if k.startswith("layers_")),
        "output": count(dec["output"]),
        "image_tokens": config.vision.num_patches,
        "prefix": config.vision.num_patches + len(prompt),
        "cache_bytes_per_slot": 2 * config.decoder.layers * config.decoder.kv_heads * config.decoder.head_dim * 4,
    }
    (work / "sizes.json").write_text(json.dumps(sizes))

    table = np.array(dec["tok_embeddings"]["embedding"], np.float32)
    kernel = np.asarray(dec["output"]["kernel"], np.float32)
    norm = np.linalg.norm(table, axis=1).mean()
    special = set(prompt.tolist()) | {tok.delimiter_id, tok.image_id, tok.empty_id, tok.bos_id, tok.eos_id}
    ordinary = np.array([i for i in range(len(table)) if i not in special])
    rng = np.random.default_rng(0)
    c2, c3 = rng.choice(ordinary, 2, replace=False)
    targets = rng.choice([tok.delimiter_id, c3, c2], size=len(table))  # labels of 1, 2 or 3 tokens
    targets[c3], targets[c2] = tok.delimiter_id, c3
    for target in (tok.delimiter_id, c3, c2):
        rows = ordinary[targets[ordinary] == target]
        column = kernel[:, target]
        table[rows] += REALISTIC_NORM * norm * column / np.linalg.norm(column)
    np.save(work / "embeddings_realistic.npy", table)


def make_checkpoint(args) -> None:
    """Random weights (seed 0) in the paper's architecture (`--layers`, `--vit_layers`), as an nxtp_jax checkpoint."""
    import dataclasses

    import jax

    from nxtp_jax import checkpoint
    from nxtp_jax.experiment import full_size
    from nxtp_jax.models.config import SpecialTokens
    from nxtp_jax.models.recognizer import Recognizer, init_params

    work = pathlib.Path(args.workdir)
    tok = common.bench_tokenizer(work / "bench.model")
    config = full_size(layers=args.layers)
    config = dataclasses.replace(
        config,
        vision=dataclasses.replace(config.vision, layers=args.vit_layers),
        special_tokens=SpecialTokens(image=tok.image_id, empty=tok.empty_id),
    )
    params = init_params(Recognizer(config), jax.random.key(0))
    checkpoint.save(work / "ckpt", params, config, tok.model_path, source="benchmarks.cpu random init, seed 0")


def in_child(name: str) -> None:
    """This module again with `--child name`, in its own process (it exits on failure)."""
    subprocess.run([sys.executable, "-m", __spec__.name, *sys.argv[1:], "--child", name], check=True)


def prepare(args) -> None:
    """WORKDIR/ckpt, its fp32 export WORKDIR/onnx, the sizes, the realistic table and the quantized exports, once."""
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "ckpt" / "config.json").exists():
        in_child("checkpoint")
    if not (work / "onnx" / "config.json").exists():
        res = subprocess.run(
            [sys.executable, "convert/to_onnx.py", f"--ckpt={work / 'ckpt'}", f"--out={work / 'onnx'}", "--dtype=float32"],
            cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
        )
        (work / "export.log").write_text(res.stdout + res.stderr)
        if res.returncode:
            sys.exit(f"export failed:\n{res.stdout}\n{res.stderr}")
    if not (work / "embeddings_realistic.npy").exists():
        in_child("sizes")
    for q in ("int8", "int4"):
        out = work / f"onnx_{q}"
        if not (out / "config.json").exists():
            in_child(f"quantize-{q}")
    for name in ("onnx", "onnx_int8", "onnx_int4"):  # the realistic case: the same graphs, another table
        real = work / f"{name}_realistic"
        if not (real / "config.json").exists():
            real.mkdir(exist_ok=True)
            for f in (work / name).iterdir():
                if f.name != "embeddings.npy" and not (real / f.name).exists():
                    (real / f.name).symlink_to(f)
            shutil.copy(work / "embeddings_realistic.npy", real / "embeddings.npy")


def quantize_export(args, mode: str) -> None:
    from nxtp_jax.choices import DEFAULT_ACCURACY_LEVEL
    from nxtp_jax.export import onnx_export

    work = pathlib.Path(args.workdir)
    src, out = work / "onnx", work / f"onnx_{mode}"
    tmp = work / f"onnx_{mode}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("decoder.onnx"):
            os.link(f, tmp / f.name)
    for f in src.glob("decoder.onnx*"):  # copies: the quantizer rewrites them
        shutil.copy(f, tmp / f.name)
    start = time.perf_counter()
    n = onnx_export.quantize_decoder(tmp / "decoder.onnx", mode)
    config = json.loads((tmp / "config.json").read_text())
    config["quantize"], config["accuracy_level"] = mode, DEFAULT_ACCURACY_LEVEL
    (tmp / "config.json").unlink()  # a hard link to the fp32 export's
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.rename(out)
    print(f"{mode}: {n} matrices quantized in {time.perf_counter() - start:.0f} s; decoder.onnx.data "
          f"{(out / 'decoder.onnx.data').stat().st_size / 2**20:.0f} MiB")


def run_config(args, engine: str, quantize: str, case: str) -> dict:
    work = pathlib.Path(args.workdir)
    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    start = time.perf_counter()
    if engine == "onnxruntime":
        from nxtp_jax.export.ort_tagger import OrtTagger

        name = "onnx" if quantize == "none" else f"onnx_{quantize}"
        tagger = OrtTagger(work / (name if case == "worst" else f"{name}_realistic"), threads=args.threads)
        pixels = tagger.preprocess([image])
        run = lambda: tagger.sample(pixels, args.k)  # noqa: E731
    else:
        import jax
        import jax.numpy as jnp

        from nxtp_jax.inference.tagger import Tagger

        tagger = Tagger.load(work / "ckpt", dtype=jnp.float32, quantize=quantize, batch_size=1)
        if case == "realistic":
            tagger.params["language_decoder"]["tok_embeddings"]["embedding"] = jnp.asarray(np.load(work / "embeddings_realistic.npy"))
        x = jnp.asarray(tagger.preprocess([image]))

        def run():
            out = tagger.sample(x, args.k)
            return tuple(np.asarray(a) for a in jax.block_until_ready((out["tokens"], out["probs"])))

    loaded = time.perf_counter() - start
    first, seconds, (tokens, _) = common.timed(run, args.repeats)
    tokens = np.asarray(tokens)
    delimiter = tagger.tokenizer.delimiter_id
    lengths = [row.index(delimiter) if delimiter in row else len(row) for row in tokens[0].tolist()]
    return {
        "seconds": seconds, "first_call": first, "load": loaded,
        "steps": int((tokens[0] >= 0).sum(axis=-1).max()) - 1,  # decode steps after the top-k prefill
        "tokens": tokens.tolist(), "label_tokens": [min(lengths), max(lengths)],
        "peak_rss_gib": common.peak_rss_gib(), "load_average": os.getloadavg()[0],
    }


def recompute(args) -> dict:
    """ONNX Runtime recomputing the sequence at every update (the original's strategy), worst case: the first
    `--recompute_updates` updates measured, the remaining ones projected at the last update's cost."""
    from nxtp_jax.export import ort_tagger

    tagger = ort_tagger.OrtTagger(pathlib.Path(args.workdir) / "onnx", threads=args.threads)
    pixels = tagger.preprocess([np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)])
    sampled = tagger.config["max_updates"] - 1
    updates = min(args.recompute_updates, sampled)
    h = tagger._prefix(pixels[:1])  # warm the encoder and the session's allocator
    tagger._last_probs(h)
    start = time.perf_counter()
    h = tagger._prefix(pixels)
    p = tagger._last_probs(h)
    _, first = ort_tagger.top_k(p, args.k)
    h = np.repeat(h, args.k, axis=0)
    tokens, step_times = [first.reshape(-1)], []
    for _ in range(updates - 1):
        t = time.perf_counter()
        h = np.concatenate([h, tagger.embed(tokens[-1][:, None]).astype(h.dtype)], axis=1)
        tokens.append(tagger._last_probs(h).argmax(axis=-1).astype(np.int32))
        step_times.append(time.perf_counter() - t)
    measured = time.perf_counter() - start
    remaining = sampled - updates
    total = measured + remaining * (step_times[-1] if step_times else measured)
    return {
        "seconds": total, "measured": measured, "updates_measured": updates, "projected": remaining > 0,
        "tokens": np.stack(tokens, -1).reshape(1, args.k, -1).tolist(), "peak_rss_gib": common.peak_rss_gib(),
    }


def show_recompute(args) -> None:
    prepare(args)
    kv, naive = run_child("onnxruntime:none:worst"), run_child("recompute")
    if kv is None or naive is None:
        sys.exit(1)
    n = np.asarray(naive["tokens"]).shape[-1]
    same = np.array_equal(np.asarray(naive["tokens"]), np.asarray(kv["tokens"])[..., :n])
    note = f" (projected: {naive['updates_measured']} of 19 updates measured in {naive['measured']:.1f} s)" if naive["projected"] else ""
    print(f"\ntop-{args.k}, one 224px image, worst case; {common.machine()}\n")
    print(common.table(["engine", "s / image", "peak RSS (GiB)", "tokens"], [
        ("onnxruntime, KV cache", f"{kv['seconds']:.1f}", f"{kv['peak_rss_gib']:.1f}", "-"),
        ("onnxruntime, recompute (original)", f"{naive['seconds']:.1f}{note}", f"{naive['peak_rss_gib']:.1f}",
         ("identical" if same else "DIFFERENT") + (f" (first {n} updates)" if n < np.asarray(kv["tokens"]).shape[-1] else "")),
    ]))
    print(f"\nKV cache speed-up: {naive['seconds'] / kv['seconds']:.1f}x")


def floor_phases(sizes: dict, quantize: str, k: int, steps: int) -> list[tuple[float, float]]:
    """(bytes, FLOPs) of the encoder, the prefill and each decode step; weights read once per phase."""
    w = BYTES_PER_WEIGHT[quantize]
    t0, per_step = sizes["prefix"], sizes["blocks"] + sizes["output"]
    phases = [
        (sizes["vision"] * 4.0, 2.0 * sizes["vision"] * sizes["image_tokens"]),  # the encoder stays fp32
        (sizes["blocks"] * w + sizes["output"] * w, 2.0 * (sizes["blocks"] * t0 + sizes["output"])),
    ]
    for s in range(1, steps + 1):
        cache = (t0 + k * s) * sizes["cache_bytes_per_slot"]
        phases.append((per_step * w + cache, 2.0 * k * per_step))
    return phases


MATMUL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000)]  # (K, N): attention, w1/w3, w2, output


def _rate(fn, flops: float, seconds: float = 1.0) -> float:
    fn()  # warm-up (and compilation)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - start) / 1e9


def matmuls(args) -> None:
    """GFLOP/s of the decoder's products at the sampler's M (k rows) and the prefill's, per layout."""
    import jax
    import jax.numpy as jnp

    from nxtp_jax.models import quantize

    rng = np.random.default_rng(0)
    def timed(f, *a):
        return lambda: jax.block_until_ready(f(*a))

    engines = {
        "numpy x@W": lambda x, w: lambda: x @ w,
        "jax x@W (naive)": lambda x, w: timed(jax.jit(jnp.dot), jnp.asarray(x), jnp.asarray(w)),
        "jax transposed": lambda x, w: timed(jax.jit(quantize.transposed_matmul), jnp.asarray(x), jnp.asarray(w.T.copy())),
        "jax int8": lambda x, w: timed(jax.jit(quantize.matmul), jnp.asarray(x), quantize.quantize_kernel(w, 8)),
        "jax int4": lambda x, w: timed(jax.jit(quantize.matmul), jnp.asarray(x), quantize.quantize_kernel(w, 4)),
    }
    if importlib.util.find_spec("onnxruntime"):
        for bits, level in ((None, None), (8, 0), (8, 4), (4, 0), (4, 4)):
            name = "ort fp32" if bits is None else f"ort int{bits} level {level}"
            engines[name] = lambda x, w, bits=bits, level=level: _ort_matmul(x, w, bits, level, args.threads)
    else:
        print("(onnxruntime not installed: its rows are left out)")
    print(f"GFLOP/s of [M, K] x [K, N], float32 activations, {os.cpu_count()} cores of {common.cpu_name()}")
    print("| M | K | N | " + " | ".join(engines) + " |")
    print("|---|---|---|" + "---|" * len(engines))
    for m in (args.k, 284):
        for k, n in MATMUL_SHAPES:
            x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32) * 0.02
            row = [f"{_rate(make(x, w), 2.0 * m * k * n):.0f}" for make in engines.values()]
            print(f"| {m} | {k} | {n} | " + " | ".join(row) + " |", flush=True)


def _ort_matmul(x: np.ndarray, w: np.ndarray, bits: int | None, level: int | None, threads: int | None):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from nxtp_jax.export.onnx_export import QUANT_BLOCK

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if bits:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=level)
        quantizer.process()
        model = quantizer.model.model
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"x": x})


def phases(args, engine: str) -> dict:
    """Seconds of the fp32 encoder and of the prefill (the prefix through the decoder into an empty cache)."""
    work = pathlib.Path(args.workdir)
    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    sampled = 19  # MAX_UPDATES - 1
    if engine == "onnxruntime":
        from nxtp_jax.export.ort_tagger import OrtTagger, prefix_mask

        t = OrtTagger(work / "onnx", threads=args.threads)
        pixels = t.preprocess([image])
        h = t._prefix(pixels)
        t0, n = h.shape[1], t.config["num_image_tokens"]
        capacity = t0 + args.k * (sampled - 1)
        mask = np.zeros((1, 1, t0, capacity), bool)
        mask[0, 0, :, :t0] = prefix_mask(n, t0)
        return {
            "encoder": common.best_seconds(lambda: t.image_tokens(pixels)),
            "prefill": common.best_seconds(lambda: t.decode(h, np.arange(t0)[None], mask, 0, [t0 - 1], t._empty_cache(1, capacity))),
        }
    import jax
    import jax.numpy as jnp

    from nxtp_jax.inference import sampling
    from nxtp_jax.inference.tagger import Tagger
    from nxtp_jax.models import mask as masks
    from nxtp_jax.models import quantize
    from nxtp_jax.models.llama import init_cache
    from nxtp_jax.models.recognizer import Recognizer

    t = Tagger.load(work / "ckpt", dtype=jnp.float32, batch_size=1)
    model, params, x = t.model, t.params, jnp.asarray(t.preprocess([image]))
    with quantize.dequantizing():
        h = sampling.prefix_embeddings(model, params, x, t.prompt)
        t0, n = h.shape[1], model.config.vision.num_patches
        capacity = t0 + args.k * (sampled - 1)

        def prefill(params, h):
            cache = init_cache(model.config.decoder, 1, capacity, model.dtype)
            prefix = jnp.pad(masks.prefix_mask(n, t0), ((0, 0), (0, 0), (0, 0), (0, capacity - t0)))
            return model.apply({"params": params}, h, jnp.arange(t0)[None], prefix, cache, 0, method=Recognizer.decode)

        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Recognizer.encode_images))
        prefill = jax.jit(prefill)
        return {
            "encoder": common.best_seconds(lambda: jax.block_until_ready(encode(params, x))),
            "prefill": common.best_seconds(lambda: jax.block_until_ready(prefill(params, h))),
        }


def sampler(args) -> None:
    """JAX's compiled KV-cache sampler against recomputing the sequence at every update (`--sampler`)."""
    import jax
    import jax.numpy as jnp

    from nxtp_jax import prompts
    from nxtp_jax.inference import ranking, sampling
    from nxtp_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, VisionConfig
    from nxtp_jax.models.recognizer import Recognizer, init_params

    def peak_bytes(fn, *a, **kw) -> int:
        """Compiled peak of one call: arguments + outputs + XLA temporaries."""
        m = fn.lower(*a, **kw).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)

    def labels(tokens, probs) -> list:
        """Per image, each branch's label token ids (ids: random argmaxes fall outside the small tokenizer)."""
        return [[g.tokens for g in ranking.groups_from_branches(t, p, tok.delimiter_id)] for t, p in zip(np.asarray(tokens), np.asarray(probs))]

    tok = common.bench_tokenizer()
    width, image_size = 2048, 224
    config = ModelConfig(  # ViT-B/16 @224 + 2 blocks x 2048, LLaMA's vocabulary
        vision=VisionConfig(768, 12, 16, image_size),
        decoder=DecoderConfig(dim=width, layers=2, n_heads=16, vocab_size=32000 + 2),
        special_tokens=SpecialTokens(image=tok.image_id, empty=tok.empty_id),
    )
    model = Recognizer(config)
    params = init_params(model, jax.random.key(0))
    prompt = jnp.asarray(prompts.inference_prompt(tok))
    print(f"{sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6:.0f}M params; {common.machine()}")
    rows = []
    for batch in (1, 8):
        images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3)).astype(np.float32))
        kw = dict(k=args.k, delimiter_id=tok.delimiter_id)
        _, t_cache, out_cache = common.timed(lambda: jax.block_until_ready(sampling.one_shot(model, params, images, prompt, **kw)), args.repeats)
        mem_cache = peak_bytes(sampling.one_shot, model, params, images, prompt, **kw)
        steps = int(np.max(np.sum(np.asarray(out_cache[0]) >= 0, axis=-1)))
        t0 = sampling.prefix_embeddings(model, params, images, prompt).shape[1]
        shapes = [jax.ShapeDtypeStruct((batch if t == t0 else batch * args.k, t, width), jnp.float32) for t in range(t0, t0 + steps)]
        mem_naive = max(peak_bytes(sampling._recompute_step, model, params, h) for h in shapes)
        unit = (lambda t: f"{t * 1e3:.0f} ms/image") if batch == 1 else (lambda t: f"{batch / t:.2f} images/s")  # noqa: E731
        if batch > 1:  # recomputation at batch 8 takes many minutes on a CPU
            rows.append((batch, steps, unit(t_cache), f"{mem_cache / 2**30:.2f}", "(not run)", f"{mem_naive / 2**30:.2f}", "-", "-"))
            continue
        _, t_naive, out_naive = common.timed(lambda: jax.block_until_ready(sampling.one_shot_recompute(model, params, images, prompt, **kw)), 1)
        same = "identical" if labels(*out_cache) == labels(*out_naive) else "DIFFERENT"
        rows.append((batch, steps, unit(t_cache), f"{mem_cache / 2**30:.2f}", unit(t_naive), f"{mem_naive / 2**30:.2f}", f"{t_naive / t_cache:.1f}x", same))
    print(f"\ntop-{args.k}, random weights (every branch runs to the cap)\n")
    print(common.table(["batch", "sampled", "KV cache", "GiB", "recompute", "GiB", "speed-up", "labels"], rows))


def init_memory(dtype: str, layers: int) -> None:
    """Peak host memory of `init_params` of the full-size model straight into `dtype` (`--init_memory`)."""
    import jax
    import jax.numpy as jnp

    from nxtp_jax.experiment import full_size
    from nxtp_jax.models.recognizer import Recognizer, init_params

    model = Recognizer(full_size(layers=layers), param_dtype=jnp.dtype(dtype))
    before = common.peak_rss_gib()
    start = time.perf_counter()
    params = jax.block_until_ready(init_params(model, jax.random.key(0)))
    seconds = time.perf_counter() - start
    leaves = jax.tree_util.tree_leaves(params)
    count, gib = sum(x.size for x in leaves), sum(x.nbytes for x in leaves) / 2**30
    peak = common.peak_rss_gib()
    print(common.table(["param_dtype", "params", "param GiB", "peak RSS before (GiB)", "peak RSS (GiB)", "peak RSS / param bytes", "init (s)"], [
        (f"{dtype} ({', '.join(sorted({str(x.dtype) for x in leaves}))})", f"{count / 1e9:.3f}B", f"{gib:.2f}", f"{before:.2f}",
         f"{peak:.2f}", f"{peak / gib:.2f}x", f"{seconds:.1f}"),
    ]))


def child(args) -> None:
    if args.child == "checkpoint":
        return make_checkpoint(args)
    if args.child == "sizes":
        return sizes_and_table(args)
    if args.child.startswith("quantize-"):
        return quantize_export(args, args.child.removeprefix("quantize-"))
    if args.child.startswith("phases-"):
        return common.report(phases(args, args.child.removeprefix("phases-")))
    if args.child == "recompute":
        return common.report(recompute(args))
    engine, quantize, case = args.child.split(":")
    common.report(run_config(args, engine, quantize, case))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="holds the checkpoint and the exports between runs (needless with --matmuls, --sampler, --init_memory)")
    ap.add_argument("--k", type=int, default=20, help="labels per image")
    ap.add_argument("--layers", type=int, default=6, help="LLaMA-2 blocks kept (6 = the 1.78B model)")
    ap.add_argument("--vit_layers", type=int, default=24, help="ViT-L/14 blocks")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: one per core)")
    ap.add_argument("--configs", nargs="*", default=[f"{e}:{q}" for e, q in CONFIGS], help="engine:quantize, e.g. jax:int8")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--matmuls", action="store_true", help="only the per-product rates of each layout and engine")
    ap.add_argument("--phases", action="store_true", help="only the fp32 encoder and prefill times of each engine")
    ap.add_argument("--recompute", action="store_true", help="only ONNX Runtime's KV cache against recomputation")
    ap.add_argument("--recompute_updates", type=int, default=2, help="updates of recomputation to measure (19 = all)")
    ap.add_argument("--sampler", action="store_true", help="only JAX's KV-cache sampler against recomputation")
    ap.add_argument("--init_memory", choices=("bfloat16", "float32"), help="only the peak memory of initialising the model")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.child:
        return child(args)
    if args.matmuls:
        return matmuls(args)
    if args.sampler:
        return sampler(args)
    if args.init_memory:
        return init_memory(args.init_memory, args.layers)
    if not args.workdir:
        ap.error("--workdir is required")
    if args.recompute:
        return show_recompute(args)
    if args.phases:
        for engine in ("onnxruntime", "jax"):
            r = run_child(f"phases-{engine}")
            if r is None:
                sys.exit(1)
            print(f"{engine}: encoder {r['encoder']:.2f} s, prefill {r['prefill']:.2f} s (fp32, best of 3)")
        return

    prepare(args)
    work = pathlib.Path(args.workdir)
    sizes = json.loads((work / "sizes.json").read_text())
    before = floor.measure(args.threads)
    before["load_average"] = os.getloadavg()[0]
    show_limits("before", before)
    results = {}
    for config in args.configs:
        for case in args.cases:
            r = run_child(f"{config}:{case}")
            if r is None:
                continue
            results[f"{config}:{case}"] = r
            print(f"  {config} {case}: {r['seconds']:.2f} s ({r['steps']} steps, load average {r['load_average']:.2f})", flush=True)

    after = floor.measure(args.threads)  # the machine may be shared: the floor takes the best of both
    after["load_average"] = os.getloadavg()[0]
    show_limits("after", after)
    limits = {key: max(before[key], after[key]) for key in ("bandwidth", "matmul")}
    print(f"\ntop-{args.k}, one 224px image, {os.cpu_count()} cores of {common.cpu_name()}; bandwidth {limits['bandwidth']:.1f} GB/s, "
          f"matmul {limits['matmul']:.0f} GFLOP/s\n")
    print("| engine | weights | case | decode steps | s / image | floor (s) | floor / measured | bandwidth floor (s) | label tokens | peak RSS (GiB) | load avg | tokens vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        engine, quantize, case = key.split(":")
        phases = floor_phases(sizes, quantize, args.k, r["steps"])
        fl = floor.floor(phases, limits["bandwidth"], limits["matmul"])
        bw = floor.floor(phases, limits["bandwidth"], float("inf"))  # bytes alone
        ref = results.get(f"{engine}:none:{case}")
        same = "-" if ref is None or quantize == "none" else f"{np.mean(np.asarray(r['tokens']) == np.asarray(ref['tokens'])):.0%} equal"
        r["floor"], r["bandwidth_floor"] = fl, bw
        print(f"| {engine} | {quantize} | {case} | {r['steps']} | {r['seconds']:.2f} | {fl:.2f} | {fl / r['seconds']:.2f} | {bw:.2f} "
              f"| {'-'.join(map(str, r['label_tokens']))} | {r['peak_rss_gib']:.1f} | {r['load_average']:.1f} | {same} |")
    (work / "bench_cpu.json").write_text(json.dumps({"limits": [before, after], "sizes": sizes, "results": results}))


def run_child(name: str) -> dict | None:
    """This module again with `--child name` (its own process, so its peak memory is its own)."""
    return common.run_child(__spec__.name, sys.argv[1:], name)


def show_limits(when: str, m: dict) -> None:
    print(f"{when}: bandwidth {m['bandwidth']:.1f} GB/s (read {m['read']:.1f}, copy {m['copy']:.1f}, triad {m['triad']:.1f}), "
          f"fp32 matmul {m['matmul']:.0f} GFLOP/s; load average {m['load_average']:.2f}", flush=True)


if __name__ == "__main__":
    main()
