"""Bulk tagging into a JSON-lines file that resumes.

INPUTs are image files, directories (searched recursively) or WebDataset `.tar` shards.
Each image gets one JSON line in OUT, `{"image": ..., "labels": [...]}` or
`{"image": ..., "error": "..."}`, written and fsynced batch by batch; a rerun skips the
images already there, so a killed run resumes. Bad images are recorded and counted. With N
processes each tags the images whose index is its process index modulo N, into
`output_path(OUT, index, N)` (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import functools
import itertools
import json
import os
import pathlib
import socket
import stat
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
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
            for f in files:
                if wanted(index, str(f)):
                    yield str(f), _not_a_file(f) or str(f)
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


def _not_a_file(path: pathlib.Path) -> OSError | None:
    """Why a directory entry named like an image is no image file (a FIFO would block the run), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:  # a symlink loop, a dangling symlink
        return OSError(f"{path}: cannot be read ({e.strerror or e})")
    if not stat.S_ISREG(mode):
        return OSError(f"{path}: not a regular file (a FIFO, socket or device); skipped")
    return None


def _call(read) -> Any:
    try:
        return read()
    except (ValueError, OSError, tar.TarFormatError) as e:
        return e


def _shard_images(shard: str) -> Iterator[tuple[str, Any]]:
    """(key SHARD/KEY.EXT, a function returning the image bytes or raising) per sample of a shard."""
    samples = 0
    try:
        with tar.walk(shard) as (fd, groups):
            for samples, group in enumerate(groups, 1):
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
        return
    if not samples:
        size = os.path.getsize(shard)
        yield shard, functools.partial(_raise, ValueError(f"{shard}: no sample in this shard ({size} bytes)"))


def _raise(error: BaseException):
    raise error


RECORD_START = b'{"image": '  # how every line of ours begins (json.dumps keeps the key order)


def read_done(path: pathlib.Path) -> tuple[set[str], int]:
    """(the images already in OUT, the length of its valid part), reading OUT without changing it.

    Raises ValueError, naming the line, for a file that is not this tool's JSON lines. A last
    line without its newline is kept if it is a whole record; if not, and it begins as ours
    do, it is a line torn by a killed run and lies beyond the valid part.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    done, valid = set(), len(data) - len(torn)
    for number, line in enumerate(lines, 1):
        done.add(_record_image(path, number, line))
    if torn:
        try:
            done.add(_record_image(path, len(lines) + 1, torn))
            valid = len(data)
        except ValueError:
            if not torn.startswith(RECORD_START):
                raise
    return done, valid


def _record_image(path: pathlib.Path, number: int, line: bytes) -> str:
    try:
        record = json.loads(line)
        if isinstance(record["image"], str) and ("labels" in record or "error" in record):
            return record["image"]
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(f"{path} is not an output of nxtp-tag (line {number}: expected a JSON object with 'image' and "
                     f"'labels' or 'error', found {line[:60]!r}); it was left untouched; pass another --output")


class OutputLock:
    """OUT.lock, held with flock for the run: a second run on OUT stops, naming the first.

    The kernel drops the flock when its process dies, so a killed run leaves no stale lock.
    """

    def __init__(self, out: pathlib.Path):
        self.path = out.with_name(out.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a run starting now"
                os.close(fd)
                raise OSError(f"{self.path.with_suffix('')} is in use by another run ({owner}); wait for it to end")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the holder before us removed it after we opened it
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


@dataclasses.dataclass
class Output:
    """OUT opened for appending, with what it already holds. A pipe or device (/dev/stdout) is
    written straight through: never read, no resume, no lock."""

    path: pathlib.Path
    file: Any
    done: set[str]
    regular: bool
    lock: OutputLock | None

    def close(self) -> None:
        self.file.close()
        if self.lock is not None:
            self.lock.release()


def prepare_output(output: str, process_index: int, process_count: int) -> Output:
    """Checks and opens this process's OUT before any model loads: raises OSError if it cannot be
    written or another run holds it, ValueError if it is not this tool's output (left untouched).
    Only then is a torn last line dropped."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"expected 0 <= process index < process count, found {process_index} and {process_count}")
    out = output_path(output, process_index, process_count)
    if out.exists() and not out.is_file():
        if out.is_dir():
            raise IsADirectoryError(f"--output {out} is a directory; pass a file name")
        logging.warning("%s is not a regular file: writing straight through, without resume", out)
        return Output(out, open(out, "a", encoding="utf-8"), set(), False, None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out.resolve()).acquire()  # beside the real file: /dev/stdout > tags.jsonl locks tags.jsonl
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise OSError(f"--output {out} cannot be written ({e.strerror or e}); pass another --output") from e
    try:
        done, valid = read_done(out) if out.exists() else (set(), 0)
        f = open(out, "a", encoding="utf-8")
    except PermissionError as e:
        lock.release()
        raise OSError(f"--output {out} cannot be written ({e.strerror}); pass another --output") from e
    except BaseException:
        lock.release()
        raise
    size = out.stat().st_size
    if valid < size:
        logging.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", out, size - valid)
        f.truncate(valid)
    elif size:
        with open(out, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                f.write("\n")  # a whole last record without its newline
    return Output(out, f, done, True, lock)


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
    before the model loads; `vocab` (a file or a list of labels, or None) is built once, after the load.
    """
    from tqdm import tqdm

    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)}")
    out = prepare_output(output, process_index, process_count)
    try:
        tagger = load_tagger()
        vocab = tagger.vocabulary(vocab)
        images = iter_images(inputs, lambda i, key: i % process_count == process_index and key not in out.done)
        tagged = failed = 0
        with tqdm(desc=f"tagging into {out.path}", unit="img") as bar:
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
                out.file.write("".join(json.dumps(line) + "\n" for line in lines))
                out.file.flush()
                if out.regular:  # a pipe cannot be fsynced
                    os.fsync(out.file.fileno())
                bar.update(len(batch))
                bar.set_postfix(errors=failed)
    finally:
        out.close()
    print(f"{out.path}: tagged {tagged} image(s), {failed} could not be read; {len(out.done)} were already there",
          file=sys.stderr, flush=True)
