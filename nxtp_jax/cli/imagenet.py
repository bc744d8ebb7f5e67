"""`python -m nxtp_jax.data.imagenet`: the captions jsonl of ImageNet-1k val for scripts/folder_to_wds.py.

    python -m nxtp_jax.data.imagenet --val_dir=/data/imagenet/val --out=in1k_val.jsonl

`--val_dir` holds one folder of images per WordNet id (1000 of them); each row names an image,
a caption and the class's synonyms as its labels (nxtp_jax/data/imagenet.py).
"""

from __future__ import annotations

import json

from absl import flags

from nxtp_jax.cli.command import Command
from nxtp_jax.data import imagenet


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("val_dir", None, "Folder with one sub-folder of images per WordNet id.", flag_values=fv, required=True)
    flags.DEFINE_string("out", None, "Output .jsonl.", flag_values=fv, required=True)


def body(fv: flags.FlagValues, args: list[str]) -> None:
    rows = imagenet.captions_rows(fv.val_dir)
    with open(fv.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {fv.out}; pack them with scripts/folder_to_wds.py --images {fv.val_dir} --captions {fv.out}")


imagenet_command = Command("python -m nxtp_jax.data.imagenet", __doc__, define, body)
