"""Entry points: training and evaluation batches from tar shards (or any random-access source).

Elements are dicts:
- "image": uint8 [S, S, 3], resized and center-cropped; normalise on device with
  `preprocess.normalize`;
- "key", "caption": str; "labels": str, labels joined by "," (json "labels" if present,
  else the nouns of the caption);
- "valid": bool (False only for eval padding and eval samples that could not be read);
- "epoch": int32;
- "skipped": int32 and "skipped_by_kind": {kind: int32}, bad samples dropped (training) or
  stood in for (eval) by this element; sum them over batches (`skips.skip_summary`).
Batching stacks them ([B, ...]; strings become numpy str arrays).
"""

from __future__ import annotations

import functools
import threading
import zlib
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from nxtp_jax.choices import LABEL_SOURCES
from nxtp_jax.data.samples import RawSample, Skip, broken_sample, decode_sample, read_sample
from nxtp_jax.data.skips import SkipCountingIterDataset, skip_fields
from nxtp_jax.data.stream import TarStreamIterDataset
from nxtp_jax.data.tar import TarFormatError, open_shard, walk

SampleTransform = Callable[[dict[str, Any]], dict[str, Any]]


def sample_rng(element: dict[str, Any], seed: int) -> np.random.Generator:
    """A generator for per-sample randomness in a sample_transform (e.g. label shuffling).

    Seeded by (seed, key, epoch), so it is the same after a resume and in any worker, and
    differs between epochs. Python's hash() is salted per process and would not be.
    """
    return np.random.default_rng([seed, zlib.crc32(str(element["key"]).encode()), int(element["epoch"])])


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # lazy: only the main process needs it, and only here

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"expected 0 <= process_index < process_count, found {process_index}, {process_count}")
    return process_index, process_count


def _allow_grain_workers() -> None:
    """grain reads absl flags in its workers; mark them parsed when no absl.app.run did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_common(image_size: int, batch_size: int, worker_count: int, label_source: str) -> None:
    if image_size <= 0 or batch_size <= 0 or worker_count < 0:
        raise ValueError(
            f"expected image_size > 0, batch_size > 0, worker_count >= 0, found {image_size}, "
            f"{batch_size}, {worker_count}"
        )
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"expected label_source in {LABEL_SOURCES}, found {label_source!r}")


def _decode_train(raw: RawSample, image_size: int, label_source: str) -> dict[str, Any] | Skip:
    element = decode_sample(raw, image_size, label_source)
    if isinstance(element, dict):
        element["valid"] = np.bool_(True)
        element["epoch"] = np.int32(raw.epoch)
    return element


def _transform_unless_skip(transform: SampleTransform, item: dict[str, Any] | Skip) -> dict[str, Any] | Skip:
    return item if isinstance(item, Skip) else transform(item)


def _finish_train(
    ds: grain.IterDataset,
    *,
    batch_size: int,
    drop_remainder: bool,
    worker_count: int,
    worker_buffer_size: int,
    sample_transform: SampleTransform | None,
    max_consecutive_skips: int,
) -> grain.DatasetIterator:
    if sample_transform is not None:
        ds = ds.map(functools.partial(_transform_unless_skip, sample_transform))
    ds = SkipCountingIterDataset(ds, max_consecutive_skips)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        _allow_grain_workers()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return iter(ds)


def build_train_iterator(
    shards: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    sample_transform: SampleTransform | None = None,
    label_source: str = "auto",
    drop_remainder: bool = True,
    cycle_length: int = 4,
    window_size: int = 1024,
    max_consecutive_skips: int = 10_000,
) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's share of `shards` (see stream.py).

    `batch_size` is per process. The order is fixed by (shards, seed, process_count,
    worker_count); resume with `get_state`/`set_state` or orbax
    (`grain.checkpoint.CheckpointSave/Restore`) using the same arguments. With
    `worker_count > 0`, `sample_transform` must be picklable (a module-level function or a
    functools.partial of one), because grain's workers are spawned processes.
    """
    _check_common(image_size, batch_size, worker_count, label_source)
    process_index, process_count = _process(process_index, process_count)
    stream = TarStreamIterDataset(
        shards,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        readers_per_process=max(1, worker_count),
        cycle_length=cycle_length,
        window_size=window_size,
    )
    ds = stream.map(functools.partial(_decode_train, image_size=image_size, label_source=label_source))
    return _finish_train(
        ds,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        sample_transform=sample_transform,
        max_consecutive_skips=max_consecutive_skips,
    )


# -- evaluation --

PADDING = "padding"


