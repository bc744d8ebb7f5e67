"""The evaluation job (docs/method.md §6): top-k labels for every image of a split, scored with the Semantic F-score.

    python -m nxtp_jax.main --config=configs/g3m.py --config.mode=eval \
        --config.eval.ckpt=DIR --config.eval.dataset=coco_valid   # or --config.eval.ckpt=g3m (a released model)

Every process evaluates its share of the split (sample i goes to process i % count) on its
own devices, with the batch split over them; the last batches are padded and the padding
is dropped before the metric. Process 0 gathers the per-image records and metric states
of all processes and writes

    <workdir>/eval_<dataset>.jsonl   one line per image, in the split's order
    <workdir>/eval_metrics.json      the final figures and the settings that produced them

The summary's "step" is the checkpoint's (0 for a converted checkpoint); `python -m
nxtp_jax.main` also adds the figures to metrics.jsonl and TensorBoard at that step. The
workdir and the checkpoint may be on any etils.epath backend (gs://...).

The model step is jitted and batched; the next batch is dispatched to the devices before
the metric scores the previous one, so the two overlap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_dict
from tqdm import tqdm

from nxtp_jax import checkpoint, experiment, pretrained, sharding
from nxtp_jax.evaluation import clip_rerank, metrics
from nxtp_jax.data import eval_inputs, pipeline, preprocess
from nxtp_jax.choices import EVAL_RANKINGS
from nxtp_jax.inference.tagger import Tagger, check_decoding

log = logging.getLogger(__name__)

RECORDS_FILE = "eval_{dataset}.jsonl"
METRICS_FILE = "eval_metrics.json"


# -- predicting labels for a batch --------------------------------------------------------


@dataclasses.dataclass
class Prediction:
    """The labels of one image: `labels` as scored (at most k, best first) and, for the CLIP
    re-ranking, `sampled`: the model's own candidates with their ranking scores."""

    labels: list[tuple[str, float]]
    sampled: list[tuple[str, float]] | None = None


def load_tagger(
    ckpt: str | os.PathLike, mesh: Mesh, *, dtype: Any, param_dtype: Any, batch_size: int, quantize: str = "none"
) -> Tagger:
    """`Tagger.load` onto this process's mesh (a checkpoint directory or a training workdir)."""
    return Tagger.load(ckpt, dtype=dtype, param_dtype=param_dtype, mesh=mesh, batch_size=batch_size, quantize=quantize)


def place_params(params: Any, mesh: Mesh) -> Any:
    """`params` on `mesh`, each with the partition spec it was loaded with (replicated if it has none)."""

    def place(x: jax.Array) -> jax.Array:
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(place, params)


@jax.jit
def _normalize(images: jax.Array) -> jax.Array:
    return preprocess.normalize(images)


class BatchPredictor:
    """uint8 images [B, S, S, 3] -> one `Prediction` per image, with the decoding of `Tagger.predict`.

    `launch` puts the batch on the mesh (split over the data axis) and dispatches the jitted
    decoding without waiting for it; `finish` waits, cuts the branches into labels and ranks
    them. `ranking="clip"` takes the model's labels in sampling order (`none`) and re-ranks
    them with `reranker` (a `clip_rerank.ClipReranker`). `vocab` (a list of labels, a file
    with one per line, or a `Vocabulary`) constrains one-shot sampling to a closed vocabulary.
    """

    def __init__(
        self,
        tagger: Tagger,
        *,
        k: int,
        strategy: str = "one_shot",
        ranking_method: str = "prob",
        mesh: Mesh | None = None,
        reranker: Any = None,
        seed: int = 0,
        decoder_kw: dict[str, Any] | None = None,
        vocab: Any = None,
    ):
        if k < 1:
            raise ValueError(f"expected k >= 1 labels per image, found {k}")
        if ranking_method not in EVAL_RANKINGS:
            raise ValueError(f"expected ranking in {EVAL_RANKINGS}, found {ranking_method!r}")
        check_decoding(strategy, ranking_method)
        if ranking_method == "clip" and reranker is None:
            raise ValueError("ranking 'clip' needs a reranker (clip_rerank.ClipReranker over OpenAI's CLIP archive)")
        self.tagger = tagger
        self.k = k
        self.strategy = strategy
        self.ranking_method = ranking_method
        self.mesh = mesh if mesh is not None else sharding.one_device_mesh()
        self.reranker = reranker
        self.decoder_kw = dict(decoder_kw or {})
        self.vocab = tagger.vocabulary(vocab)
        self._key = jax.random.key(seed)
        self._batch_sharding = sharding.batch_sharding(self.mesh)
        self.batch_multiple = self._batch_sharding.num_devices // self.mesh.shape["tensor"]

    def launch(self, images: np.ndarray) -> dict[str, Any]:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images [B, S, S, 3], found {images.dtype} {images.shape}")
        if images.shape[0] % self.batch_multiple:
            raise ValueError(
                f"expected a batch that splits over the {self.batch_multiple} data-parallel devices, "
                f"found {images.shape[0]} images; set eval.batch_size to a multiple of {self.batch_multiple}"
            )
        x = _normalize(jax.device_put(images, self._batch_sharding))
        self._key, sub = jax.random.split(self._key)
        out = self.tagger.sample(x, self.k, strategy=self.strategy, key=sub, vocab=self.vocab, **self.decoder_kw)
        if self.reranker is not None:
            out["clip_images"] = self.reranker.image_features(x)
        return out

    def finish(self, launched: dict[str, Any]) -> list[Prediction]:
        if self.ranking_method != "clip":
            return [Prediction(r) for r in self.tagger.rank(launched, self.k, self.ranking_method)]
        # CLIP re-ranks every label in sampling order, not only the first k.
        ranked = self.tagger.rank(launched, None, "none")
        features = np.asarray(launched["clip_images"])
        return [
            Prediction(self.reranker.rerank(f, [label for label, _ in r], self.k), sampled=r)
            for f, r in zip(features, ranked)
        ]


