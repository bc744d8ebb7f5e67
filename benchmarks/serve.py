"""Service: the HTTP service under a bounded load on loopback: dynamic batching vs `--max_batch=1`.

For each model, a checkpoint with random weights is written to a temporary directory and
served twice by `python -m nxtp_jax.serve` (same weights, same requests): once with dynamic
batching (`--max_batch=16 --max_wait_ms=20`), once with `--max_batch=1`. N concurrent clients send a fixed
number of `POST /v1/tag` requests (k=10), then stop. Prints throughput, p50 and p99
latency, failed requests and the mean device batch per run, and the throughput ratio.

    python -m benchmarks.serve                          # demo + mid-size, 16 clients
    python -m benchmarks.serve --models demo --clients 4 16 --requests_demo 64

Models: `demo` is configs/demo.py's recognizer (ViT 256x2/8 @64 px + 2 blocks x 128);
`mid` is `benchmarks.cpu --sampler`'s (ViT-B/16 @224 px + 2 blocks x 2048), here with the
benchmark tokenizer's vocabulary instead of 32002 rows, so that every sampled id decodes.
Random weights never emit the delimiter: every branch runs to the cap (the worst case).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import jax
import numpy as np
from PIL import Image

from benchmarks import common
from nxtp_jax import checkpoint
from nxtp_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, VisionConfig
from nxtp_jax.models.recognizer import Recognizer, init_params

MODELS = {
    "demo": dict(vision=(256, 2, 8, 64), decoder=dict(dim=128, layers=2, n_heads=4, multiple_of=32)),
    "mid": dict(vision=(768, 12, 16, 224), decoder=dict(dim=2048, layers=2, n_heads=16)),
}


def write_checkpoint(name: str, root: pathlib.Path) -> tuple[pathlib.Path, int]:
    tok_path = root / f"{name}.model"
    tok = common.bench_tokenizer(tok_path)
    spec = MODELS[name]
    config = ModelConfig(
        vision=VisionConfig(*spec["vision"]),
        decoder=DecoderConfig(vocab_size=tok.vocab_size, **spec["decoder"]),
        special_tokens=SpecialTokens(image=tok.image_id, empty=tok.empty_id),
    )
    params = init_params(Recognizer(config), jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    out = root / name
    checkpoint.save(out, params, config, tok_path)
    return out, n_params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: pathlib.Path, max_batch: int, max_wait_ms: float, log: pathlib.Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nxtp_jax.serve", f"--ckpt={ckpt}", f"--port={port}", f"--max_batch={max_batch}",
         "--max_num_labels=10", f"--max_wait_ms={max_wait_ms}", "--max_queue=4096", "--timeout_s=1800"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url, time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def batches(url: str) -> tuple[float, float]:
    """(device batches, images in them) so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return value("nxtp_batch_size_count"), value("nxtp_batch_size_sum")


def load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    """`clients` threads send `requests` requests in all (one at a time each), then stop."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies, failures = [], 0

    def client() -> None:
        nonlocal failures
        with httpx.Client(timeout=1800) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                res = http.post(f"{url}/v1/tag", params={"num_labels": 10}, content=images[i % len(images)],
                                headers={"Content-Type": "image/png"})
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    failures += res.status_code != 200

    n0, images0 = batches(url)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    n1, images1 = batches(url)
    return {"throughput": requests / wall, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "failed": failures, "wall": wall,
            "batch": (images1 - images0) / max(n1 - n0, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo", "mid"], choices=sorted(MODELS))
    ap.add_argument("--clients", type=int, nargs="+", default=[16])
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--max_wait_ms", type=float, default=20.0)
    ap.add_argument("--requests_demo", type=int, default=128, help="requests per run on the demo model")
    ap.add_argument("--requests_mid", type=int, default=32, help="requests per run on the mid-size model")
    args = ap.parse_args(argv)

    print(common.machine())
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for name in args.models:
            ckpt, n_params = write_checkpoint(name, root)
            size = MODELS[name]["vision"][3]
            images = []
            for _ in range(16):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size + 32, size + 16, 3), dtype=np.uint8)).save(buf, "PNG")
                images.append(buf.getvalue())
            requests = args.requests_demo if name == "demo" else args.requests_mid
            for max_batch in (args.max_batch, 1):
                proc, url, ready_s = start_server(ckpt, max_batch, args.max_wait_ms, root / f"{name}-{max_batch}.log")
                try:
                    load(url, images, 2, 2)  # first requests through every thread and buffer
                    for clients in args.clients:
                        r = load(url, images, clients, requests)
                        rows.append((name, n_params, max_batch, clients, requests, ready_s, r))
                        print(f"{name} max_batch={max_batch} clients={clients}: {r['throughput']:.2f} req/s, "
                              f"p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s, {r['failed']} failed, mean batch {r['batch']:.1f} "
                              f"(ready after {ready_s:.0f} s)", flush=True)
                finally:
                    proc.terminate()
                    proc.wait()

    base = {(m, c): r["throughput"] for m, _, b, c, _, _, r in rows if b == 1}
    headers = ["model", "--max_batch", "clients", "requests", "req/s", "p50 (s)", "p99 (s)", "failed", "mean batch", "vs --max_batch=1"]
    print("\n" + common.table(headers, [
        (f"{m} ({n / 1e6:.0f}M)", b, c, req, f"{r['throughput']:.2f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}", r["failed"],
         f"{r['batch']:.1f}", f"**{r['throughput'] / base[(m, c)]:.1f}x**" if b != 1 else "1.0x")
        for m, n, b, c, req, _, r in rows
    ]))


if __name__ == "__main__":
    main()
