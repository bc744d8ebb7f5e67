"""TensorFlow Datasets eval sources (e.g. ImageNet-2012 prepared from its manual files).

Optional: needs the `tfds` extra (tensorflow-datasets, importlib_resources), imported only
when a TFDS source is built. Records go through `tfds.data_source`, a random-access
ArrayRecord reader; each record becomes the usual element, with the class name as the label.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from nxtp_jax.data import preprocess
from nxtp_jax.data.samples import Skip


def tfds_data_source(name: str, split: str, data_dir: str | None = None) -> Any:
    """`tfds.data_source(name, split=split, data_dir=data_dir)`, with a clear error if TFDS is absent."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "TFDS sources need tensorflow-datasets, which is optional: install it with "
            "`pip install 'nxtp_jax[tfds]'` (tensorflow-datasets and importlib_resources)"
        ) from e
    return tfds.data_source(name, split=split, data_dir=data_dir)


class ClassificationRecord:
    """A picklable `record -> element | Skip` for image classification records.

    The image (`image_key`: uint8 array or encoded bytes) is resized and center-cropped;
    the labels are the class name of `label_key`, and the caption is `caption_template`
    filled with it. The key is `key_field` of the record if present, else the class name.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        image_size: int,
        *,
        image_key: str = "image",
        label_key: str = "label",
        key_field: str = "file_name",
        caption_template: str = "a photo of a {}.",
    ):
        if any("," in name for name in class_names):
            raise ValueError("class names must not contain ',', the label delimiter; rename them first")
        self.class_names = list(class_names)
        self.image_size = image_size
        self.image_key = image_key
        self.label_key = label_key
        self.key_field = key_field
        self.caption_template = caption_template

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any] | Skip:
        label = int(record[self.label_key])
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"expected a label in [0, {len(self.class_names)}), found {label}; wrong class_names?")
        name = self.class_names[label]
        key = record.get(self.key_field, name)
        key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        try:
            img = preprocess.load_image(record[self.image_key])
        except preprocess.ImageError as e:
            return Skip(e.kind, key, str(e))
        return {
            "image": preprocess.resize_center_crop(img, self.image_size),
            "key": key,
            "caption": self.caption_template.format(name),
            "labels": name,
        }

