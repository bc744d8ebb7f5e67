"""The frequency baseline: the k most common training labels for every image, on the eval's targets."""

import json

import pytest

from nxtp_jax.evaluation.baseline import frequency_baseline, most_common, training_labels
from nxtp_jax.data.writer import write_shard
from nxtp_jax.configs import demo

TRAIN_LABELS = [["red", "circle"], ["red", "square"], ["blue", "circle"], ["red", "circle", "star"], ["green"]]


def shard(path, label_lists):
    samples = [(f"s{i}", {"txt": b"x", "json": json.dumps({"labels": labels}).encode()}) for i, labels in enumerate(label_lists)]
    write_shard(path, samples)


def test_most_common_counts_each_sample_once():
    assert most_common(TRAIN_LABELS + [["blue", "blue", "blue"]], 2) == ["red", "circle"]
    with pytest.raises(ValueError, match="found none"):
        most_common([], 3)


def test_frequency_baseline_scores_the_eval_targets_with_the_eval_metric(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    shard(tmp_path / "data" / "train" / "a.tar", TRAIN_LABELS[:3])
    shard(tmp_path / "data" / "train" / "b.tar", TRAIN_LABELS[3:])
    assert list(training_labels([str(tmp_path / "data" / "train" / "a.tar")], 2)) == TRAIN_LABELS[:2]

    config = demo.get_config()
    config.data.root = str(tmp_path / "data")
    config.data.registry.shapes_train.root = "train"
    workdir = tmp_path / "run"
    workdir.mkdir()
    targets = [["red", "circle"], ["blue"], ["red", "star", "moon"]]
    (workdir / "eval_shapes_val.jsonl").write_text("".join(json.dumps({"targets": t}) + "\n" for t in targets))
    (workdir / "eval_metrics.json").write_text(json.dumps({"f1": 0.9, "k": 2, "embedder": "exact"}))

    result = frequency_baseline(config, workdir)
    # Prediction ["red", "circle"] for every image: R = (1 + 0 + 1/3) / 3, P = (1 + 0 + 1/2) / 3.
    r, p = (1 + 0 + 1 / 3) / 3, (1 + 0 + 0.5) / 3
    f = (1.0 + 0.0 + 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)) / 3
    assert result["labels"] == ["red", "circle"]
    assert result["recall"] == pytest.approx(r) and result["precision"] == pytest.approx(p) and result["f1"] == pytest.approx(f)
    summary = json.loads((workdir / "eval_metrics.json").read_text())
    assert summary["frequency_baseline"]["f1"] == pytest.approx(f)
    assert summary["f1_over_baseline"] == pytest.approx(0.9 - f)
