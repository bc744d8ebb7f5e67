"""A synthetic dataset of coloured shapes, the embedded demo's training and validation data.

Each image shows one, two or three shapes of one kind and one colour (8 kinds, 7 colours),
each with its own size, position, rotation and shade, on a noisy dark background. Its
labels are always three: the colour, the shape and the count ("red", "star", "two"), from
18 words in all. Colours are easy; shapes at small sizes and counts need real recognition.
A fixed number of labels lets one-shot sampling with k = 3 score a perfect F1, so the
demo's score measures what the model learned rather than a mismatch between k and the
label count. The caption says the same in one of several sentence forms. Sample i of a
split depends only on (seed, split, i), so any shard can be regenerated alone.
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from nxtp_jax.data.writer import pack

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "moon", "arrow")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (45, 85, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 195),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
}
COUNTS = ("one", "two", "three")
_SUPERSAMPLE = 4
_SPLITS = {"train": 0, "val": 1}
_TEMPLATES = (
    "{objects}.",
    "There {be} {objects}.",
    "A picture of {objects} on a dark background.",
    "An image showing {objects}.",
    "Here we see {objects}.",
    "A dark canvas with {objects}.",
    "This drawing contains {objects}.",
    "{objects} drawn on a black background.",
)


def _polygon(points: list[tuple[float, float]], cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Unit-radius points, rotated by `angle`, scaled by r, moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _regular(n: int, phase: float) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "square":
        draw.polygon(_polygon(_regular(4, math.pi / 4), cx, cy, r, angle), fill=255)
    elif kind == "triangle":
        draw.polygon(_polygon(_regular(3, -math.pi / 2), cx, cy, r, angle), fill=255)
    elif kind == "star":
        points = [(p[0] * (1 if k % 2 == 0 else 0.42), p[1] * (1 if k % 2 == 0 else 0.42)) for k, p in enumerate(_regular(10, -math.pi / 2))]
        draw.polygon(_polygon(points, cx, cy, r, angle), fill=255)
    elif kind == "heart":
        ts = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        points = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17) for t in ts]
        draw.polygon(_polygon(points, cx, cy, r, angle), fill=255)
    elif kind == "cross":
        w = 0.33
        points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        draw.polygon(_polygon(points, cx, cy, r, angle), fill=255)
    elif kind == "moon":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
        draw.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=0)
    elif kind == "arrow":
        points = [(-1, -0.2), (0.2, -0.2), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.2), (-1, 0.2)]
        draw.polygon(_polygon(points, cx, cy, r, angle), fill=255)
    else:
        raise ValueError(f"expected a shape in {SHAPES}, found {kind!r}")
    return mask


def _rotation(kind: str, rng: np.random.Generator) -> float:
    # Squares and crosses only tilt a little, so that they do not turn into diamonds and x's.
    if kind in ("square", "cross", "heart"):
        return float(rng.uniform(-0.3, 0.3))
    return float(rng.uniform(0, 2 * math.pi))


def _plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith("s") else "s")


def _describe(colour: str, shape: str, count: int, rng: np.random.Generator) -> str:
    if count == 1:
        text = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
    else:
        text = f"{COUNTS[count - 1]} {colour} {_plural(shape, count)}"
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    sentence = template.format(objects=text, be="is" if count == 1 else "are")
    return sentence[0].upper() + sentence[1:]


def render_sample(rng: np.random.Generator, image_size: int = 64) -> tuple[np.ndarray, str, list[str], list[dict]]:
    """One random scene: (uint8 image [S, S, 3], caption, labels [colour, shape, count], objects)."""
    size = image_size * _SUPERSAMPLE
    background = rng.integers(0, 60, size=3)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    count = int(rng.integers(1, len(COUNTS) + 1))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    objects: list[dict] = []
    for _ in range(count):
        r = float(rng.uniform(0.11, 0.2)) * size
        for _attempt in range(50):  # keep shapes apart, so that they can be counted
            cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
            if all(math.hypot(cx - o["x"], cy - o["y"]) > r + o["r"] + 0.03 * size for o in objects):
                break
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3), 0, 255)
        canvas.paste(tuple(int(c) for c in rgb), (0, 0), _mask(kind, size, cx, cy, r, _rotation(kind, rng)))
        objects.append({"shape": kind, "colour": colour, "x": cx, "y": cy, "r": r})
    image = canvas.filter(ImageFilter.GaussianBlur(0.5 * _SUPERSAMPLE)).resize((image_size, image_size), Image.BOX)
    noise = rng.normal(0, 4, size=(image_size, image_size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    for o in objects:
        o.update(x=round(o["x"] / size, 4), y=round(o["y"] / size, 4), r=round(o["r"] / size, 4))
    return pixels, _describe(colour, kind, count, rng), [colour, kind, COUNTS[count - 1]], objects


def _make_sample(split: str, seed: int, image_size: int, i: int, _item: int) -> tuple[str, dict[str, bytes]]:
    rng = np.random.default_rng([seed, _SPLITS[split], i])
    pixels, caption, labels, objects = render_sample(rng, image_size)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=92)
    meta = {"labels": labels, "objects": objects}
    return f"{split}{i:08d}", {"jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def make_shapes(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 20_000,
    num_val: int = 1_000,
    image_size: int = 64,
    samples_per_shard: int = 1_000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Write `out_dir/train/shapes-train-*.tar` and `out_dir/val/shapes-val-*.tar`; returns the shards.

    Shards already in `out_dir/train` and `out_dir/val` are replaced: sample i depends only
    on (seed, split, i), so a rerun with the same settings writes the same bytes.
    """
    from functools import partial

    shards = {}
    for split, n in (("train", num_train), ("val", num_val)):
        shards[split] = pack(
            range(n),
            partial(_make_sample, split, seed, image_size),
            os.path.join(os.fspath(out_dir), split),
            prefix=f"shapes-{split}",
            samples_per_shard=samples_per_shard,
            overwrite=True,
            desc=f"shapes {split}",
            progress=progress,
        )
    return shards
