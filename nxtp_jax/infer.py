"""Tag images from the command line.

    python -m nxtp_jax.infer --ckpt=DIR --num_labels=20 [--json] IMAGE [IMAGE ...]
    python -m nxtp_jax.infer --ckpt=DIR --num_labels=K --output=OUT.jsonl INPUT [INPUT ...]

Every readable image is tagged; each one that is not gets an `error: ...` line on stderr
(with --json, an entry {"image": path, "error": "..."}), and the exit status is then 1.
Other errors (a bad checkpoint, bad flags) print one `error: ...` line; --verbose adds tracebacks.

Bulk tagging (`--output`): INPUTs are image files, directories (searched recursively) or
WebDataset `.tar` shards. Each image gets one JSON line in OUT, `{"image": ..., "labels":
[...]}` or `{"image": ..., "error": "..."}`, written and fsynced batch by batch; a rerun skips
the images already there, so a killed run resumes. Bad images are recorded and counted and
the exit status stays 0. With N processes each tags the images whose index is its
`--process_index` modulo N, into `output_path(OUT, index, N)` (docs/serving.md).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import pathlib
import sys
import time
import traceback
from typing import Any, Iterator, Sequence

import numpy as np
from absl import app, flags, logging

from nxtp_jax import errors
from nxtp_jax.data import tar
from nxtp_jax.inference import ranking
from nxtp_jax.inference.formatting import format_json, format_text, image_error

CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory (from convert/from_torch.py or training).", required=True)
NUM_LABELS = flags.DEFINE_integer("num_labels", 10, "k of the one-shot sampling: labels per image.", lower_bound=1)
JSON = flags.DEFINE_bool("json", False, "Print JSON instead of the original's text lines.")
RANKING = flags.DEFINE_enum("ranking", "prob", ["prob", "ppl", "sim", "none"], "How labels are ranked.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1)
QUANTIZE = flags.DEFINE_enum(
    "quantize", "none", ["none", "int8", "int4"], "Decoder weights in 8 bits per output channel or 4 bits in groups: less memory (docs/benchmarks.md)."
)
MIN_PROB = flags.DEFINE_float("min_prob", 0.0, "Drop labels scored below this probability (ranking 'prob').")
VOCAB = flags.DEFINE_string(
    "vocab", None, "A closed vocabulary, one label per line: decoding is constrained to its labels (docs/tagging.md)."
)
VERBOSE = errors.verbose_flag()
ATTENTION_DIR = flags.DEFINE_string(
    "save_attention_maps", None, "Directory for per-layer/per-head image-token attention grids (PNG)."
)
OUTPUT = flags.DEFINE_string(
    "output", None, "Bulk tagging: one JSON line per image into this file; a rerun skips the images already in it."
)
PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "Bulk tagging: this process's share (default: jax.process_index()).")
PROCESS_COUNT = flags.DEFINE_integer("process_count", None, "Bulk tagging: number of processes (default: jax.process_count()).")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
    if not flags.FLAGS["verbosity"].present and not VERBOSE.value:
        logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO; errors stay one line
    if OUTPUT.value:
        try:
            tag_to_file(list(argv[1:]), OUTPUT.value)
        except errors.USER_ERRORS as e:
            sys.exit(errors.report(e, VERBOSE.value))
        return
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
    tagger = Tagger.load(CKPT.value, batch_size=BATCH_SIZE.value, quantize=QUANTIZE.value)
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



def output_path(output: str, process_index: int, process_count: int) -> pathlib.Path:
    """OUT.jsonl for one process; OUT.process-00001-of-00004.jsonl for process 1 of 4."""
    out = pathlib.Path(output)
    if process_count == 1:
        return out
    return out.with_name(f"{out.stem}.process-{process_index:05d}-of-{process_count:05d}{out.suffix}")


def iter_images(inputs: Sequence[str], wanted) -> Iterator[tuple[str, Any]]:
    """(key, source) per image of the inputs, in order; `source` is a path or bytes for
    `Tagger.predict`, or the exception that stopped reading it. Only images for which
    `wanted(index, key)` is true are read (index counts every image of every input)."""
    index = 0
    for name in inputs:
        path = pathlib.Path(name)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            for f in files:
                if wanted(index, str(f)):
                    yield str(f), str(f)
                index += 1
        elif path.suffix == ".tar":
            for key, read in _shard_images(name):
                if wanted(index, key):
                    yield key, _call(read)
                index += 1
        else:
            if wanted(index, name):
                yield name, name
            index += 1


def _call(read) -> Any:
    try:
        return read()
    except (ValueError, OSError, tar.TarFormatError) as e:
        return e


def _shard_images(shard: str) -> Iterator[tuple[str, Any]]:
    """(key SHARD/KEY.EXT, a function returning the image bytes or raising) per sample of a shard."""
    try:
        with tar.walk(shard) as (fd, groups):
            for group in groups:
                if isinstance(group, tar.TarFormatError):  # nothing after it can be read
                    yield f"{shard}@{group.offset}", functools.partial(_raise, group)
                    return
                ext = next((e for e in tar.IMAGE_EXTS if e in group.members), None)
                if ext is None:
                    found = ", ".join(sorted(group.members)) or "nothing"
                    error = ValueError(
                        f"sample {group.key!r} of {shard} has no image member ({'/'.join(tar.IMAGE_EXTS)}), found {found}"
                    )
                    yield f"{shard}/{group.key}", functools.partial(_raise, error)
                    continue
                yield f"{shard}/{group.key}.{ext}", functools.partial(tar.read_bytes, fd, group.members[ext])
    except tar.ShardOpenError as e:
        yield shard, functools.partial(_raise, e)


def _raise(error: BaseException):
    raise error


def read_done(path: pathlib.Path) -> set[str]:
    """The images already in OUT. A last line cut short by a killed run is removed from the file."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logging.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
    done = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            done.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {number}: expected a JSON object with an 'image' key, found {line[:80]!r}; "
                             "is this a --output file of nxtp_jax.infer?")
    return done


