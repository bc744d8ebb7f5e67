"""Peak host memory of initialising the full-size model on CPU (ViT-L/14 + 6 LLaMA-2-7B blocks, ~1.78B params).

    python scripts/bench_init.py --dtype bfloat16
    python scripts/bench_init.py --dtype float32

Params are created by `init_params` (eval_shape, then one jit with out_shardings) directly
in `--dtype`, never materialised in fp32 first and cast. Peak RSS is per process, so run
each configuration in its own process; "peak RSS / param bytes" is the figure to watch.

`init_sharded` draws the random values with XLA's RngBitGenerator (`rbg`): with the default
threefry generator, XLA's CPU buffer plan kept several GiB of intermediate bits for the
32002 x 4096 tables alive at once (peak 16.7 GiB for either dtype).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from nxtp_jax.experiment import full_size
from nxtp_jax.models.recognizer import Recognizer, init_params

GIB = 1024**3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), required=True, help="param_dtype")
    p.add_argument("--layers", type=int, default=6, help="LLaMA-2-7B blocks kept (6: 1.78B, 1: 0.77B)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")

    model = Recognizer(full_size(layers=args.layers), param_dtype=jnp.dtype(args.dtype))
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    params = jax.block_until_ready(init_params(model, jax.random.key(args.seed)))
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()

    leaves = jax.tree_util.tree_leaves(params)
    count = sum(x.size for x in leaves)
    nbytes = sum(x.nbytes for x in leaves)
    dtypes = sorted({str(x.dtype) for x in leaves})
    print(f"param_dtype          {args.dtype} (leaves: {', '.join(dtypes)})")
    print(f"params               {count:,} ({count / 1e9:.3f}B)")
    print(f"param bytes          {nbytes / GIB:.2f} GiB")
    print(f"peak RSS before init {rss_before / GIB:.2f} GiB")
    print(f"peak RSS             {peak / GIB:.2f} GiB")
    print(f"peak RSS / params    {peak / nbytes:.2f}x")
    print(f"init time            {seconds:.1f} s")


if __name__ == "__main__":
    main()
