"""What every benchmark shares: timing, the machine's name, markdown tables, peak memory, child processes,
and the small tokenizers that random-weight models decode with."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

RESULT = "RESULT "  # the line a child process reports its measurement on


def timed(run: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first call in s, its compilation included; median of `repeats` further calls in s; the last result)."""
    start = time.perf_counter()
    result = run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return first, float(np.median(times)) if times else first, result


def best_seconds(run: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of `repeats` calls after one untimed warm-up (compilation, caches)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_name() -> str:
    """The CPU's model name and widest vector extension, from /proc/cpuinfo."""
    path = pathlib.Path("/proc/cpuinfo")
    info = path.read_text() if path.exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "an unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{name} ({'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'})"


def machine() -> str:
    """This machine in one line: its cores and CPU, the load average, and JAX's devices when JAX is loaded."""
    line = f"{os.cpu_count()} cores of {cpu_name()}, load average {os.getloadavg()[0]:.1f}"
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        line += f"; JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}"
    return line


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss, not inherited from the parent)."""
    status = pathlib.Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # KiB


def report(result: dict) -> None:
    """A child process's measurement, for `run_child`."""
    print(RESULT + json.dumps(result), flush=True)


def run_child(module: str, argv: Sequence[str], name: str) -> dict | None:
    """`python -m module *argv --child name` in its own process (its peak memory its own); its `report`,
    or None after printing why it failed."""
    res = subprocess.run([sys.executable, "-m", module, *argv, "--child", name], capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith(RESULT)]
    if res.returncode or not lines:
        print(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return None
    return json.loads(lines[-1].removeprefix(RESULT))


def bench_tokenizer(path: pathlib.Path | None = None):
    """Only the prompt's ids and the delimiter come from it; the models keep a LLaMA-sized vocabulary."""
    from nxtp_jax import prompts
    from nxtp_jax.tokenizer import Tokenizer, train_sentencepiece

    words = "cloud sky logo text title blue photo picture storm middle name art sun dog cat tree car house road water".split()
    texts = list(prompts.OBJECT_TEMPLATES) + [", ".join(np.random.default_rng(i).permutation(words)) for i in range(200)]
    path = path or pathlib.Path(tempfile.mkdtemp()) / "bench.model"
    return Tokenizer(train_sentencepiece(texts, path, 300))


def id_tokenizer(path: pathlib.Path):
    """A tokenizer that decodes to the ids themselves: random argmaxes of a LLaMA-sized model fall
    outside the small benchmark tokenizer."""
    from nxtp_jax.tokenizer import Tokenizer

    class IdTokenizer(Tokenizer):
        def decode(self, ids):
            return " ".join(str(i) for i in ids)

    return IdTokenizer(path)
