"""Preprocessing against an independent re-statement of torchvision's CLIP transforms.

torchvision itself cannot be the reference here: the only torchvision wheels that match torch
2.13.0 are CUDA builds, whose operators fail to register next to the CPU torch the tests use.
"""

import io
import struct
import subprocess
import sys
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from nxtp_jax.data import preprocess as pp

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def torchvision_restatement(img: Image.Image, size: int) -> np.ndarray:
    """Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize, as torchvision does on PIL.

    torchvision's Resize with an int keeps the aspect ratio: the short side becomes `size`,
    the long side int(size * long / short), and PIL's bicubic resize is called only when the
    size changes. CenterCrop takes rows from int(round((h - size) / 2.0)). ToTensor divides
    by 255 in float32 and Normalize subtracts the mean and divides by the std per channel.
    """
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        target = (size, int(size * h / w))
    else:
        target = (int(size * w / h), size)
    if target != (w, h):
        img = img.resize(target, Image.BICUBIC)
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
    t = t.to(torch.float32).div(255)
    _, th, tw = t.shape
    top = int(round((th - size) / 2.0))
    left = int(round((tw - size) / 2.0))
    t = t[:, top : top + size, left : left + size]
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    t = (t - mean) / std
    return t.permute(1, 2, 0).numpy()


def random_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise so bicubic overshoot and clipping both occur.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def test_constants_are_clips():
    assert pp.CLIP_MEAN == MEAN
    assert pp.CLIP_STD == STD


@pytest.mark.parametrize(
    "w,h,size",
    [
        (301, 167, 37),  # landscape, odd sizes
        (167, 301, 37),  # portrait
        (97, 113, 31),
        (640, 427, 224),
        (427, 640, 224),
        (255, 255, 64),  # square, downscale
        (20, 33, 49),  # upscale
        (224, 300, 224),  # short side already at size: no resize, crop only
        (224, 224, 224),  # no-op
        (300, 225, 224),  # odd crop offset, round half
    ],
)
def test_matches_a_restatement_of_torchvision_transforms(w, h, size):
    img = random_image(w, h, seed=w * 1000 + h)
    crop = pp.resize_center_crop(img, size)
    assert crop.dtype == np.uint8 and crop.shape == (size, size, 3)
    ours = pp.preprocess(img, size)
    ref = torchvision_restatement(img, size)
    assert ours.dtype == np.float32 and ours.shape == (size, size, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_center_crop_offset_is_python_round():
    # 225 rows resized to 224 would hide the offset; use a width of 227 at size 224 with a
    # short side already at 224: left = round(1.5) = 2 (banker's rounding), not 1.
    arr = np.zeros((224, 227, 3), np.uint8)
    arr[:, :, 0] = np.arange(227, dtype=np.uint8)[None, :]
    out = pp.resize_center_crop(Image.fromarray(arr), 224)
    assert out[0, 0, 0] == 2 and out[0, -1, 0] == 225
    arr = np.zeros((224, 229, 3), np.uint8)
    arr[:, :, 0] = np.arange(229, dtype=np.uint8)[None, :]
    out = pp.resize_center_crop(Image.fromarray(arr), 224)
    assert out[0, 0, 0] == 2  # round(2.5) == 2


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1", "I", "YCbCr"])
def test_modes_are_converted_to_rgb_before_resizing(mode):
    img = random_image(53, 71, seed=3, mode=mode)
    rgb = pp.load_image(img)
    assert rgb.mode == "RGB" and rgb.size == (53, 71)
    expected = np.asarray(img.convert("RGB").resize((29, int(29 * 71 / 53)), Image.BICUBIC))
    top = int(round((expected.shape[0] - 29) / 2.0))
    np.testing.assert_array_equal(pp.resize_center_crop(rgb, 29), expected[top : top + 29])


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "CMYK"), ("JPEG", "L"), ("WEBP", "RGB")])
def test_load_image_from_bytes_and_path(tmp_path, fmt, mode):
    img = random_image(40, 30, seed=5, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = buf.getvalue()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    from_bytes = pp.load_image(data)
    assert from_bytes.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(from_bytes), expected)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    np.testing.assert_array_equal(np.asarray(pp.load_image(path)), expected)
    np.testing.assert_array_equal(np.asarray(pp.load_image(str(path))), expected)


