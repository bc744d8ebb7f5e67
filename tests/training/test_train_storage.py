"""A demo-sized run with its workdir and data on gs:// (a stand-in inside this process) equals the same run on local disk.

The gs:// stand-in is fsspec's in-memory filesystem mounted under gs:// (tests/fake_gcs.py).
Everything nxtp_jax reads and writes itself goes through it: the shards (synthesized there,
listed, read with ranged reads), the tokenizer (trained and written there), config.json,
train_config.json, the workdir lock, metrics.jsonl, TensorBoard events, the eval records and
figures. Orbax writes arrays through tensorstore, which talks to GCS by itself and cannot see
an in-process stand-in, so orbax's step checkpoints stay on local disk
(`config.checkpoint.dir`); config.json records where they are, and Tagger.load finds them.

The gs:// run is stopped by a real SIGTERM (sent while step 5 is logged: it saves step 6 and
stops), then resumed, trained to the end and evaluated through `nxtp_jax.main.run`. Its
losses, eval figures, eval records and eval TensorBoard scalars must equal those of one
uninterrupted run on local disk, bit for bit.
"""

import json
import os
import pathlib
import signal
import struct

import pytest
from etils import epath

from fake_gcs import fake_gcs
from nxtp_jax import checkpoint
from nxtp_jax.configs import demo
from nxtp_jax.cli.main import run
from nxtp_jax.training import log as train_log

STEPS = 12
SIGTERM_AT = 5
DATASET = "shapes_val"


def demo_config(data_root, orbax_dir=""):
    config = demo.get_config("tiny")
    config.mode = "train_and_eval"
    config.data.root = str(data_root)
    config.mesh.data, config.mesh.fsdp = 1, 1
    config.total_steps = STEPS
    config.checkpoint.dir = str(orbax_dir)
    return config


def tensorboard_scalars(logdir: epath.Path) -> dict:
    """{(tag, step): value} of every event file under `logdir` (TFRecord framing, tensorboardX's Event proto)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in logdir.iterdir():
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def outputs(workdir) -> dict:
    workdir = epath.Path(workdir)
    records = train_log.read_metrics(workdir)
    summary = json.loads((workdir / "eval_metrics.json").read_text())
    return {
        "losses": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "eval_lines": [r for r in records if "loss" not in r],
        "figures": {k: summary[k] for k in ("recall", "precision", "f1", "num_images", "step", "frequency_baseline")},
        "eval_records": (workdir / f"eval_{DATASET}.jsonl").read_text(),
        "eval_scalars": {k: v for k, v in tensorboard_scalars(workdir / "tensorboard").items() if k[0].startswith("eval/")},
    }


def test_gs_workdir_and_data_run_equals_local_run(monkeypatch, tmp_path):
    local_orbax = tmp_path / "orbax_of_the_gs_run"
    with fake_gcs(monkeypatch) as store:
        workdir, config = "gs://bucket/runs/demo", demo_config("gs://bucket/data", local_orbax)
        write = train_log.MetricsLogger.write

        def write_then_sigterm(self, record):
            write(self, record)
            if record["step"] == SIGTERM_AT:
                os.kill(os.getpid(), signal.SIGTERM)

        with monkeypatch.context() as m:
            m.setattr(train_log.MetricsLogger, "write", write_then_sigterm)
            run(config, workdir)
        assert checkpoint.training_steps(workdir) == [1, SIGTERM_AT + 1]  # orbax's first-step save, then SIGTERM's
        assert not epath.Path(workdir, "eval_metrics.json").exists()  # a preempted run does not evaluate
        run(config, workdir)
        on_gs = outputs(workdir)
        written = sorted(store.store)
        assert checkpoint.training_steps(workdir) == [SIGTERM_AT + 1, 10, STEPS]
    assert sorted(p.name for p in tmp_path.iterdir()) == [local_orbax.name]  # nothing else of the gs run is local
    assert not (pathlib.Path.cwd() / "gs:").exists()
    workdir_files = {p.removeprefix("bucket/runs/demo/").split("/")[0] for p in written if p.startswith("bucket/runs/")}
    assert workdir_files == {
        "config.json", "tokenizer.model", "train_config.json", "metrics.jsonl", "tensorboard",
        f"eval_{DATASET}.jsonl", "eval_metrics.json",
    }
    assert any(p.startswith("bucket/data/shapes/train/") and p.endswith(".tar") for p in written)

    local = outputs_of_local_run(tmp_path / "local")
    assert [s for s, _ in on_gs["losses"]] == list(range(1, STEPS + 1))
    assert on_gs["losses"] == local["losses"]  # bit-identical floats
    assert on_gs["figures"] == local["figures"]
    assert on_gs["figures"]["step"] == STEPS
    assert on_gs["eval_records"] == local["eval_records"]
    assert on_gs["eval_lines"] == local["eval_lines"]
    assert [r["step"] for r in on_gs["eval_lines"]] == [STEPS]
    assert set(on_gs["eval_lines"][0]) >= {"step", f"eval/{DATASET}/f1", f"eval/{DATASET}/recall", f"eval/{DATASET}/precision"}
    assert on_gs["eval_scalars"] == local["eval_scalars"]
    assert on_gs["eval_scalars"][(f"eval/{DATASET}/f1", STEPS)] == pytest.approx(on_gs["figures"]["f1"], rel=1e-6)


def outputs_of_local_run(root: pathlib.Path) -> dict:
    run(demo_config(root / "data"), root / "run")
    return outputs(root / "run")
