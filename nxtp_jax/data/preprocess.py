"""CLIP image preprocessing: decode to RGB, bicubic short-side resize, center crop, normalise.

Matches the original's torchvision pipeline (`Image.open(...).convert("RGB")`, then
`Resize(size, BICUBIC)`, `CenterCrop(size)`, `ToTensor()`, `Normalize(CLIP_MEAN, CLIP_STD)`),
but keeps images channels-last and leaves normalisation to a separate step so that uint8
batches can be normalised on device. Like the original, EXIF orientation is not applied:
pixels are used as stored.

One function decodes for training, `Tagger`/`infer` and the service: `load_image`. It holds
every image to one budget of `max_pixels`, both decoded and while resizing (docs/data.md,
"Images"), and raises `ImageError` for anything it cannot use.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The decoding budget: no image is decoded, or resized through, at more pixels than this. A
# 50000x50000 PNG is a few hundred bytes on disk and 7.5 GB decoded. 8192^2 is far above any
# training image and well below what a data-loader worker can afford.
MAX_IMAGE_PIXELS = 8192 * 8192
# Encoded bytes above this are refused unread: an 8192^2 RGBA image stored raw.
MAX_IMAGE_BYTES = 4 * MAX_IMAGE_PIXELS
# The formats decoded (PIL names; "JPEG" includes camera MPO files). Others are refused:
# EPS would run Ghostscript, and rarer parsers are more attack surface than use.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ERROR_KINDS = ("not_an_image", "truncated_image", "too_large")


class ImageError(ValueError):
    """An image that cannot be used; `kind` (one of ERROR_KINDS) says why:

    - "not_an_image": empty, not in IMAGE_FORMATS, or a header that cannot be read;
    - "truncated_image": the header reads but the pixel data is cut short or corrupt;
    - "too_large": more encoded bytes than MAX_IMAGE_BYTES or more pixels than `max_pixels`.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


