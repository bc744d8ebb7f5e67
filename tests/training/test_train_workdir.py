"""Workdir guards: writable before any barrier, locked against a second run, the same model on
resume (checked before anything is written), a fallback past a truncated latest checkpoint,
and Ctrl-C saving like SIGTERM."""

import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from nxtp_jax import checkpoint
from nxtp_jax.errors import WorkdirError
from tiny_models import demo_config
from nxtp_jax.training.loop import train
from nxtp_jax.training.log import read_metrics
from nxtp_jax.training.preemption import PreemptionWatch

REPO = pathlib.Path(__file__).parents[2]


def tiny_config(data_root, **fields):
    defaults = {"mode": "train", "mesh.data": 1, "mesh.fsdp": 1, "total_steps": 4, "checkpoint.save_interval_steps": 2}
    return demo_config(data_root, **{**defaults, **fields})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_data")


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A workdir trained 4 steps, with checkpoints at steps 2 and 4 (and orbax's first step)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(data_root), workdir)
    assert checkpoint.training_steps(workdir)[-2:] == [2, 4]
    return workdir


def snapshot(directory: pathlib.Path) -> dict:
    """Every file's size and modification time (directories change mtime with the lock and the write probe)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def test_a_second_run_on_a_locked_workdir_stops(data_root, trained):
    # This process is alive on this host: the lock is held.
    lock = checkpoint.Lock(trained).acquire()
    try:
        before = snapshot(trained)
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}"):
            train(tiny_config(data_root, total_steps=6), trained)
        assert snapshot(trained) == before
    finally:
        lock.release()
    assert not (trained / checkpoint.LOCK_FILE).exists()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / checkpoint.LOCK_FILE).write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, "time": "t0"}}')
    lock = checkpoint.Lock(tmp_path).acquire()
    assert f"taking over the stale lock {tmp_path / checkpoint.LOCK_FILE} of pid {dead.pid}" in capsys.readouterr().out
    assert f'"pid": {os.getpid()}' in (tmp_path / checkpoint.LOCK_FILE).read_text()
    lock.release()
    # A lock of another host cannot be checked: it stops the run.
    (tmp_path / checkpoint.LOCK_FILE).write_text('{"host": "elsewhere", "pid": 1, "time": "t0"}')
    with pytest.raises(WorkdirError, match="pid 1 on elsewhere"):
        checkpoint.Lock(tmp_path).acquire()


def test_unusable_workdirs_fail_before_anything_starts(data_root, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(WorkdirError, match="expected a directory at .*a_file, found a file"):
        train(tiny_config(data_root), tmp_path / "a_file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / checkpoint.STEPS_DIR).write_text("not a directory")
    with pytest.raises(WorkdirError, match="checkpoints, found a file"):
        train(tiny_config(data_root), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [checkpoint.STEPS_DIR]


def test_a_changed_model_stops_the_resume_and_leaves_the_workdir_untouched(data_root, trained):
    before = snapshot(trained)
    config = tiny_config(data_root, total_steps=6, **{"model.decoder.layers": 2, "model.vision.width": 128})
    with pytest.raises(WorkdirError) as info:
        train(config, trained)
    message = str(info.value)
    assert "model.decoder.layers: saved 1, now 2" in message and "model.vision.width: saved 64, now 128" in message
    assert "\n" not in message
    assert snapshot(trained) == before


def test_an_unrestorable_latest_step_falls_back_to_the_previous_one(data_root, trained, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    # A save cut short: every file of step 4's params truncated to half.
    for f in (workdir / checkpoint.STEPS_DIR / "4" / checkpoint.TRAINABLE_ITEM).rglob("*"):
        if f.is_file() and f.stat().st_size > 1:
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    result = train(tiny_config(data_root, total_steps=6), workdir)
    out = capsys.readouterr().out
    assert f"warning: checkpoint step 4 in {workdir / checkpoint.STEPS_DIR} does not restore" in out
    assert "resumed from step 2" in out
    assert result.step == 6
    assert checkpoint.training_steps(workdir)[-3:] == [2, 4, 6]  # step 4 saved again, from the good step 2
    assert (workdir / checkpoint.STEPS_DIR / "4.unrestorable").is_dir()  # the bad one is kept aside
    # The metrics continue from step 2 and are identical to the uninterrupted run's.
    assert [r["step"] for r in read_metrics(workdir)][-4:] == [3, 4, 5, 6]


def test_first_ctrl_c_asks_for_a_save_and_the_second_aborts_then_the_previous_handler_is_back():
    # Python's own handler, or SIG_IGN when the process started in the background of a shell.
    before = signal.getsignal(signal.SIGINT)
    watch = PreemptionWatch()
    try:
        assert not watch.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.reached(2)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_main_prints_one_line_for_a_workdir_that_is_a_file(data_root, tmp_path):
    (tmp_path / "a_file").write_text("x")
    command = [
        sys.executable, "-m", "nxtp_jax.main", "--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'a_file'}",
        f"--config.data.root={data_root}", "--config.mode=train",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: expected a directory at {tmp_path / 'a_file'}")


def test_model_differences_name_each_differing_field_with_both_values():
    saved = {"vision": {"width": 64, "layers": 2}, "decoder": {"layers": 1}}
    now = {"vision": {"width": 128, "layers": 2}, "decoder": {"layers": 1, "dim": 8}}
    assert checkpoint.model_differences(saved, now, "saved", "now") == [
        "model.vision.width: saved 64, now 128", "model.decoder.dim: saved None, now 8"
    ]
    assert checkpoint.model_differences(now, now, "saved", "now") == []


def test_non_finite_params_names_each_param_with_nan_or_inf():
    params = {"a": {"w": np.ones(3, np.float32)}, "b": np.array([1.0, np.nan], np.float32), "c": np.array([np.inf], np.float32)}
    assert checkpoint.non_finite_params(params) == ["b", "c"]
    assert checkpoint.non_finite_params({"a": params["a"]}) == []
