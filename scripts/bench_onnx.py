"""Top-k tagging of one 224px image on CPU: ONNX Runtime with KV cache, JAX, and ONNX Runtime recomputing.

Same random weights (one checkpoint, exported once), same image, one run; each engine runs in its
own process so that its peak memory is its own. Prints a markdown table.

    python scripts/bench_onnx.py --workdir /tmp/bench_onnx            # 1.78B: ViT-L/14 + 6 LLaMA-2 blocks
    python scripts/bench_onnx.py --workdir /tmp/bench_small --layers 1 --vit_layers 2 --recompute_updates 19

The first run writes WORKDIR/ckpt (random weights, ~7 GB for 1.78B) and WORKDIR/onnx
(convert/to_onnx.py); later runs reuse them. With random weights no branch ever emits the
delimiter, so every branch runs to the cap of 19 sampled tokens: the worst case for all engines
(a trained model's labels end after a few tokens). Recomputation costs about k prefills per
update, so by default it runs only its first `--recompute_updates` updates, and the table
projects the rest from the measured per-update time (marked "projected"). Labels are compared
as token ids: the benchmark's small tokenizer cannot decode a LLaMA-sized vocabulary.

Needs the export environment (jax + the `onnx` extra), see docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINES = ("onnxruntime, KV cache", "JAX (XLA CPU), KV cache", "onnxruntime, recompute (original)")


def make_checkpoint(args) -> None:
    """Random weights (seed 0) in the paper's architecture, written as an nxtp_jax checkpoint."""
    import dataclasses

    import jax

    from nxtp_jax import checkpoint
    from nxtp_jax.experiment import full_size
    from nxtp_jax.models.config import SpecialTokens
    from nxtp_jax.models.recognizer import Recognizer, init_params

    from bench_infer import bench_tokenizer  # scripts/ is on the path when a script runs

    work = pathlib.Path(args.workdir)
    tok = bench_tokenizer(work / "bench.model")
    config = full_size(layers=args.layers)
    config = dataclasses.replace(
        config,
        vision=dataclasses.replace(config.vision, layers=args.vit_layers),
        special_tokens=SpecialTokens(image=tok.image_id, empty=tok.empty_id),
    )
    params = init_params(Recognizer(config), jax.random.key(0))
    checkpoint.save(work / "ckpt", params, config, tok.model_path, source="scripts/bench_onnx.py random init, seed 0")


def prepare(args) -> str:
    """Makes the random checkpoint and its export once, each in its own process; returns the exporter's report."""
    work = pathlib.Path(args.workdir)
    ckpt, onnx_dir, report = work / "ckpt", work / "onnx", work / "export.log"
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--child", "checkpoint", *sys.argv[1:]], check=True)
    if not (onnx_dir / "config.json").exists():
        res = subprocess.run(
            [sys.executable, str(ROOT / "convert" / "to_onnx.py"), "--ckpt", str(ckpt), "--out", str(onnx_dir), "--dtype", args.dtype],
            capture_output=True, text=True,
        )
        report.write_text(res.stdout + res.stderr)
        if res.returncode:
            sys.exit(f"export failed:\n{res.stdout}\n{res.stderr}")
    return report.read_text() if report.exists() else ""


def run_engine(engine: str, args, ckpt: pathlib.Path, onnx_dir: pathlib.Path, image: np.ndarray) -> dict:
    """Times `engine` on one image in this process: warm-up, then `--repeats` runs."""
    if engine.startswith("onnxruntime"):
        from nxtp_jax.export.ort_tagger import OrtTagger

        tagger = OrtTagger(onnx_dir, threads=args.threads)
        pixels = image[None]
        if "recompute" in engine:
            return _time_recompute(tagger, pixels, args)
        run = lambda: tagger.sample(pixels, args.k)  # noqa: E731
    else:
        import jax
        import jax.numpy as jnp

        from nxtp_jax.data import preprocess
        from nxtp_jax.inference.tagger import Tagger

        tagger = Tagger.load(ckpt, dtype=jnp.float32, batch_size=1)
        images = jnp.asarray(preprocess.normalize(image)[None])

        def run():
            out = tagger.sample(images, args.k)
            return tuple(np.asarray(x) for x in jax.block_until_ready((out["tokens"], out["probs"])))

    start = time.perf_counter()
    tokens, _ = run()
    first = time.perf_counter() - start  # includes JAX's compilation
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tokens, _ = run()
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "first_call": first, "tokens": tokens.tolist(), "projected": False}


def _time_recompute(tagger, pixels: np.ndarray, args) -> dict:
    """The first `--recompute_updates` updates measured; the remaining ones projected at the last update's cost."""
    from nxtp_jax.export import ort_tagger

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
    tokens = np.stack(tokens, -1).reshape(1, args.k, -1)
    return {"seconds": total, "measured": measured, "updates_measured": updates, "tokens": tokens.tolist(), "projected": remaining > 0}


def child(args) -> None:
    if args.child == "checkpoint":
        return make_checkpoint(args)
    work = pathlib.Path(args.workdir)
    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    out = run_engine(args.child, args, work / "ckpt", work / "onnx", image)
    status = pathlib.Path("/proc/self/status").read_text()
    out["peak_rss_gib"] = int(status.split("VmHWM:")[1].split()[0]) / 2**20  # KiB; unlike ru_maxrss not inherited
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="holds the random checkpoint and its export between runs")
    ap.add_argument("--k", type=int, default=20, help="labels per image (one-shot branches)")
    ap.add_argument("--layers", type=int, default=6, help="LLaMA-2 blocks kept (6 = the 1.78B model)")
    ap.add_argument("--vit_layers", type=int, default=24, help="ViT-L/14 blocks (24 = the paper's)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="export dtype")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: one per core)")
    ap.add_argument("--recompute_updates", type=int, default=2, help="updates of recomputation to measure (19 = all)")
    ap.add_argument("--engines", nargs="*", type=int, default=[0, 1, 2], help=f"indices into {ENGINES}")
    ap.add_argument("--child", choices=ENGINES + ("checkpoint",), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.child:
        return child(args)

    print(prepare(args))
    results = {}
    for i in args.engines:
        engine = ENGINES[i]
        cmd = [sys.executable, __file__, "--child", engine, *sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
        if res.returncode or not lines:
            sys.exit(f"{engine} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        results[engine] = json.loads(lines[-1].removeprefix("RESULT "))

    ref = results.get(ENGINES[0])
    print(f"\ntop-{args.k}, one {224}px image, {os.cpu_count()} CPU cores, export dtype {args.dtype}\n")
    print("| engine | s / image | peak RSS (GiB) | tokens vs ORT KV cache |")
    print("|---|---|---|---|")
    for engine, r in results.items():
        secs = f"{r['seconds']:.1f}" + (f" (projected; {r['updates_measured']} of 19 updates measured in {r['measured']:.1f} s)" if r["projected"] else "")
        if ref is None or engine == ENGINES[0]:
            same = "-"
        else:
            n = np.asarray(r["tokens"]).shape[-1]
            same = "identical" if np.array_equal(np.asarray(r["tokens"]), np.asarray(ref["tokens"])[..., :n]) else "DIFFERENT"
            same += "" if n == np.asarray(ref["tokens"]).shape[-1] else f" (first {n} updates)"
        print(f"| {engine} | {secs} | {r['peak_rss_gib']:.1f} | {same} |")
    (pathlib.Path(args.workdir) / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
