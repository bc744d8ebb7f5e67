"""`Tagger.predict` top-20 on one 224px image with the paper's full-size architecture.

ViT-L/14 + the first 6 blocks of LLaMA-2 7B + embeddings (about 1.78B params), random
weights, initialised straight into their dtype. Prints the first call (with
compilation), the median of warm calls, and the process's peak RSS.

    python scripts/bench_full_size.py [--k 20] [--param_dtype float32] [--repeats 2]

Random weights never emit the delimiter, so all branches run to the cap of 19 sampled
tokens: the slowest case.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_infer import bench_tokenizer  # scripts/ is on the path when a script runs
from nxtp_jax.experiment import full_size
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer


class IdTokenizer(Tokenizer):
    """Decodes to the ids themselves: random argmaxes fall outside the small benchmark tokenizer."""

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    # The tokenizer only supplies the prompt's ids and the delimiter; the model has LLaMA's 32002 rows.
    tok = IdTokenizer(bench_tokenizer().model_path)
    config = full_size(layers=args.layers)
    dtype = jnp.dtype(args.param_dtype)
    model = Recognizer(config, dtype=dtype, param_dtype=dtype)
    start = time.perf_counter()
    params = init_params(model, jax.random.key(0))
    jax.block_until_ready(params)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"{n_params / 1e9:.2f}B params in {args.param_dtype}, initialised in {time.perf_counter() - start:.1f}s "
          f"on {jax.device_count()} {jax.devices()[0].platform} device(s)")

    tagger = Tagger(model, params, tok, batch_size=1)
    image = np.random.default_rng(0).integers(0, 256, size=(256, 320, 3), dtype=np.uint8)

    start = time.perf_counter()
    tagger.predict([image], num_labels=args.k, ranking_method="none")
    cold = time.perf_counter() - start
    warm = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = tagger.predict([image], num_labels=args.k, ranking_method="none")
        warm.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(f"top-{args.k}, one 224px image: first call {cold:.1f}s (with compilation), "
          f"warm {np.median(warm):.1f}s (median of {len(warm)}); peak RSS {peak:.2f} GiB; {len(out[0])} labels")


if __name__ == "__main__":
    main()
