"""Bulk tagging into a JSON-lines file that resumes.

INPUTs are image files, directories (searched recursively) or WebDataset `.tar` shards.
Each image gets one JSON line in OUT, `{"image": ..., "labels": [...]}` or
`{"image": ..., "error": "..."}`, written and fsynced batch by batch; a rerun skips the
images already there, so a killed run resumes. Bad images are recorded and counted. With N
processes each tags the images whose index is its process index modulo N, into
`output_path(OUT, index, N)` (docs/serving.md).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import pathlib
import sys
from typing import Any, Callable, Iterator, Sequence

from absl import logging

from nxtp_jax.data import tar
from nxtp_jax.inference.formatting import image_error

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
                             "is this a --output file of nxtp-tag?")
    return done


def tag_to_file(
    inputs: Sequence[str],
    output: str,
    load_tagger: Callable[[], Any],
    *,
    num_labels: int,
    min_prob: float,
    vocab,
    ranking: str,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> None:
    """Tags every image of `inputs` into OUT (see the module docstring).

    `load_tagger()` is called once the inputs and the output are checked, so a bad path fails
    before the model loads; `vocab` is a file, a list or a function of the tagger giving a Vocabulary.
    """
    from tqdm import tqdm

    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"expected 0 <= process index < process count, found {process_index} and {process_count}")
    out = output_path(output, process_index, process_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    tagger = load_tagger()
    vocab = vocab(tagger) if callable(vocab) else vocab
    images = iter_images(inputs, lambda i, key: i % process_count == process_index and key not in done)
    tagged = failed = 0
    with open(out, "a", encoding="utf-8") as f, tqdm(desc=f"tagging into {out}", unit="img") as bar:
        while batch := list(itertools.islice(images, batch_size)):
            keys = [key for key, _ in batch]
            readable = [(i, src) for i, (_, src) in enumerate(batch) if not isinstance(src, Exception)]
            results: list[Any] = [src for _, src in batch]
            predicted = tagger.predict([src for _, src in readable], num_labels=num_labels, min_prob=min_prob,
                                       vocab=vocab, ranking_method=ranking, errors="return")
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
