"""CLIP image preprocessing: decode to RGB, bicubic short-side resize, center crop, normalise.

Matches the original's torchvision pipeline (`Image.open(...).convert("RGB")`, then
`Resize(size, BICUBIC)`, `CenterCrop(size)`, `ToTensor()`, `Normalize(CLIP_MEAN, CLIP_STD)`),
but keeps images channels-last and leaves normalisation to a separate step so that uint8
batches can be normalised on device.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Refuse images whose header claims more pixels than this (a decompression bomb): a
# 50000x50000 PNG is a few hundred bytes on disk and 7.5 GB once decoded. 8192^2 is far
# above any training image and well below what a data-loader worker can afford.
MAX_IMAGE_PIXELS = 8192 * 8192


class BadImageError(ValueError):
    """An image that cannot be used; `kind` names the reason for skip counting."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _decode_bytes(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise BadImageError("empty_image", "expected image bytes, found 0 bytes")
    # Set where decoding happens, not at import, so PIL's own check (an error above 2x the
    # limit) is never looser than ours.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImageError("bomb", f"image refused as a decompression bomb: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError("undecodable", f"expected a decodable image, PIL says: {e}") from e
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImageError(
            "bomb",
            f"image header claims {width}x{height} pixels, above MAX_IMAGE_PIXELS="
            f"{MAX_IMAGE_PIXELS}; refusing it as a decompression bomb",
        )
    if width == 0 or height == 0:
        raise BadImageError("empty_image", f"expected a non-empty image, found {width}x{height}")
    try:
        img.load()
    except Exception as e:  # PIL raises many types for truncated or corrupt data
        raise BadImageError("undecodable", f"image data does not decode: {e!r}") from e
    return img


def load_image(src: Any) -> Image.Image:
    """Decode `src` (path, bytes, PIL image, uint8 HxWx3 or HxW array) into an RGB image."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        img = _decode_bytes(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            data = f.read()
        try:
            img = _decode_bytes(data)
        except BadImageError as e:
            raise BadImageError(e.kind, f"{os.fspath(src)}: {e}") from e
    elif hasattr(src, "__array__"):
        arr = np.asarray(src)
        if arr.dtype != np.uint8 or not (
            arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))
        ):
            raise BadImageError(
                "bad_array",
                "expected a uint8 array of shape HxW, HxWx1, HxWx3 or HxWx4, found "
                f"dtype {arr.dtype} shape {arr.shape}; convert it with "
                "np.clip(x, 0, 255).astype(np.uint8) first",
            )
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        img = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise TypeError(
            "expected a path, bytes, a PIL image or a uint8 array, found "
            f"{type(src).__name__}"
        )
    if img.width == 0 or img.height == 0:
        raise BadImageError("empty_image", f"expected a non-empty image, found {img.size}")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """torchvision `Resize(size, BICUBIC)` + `CenterCrop(size)` on a PIL image -> uint8 [size, size, 3]."""
    if size <= 0:
        raise ValueError(f"expected a positive image size, found {size}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    out = np.asarray(img, dtype=np.uint8)[top : top + size, left : left + size]
    return np.ascontiguousarray(out)


def normalize(x: Any) -> Any:
    """uint8 [..., 3] (numpy or jax, also under jit) -> float32 (x / 255 - CLIP_MEAN) / CLIP_STD."""
    if x.dtype != np.uint8:
        raise TypeError(
            f"expected uint8 pixels, found dtype {x.dtype}; normalize() takes raw pixels "
            "and must not be applied twice"
        )
    if x.shape[-1] != 3:
        raise ValueError(f"expected channels-last RGB [..., 3], found shape {tuple(x.shape)}")
    if isinstance(x, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp  # lazy: grain workers that only decode need no jax
    mean = xp.asarray(CLIP_MEAN, dtype=xp.float32)
    std = xp.asarray(CLIP_STD, dtype=xp.float32)
    return (x.astype(xp.float32) / xp.float32(255.0) - mean) / std


def preprocess(src: Any, size: int) -> np.ndarray:
    """Decode, resize, crop and normalise one image: float32 [size, size, 3]."""
    return normalize(resize_center_crop(load_image(src), size))
