"""This CPU's limits, measured with numpy: memory bandwidth (STREAM-like, all cores) and the fp32 matmul rate.

benchmarks.cpu measures them before and after its runs and sets each figure beside its floor.

Bandwidth: one thread per core, each over its own slice of arrays far larger than the caches
(numpy releases the GIL in its loops, so the threads run at once). Three kernels, bytes counted
as STREAM does (no write-allocate traffic):
  read   s = max(a)          4 bytes per element (what streaming weights through a matmul does)
  copy   b = a               8
  triad  a = b + q*c         12 (computed in cache-sized blocks, so it is one pass over memory)
Matmul: a 2048^3 fp32 product through numpy's BLAS (all cores), 2*n^3 FLOPs.

`floor(phases, bw, flops)` is the time a computation cannot beat on this machine: per phase
max(bytes it must read / bandwidth, FLOPs / matmul rate), summed over phases.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

ARRAY_BYTES = 512 * 2**20  # per array: far beyond any cache
BLOCK = 64 * 1024  # triad block (256 KiB of float32)


def _parallel(fn, slices) -> float:
    """Runs fn(i, slice) on one thread per slice, all released together; seconds until the last ends."""
    barrier = threading.Barrier(len(slices) + 1)
    threads = [threading.Thread(target=lambda i=i, s=s: (barrier.wait(), fn(i, s))) for i, s in enumerate(slices)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bandwidth(threads: int | None = None, array_bytes: int = ARRAY_BYTES, repeats: int = 5) -> dict[str, float]:
    """Best GB/s (1e9 bytes) of each kernel over `repeats`, with `threads` threads (default: one per core)."""
    threads = threads or os.cpu_count() or 1
    n = array_bytes // 4
    a, b, c = (np.full(n, 1.0, np.float32) for _ in range(3))  # touched: pages are mapped before timing
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    tmp = [np.empty(BLOCK, np.float32) for _ in slices]

    def read(i, s):
        np.max(a[s])  # SIMD in numpy; its pairwise sum is slower than memory

    def copy(i, s):
        np.copyto(b[s], a[s])

    def triad(i, s):
        for lo in range(s.start, s.stop, BLOCK):
            hi = min(lo + BLOCK, s.stop)
            t = tmp[i][: hi - lo]
            np.multiply(c[lo:hi], 3.0, out=t)
            np.add(b[lo:hi], t, out=a[lo:hi])

    kernels = {"read": (read, 4), "copy": (copy, 8), "triad": (triad, 12)}
    out = {}
    for name, (fn, bytes_per) in kernels.items():
        best = min(_parallel(fn, slices) for _ in range(repeats))
        out[name] = n * bytes_per / best / 1e9
    return out


def matmul_rate(n: int = 2048, repeats: int = 3) -> float:
    """Best GFLOP/s of an n x n x n float32 matmul (numpy's BLAS, all its threads)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    x @ y  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure(threads: int | None = None) -> dict[str, float]:
    """{"read", "copy", "triad"} GB/s and "matmul" GFLOP/s; "bandwidth" is the best of the three."""
    out = bandwidth(threads)
    out["bandwidth"] = max(out["read"], out["copy"], out["triad"])
    out["matmul"] = matmul_rate()
    return out


def floor(phases: list[tuple[float, float]], bandwidth_gbs: float, matmul_gflops: float) -> float:
    """Seconds: the sum over phases (bytes, FLOPs) of max(bytes / bandwidth, FLOPs / matmul rate)."""
    return sum(max(b / (bandwidth_gbs * 1e9), f / (matmul_gflops * 1e9)) for b, f in phases)

