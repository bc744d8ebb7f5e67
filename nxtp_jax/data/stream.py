"""An endless, shuffled, resumable stream of raw samples from tar shards, as a grain IterDataset.

Work is split in *units*: a shard, or one of `parts` interleaved slices of a shard when
there are fewer shards than readers. Each epoch permutes the units with the seed, gives
every `process_count`-th unit to this process and, in grain worker processes, every
`worker_count`-th of those to this worker: every sample is read exactly once per epoch
across all processes and workers. A reader keeps `cycle_length` units open and takes one
sample from each in turn; `window_size` consecutive samples are then permuted with the
seed (grain's "hierarchical shuffle"). Nothing is indexed up front: a unit's header chain
is walked only when the unit is opened.

The state is the reader position at the start of the current window (epoch, next unit,
byte offset and sample counter of each open unit) plus the position inside the window;
restoring re-reads that one window and continues with exactly the same samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from nxtp_jax.data.samples import RawSample, broken_sample, read_sample
from nxtp_jax.data.tar import TarFormatError, open_shard, read_group

_EPOCH_END = object()


@dataclasses.dataclass(eq=False)
class _OpenUnit:
    """One unit being read: a shard descriptor, a byte offset and a sample counter."""

    position: int
    shard: str
    part: int
    parts: int
    offset: int
    index: int

    def __post_init__(self) -> None:
        self.fd, self.size = open_shard(self.shard)
        self.done = False

    def close(self) -> None:
        if self.fd is not None:
            self.fd.close()
            self.fd = None

    def state(self) -> list[int]:
        return [self.position, self.offset, self.index]

    def next_sample(self, epoch: int) -> RawSample | None:
        """The next sample of this unit's part, with member bytes read; None when done."""
        while not self.done:
            index = self.index
            try:
                group = read_group(self.fd, self.offset, self.size, index)
            except TarFormatError as e:
                # Nothing after a broken header can be located: report it once, in the
                # part that owns the sample it broke, and end the unit.
                self.done = True
                if index % self.parts != self.part:
                    return None
                return broken_sample(e, epoch)
            if group is None:
                self.done = True
                return None
            self.offset = group.next_offset
            self.index = index + 1
            if index % self.parts == self.part:
                return read_sample(self.fd, group.key, group.members, epoch)
        return None