BadImageError = ImageError  # its name before 0.2


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes within the budget (JPEG through draft mode if it must)."""
    if len(data) == 0:
        raise ImageError("not_an_image", "expected image bytes, found 0 bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError("too_large", f"image has {len(data)} bytes, above MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own limit, at twice Image.MAX_IMAGE_PIXELS
        raise ImageError("too_large", f"image refused as a decompression bomb: {e}") from e
    except MemoryError:
        raise
    except Exception as e:  # PIL's header parsers raise many types on hostile bytes
        raise ImageError("not_an_image", f"expected an image in one of {IMAGE_FORMATS}, PIL says: {e!r:.200}") from e
    width, height = img.size
    if width * height > max_pixels and img.format in ("JPEG", "MPO"):
        # JPEG decodes at 1/2, 1/4 or 1/8 scale for almost nothing. Only images over the
        # budget take this path, so every image within it decodes exactly as the original's.
        for scale in (2, 4, 8):
            if -(-width // scale) * -(-height // scale) <= max_pixels:
                img.draft(img.mode, (max(1, width // scale), max(1, height // scale)))
                break
    return _load(img, max_pixels, f"image header claims {width}x{height} pixels")


def _load(img: Image.Image, max_pixels: int, claims: str) -> Image.Image:
    width, height = img.size
    if width == 0 or height == 0:
        raise ImageError("not_an_image", f"expected a non-empty image, found {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageError("too_large", f"{claims}, above the budget of {max_pixels} pixels; refusing to decode it")
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types for truncated or corrupt data
        raise ImageError("truncated_image", f"image data is cut short or corrupt: {e!r:.200}") from e
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """As the original's `convert("RGB")`, except 16-bit grey: that keeps the high byte (as PIL
    does for 16-bit colour) where `convert` would clip every value above 255 to white."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        grey = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
        img = Image.fromarray(grey.astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(src: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `src` (a path, encoded bytes, a PIL image, or a uint8 HxW / HxWx{1,3,4} array) to RGB.

    Raises ImageError (a ValueError; see its kinds) for anything that is not a usable image
    of at most `max_pixels` pixels, OSError if a path cannot be read, TypeError for other
    types. Palette, grey, CMYK and alpha images convert as PIL's `convert("RGB")` does
    (alpha dropped, as the original); 16-bit grey keeps its high byte; EXIF orientation is
    not applied (as the original).
    """
    if isinstance(src, Image.Image):
        img = _load(src, max_pixels, f"image has {src.width}x{src.height} pixels")
    elif isinstance(src, (bytes, bytearray, memoryview)):
        img = _open(bytes(src), max_pixels)
    elif isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
        try:
            img = _open(data, max_pixels)
        except ImageError as e:
            raise ImageError(e.kind, f"{os.fspath(src)}: {e}") from e
    elif hasattr(src, "__array__"):
        arr = np.asarray(src)
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))):
            raise ImageError(
                "not_an_image",
                "expected a uint8 array of shape HxW, HxWx1, HxWx3 or HxWx4, found "
                f"dtype {arr.dtype} shape {arr.shape}; convert it with "
                "np.clip(x, 0, 255).astype(np.uint8) first",
            )
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        img = _load(Image.fromarray(np.ascontiguousarray(arr)), max_pixels, f"array has {arr.shape[1]}x{arr.shape[0]} pixels")
    else:
        raise TypeError(f"expected a path, bytes, a PIL image or a uint8 array, found {type(src).__name__}")
    return _to_rgb(img)


# -- resize and crop --

_PRECISION_BITS = 22  # PIL's fixed-point resampling coefficients (Resample.c)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _taps(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bicubic taps for outputs [first, first + count) of an in_size -> out_size resize:
    (first input index [count], fixed-point weights [count, ksize]), computed in the same
    double-precision steps as PIL's `precompute_coeffs` and `normalize_coeffs_8bpc`."""
    scale = float(np.float32(in_size)) / out_size  # PIL passes the box corners as C floats
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(first, first + count, dtype=np.float64) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)
    n = np.minimum((center + support + 0.5).astype(np.int64), in_size) - lo
    weights = np.zeros((count, ksize))
    total = np.zeros(count)
    for x in range(ksize):  # summed in tap order, as PIL does
        w = np.where(x < n, _bicubic(((x + lo) - center + 0.5) * (1.0 / filterscale)), 0.0)
        weights[:, x] = w
        total = total + w
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    one = 1 << _PRECISION_BITS
    fixed = np.where(weights < 0, np.trunc(-0.5 + weights * one), np.trunc(0.5 + weights * one))
    return lo, fixed.astype(np.int64)


def _resample(arr: np.ndarray, lo: np.ndarray, fixed: np.ndarray, axis: int) -> np.ndarray:
    """One PIL 8-bit resampling pass along `axis` of uint8 [H, W, 3]: round, shift and clip as PIL does."""
    shape = list(arr.shape)
    shape[axis] = len(lo)
    acc = np.full(shape, 1 << (_PRECISION_BITS - 1), np.int64)
    weight_shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    for x in range(fixed.shape[1]):
        taps = np.take(arr, np.minimum(lo + x, arr.shape[axis] - 1), axis=axis)
        acc += taps.astype(np.int64) * fixed[:, x].reshape(weight_shape)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def _resize_window(img: Image.Image, new_w: int, new_h: int, left: int, top: int, size: int) -> np.ndarray:
    """`img.resize((new_w, new_h), BICUBIC)[top:top+size, left:left+size]`, bit for bit, without
    the full resize: only the input rows and columns the window reads are touched.

    Only for a short side that is upscaled: PIL then runs the horizontal pass first (every
    version; Pillow 13 runs the vertical one first when the height shrinks a lot).
    """
    width, height = img.size
    if new_w != width:
        x_lo, x_w = _taps(width, new_w, left, size)
        c0, c1 = int(x_lo.min()), int(x_lo.max()) + x_w.shape[1]
    else:
        c0, c1 = left, left + size
    if new_h != height:
        y_lo, y_w = _taps(height, new_h, top, size)
        r0, r1 = int(y_lo.min()), int(y_lo.max()) + y_w.shape[1]
    else:
        r0, r1 = top, top + size
    arr = np.asarray(img.crop((c0, r0, min(c1, width), min(r1, height))))
    if new_w != width:
        arr = _resample(arr, x_lo - c0, x_w, axis=1)
    if new_h != height:
        arr = _resample(arr, y_lo - r0, y_w, axis=0)
    return arr


def resize_center_crop(img: Image.Image, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """torchvision `Resize(size, BICUBIC)` + `CenterCrop(size)` on a PIL image -> uint8 [size, size, 3].

    When the resized image would exceed `max_pixels` (a 1x300000 image resizes to 224x67
    million), only the center crop is computed, with PIL's arithmetic: the same pixels.
    """
    if size <= 0:
        raise ValueError(f"expected a positive image size, found {size}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if new_w * new_h > max_pixels and short < size:
        return _resize_window(img, new_w, new_h, left, top, size)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
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


def preprocess(src: Any, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode, resize, crop and normalise one image: float32 [size, size, 3]."""
    return normalize(resize_center_crop(load_image(src, max_pixels), size, max_pixels))
