"""Tag images from the command line.

    python -m nxtp_jax.infer --ckpt=DIR --num_labels=20 [--json] IMAGE [IMAGE ...]

Every readable image is tagged; each one that is not gets an `error: ...` line on stderr
(with --json, an entry {"image": path, "error": "..."}), and the exit status is then 1.
Other errors (a bad checkpoint, bad flags) print one `error: ...` line; --verbose adds tracebacks.
"""

from __future__ import annotations

import pathlib
import sys
import time
import traceback
from typing import Sequence

import numpy as np
from absl import app, flags, logging

from nxtp_jax import errors
from nxtp_jax.inference import ranking
from nxtp_jax.inference.formatting import format_json, format_text, image_error

CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory (from convert/from_torch.py or training).", required=True)
NUM_LABELS = flags.DEFINE_integer("num_labels", 10, "k of the one-shot sampling: labels per image.", lower_bound=1)
JSON = flags.DEFINE_bool("json", False, "Print JSON instead of the original's text lines.")
RANKING = flags.DEFINE_enum("ranking", "prob", ["prob", "ppl", "sim", "none"], "How labels are ranked.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1)
MIN_PROB = flags.DEFINE_float("min_prob", 0.0, "Drop labels scored below this probability (ranking 'prob').")
VOCAB = flags.DEFINE_string(
    "vocab", None, "A closed vocabulary, one label per line: decoding is constrained to its labels (docs/tagging.md)."
)
VERBOSE = errors.verbose_flag()
ATTENTION_DIR = flags.DEFINE_string(
    "save_attention_maps", None, "Directory for per-layer/per-head image-token attention grids (PNG)."
)


def attention_grid(maps: np.ndarray) -> np.ndarray:
    """[N, N] attention (row = query) -> a uint8 RGB mosaic: one g x g tile per query token, g = sqrt(N).

    Each tile is min-max normalised on its own and drawn white-to-blue, like the original's plots.
    """
    n = maps.shape[0]
    g = int(round(np.sqrt(n)))
    tiles = maps.reshape(n, g, g)
    lo, hi = tiles.min(axis=(1, 2), keepdims=True), tiles.max(axis=(1, 2), keepdims=True)
    tiles = (tiles - lo) / (hi - lo + 1e-6)
    tiles = np.pad(tiles, ((0, 0), (0, 1), (0, 1)), constant_values=0.0)  # a 1-pixel gutter
    mosaic = tiles.reshape(g, g, g + 1, g + 1).transpose(0, 2, 1, 3).reshape(g * (g + 1), g * (g + 1))
    white, blue = np.array([247, 251, 255], np.float32), np.array([8, 48, 107], np.float32)
    return (white + mosaic[..., None] * (blue - white)).astype(np.uint8)


def save_attention_maps(tagger, image, out_dir: pathlib.Path) -> int:
    from PIL import Image

    maps = tagger.attention_maps(image)  # [layers, heads, N, N]
    out_dir.mkdir(parents=True, exist_ok=True)
    for layer in range(maps.shape[0]):
        for head in range(maps.shape[1]):
            grid = attention_grid(maps[layer, head])
            Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
                out_dir / f"layer_{layer}_head_{head}.png"
            )
    return maps.shape[0] * maps.shape[1]


def main(argv: Sequence[str]) -> None:
    try:
        failed = tag(list(argv[1:]))
    except errors.USER_ERRORS as e:
        sys.exit(errors.report(e, VERBOSE.value))
    if failed:
        sys.exit(1)


def load_vocabulary(tagger):
    """--vocab as a checked `Vocabulary` built once (None without it); --min_prob checked before any image is read."""
    ranking.check_threshold(MIN_PROB.value, RANKING.value)
    return tagger.vocabulary(VOCAB.value)


def tag(paths: list[str]) -> int:
    """Tags every readable image; prints one error line (or JSON entry) per other one; returns how many failed."""
    from nxtp_jax.inference.tagger import Tagger

    if not paths:
        raise app.UsageError("give at least one image path")
    tagger = Tagger.load(CKPT.value, batch_size=BATCH_SIZE.value)
    vocab = load_vocabulary(tagger)
    start = time.perf_counter()
    exists = [pathlib.Path(p).is_file() for p in paths]
    found = [p for p, e in zip(paths, exists) if e]
    tagged = iter(
        tagger.predict(
            found, num_labels=NUM_LABELS.value, min_prob=MIN_PROB.value, vocab=vocab, ranking_method=RANKING.value, errors="return"
        )
    )
    results = [next(tagged) if e else FileNotFoundError(f"{p}: image file not found") for p, e in zip(paths, exists)]
    logging.info("inference time: %.3fs for %d image(s)", time.perf_counter() - start, len(paths))
    failed = [(p, r) for p, r in zip(paths, results) if isinstance(r, Exception)]
    for path, error in failed:
        if VERBOSE.value:
            traceback.print_exception(error, file=sys.stderr)
        print(f"error: {image_error(path, error)}", file=sys.stderr, flush=True)

    if JSON.value:
        print(format_json(paths, results))
    else:
        print("\n\n".join(format_text(p, r, NUM_LABELS.value) for p, r in zip(paths, results) if not isinstance(r, Exception)))

    if ATTENTION_DIR.value:
        for path, result in zip(paths, results):
            if isinstance(result, Exception):
                continue
            out = pathlib.Path(ATTENTION_DIR.value) / pathlib.Path(path).stem
            count = save_attention_maps(tagger, path, out)
            logging.info("wrote %d attention maps to %s", count, out)
    return len(failed)


if __name__ == "__main__":
    app.run(main)