class TarStreamIterDataset(grain.IterDataset):
    """Raw samples (`samples.RawSample`) from tar shards; see the module docstring."""

    def __init__(
        self,
        shards: Sequence[str],
        *,
        seed: int,
        shuffle: bool = True,
        repeat: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        readers_per_process: int = 1,
        cycle_length: int = 4,
        window_size: int = 1024,
    ):
        super().__init__()
        if not shards:
            raise ValueError("expected at least one shard, found none")
        if not 0 <= process_index < process_count:
            raise ValueError(f"expected 0 <= process_index < process_count, found {process_index}, {process_count}")
        if cycle_length < 1 or window_size < 1:
            raise ValueError(f"expected cycle_length, window_size >= 1, found {cycle_length}, {window_size}")
        self.shards = tuple(str(s) for s in shards)
        # Split shards into interleaved parts so that every reader (process x worker) gets
        # at least one unit per epoch even when there are fewer shards than readers.
        readers = process_count * readers_per_process
        self.parts = -(-readers // len(self.shards))
        self.seed = seed
        self.shuffle = shuffle
        self.repeat = repeat
        self.process_index = process_index
        self.process_count = process_count
        self.cycle_length = cycle_length
        self.window_size = window_size
        self.worker_slice = slice(None)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Called by grain's mp_prefetch in each worker: read that slice of this process's units."""
        del sequential_slice  # units are already interleaved across readers
        self.worker_slice = sl

    def units(self, epoch: int) -> list[tuple[str, int]]:
        """This reader's (shard, part) units for `epoch`, in reading order."""
        units = [(shard, part) for shard in self.shards for part in range(self.parts)]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return units[self.process_index :: self.process_count][self.worker_slice]

    def __iter__(self) -> "TarStreamIterator":
        return TarStreamIterator(self)

    def __str__(self) -> str:
        return (
            f"TarStreamIterDataset({len(self.shards)} shards x {self.parts} parts, seed={self.seed}, "
            f"process {self.process_index}/{self.process_count}, slice={self.worker_slice})"
        )


class TarStreamIterator(grain.DatasetIterator):
    """Iterator of TarStreamIterDataset; its state is small and JSON-serialisable."""

    def __init__(self, ds: TarStreamIterDataset):
        super().__init__()
        self._ds = ds
        self._units_epoch = -1
        self._units: list[tuple[str, int]] = []
        self._open: list[_OpenUnit] = []
        self._restore({"epoch": 0, "next_unit": 0, "open": [], "turn": 0, "window": 0, "pos": 0})

    # -- reader: interleave the open units of the current epoch --

    def _epoch_units(self) -> list[tuple[str, int]]:
        if self._units_epoch != self._epoch:
            self._units = self._ds.units(self._epoch)
            self._units_epoch = self._epoch
            if not self._units:
                raise ValueError(
                    f"{self._ds}: this reader got no shards in epoch {self._epoch}; this is a bug "
                    "in the unit split (it sizes parts for the readers it was told about)"
                )
        return self._units

    def _open_unit(self, position: int, offset: int, index: int) -> _OpenUnit:
        shard, part = self._epoch_units()[position]
        return _OpenUnit(position, shard, part, self._ds.parts, offset, index)

    def _reader_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "next_unit": self._next_unit,
            "open": [u.state() for u in self._open],
            "turn": self._turn,
        }

    def _next_raw(self) -> Any:
        units = self._epoch_units()
        while True:
            while len(self._open) < self._ds.cycle_length and self._next_unit < len(units):
                self._open.append(self._open_unit(self._next_unit, 0, 0))
                self._next_unit += 1
            if not self._open:
                return _EPOCH_END
            self._turn %= len(self._open)
            unit = self._open[self._turn]
            sample = unit.next_sample(self._epoch)
            if sample is None:
                unit.close()
                del self._open[self._turn]
                continue
            self._turn += 1
            return sample

    # -- window shuffle on top of the reader --

    def _fill_window(self) -> None:
        self._window_start = self._reader_state()
        samples: list[RawSample] = []
        while len(samples) < self._ds.window_size:
            sample = self._next_raw()
            if sample is not _EPOCH_END:
                samples.append(sample)
                continue
            if samples:
                break  # windows never straddle epochs
            if not self._ds.repeat:
                raise StopIteration
            if self._epoch_had_samples is False:
                raise ValueError(
                    f"{self._ds}: epoch {self._epoch} found no samples at all in "
                    f"{len(self._epoch_units())} unit(s); the shards are empty or unreadable"
                )
            self._epoch += 1
            self._next_unit = 0
            self._turn = 0
            self._epoch_had_samples = False
            self._window_start = self._reader_state()
        self._epoch_had_samples = True
        if self._ds.shuffle:
            order = np.random.default_rng([self._ds.seed, 1 << 20, self._window]).permutation(len(samples))
            samples = [samples[i] for i in order]
        self._samples = samples

    def __next__(self) -> RawSample:
        if self._samples is None:
            self._fill_window()
        while self._pos >= len(self._samples):
            self._window += 1
            self._pos = 0
            self._fill_window()
        sample = self._samples[self._pos]
        self._pos += 1
        return sample

    def get_state(self) -> dict[str, Any]:
        if self._samples is None:
            return {**self._reader_state(), "window": self._window, "pos": self._pos}
        return {**self._window_start, "window": self._window, "pos": self._pos}

    def _restore(self, state: dict[str, Any]) -> None:
        self._close_units()
        self._epoch = int(state["epoch"])
        self._next_unit = int(state["next_unit"])
        self._turn = int(state["turn"])
        self._open = [self._open_unit(int(p), int(o), int(i)) for p, o, i in state["open"]]
        self._window = int(state["window"])
        self._pos = int(state["pos"])
        self._samples: list[RawSample] | None = None
        # Unknown after a restore; only used to stop an endless loop over empty shards.
        self._epoch_had_samples: bool | None = None

    def set_state(self, state: dict[str, Any]) -> None:
        self._restore(state)
        if self._pos:
            self._fill_window()

    def _close_units(self) -> None:
        for unit in getattr(self, "_open", []):
            unit.close()
        self._open = []

    def close(self) -> None:
        self._close_units()
        super().close()

    def __del__(self) -> None:
        self._close_units()
