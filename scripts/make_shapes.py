"""Write the synthetic shapes dataset (the demo's data) as train and val WebDataset shards.

    python scripts/make_shapes.py --out data/shapes --num_train 20000 --num_val 1000

Each sample has a .jpg, a .txt caption and a .json with "labels" (colour words and shape
names), so training and evaluation need no NLTK. Re-running resumes: finished shards stay.
"""

from __future__ import annotations

import argparse

from nxtp_jax.data.shapes import make_shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder; gets train/ and val/")
    parser.add_argument("--num_train", type=int, default=20_000)
    parser.add_argument("--num_val", type=int, default=1_000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--samples_per_shard", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    shards = make_shapes(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"train: {len(shards['train'])} shards, val: {len(shards['val'])} shards under {args.out}")


if __name__ == "__main__":
    main()