# -- the evaluation loop ------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Seconds spent waiting for data, in the model (decoding and ranking) and in the metric."""

    data_s: float = 0.0
    model_s: float = 0.0
    metric_s: float = 0.0
    total_s: float = 0.0

    def as_dict(self, num_images: int) -> dict[str, float]:
        d = dataclasses.asdict(self)
        d["images_per_s"] = num_images / self.total_s if self.total_s > 0 else 0.0
        return d


@dataclasses.dataclass
class LocalResult:
    """What one process evaluated: records in its order, its metric state, unreadable samples."""

    records: list[dict[str, Any]]
    state: dict[str, list[float]]
    unreadable: list[dict[str, Any]]
    timing: Timing


def _targets(labels: str) -> list[str]:
    # As the original: ",".join(nouns).split(","), so an image without nouns has [""].
    return str(labels).split(",")


def run(
    predictor: BatchPredictor,
    loader: Any,
    metric: metrics.SemanticFScore,
    *,
    process_index: int = 0,
    process_count: int = 1,
    max_images: int = 0,
    progress: bool = True,
) -> LocalResult:
    """Evaluates this process's batches of `loader` (an `EvalLoader`: sample i on process i % count).

    Only samples with global index < `max_images` (all when 0) count; every process still
    runs the same number of batches.
    """
    total = loader.num_samples if max_images <= 0 else min(max_images, loader.num_samples)
    batch_size = None
    num_batches = len(loader)
    records: list[dict[str, Any]] = []
    unreadable: list[dict[str, Any]] = []
    timing = Timing()
    sums = np.zeros(3)
    start = time.perf_counter()
    bar = tqdm(total=num_batches, desc="eval", unit="batch", disable=not progress or process_index != 0)

    def finish(pending: tuple[dict[str, Any], dict[str, Any], int]) -> None:
        batch, launched, first_slot = pending
        t0 = time.perf_counter()
        preds = predictor.finish(launched)
        t1 = time.perf_counter()
        timing.model_s += t1 - t0
        rows, keep = [], []
        for row, valid in enumerate(np.asarray(batch["valid"])):
            index = process_index + (first_slot + row) * process_count
            if index >= total:
                continue
            if valid:
                keep.append((row, index))
            else:
                unreadable.append({"index": index, "path": str(batch["key"][row])})
        if keep:
            targets = [_targets(batch["labels"][row]) for row, _ in keep]
            scored = metric.update([[label for label, _ in preds[row].labels] for row, _ in keep], targets)
            for (row, index), record in zip(keep, scored):
                out = {"index": index, "path": str(batch["key"][row])}
                out.update(record)
                out["predictions"] = [[label, score] for label, score in preds[row].labels]
                if preds[row].sampled is not None:
                    out["sampled"] = [[label, score] for label, score in preds[row].sampled]
                rows.append(out)
                sums[:] += (record["recall"], record["precision"], record["f1"])
        timing.metric_s += time.perf_counter() - t1
        records.extend(rows)
        n = max(1, len(records))
        elapsed = time.perf_counter() - start
        bar.set_postfix(img_s=f"{len(records) / elapsed:.1f}", R=f"{sums[0] / n:.3f}", P=f"{sums[1] / n:.3f}", F1=f"{sums[2] / n:.3f}", refresh=False)
        bar.update(1)

    needed = None
    pending = None
    it = iter(loader)
    b = 0
    while needed is None or b < needed:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        timing.data_s += time.perf_counter() - t0
        if batch_size is None:
            batch_size = len(batch["valid"])
            needed = min(num_batches, pipeline.batches_per_process(total, process_count, batch_size))
            bar.total = needed
        t1 = time.perf_counter()
        launched = predictor.launch(np.asarray(batch["image"]))
        timing.model_s += time.perf_counter() - t1
        if pending is not None:
            finish(pending)
        pending = (batch, launched, b * batch_size)
        b += 1
    if pending is not None:
        finish(pending)
    bar.close()
    timing.total_s = time.perf_counter() - start
    state = {key: [float(v) for v in values] for key, values in metric.state().items()}
    if len(state["recall"]) != len(records):
        raise RuntimeError(
            f"expected one metric entry per record, found {len(state['recall'])} entries and {len(records)} "
            "records; pass a fresh SemanticFScore (or call reset()) for each evaluation"
        )
    return LocalResult(records, state, unreadable, timing)