class _EvalSource:
    """Random access to this process's eval samples, padded to a whole number of batches.

    `entries[i]` is an index into `samples`, or -1 for padding (read as `PADDING`, since
    grain takes a None element for a filtered one). grain reads with several threads, so
    each thread opens the shards it reads, lazily; nothing is pickled open.
    """

    def __init__(self, shards: list[str], samples: list[tuple[int, str, Any]], entries: list[int]):
        self.shards = shards
        self.samples = samples
        self.entries = entries
        self._local = threading.local()  # .files: {shard index: ShardFile} of this thread

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> RawSample | str:
        j = self.entries[i]
        if j < 0:
            return PADDING
        shard_index, key, members = self.samples[j]
        shard = self.shards[shard_index]
        if isinstance(members, TarFormatError):
            return broken_sample(members)
        files = self._local.__dict__.setdefault("files", {})
        fd = files.get(shard_index)
        if fd is None:
            fd = files[shard_index] = open_shard(shard)[0]
        return read_sample(fd, key, members)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __repr__(self) -> str:
        return f"_EvalSource({len(self.shards)} shards, {len(self.samples)} samples, {len(self.entries)} slots)"


def eval_element(element: dict[str, Any] | Skip | None, image_size: int, key: str = "") -> dict[str, Any]:
    """A decoded eval sample as a `valid` element; padding (None) or an unreadable sample (a Skip,
    counted) as the `valid=False` stand-in of the same structure."""
    if isinstance(element, dict):
        return {**element, "valid": np.bool_(True), "epoch": np.int32(0), **skip_fields({})}
    return {
        "image": np.zeros((image_size, image_size, 3), np.uint8),
        "key": key,
        "caption": "",
        "labels": "",
        "valid": np.bool_(False),
        "epoch": np.int32(0),
        **skip_fields({} if element is None else {element.kind: 1}),
    }


def batches_per_process(num_samples: int, process_count: int, batch_size: int) -> int:
    """Eval batches every process runs: its round-robin share of the samples, rounded up to whole batches."""
    return -(-(-(-num_samples // process_count)) // batch_size)


def process_slots(num_samples: int, process_index: int, process_count: int, batch_size: int) -> list[int]:
    """This process's sample indices (i % process_count == process_index), then -1 padding up to
    `batches_per_process` whole batches, so every process runs the same number of steps."""
    mine = list(range(process_index, num_samples, process_count))
    return mine + [-1] * (batches_per_process(num_samples, process_count, batch_size) * batch_size - len(mine))


def _decode_eval(raw: RawSample | str, image_size: int, label_source: str) -> dict[str, Any]:
    if isinstance(raw, str):
        return eval_element(None, image_size)
    return eval_element(decode_sample(raw, image_size, label_source), image_size, raw.key)


def _index_shards(shards: Sequence[str]) -> list[tuple[int, str, Any]]:
    samples: list[tuple[int, str, Any]] = []
    for shard_index, shard in enumerate(shards):
        with walk(shard) as (_, groups):
            for group in groups:
                if isinstance(group, TarFormatError):
                    samples.append((shard_index, f"@{group.offset}", group))
                else:
                    samples.append((shard_index, group.key, group.members))
    return samples


class EvalLoader:
    """One deterministic pass over eval shards; every process yields `num_batches` batches.

    Samples are dealt round-robin to processes (sample i to process i % process_count), so
    each is seen exactly once. The last batches are padded with `valid=False` elements, and
    a sample that cannot be read is also a `valid=False` element (counted in `skipped`),
    so every process runs the same number of steps.
    """

    def __init__(self, dataset: grain.MapDataset, num_samples: int, worker_count: int):
        self._dataset = dataset
        self.num_batches = len(dataset)
        self.num_samples = num_samples
        self._worker_count = worker_count

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self._dataset.to_iter_dataset()
        if self._worker_count > 0:
            _allow_grain_workers()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(ds)


def build_eval_loader(
    shards: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    sample_transform: SampleTransform | None = None,
    label_source: str = "auto",
) -> EvalLoader:
    """Eval batches of `shards` in file order (see EvalLoader); indexes the shards' headers first.

    `sample_transform` also sees the `valid=False` stand-ins, so that every element of a
    batch has the same structure.
    """
    _check_common(image_size, batch_size, worker_count, label_source)
    process_index, process_count = _process(process_index, process_count)
    shards = [str(s) for s in shards]
    if not shards:
        raise ValueError("expected at least one eval shard, found none")
    samples = _index_shards(shards)
    entries = process_slots(len(samples), process_index, process_count, batch_size)
    ds = grain.MapDataset.source(_EvalSource(shards, samples, entries))
    ds = ds.map(functools.partial(_decode_eval, image_size=image_size, label_source=label_source))
    if sample_transform is not None:
        ds = ds.map(sample_transform)
    return EvalLoader(ds.batch(batch_size), len(samples), worker_count)
