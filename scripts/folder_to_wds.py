"""Pack an image folder plus a captions file (tsv or jsonl) into WebDataset shards.

    python scripts/folder_to_wds.py --images IMGS --captions caps.tsv --out DIR --samples_per_shard 1000

The captions file names each image by its path relative to --images:
- .tsv: a header row with the `path` and `caption` columns (names set by --path_col,
  --caption_col), tab-separated; an optional `labels` column holds comma-separated labels;
- .jsonl: one object per line with the same keys; "labels" is a list of strings.
Sample i (in file order) is keyed by its zero-padded number and has the image (jpg, png
and webp bytes copied as they are, other formats converted to png), .txt with the caption
and .json with {"path", "cap"} and "labels" if given. A path that leads outside --images,
or a --prefix that leads outside --out, is refused. --out must be empty, or pass
--overwrite to replace the shards in it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Iterator

from nxtp_jax.data import preprocess
from nxtp_jax.data.writer import inside, pack, packer_main

_KEEP = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def read_captions(path: str, path_col: str, caption_col: str) -> Iterator[dict]:
    """Rows {"path", "caption", optional "labels": list[str]} of a tsv or jsonl file."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if path_col not in row or caption_col not in row:
                    raise ValueError(f"{path}:{n}: expected keys {path_col!r} and {caption_col!r}, found {sorted(row)}")
                yield {"path": row[path_col], "caption": row[caption_col], **({"labels": row["labels"]} if "labels" in row else {})}
    elif path.endswith(".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if reader.fieldnames is None or path_col not in reader.fieldnames or caption_col not in reader.fieldnames:
                raise ValueError(f"{path}: expected a header row with {path_col!r} and {caption_col!r}, found {reader.fieldnames}")
            for row in reader:
                out = {"path": row[path_col], "caption": row[caption_col]}
                if row.get("labels"):
                    out["labels"] = [x.strip() for x in row["labels"].split(",") if x.strip()]
                yield out
    else:
        raise ValueError(f"expected a .tsv or .jsonl captions file, found {path!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder the image paths are relative to")
    parser.add_argument("--captions", required=True, help=".tsv or .jsonl captions file")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--prefix", default="", help="shard name prefix (default: 000000.tar, ...)")
    parser.add_argument("--path_col", default="path")
    parser.add_argument("--caption_col", default="caption")
    return packer_main(parser, run, argv)


def run(args: argparse.Namespace) -> int:
    rows = list(read_captions(args.captions, args.path_col, args.caption_col))
    sources = [inside(args.images, row["path"], f"{args.captions}: path") for row in rows]
    width = max(6, len(str(len(rows))))
    problems: list[str] = []

    def make_sample(i: int, row: dict) -> tuple[str, dict[str, bytes]] | None:
        src = sources[i]
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as e:
            problems.append(f"{row['path']}: {e.strerror}")
            return None
        ext = _KEEP.get(os.path.splitext(src)[1].lower())
        if ext is None:
            try:
                buf = io.BytesIO()
                preprocess.load_image(data).save(buf, "PNG")  # within the decoding budget
            except preprocess.ImageError as e:
                problems.append(f"{row['path']}: cannot convert to png: {e}")
                return None
            data, ext = buf.getvalue(), "png"
        meta = {"path": row["path"], "cap": row["caption"]}
        if "labels" in row:
            meta["labels"] = row["labels"]
        members = {ext: data, "txt": row["caption"].encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}
        return f"{i:0{width}d}", members

    shards = pack(
        rows, make_sample, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite, desc="packing", progress=not args.no_progress,
    )
    print(f"{len(rows) - len(problems)} samples in {len(shards)} shards under {args.out}")
    for p in problems[:10]:
        print(f"warning: skipped {p}", file=sys.stderr)
    if len(problems) > 10:
        print(f"warning: ... and {len(problems) - 10} more skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