# -- gathering on process 0 ---------------------------------------------------------------


def _encode(result: LocalResult) -> np.ndarray:
    payload = {
        "records": result.records,
        "state": result.state,
        "unreadable": result.unreadable,
        "timing": dataclasses.asdict(result.timing),
    }
    return np.frombuffer(zlib.compress(json.dumps(payload).encode("utf-8")), np.uint8)


def gather(result: LocalResult) -> list[dict[str, Any]]:
    """Every process's result (as decoded payloads), in process order; exact (JSON floats round-trip)."""
    data = _encode(result)
    if jax.process_count() == 1:
        blobs = [data]
    else:
        from jax.experimental import multihost_utils

        lengths = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
        padded = np.zeros(int(lengths.max()), np.uint8)
        padded[: data.size] = data
        gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
        blobs = [gathered[i, : int(n)] for i, n in enumerate(lengths)]
    return [json.loads(zlib.decompress(blob.tobytes()).decode("utf-8")) for blob in blobs]


def merge(payloads: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float], list[dict[str, Any]]]:
    """All records sorted by global index, the merged metric figures, and the unreadable samples."""
    records = sorted((r for p in payloads for r in p["records"]), key=lambda r: r["index"])
    indices = [r["index"] for r in records]
    if len(set(indices)) != len(indices):
        raise RuntimeError("an image was evaluated twice across processes; the eval loader must deal disjoint samples")
    state: dict[str, list[float]] = {key: [] for key in metrics.STATE_KEYS}
    for p in payloads:
        for key in metrics.STATE_KEYS:
            state[key].extend(p["state"][key])
    figures = metrics.summarize(state)
    unreadable = sorted((u for p in payloads for u in p["unreadable"]), key=lambda u: u["index"])
    return records, figures, unreadable


