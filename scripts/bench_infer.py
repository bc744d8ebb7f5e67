"""One-shot sampling: the compiled KV-cache sampler against the original's recompute strategy.

Same model, same random weights, same images, one run. Prints ms/image at batch 1,
images/s at batch 8, the compiled peak memory of each, the speed-up, and checks that both
produce identical labels.

    python scripts/bench_infer.py                    # ViT-B/16 @224 + 2 x 2048-wide blocks
    python scripts/bench_infer.py --k 10 --batches 1 --repeats 1

With random weights no branch ever emits the delimiter, so every branch runs to the cap
of 19 sampled tokens, the worst case for both methods (a trained model's labels end after a
few tokens). Recomputation at batch 8 takes many minutes on a CPU: it runs only for batches
up to `--naive_max_batch`.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from nxtp_jax import prompts
from nxtp_jax.inference import ranking, sampling
from nxtp_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, VisionConfig
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.tokenizer import Tokenizer, train_sentencepiece


def bench_tokenizer(path: pathlib.Path | None = None) -> Tokenizer:
    """Only the prompt's ids and the delimiter come from it; the model keeps a LLaMA-sized vocabulary."""
    words = "cloud sky logo text title blue photo picture storm middle name art sun dog cat tree car house road water".split()
    texts = list(prompts.OBJECT_TEMPLATES) + [", ".join(np.random.default_rng(i).permutation(words)) for i in range(200)]
    path = path or pathlib.Path(tempfile.mkdtemp()) / "bench.model"
    return Tokenizer(train_sentencepiece(texts, path, 300))


def peak_bytes(fn, *args, **kw) -> int:
    """Compiled peak of one call: arguments + outputs + XLA temporaries."""
    m = fn.lower(*args, **kw).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def label_tokens(tokens, probs, delimiter_id) -> list[list[tuple[int, ...]]]:
    """Per image, each branch's label token ids (compared as ids: random argmaxes fall outside the small tokenizer)."""
    return [
        [g.tokens for g in ranking.groups_from_branches(t, p, delimiter_id)]
        for t, p in zip(np.asarray(tokens), np.asarray(probs))
    ]


def timed(fn, repeats: int) -> tuple[float, tuple]:
    out = jax.block_until_ready(fn())  # warm-up: compiles every shape the call needs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vit_width", type=int, default=768)
    ap.add_argument("--vit_layers", type=int, default=12)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--naive_max_batch", type=int, default=1, help="largest batch timed for recomputation")
    args = ap.parse_args()

    tok = bench_tokenizer()
    vocab = args.vocab + 2
    config = ModelConfig(
        vision=VisionConfig(args.vit_width, args.vit_layers, args.patch, args.image_size),
        decoder=DecoderConfig(dim=args.dim, layers=args.layers, n_heads=args.heads, vocab_size=vocab),
        special_tokens=SpecialTokens(image=tok.image_id, empty=tok.empty_id),
    )
    model = Recognizer(config)
    params = init_params(model, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    prompt = jnp.asarray(prompts.inference_prompt(tok))
    print(f"model: ViT {args.vit_width}x{args.vit_layers}/{args.patch}@{args.image_size} + {args.layers} blocks x {args.dim}, "
          f"vocab {vocab}, {n_params / 1e6:.0f}M params; {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")

    rng = np.random.default_rng(0)
    rows = []
    for k in args.k:
        for b in args.batches:
            images = jnp.asarray(rng.normal(size=(b, args.image_size, args.image_size, 3)).astype(np.float32))
            kw = dict(k=k, delimiter_id=tok.delimiter_id)
            t_cache, out_cache = timed(lambda: sampling.one_shot(model, params, images, prompt, **kw), args.repeats)
            mem_cache = peak_bytes(sampling.one_shot, model, params, images, prompt, **kw)
            steps = int(np.max(np.sum(np.asarray(out_cache[0]) >= 0, axis=-1)))
            t0 = sampling.prefix_embeddings(model, params, images, prompt).shape[1]
            shapes = [jax.ShapeDtypeStruct((b if t == t0 else b * k, t, args.dim), jnp.float32) for t in range(t0, t0 + steps)]
            mem_naive = max(peak_bytes(sampling._recompute_step, model, params, h) for h in shapes)
            if b > args.naive_max_batch:
                rows.append((k, b, t_cache, None, mem_cache, mem_naive, None, steps))
                continue
            t_naive, out_naive = timed(lambda: sampling.one_shot_recompute(model, params, images, prompt, **kw), 1)
            same = label_tokens(*out_cache, tok.delimiter_id) == label_tokens(*out_naive, tok.delimiter_id)
            rows.append((k, b, t_cache, t_naive, mem_cache, mem_naive, same, steps))

    print(f"\n{'k':>3} {'batch':>5} {'sampled':>7} | {'KV cache':>20} | {'recompute':>20} | {'speed-up':>8} | labels")
    for k, b, tc, tn, mc, mn, same, steps in rows:
        unit = lambda t: f"{t / b * 1e3:9.0f} ms/img" if b == 1 else f"{b / t:9.2f} img/s"
        naive = f"{unit(tn)} {mn / 2**30:5.2f}GiB" if tn else f"{'(not run)':>15} {mn / 2**30:5.2f}GiB"
        ratio = f"{tn / tc:7.1f}x" if tn else f"{'-':>8}"
        verdict = "-" if same is None else ("identical" if same else "DIFFERENT")
        print(f"{k:>3} {b:>5} {steps:>7} | {unit(tc)} {mc / 2**30:5.2f}GiB | {naive} | {ratio} | {verdict}")


if __name__ == "__main__":
    main()
