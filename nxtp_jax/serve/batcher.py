"""Dynamic batching onto a few fixed, pre-compiled shapes.

`one_shot` sampling is jitted with the batch size and k (the number of branches) in its
compiled shape, so the service compiles a small grid of them at start-up and never again:

- batch sizes: powers of two up to `max_batch`, and `max_batch` itself; a batch of 3 runs
  padded to 4 (the padding repeats the batch's first image, so it ends when that image ends);
- k: `DEFAULT_NUM_LABELS` and the cap `max_num_labels`. A request for k labels runs in the
  smallest compiled k' >= k and keeps the first k branches. That is exactly the k-branch
  result: the top-k first tokens are the first k of the top-k' ones, and every branch is
  decoded on its own (docs/method.md §4), so the extra branches change nothing but the cost.
  The same holds with a closed vocabulary (the first step is a top-k over the trie's root);
- each vocabulary loaded at start-up (its trie's padded sizes are part of the shape).

Requests wait until `max_batch` of them are there or the oldest has waited `max_wait_ms`;
then they run as one device call per (compiled k, vocabulary). Attention requests wait in the
same queue and run one image per device call. At most `max_queue` images wait (queued or
being collected into a batch, not yet on the device); `submit` refuses more. Waiting images
are uint8 [R, R, 3] at model resolution (3 R² bytes each), normalised on the device thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from nxtp_jax.choices import DEFAULT_NUM_LABELS
from nxtp_jax.data import preprocess

Labels = list[tuple[str, float]]


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch, then max_batch."""
    if max_batch < 1:
        raise ValueError(f"expected --max_batch >= 1, found {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


def label_sizes(max_num_labels: int) -> tuple[int, ...]:
    """The compiled k values: the default k and the cap."""
    if max_num_labels < 1:
        raise ValueError(f"expected --max_num_labels >= 1, found {max_num_labels}")
    return tuple(sorted({min(DEFAULT_NUM_LABELS, max_num_labels), max_num_labels}))


def smallest_at_least(sizes: Sequence[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


class Runner:
    """The Tagger behind fixed shapes; every call runs on the caller's thread (the service keeps one)."""

    def __init__(self, tagger: Any, *, max_batch: int, max_num_labels: int, vocabs: dict[str, Any] | None = None):
        self.tagger = tagger
        self.vocabs = {name: tagger.vocabulary(labels) for name, labels in (vocabs or {}).items()}
        self.batch_sizes = batch_sizes(max_batch)
        self.label_sizes = label_sizes(max_num_labels)
        self.max_num_labels = max_num_labels
        size = tagger.image_size
        self._blank = np.zeros((size, size, 3), np.uint8)

    def warm_up(self) -> None:
        """Compiles every (batch size, k, vocabulary) sampler and the attention pass."""
        for vocab in [None, *self.vocabs]:
            for k in self.label_sizes:
                for b in self.batch_sizes:
                    self.tag([(self._blank, k, 0.0)] * b, vocab)
        self.attention(self._blank)

    def tag(self, queries: Sequence[tuple[np.ndarray, int, float]], vocab: str | None) -> list[Labels]:
        """(uint8 image [R, R, 3], k, min_prob) per request, one compiled k' covering every k -> ranked labels."""
        xs = [x for x, _, _ in queries]
        padded = smallest_at_least(self.batch_sizes, len(xs))
        k_run = smallest_at_least(self.label_sizes, max(k for _, k, _ in queries))
        x = preprocess.normalize(np.stack(xs + [xs[0]] * (padded - len(xs))))  # as Tagger.preprocess
        sampled = self.tagger.sample(jnp.asarray(x), k_run, vocab=None if vocab is None else self.vocabs[vocab])
        tokens, probs = np.asarray(sampled["tokens"]), np.asarray(sampled["probs"])  # host copies: no device slicing
        out = []
        for i, (_, k, min_prob) in enumerate(queries):
            row = {**sampled, "tokens": tokens[i : i + 1, :k], "probs": probs[i : i + 1, :k]}
            out += self.tagger.rank(row, k, min_prob=min_prob)
        return out

    def attention(self, image: np.ndarray) -> np.ndarray:
        """uint8 [R, R, 3] -> attention each image token receives, averaged over the image-token
        queries: [layers, heads, g, g]. (At model resolution, Tagger's resize and crop keep it as is.)"""
        maps = self.tagger.attention_maps(image)  # [L, H, N, N], row = query
        received = maps.mean(axis=2)
        g = int(round(np.sqrt(received.shape[-1])))
        return received.reshape(received.shape[:2] + (g, g))


ATTENTION = "attention"  # a Job's k for an attention request


@dataclasses.dataclass
class Job:
    x: np.ndarray  # uint8 [R, R, 3]
    k: int | str  # labels wanted, or ATTENTION
    min_prob: float
    vocab: str | None
    future: asyncio.Future
    queued_at: float


class Batcher:
    """Collects queued jobs into batches and runs them on one device thread."""

    def __init__(
        self,
        run: Callable[[Sequence[tuple[np.ndarray, int, float]], str | None], list[Labels]],
        attention: Callable[[np.ndarray], np.ndarray],
        label_sizes: Sequence[int],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int], None] = lambda n: None,
    ):
        self.run, self.attention = run, attention
        self.label_sizes = tuple(label_sizes)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.waiting = 0  # submitted, not yet on the device
        self.on_batch = on_batch
        self.device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")
        self._arrived = asyncio.Event()
        self.closed: BaseException | None = None  # set by close(): what every later job fails with

    def submit(self, queries: Sequence[tuple[np.ndarray, int | str, float, str | None]]) -> list[asyncio.Future]:
        """Queues (image, k or ATTENTION, min_prob, vocab) per image, all or none; raises
        asyncio.QueueFull when they would take more than `max_queue` images waiting."""
        if self.closed is not None:
            raise self.closed
        if self.waiting + len(queries) > self.max_queue:
            raise asyncio.QueueFull
        loop = asyncio.get_running_loop()
        jobs = [Job(x, k, p, v, loop.create_future(), time.monotonic()) for x, k, p, v in queries]
        for job in jobs:
            self.queue.put_nowait(job)
        self.waiting += len(jobs)
        self._arrived.set()
        return [job.future for job in jobs]

    def close(self, error: BaseException) -> None:
        """Fails every waiting job (and every later one) with `error`; the batch on the device finishes."""
        self.closed = error
        self._arrived.set()  # a batch being collected stops waiting for company
        while not self.queue.empty():
            self._fail([self.queue.get_nowait()], error)
            self.waiting -= 1

    @staticmethod
    def _fail(jobs: Sequence[Job], error: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    async def on_device(self, fn: Callable, *args: Any) -> Any:
        """Runs fn on the device thread, in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self.device, fn, *args)

    async def _collect(self) -> list[Job]:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            remaining = deadline - asyncio.get_running_loop().time()
            if len(batch) == self.max_batch or remaining <= 0 or self.closed is not None:
                break
            self._arrived.clear()
            try:  # an Event, not queue.get(): cancelling a wait on it never loses a job
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return batch

    async def serve_forever(self) -> None:
        while True:
            batch = await self._collect()
            self.waiting -= len(batch)
            if self.closed is not None:
                self._fail(batch, self.closed)
                continue
            groups: dict[tuple[int | str, str | None], list[Job]] = {}
            for job in batch:
                if job.future.done():  # its request timed out while it waited
                    continue
                k = job.k if job.k == ATTENTION else smallest_at_least(self.label_sizes, job.k)
                groups.setdefault((k, job.vocab), []).append(job)
            for (k, vocab), jobs in groups.items():
                try:
                    if k == ATTENTION:
                        results = [await self.on_device(self.attention, job.x) for job in jobs]
                    else:
                        self.on_batch(len(jobs))
                        results = await self.on_device(self.run, [(j.x, j.k, j.min_prob) for j in jobs], vocab)
                except Exception as e:  # a failed batch fails its requests, not the server
                    self._fail(jobs, e)
                    continue
                for job, result in zip(jobs, results):
                    if not job.future.done():
                        job.future.set_result(result)