def test_load_image_from_arrays():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(pp.load_image(rgb)), rgb)
    np.testing.assert_array_equal(np.asarray(pp.load_image(jnp.asarray(rgb))), rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(np.asarray(pp.load_image(gray)), np.repeat(gray[..., None], 3, -1))
    with pytest.raises(pp.ImageError, match="uint8"):
        pp.load_image(rgb.astype(np.float32))
    with pytest.raises(pp.ImageError, match="shape"):
        pp.load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(TypeError, match="expected a path"):
        pp.load_image(12)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [50000, 9000])
def test_decompression_bomb_is_refused(side):
    # 50000^2 is past PIL's hard limit; 9000^2 is past ours but inside PIL's warning band.
    assert side * side > pp.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(pp.ImageError, match="decompression bomb|above the budget") as info:
            pp.load_image(_png_header_only(side, side))
    assert info.value.kind == "too_large"


def test_corrupt_truncated_and_empty_bytes():
    buf = io.BytesIO()
    random_image(64, 64, seed=1).save(buf, format="JPEG")
    data = buf.getvalue()
    with pytest.raises(pp.ImageError) as info:
        pp.load_image(data[: len(data) // 2])
    assert info.value.kind == "truncated_image"
    with pytest.raises(pp.ImageError) as info:
        pp.load_image(b"this is not an image")
    assert info.value.kind == "not_an_image"
    with pytest.raises(pp.ImageError) as info:
        pp.load_image(b"")
    assert info.value.kind == "not_an_image"


def test_bad_file_error_names_the_path(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"garbage")
    with pytest.raises(pp.ImageError, match="broken.jpg"):
        pp.load_image(path)


def test_normalize_numpy_and_jit_agree_with_formula():
    x = np.arange(256 * 3, dtype=np.int64).reshape(1, 256, 3) % 256
    x = x.astype(np.uint8)
    expected = (x.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    out_np = pp.normalize(x)
    assert out_np.dtype == np.float32
    np.testing.assert_allclose(out_np, expected, atol=1e-6, rtol=0)
    out_jit = jax.jit(pp.normalize)(jnp.asarray(x))
    assert out_jit.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_jit), out_np, atol=1e-6, rtol=0)


def test_normalize_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        pp.normalize(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[..., 3\]"):
        pp.normalize(np.zeros((2, 2, 4), np.uint8))


# -- hostile and unusual images (docs/data.md, "Images") --


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("w,h,size", [(3, 2000, 16), (2000, 3, 16), (1, 5000, 24), (7, 3001, 31), (20, 33, 49), (1, 1, 5)])
def test_extreme_aspect_ratios_resize_only_the_crop_with_the_exact_pixels(w, h, size):
    # max_pixels=1 forces the crop-window path; the reference resizes the whole image.
    img = random_image(w, h, seed=w * 7 + h)
    ref = torchvision_restatement(img, size)
    for max_pixels in (pp.MAX_IMAGE_PIXELS, 1):
        np.testing.assert_allclose(pp.normalize(pp.resize_center_crop(img, size, max_pixels)), ref, atol=1e-6, rtol=0)


def test_crop_window_equals_pils_full_resize_on_random_extreme_images():
    rng = np.random.default_rng(0)
    for _ in range(60):
        size = int(rng.integers(2, 64))
        short, long = int(rng.integers(1, size)), int(rng.integers(size, 3000))
        w, h = (short, long) if rng.random() < 0.5 else (long, short)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        full = np.asarray(img.resize((new_w, new_h), Image.BICUBIC))
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        np.testing.assert_array_equal(pp.resize_center_crop(img, size, max_pixels=1), full[top : top + size, left : left + size])


def _peak_rss_growth_mb(code: str) -> float:
    """Runs `code` (which sets `before` to ru_maxrss) in a fresh interpreter; returns the peak RSS growth since."""
    script = (
        "import io, resource, numpy as np\n"
        "from PIL import Image\n"
        "from nxtp_jax.data import preprocess as pp\n"
        f"{code}\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


@pytest.mark.parametrize("length", [300_000, 20_000])
def test_a_one_pixel_wide_png_is_tagged_in_bounded_memory(length):
    # The cases: 1 x 300,000 took 3.4 GB (224 x 67 million pixels after the resize).
    code = (
        f"arr = (np.arange({length}) % 251).astype(np.uint8)[:, None]\n"
        "buf = io.BytesIO(); Image.fromarray(arr).save(buf, 'PNG'); data = buf.getvalue()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "x = pp.preprocess(data, 224)\n"
        "assert x.shape == (224, 224, 3) and x.dtype == np.float32\n"
    )
    assert _peak_rss_growth_mb(code) < 100


def test_16_bit_grey_png_keeps_its_grey_levels():
    # convert("RGB") clips 16-bit values to 255: everything came out white.
    levels = np.array([[0, 255, 256, 0x1234, 0x8080, 0xFFFF]], np.uint16)
    data = encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = np.asarray(pp.load_image(data))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 0, 1, 0x12, 0x80, 0xFF])
    assert (rgb == rgb[..., :1]).all()
    as_int = Image.fromarray(levels.astype(np.int32))  # how Pillow < 10.? opened 16-bit PNG
    as_int.format = "PNG"
    np.testing.assert_array_equal(np.asarray(pp.load_image(as_int))[0, :, 0], [0, 0, 1, 0x12, 0x80, 0xFF])


def test_palette_with_transparency_cmyk_la_and_rgba_convert_as_the_original():
    # The original: PIL convert("RGB"), alpha and transparency dropped, not composited.
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    assert np.asarray(pp.load_image(encode(palette, "PNG", transparency=0)))[0, 0].tolist() == [255, 0, 0]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.asarray(pp.load_image(encode(cmyk, "TIFF")))[0, 0].tolist() == [255, 0, 0]
    jpeg = np.asarray(pp.load_image(encode(cmyk, "JPEG", quality=100))).astype(int)
    assert np.abs(jpeg - [255, 0, 0]).max() <= 3
    la = Image.new("LA", (4, 4), (100, 0))
    assert np.asarray(pp.load_image(encode(la, "PNG")))[0, 0].tolist() == [100, 100, 100]
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(pp.load_image(encode(rgba, "PNG")))[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_not_applied_as_in_the_original():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue, as stored
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = pp.load_image(encode(Image.fromarray(arr), "PNG", exif=exif.tobytes()))
    assert img.size == (40, 20)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_large_jpeg_decodes_through_draft_mode_only_above_the_budget():
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), "JPEG")
    exact = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(pp.load_image(data, max_pixels=64 * 48)), exact)  # within: no draft
    assert pp.load_image(data, max_pixels=64 * 48 - 1).size == (32, 24)  # 1/2 scale
    assert pp.load_image(data, max_pixels=100).size == (8, 6)  # 1/8 scale
    with pytest.raises(pp.ImageError, match="above the budget of 10 pixels") as info:
        pp.load_image(data, max_pixels=10)
    assert info.value.kind == "too_large"
    png = encode(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(pp.ImageError) as info:  # no draft mode for PNG
        pp.load_image(png, max_pixels=64 * 48 - 1)
    assert info.value.kind == "too_large"


def test_image_errors_are_value_errors_with_a_documented_kind(tmp_path):
    ppm = encode(Image.new("RGB", (4, 4)), "PPM")  # PIL reads it; not an accepted format
    cases = [(ppm, "not_an_image"), (b"\x89PNG\r\n\x1a\n", "not_an_image"), (_png_header_only(3, 3), "truncated_image")]
    for data, kind in cases:
        with pytest.raises(ValueError) as info:
            pp.load_image(data)
        assert isinstance(info.value, pp.ImageError) and info.value.kind == kind, (data[:10], info.value)
        assert info.value.kind in pp.ERROR_KINDS
    with pytest.raises(pp.ImageError, match="above MAX_IMAGE_BYTES") as info:
        pp.load_image(bytes(pp.MAX_IMAGE_BYTES + 1))
    assert info.value.kind == "too_large"
    with pytest.raises(pp.ImageError, match="pixels") as info:
        pp.load_image(np.zeros((5, 5), np.uint8), max_pixels=24)
    assert info.value.kind == "too_large"
