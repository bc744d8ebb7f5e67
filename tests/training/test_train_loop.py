"""End-to-end training runs on the tiny demo variant: exact resume, SIGTERM, NaN stop, Tagger.load of a workdir."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nxtp_jax import checkpoint
from nxtp_jax import params as ptree
from tiny_models import demo_config
from nxtp_jax.models.recognizer import Recognizer, init_params
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.training.loop import train
from nxtp_jax.training.log import read_metrics

REPO = pathlib.Path(__file__).parents[2]


def tiny_config(data_root, sharded=False, **fields):
    """The tiny demo variant on one device, or with batch and params sharded over two (fsdp 2)."""
    return demo_config(data_root, **{"mode": "train", "mesh.data": 1, "mesh.fsdp": 2 if sharded else 1, **fields})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_data")


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir)]


def test_resume_is_bit_exact(data_root, tmp_path):
    # 12 steps of 8 out of 64 samples: the split run stops mid-epoch (step 6) and resumes across
    # the epoch boundary (step 8) and the periodic checkpoint (step 10).
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = train(tiny_config(data_root, sharded=True, total_steps=12), straight)
    assert result.step == 12 and not result.preempted
    train(tiny_config(data_root, sharded=True, total_steps=12, stop_at_step=6), split)
    assert checkpoint.training_steps(split)[-1] == 6
    assert [s for s, _ in losses(split)] == list(range(1, 7))
    train(tiny_config(data_root, sharded=True, total_steps=12), split)

    assert [s for s, _ in losses(straight)] == list(range(1, 13))
    assert losses(split) == losses(straight)  # bit-identical floats
    assert losses(straight)[-1][1] < losses(straight)[0][1]

    assert_trees_equal(Tagger.load(straight, dtype=np.float32).params, Tagger.load(split, dtype=np.float32).params)
    record = read_metrics(straight)[-1]
    for key in ("step", "loss", "lr", "samples_per_sec", "skipped_samples", "epoch", "data_time", "batch_time"):
        assert key in record
    assert (straight / "tensorboard").is_dir()


TRAINABLE = (r"vision_encoder/proj/.*", r"language_decoder/layers_\d+/.*", r"language_decoder/tok_embeddings/.*")


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_workdir_loads_with_its_frozen_weights(data_root, tmp_path):
    """Only trainable params are checkpointed; Tagger.load merges back the frozen ones it trained with."""
    scratch = tmp_path / "scratch"
    train(tiny_config(data_root, total_steps=2, trainable=TRAINABLE, embedding_rows=("<|image|>",)), scratch)
    tagger = Tagger.load(scratch, dtype=np.float32)
    model = Recognizer(tagger.model.config)
    initial = checkpoint.scratch_params(model, 0)  # the demo's seed, on the training mesh (one device)
    assert_trees_equal(ptree.split(tagger.checkpoint_params(), TRAINABLE)[1], ptree.split(initial, TRAINABLE)[1])

    init_dir = tmp_path / "init"
    init = init_params(model, jax.random.key(7))
    checkpoint.save(init_dir, init, tagger.model.config, scratch / "tokenizer.model", source="test")
    run = tmp_path / "run"
    config = tiny_config(
        data_root, total_steps=2, trainable=TRAINABLE, embedding_rows=("<|image|>",), **{"model.init": "checkpoint"}
    )
    config.model.checkpoint = str(init_dir)
    train(config, run)

    loaded = Tagger.load(run, dtype=np.float32).checkpoint_params()
    tr_loaded, fr_loaded = ptree.split(loaded, TRAINABLE)
    tr_init, fr_init = ptree.split(init, TRAINABLE)
    assert_trees_equal(fr_loaded, fr_init)
    moved = jax.tree.map(lambda x, y: not np.array_equal(np.asarray(x), np.asarray(y)), tr_loaded, tr_init)
    assert all(jax.tree.leaves(moved))
    emb_loaded = np.asarray(tr_loaded["language_decoder"]["tok_embeddings"]["embedding"])
    emb_init = np.asarray(tr_init["language_decoder"]["tok_embeddings"]["embedding"])
    assert np.flatnonzero(np.any(emb_loaded != emb_init, axis=1)).tolist() == [tagger.tokenizer.image_id]


@pytest.mark.parametrize(
    "lr,message",
    [
        (1e30, r"loss is nan at step 2"),  # huge but finite weights after step 1, then an overflowing forward
        (float("inf"), r"parameters became non-finite in the update of step 1"),  # finite loss, broken update
    ],
)
def test_non_finite_values_stop_the_run_without_saving_them(data_root, tmp_path, lr, message):
    workdir = tmp_path / "nan"
    config = tiny_config(data_root, **{"optim.lr": lr, "checkpoint.save_interval_steps": 1})
    with pytest.raises(FloatingPointError, match=message):
        train(config, workdir)
    steps = checkpoint.training_steps(workdir)
    assert steps == ([1] if lr == 1e30 else [])
    if steps:
        params = Tagger.load(workdir, dtype=np.float32).params
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(workdir))


def test_sigterm_saves_and_exits_cleanly(data_root, tmp_path):
    workdir = tmp_path / "preempted"
    command = [
        sys.executable, "-m", "nxtp_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
        f"--config.data.root={data_root}", "--config.mode=train", "--config.total_steps=100000",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while len(read_metrics(workdir)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "preempted: saved step" in out
    saved = checkpoint.training_steps(workdir)[-1]
    assert read_metrics(workdir)[-1]["step"] == saved > 0
    assert json.loads((workdir / "config.json").read_text())["training"]["init"]["kind"] == "scratch"
    assert Tagger.load(workdir, dtype=np.float32).params
