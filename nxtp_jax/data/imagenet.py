"""ImageNet-1k as the original repository evaluated it: the targets of an image are its class's synonyms.

`in1k_classes.txt` is the original's `src/imagenet/tools/in1k_label.name`: line i is
"i: name, synonym, ..." for class i in the standard order (WordNet ids sorted, as TFDS's
`imagenet2012` labels and the sorted class folders of the validation set). The original
joined a class's names with "," and lowercased them (`skip_extract_nouns`), so the targets
of "0: tench, Tinca tinca" are ["tench", "tinca tinca"].

Two ways in:
- TFDS: a registry entry with "tfds": "imagenet2012" and "classes": "in1k" (eval_inputs.py);
- shards: `python -m nxtp_jax.data.imagenet --val_dir=VAL --out=in1k_val.jsonl` writes the
  captions file that `scripts/folder_to_wds.py` packs, with the targets as json labels.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Mapping

from nxtp_jax.data.samples import Skip
from nxtp_jax.data.tfds_source import ClassificationRecord

CLASSES_FILE = pathlib.Path(__file__).parent / "in1k_classes.txt"
NUM_CLASSES = 1000
IMAGE_EXTS = (".jpeg", ".jpg", ".png")


@functools.lru_cache(maxsize=None)
def class_names() -> tuple[tuple[str, ...], ...]:
    """Per class, its names as the original lists them (first = the usual class name)."""
    names: list[tuple[str, ...]] = []
    for n, line in enumerate(CLASSES_FILE.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        index, sep, rest = line.partition(":")
        if not sep or int(index) != len(names):
            raise ValueError(f"{CLASSES_FILE}:{n}: expected 'index: name, ...' with index {len(names)}, found {line!r}")
        names.append(tuple(part.strip() for part in rest.split(",")))
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{CLASSES_FILE}: expected {NUM_CLASSES} classes, found {len(names)}; the file is damaged")
    return tuple(names)


def class_targets(label: int) -> list[str]:
    """The targets of an image of class `label`: its names, lowercased."""
    names = class_names()
    if not 0 <= label < len(names):
        raise ValueError(f"expected an ImageNet-1k class index in [0, {len(names)}), found {label}")
    return [name.lower() for name in names[label]]


class In1kRecord:
    """A picklable TFDS `imagenet2012` record -> eval element whose labels are the class's targets."""

    def __init__(self, image_size: int, *, image_key: str = "image", label_key: str = "label", key_field: str = "file_name"):
        self.label_key = label_key
        self._base = ClassificationRecord(
            [names[0] for names in class_names()], image_size, image_key=image_key, label_key=label_key, key_field=key_field
        )

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any] | Skip:
        element = self._base(record)
        if isinstance(element, dict):
            element["labels"] = ",".join(class_targets(int(record[self.label_key])))
        return element


def captions_rows(val_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """folder_to_wds rows for an ImageNet validation folder `val_dir/<wnid>/<image>` (1000 class folders)."""
    root = pathlib.Path(val_dir)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(folders) != NUM_CLASSES:
        raise ValueError(
            f"expected {NUM_CLASSES} class folders (n01440764, ...) in {root}, found {len(folders)}; "
            "sort the validation images into one folder per WordNet id first"
        )
    rows = []
    for label, folder in enumerate(folders):
        targets = class_targets(label)
        for image in sorted((root / folder).iterdir()):
            if image.suffix.lower() in IMAGE_EXTS:
                rows.append(
                    {"path": f"{folder}/{image.name}", "caption": f"a photo of a {class_names()[label][0]}.", "labels": targets}
                )
    return rows


if __name__ == "__main__":
    from nxtp_jax.cli.imagenet import imagenet_command

    imagenet_command.entry()
