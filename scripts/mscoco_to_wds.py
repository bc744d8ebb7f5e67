"""Pack COCO 2017 captions and images into WebDataset shards.

    python scripts/mscoco_to_wds.py --root COCO --split val2017 --out DIR --samples_per_shard 3000

Reads COCO/annotations/captions_<split>.json and COCO/<split>/<file_name>. Images go in
order of their id; each becomes a sample keyed by its file name without extension
(000000000139) with .jpg (the original bytes), .txt (all its captions in annotation-file
order, each stripped, joined by one space) and .json ({"path", "cap", "split"}). A dot
inside the name is escaped in the key (writer.safe_key). Shards are DIR/000000.tar, ...;
DIR must be empty, or pass --overwrite to replace the shards in it. A file name that leads
outside COCO/<split> is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nxtp_jax.data.writer import inside, pack, packer_main, safe_key


def load_captions(root: str, split: str) -> tuple[list[dict], dict[int, list[str]]]:
    """(images sorted by id, image id -> captions in annotation-file order)."""
    path = os.path.join(root, "annotations", f"captions_{split}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected the COCO captions file at {path!r}; check --root and --split")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ValueError(f"{path}: expected a COCO captions file with \"images\" and \"annotations\"; check --root and --split")
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return sorted(data["images"], key=lambda im: im["id"]), captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="COCO folder with annotations/ and <split>/")
    parser.add_argument("--split", default="val2017", help="train2017 or val2017")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--samples_per_shard", type=int, default=3000)
    return packer_main(parser, run, argv)


def run(args: argparse.Namespace) -> int:
    images, captions = load_captions(args.root, args.split)
    folder = os.path.join(args.root, args.split)
    sources = [inside(folder, image["file_name"], "annotation file_name") for image in images]
    missing: list[str] = []

    def make_sample(i: int, image: dict) -> tuple[str, dict[str, bytes]] | None:
        name = image["file_name"]
        try:
            with open(sources[i], "rb") as f:
                data = f.read()
        except FileNotFoundError:
            missing.append(name)
            return None
        text = " ".join(c.strip() for c in captions.get(image["id"], []))
        meta = {"path": name, "cap": text, "split": args.split}
        key = safe_key(os.path.splitext(name)[0])
        return key, {"jpg": data, "txt": text.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}

    shards = pack(
        images, make_sample, args.out, samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
        desc=f"coco {args.split}", progress=not args.no_progress,
    )
    print(f"{len(images) - len(missing)} samples in {len(shards)} shards under {args.out}")
    if missing:
        print(f"warning: {len(missing)} images listed in the annotations were not found, e.g. {missing[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