def write_records(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8"))
    tmp.replace(path)


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The step `Tagger.load` takes from `ckpt`: a training workdir's latest, else 0 (a converted checkpoint)."""
    steps = checkpoint.training_steps(ckpt) if checkpoint.is_training_workdir(ckpt) else []
    return steps[-1] if steps else 0


# -- the job ------------------------------------------------------------------------------


def make_metric(name: str, *, clip_archive: str = "", device: Any = None) -> tuple[metrics.SemanticFScore, str, str]:
    """(metric, the embedder actually used, a note). "minilm" falls back to "exact" when the eval extra is absent.

    The embedder runs on `device` (a jax.Device or platform name); None: this process's first device.
    """
    try:
        metric = metrics.SemanticFScore(name, device=device, clip_archive=clip_archive or None)
    except ImportError as e:
        if name != "minilm":
            raise
        note = f"all-MiniLM-L6-v2 unavailable ({e}); scored by exact string match instead, not comparable to the paper"
        log.warning(note)
        print(f"WARNING: {note}", flush=True)
        return metrics.SemanticFScore("exact"), "exact", note
    return metric, name, ""


def evaluate(config: config_dict.ConfigDict, workdir: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
    """Runs config.eval on this process's share of the split; returns the final figures (on every process)."""
    cfg = config.eval
    workdir = checkpoint.as_path(workdir)
    # A released model's name or card is downloaded and converted on first use (nxtp_jax.pretrained).
    ckpt = pretrained.resolve(cfg.ckpt) if cfg.ckpt else os.fspath(workdir)
    clip_archive = cfg.clip_archive
    mesh = sharding.local_mesh(int(config.mesh.fsdp), int(config.mesh.tensor))
    step = checkpoint_step(ckpt)
    tagger = load_tagger(
        ckpt,
        mesh,
        dtype=experiment.dtype(config.model.dtype),
        param_dtype=experiment.dtype(config.model.param_dtype),
        batch_size=cfg.batch_size,
        quantize=cfg.get("quantize", "none"),
    )
    reranker = None
    if cfg.ranking == "clip":
        if not clip_archive:
            raise ValueError(
                "eval.ranking='clip' needs eval.clip_archive, the path of OpenAI's CLIP checkpoint "
                "(ViT-L-14.pt, as the paper's Eq. A.1 used); found none"
            )
        reranker = clip_rerank.ClipReranker(clip_archive, mesh=mesh)
    predictor = BatchPredictor(
        tagger,
        k=cfg.k,
        strategy=cfg.strategy,
        ranking_method=cfg.ranking,
        mesh=mesh,
        reranker=reranker,
        seed=config.seed,
        vocab=cfg.vocab or None,
    )
    loader = eval_inputs.build_loader(
        config, cfg.dataset, image_size=tagger.image_size, batch_size=cfg.batch_size
    )
    metric, embedder, note = make_metric(cfg.embedder, clip_archive=clip_archive)
    local = run(
        predictor,
        loader,
        metric,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_images=cfg.max_images,
        progress=progress,
    )
    payloads = gather(local)
    records, figures, unreadable = merge(payloads)
    timing = payloads[0]["timing"]
    summary = {
        **figures,
        "dataset": cfg.dataset,
        "k": cfg.k,
        "strategy": cfg.strategy,
        "ranking": cfg.ranking,
        "vocab": cfg.vocab,
        **({"in_vocab": in_vocabulary(records, predictor.vocab)} if predictor.vocab is not None else {}),
        "checkpoint": str(ckpt),
        "step": step,
        "embedder": embedder,
        **({"embedder_note": note} if note else {}),
        "num_unreadable": len(unreadable),
        "num_processes": jax.process_count(),
        "timing_process0": Timing(**timing).as_dict(len(payloads[0]["records"])),
    }
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_records(workdir / RECORDS_FILE.format(dataset=cfg.dataset), records)
        (workdir / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        _report(summary, records, unreadable, cfg.examples)
    return summary


def in_vocabulary(records: Sequence[dict[str, Any]], vocab: Any) -> float:
    """The fraction of predicted labels that are entries of `vocab` (1.0 when nothing was predicted)."""
    labels = [label for record in records for label, _ in record["predictions"]]
    return sum(label in vocab for label in labels) / len(labels) if labels else 1.0


def _report(summary: dict[str, Any], records: Sequence[dict[str, Any]], unreadable: Sequence[dict[str, Any]], examples: int) -> None:
    for record in records[:examples]:
        labels = ", ".join(f"{label} ({score:.2f})" for label, score in record["predictions"])
        print(f"{record['path']}: targets [{', '.join(record['targets'])}] -> {labels}", flush=True)
    t = summary["timing_process0"]
    note = f" [{summary['embedder_note']}]" if "embedder_note" in summary else ""
    vocab = f", vocab {summary['vocab']} ({summary['in_vocab']:.1%} of labels in it)" if summary.get("vocab") else ""
    print(
        f"eval {summary['dataset']} (top-{summary['k']}, {summary['strategy']}, {summary['ranking']}, "
        f"embedder {summary['embedder']}{note}{vocab}): {summary['num_images']} images, "
        f"R {summary['recall']:.4f}  P {summary['precision']:.4f}  F1 {summary['f1']:.4f}  "
        f"(process 0: {t['images_per_s']:.1f} img/s; model {t['model_s']:.1f} s, metric {t['metric_s']:.1f} s, "
        f"data {t['data_s']:.1f} s of {t['total_s']:.1f} s)",
        flush=True,
    )
    if unreadable:
        print(f"{len(unreadable)} unreadable samples were left out, e.g. {unreadable[0]['path']!r}", flush=True)
