"""A real server process on 127.0.0.1 over a tiny checkpoint, shared by the service tests."""

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from tiny_models import random_images

VOCAB = ("cat", "dog", "sky", "cloud", "tree")


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m nxtp_jax.serve` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, ckpt: pathlib.Path, *flags: str, log: pathlib.Path, open_files: int | None = None):
        """`open_files`: the soft RLIMIT_NOFILE the server starts under (the hard limit stays)."""
        self.log = log
        self.url = f"http://127.0.0.1:{free_port()}"
        self.port = int(self.url.rsplit(":", 1)[1])
        cmd = [sys.executable, "-m", "nxtp_jax.serve", f"--ckpt={ckpt}", "--host=127.0.0.1", f"--port={self.port}", *flags]
        if open_files is not None:
            cmd = ["sh", "-c", f'ulimit -S -n {open_files} && exec "$@"', "sh", *cmd]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})

    def wait_ready(self, timeout: float = 600) -> "Server":
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"server not ready after {timeout} s:\n{self.log.read_text()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def serve_images(tmp_path_factory) -> list[pathlib.Path]:
    d = tmp_path_factory.mktemp("serve_images")
    paths = []
    for i, arr in enumerate(random_images(8, 40, seed=11)):
        p = d / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def servers(tiny_ckpt, tmp_path_factory) -> dict[str, str]:
    """"main": batching up to 4, small limits. "slow": a vocabulary; every batch waits 1.5 s for
    company and at most 1 image waits, so overload and timeouts happen on cue."""
    d = tmp_path_factory.mktemp("server")
    vocab = d / "words.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    started = {
        "main": Server(tiny_ckpt, "--max_batch=4", "--max_wait_ms=50", "--max_num_labels=8", "--max_body_mb=1",
                       "--max_pixels=1000000", "--max_queue=64", "--max_images=3", log=d / "main.log"),
        "slow": Server(tiny_ckpt, "--max_batch=2", "--max_wait_ms=1500", "--max_num_labels=8", "--max_queue=1",
                       "--timeout_s=4", f"--vocab=words:{vocab}", log=d / "slow.log"),
    }
    try:
        for s in started.values():  # both compile at once
            s.wait_ready()
        yield {name: s.url for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="session")
def server(servers) -> str:
    return servers["main"]
