"""scripts/run_tpu_pod.sh: the compile check gates the pod run (gcloud is a stand-in that records its call)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_tpu_pod.sh"


def launch(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "gcloud_args"}\n')
    gcloud.chmod(0o755)
    path = f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "my-tpu", "us-central2-b", "configs/demo.py:tiny", f"--workdir={tmp_path / 'run'}", *args],
        cwd=ROOT, env={**os.environ, "PATH": path, **env}, capture_output=True, text=True, timeout=300,
    )
    called = (tmp_path / "gcloud_args").read_text() if (tmp_path / "gcloud_args").exists() else None
    return proc, called


def test_without_a_topology_it_asks_for_one_and_starts_nothing(tmp_path):
    proc, called = launch(tmp_path)
    assert proc.returncode == 2 and "NXTP_TOPOLOGY" in proc.stderr and called is None


def test_skipping_the_check_starts_the_run_on_every_worker(tmp_path):
    proc, called = launch(tmp_path, "--config.batch_size=16", NXTP_SKIP_COMPILE_CHECK="1")
    assert proc.returncode == 0, proc.stderr
    assert "--worker=all" in called and "--config.batch_size=16" in called and "--distributed=on" in called


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='the compile check needs libtpu: pip install -e ".[tpu]"')
def test_a_run_that_does_not_fit_stops_before_the_pod(tmp_path):
    """remat is already on and accumulation cannot help, so the check compiles once and fails."""
    proc, called = launch(tmp_path, "--config.batch_size=1048576", "--config.model.remat=True", NXTP_TOPOLOGY="v5e-1")
    assert proc.returncode == 1 and called is None
    assert "train does not fit v5e-1 at batch 1048576" in proc.stdout
