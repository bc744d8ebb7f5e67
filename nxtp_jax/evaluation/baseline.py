"""The frequency baseline: the k most common training labels, predicted for every evaluation image.

A model that learned only the label prior scores this. It is scored on the targets the
evaluation wrote (`eval_<dataset>.jsonl`), with the same metric, and added to
`eval_metrics.json` under "frequency_baseline".
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterable

from etils import epath
from ml_collections import config_dict

from nxtp_jax.data import registry, tar
from nxtp_jax.data.samples import load_json, read_texts
from nxtp_jax.evaluation import job

BASELINE_KEY = "frequency_baseline"


def training_labels(shards: Iterable[str], max_samples: int) -> Iterable[list[str]]:
    """The json "labels" of the first `max_samples` training samples (0 = all), in shard order."""
    seen = 0
    for shard in shards:
        with tar.walk(shard) as (fd, groups):
            for group in groups:
                if max_samples and seen >= max_samples:
                    return
                if isinstance(group, tar.TarFormatError) or tar.JSON_EXT not in group.members:
                    continue
                meta = load_json(read_texts(fd, group.key, group.members).get(tar.JSON_EXT) or b"{}")
                if isinstance(meta, dict) and isinstance(meta.get("labels"), list):
                    seen += 1
                    yield [str(label) for label in meta["labels"]]


def most_common(label_lists: Iterable[list[str]], k: int) -> list[str]:
    """The k labels in most samples (ties broken by first appearance)."""
    counts = collections.Counter(label for labels in label_lists for label in dict.fromkeys(labels))
    if not counts:
        raise ValueError("expected training samples with json labels to count, found none")
    return [label for label, _ in counts.most_common(k)]


def frequency_baseline(config: config_dict.ConfigDict, workdir: str | os.PathLike, *, max_samples: int = 100_000) -> dict[str, Any]:
    """Scores the baseline on the targets of the last evaluation in `workdir` and records it in eval_metrics.json."""
    workdir = epath.Path(workdir)
    records_path = workdir / job.RECORDS_FILE.format(dataset=config.eval.dataset)
    metrics_path = workdir / job.METRICS_FILE
    if not records_path.is_file() or not metrics_path.is_file():
        raise FileNotFoundError(f"expected the evaluation outputs {records_path} and {metrics_path}; evaluate first")
    targets = [json.loads(line)["targets"] for line in records_path.read_text().splitlines() if line.strip()]
    summary = json.loads(metrics_path.read_text())
    shards = registry.resolve_shards(list(config.data.train), config.data.root, config.data.registry)
    labels = most_common(training_labels(shards, max_samples), summary["k"])
    metric, embedder, _ = job.make_metric(summary["embedder"])
    metric.update([labels] * len(targets), targets)
    result = {**metric.compute(), "labels": labels, "embedder": embedder}
    summary[BASELINE_KEY] = result
    summary["f1_over_baseline"] = summary["f1"] - result["f1"]
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"frequency baseline (the {len(labels)} most common training labels {labels} for every image): "
        f"R {result['recall']:.4f}  P {result['precision']:.4f}  F1 {result['f1']:.4f}; "
        f"the model's F1 is {summary['f1_over_baseline']:+.4f} above it",
        flush=True,
    )
    return result
