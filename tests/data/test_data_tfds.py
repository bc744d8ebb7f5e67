"""TFDS records -> pipeline elements; TFDS itself is optional and imported lazily."""

import io
import sys

import numpy as np
import pytest
from PIL import Image

from nxtp_jax.data import preprocess
from nxtp_jax.data.samples import Skip
from nxtp_jax.data.tfds_source import ClassificationRecord, tfds_data_source


def test_array_and_encoded_images_become_elements():
    to_element = ClassificationRecord(["tench", "goldfish"], 16)
    pixels = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    element = to_element({"image": pixels, "label": np.int64(1), "file_name": b"n01443537_1.JPEG"})
    expected = preprocess.resize_center_crop(Image.fromarray(pixels), 16)
    np.testing.assert_array_equal(element["image"], expected)
    assert (element["key"], element["caption"], element["labels"]) == ("n01443537_1.JPEG", "a photo of a goldfish.", "goldfish")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    encoded = to_element({"image": buf.getvalue(), "label": 0})
    np.testing.assert_array_equal(encoded["image"], expected)
    assert encoded["key"] == "tench"


def test_bad_records():
    to_element = ClassificationRecord(["a", "b"], 8)
    skip = to_element({"image": b"junk", "label": 0, "file_name": "x.jpg"})
    assert isinstance(skip, Skip) and skip.kind == "not_an_image" and skip.where == "x.jpg"
    with pytest.raises(ValueError, match=r"label in \[0, 2\)"):
        to_element({"image": np.zeros((4, 4, 3), np.uint8), "label": 5})
    with pytest.raises(ValueError, match="must not contain ','"):
        ClassificationRecord(["tench, Tinca tinca"], 8)


def test_missing_tfds_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'nxtp_jax\[tfds\]'"):
        tfds_data_source("imagenet2012", "train")