def tag_to_file(inputs: list[str], output: str) -> None:
    """Bulk tagging: see the module docstring."""
    import jax
    from tqdm import tqdm

    from nxtp_jax.inference.tagger import Tagger

    if not inputs:
        raise app.UsageError("give at least one image file, directory or .tar shard")
    if ATTENTION_DIR.value:
        raise app.UsageError("--save_attention_maps works without --output only")
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)}")
    index = jax.process_index() if PROCESS_INDEX.value is None else PROCESS_INDEX.value
    count = jax.process_count() if PROCESS_COUNT.value is None else PROCESS_COUNT.value
    if not 0 <= index < count:
        raise app.UsageError(f"expected 0 <= --process_index < --process_count, found {index} and {count}")
    out = output_path(output, index, count)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    tagger = Tagger.load(CKPT.value, batch_size=BATCH_SIZE.value, quantize=QUANTIZE.value)
    vocab = load_vocabulary(tagger)
    images = iter_images(inputs, lambda i, key: i % count == index and key not in done)
    tagged = failed = 0
    with open(out, "a", encoding="utf-8") as f, tqdm(desc=f"tagging into {out}", unit="img") as bar:
        while batch := list(itertools.islice(images, BATCH_SIZE.value)):
            keys = [key for key, _ in batch]
            readable = [(i, src) for i, (_, src) in enumerate(batch) if not isinstance(src, Exception)]
            results: list[Any] = [src for _, src in batch]
            predicted = tagger.predict([src for _, src in readable], num_labels=NUM_LABELS.value, min_prob=MIN_PROB.value,
                                       vocab=vocab, ranking_method=RANKING.value, errors="return")
            for (i, _), labels in zip(readable, predicted):
                results[i] = labels
            lines = []
            for key, result in zip(keys, results):
                if isinstance(result, Exception):
                    failed += 1
                    lines.append({"image": key, "error": image_error(key, result)})
                else:
                    tagged += 1
                    lines.append({"image": key, "labels": [{"label": label, "prob": float(p)} for label, p in result]})
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            bar.set_postfix(errors=failed)
    print(f"{out}: tagged {tagged} image(s), {failed} could not be read; {len(done)} were already there",
          file=sys.stderr, flush=True)


def run() -> None:
    """The `nxtp-tag` console script."""
    app.run(main)


if __name__ == "__main__":
    run()
