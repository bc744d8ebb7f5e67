"""The batcher in process, with a recording stand-in for the device: the batches it forms, the
queue bound shared with attention requests, and closing on drain."""

import asyncio

import numpy as np
import pytest

from nxtp_jax.serve.batcher import ATTENTION, Batcher

X = np.zeros((2, 2, 3), np.uint8)


def run_batcher(scenario, *, max_batch=4, max_wait_s=0.05, max_queue=64, label_sizes=(8,)):
    """Runs `scenario(batcher)` with the batcher loop; returns (its result, the device calls made)."""
    calls = []

    def tag(queries, vocab):
        calls.append(("tag", [k for _, k, _ in queries], vocab))
        return [[("label", float(k))] for _, k, _ in queries]

    def attention(x):
        calls.append(("attention", 1, None))
        return "grid"

    async def main():
        batcher = Batcher(tag, attention, label_sizes, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue)
        loop = asyncio.create_task(batcher.serve_forever())
        try:
            return await scenario(batcher)
        finally:
            loop.cancel()
            batcher.device.shutdown()

    return asyncio.run(main()), calls


def test_32_jobs_at_once_form_8_full_batches():
    async def scenario(b):
        return await asyncio.gather(*b.submit([(X, 3 + i % 2, 0.0, None) for i in range(32)]))

    results, calls = run_batcher(scenario)
    assert [len(ks) for _, ks, _ in calls] == [4] * 8
    assert [r[0][1] for r in results] == [3.0 + i % 2 for i in range(32)]  # each answer to its own job


def test_a_partial_batch_runs_after_max_wait():
    async def scenario(b):
        first = b.submit([(X, 3, 0.0, None)] * 3)
        await asyncio.sleep(0.2)  # beyond max_wait: the 3 ran alone
        second = b.submit([(X, 3, 0.0, None)] * 2)
        return await asyncio.gather(*first, *second)

    _, calls = run_batcher(scenario)
    assert [len(ks) for _, ks, _ in calls] == [3, 2]


def test_one_device_call_per_compiled_k_and_vocabulary_and_one_per_attention_image():
    async def scenario(b):
        jobs = [(X, 3, 0.0, None), (X, 15, 0.0, None), (X, 10, 0.0, None), (X, 3, 0.0, "words"),
                (X, ATTENTION, 0.0, None), (X, ATTENTION, 0.0, None)]
        return await asyncio.gather(*b.submit(jobs))

    results, calls = run_batcher(scenario, max_batch=8, label_sizes=(10, 20))
    assert sorted(calls, key=str) == sorted(
        [("tag", [3, 10], None), ("tag", [15], None), ("tag", [3], "words"), ("attention", 1, None),
         ("attention", 1, None)], key=str)
    assert results[4:] == ["grid", "grid"]


def test_tag_and_attention_images_share_the_queue_bound():
    async def scenario(b):
        b.submit([(X, 3, 0.0, None)] * 2)
        with pytest.raises(asyncio.QueueFull):
            b.submit([(X, ATTENTION, 0.0, None)])
        with pytest.raises(asyncio.QueueFull):  # all or none
            b.submit([(X, 3, 0.0, None)] * 2)
        return b.waiting

    waiting, _ = run_batcher(scenario, max_queue=2, max_wait_s=1.0)
    assert waiting == 2


def test_close_fails_what_waits_and_what_comes_later():
    async def scenario(b):
        futures = b.submit([(X, 3, 0.0, None)] * 2)
        await asyncio.sleep(0)
        b.close(RuntimeError("shutting down"))
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        with pytest.raises(RuntimeError, match="shutting down"):
            b.submit([(X, 3, 0.0, None)])
        return outcomes, b.waiting

    (outcomes, waiting), calls = run_batcher(scenario, max_wait_s=1.0)
    assert [str(o) for o in outcomes] == ["shutting down"] * 2 and waiting == 0 and calls == []
