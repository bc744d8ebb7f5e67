"""Training logs: the original's console line, <workdir>/metrics.jsonl and TensorBoard scalars.

Only process 0 writes. A resumed run appends to metrics.jsonl after dropping the lines
of steps past the checkpoint it resumed from, so the file always reads as one run.
Evaluation adds its figures there too, at the step of the checkpoint it evaluated, as
`eval/<dataset>/<figure>` (`write_eval`).

The workdir may be on any etils.epath backend. On local disk lines are appended. Object
stores (gs://, ...) cannot append: there metrics.jsonl is rewritten whole at each record,
and TensorBoard event files are uploaded whole at each flush, as tensorboardX's own GCS
writer does.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from typing import Any, Mapping

from etils import epath

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def console_line(record: Mapping[str, Any], warmup: int) -> str:
    """The original's line: epoch, step, lr, loss(es), data time, batch time, warmup tag."""
    step = record["step"]
    parts = [
        f"epoch: {record['epoch']:02d}",
        f"step: {step:08d}",
        f"lr: {record['lr']:.7f}",
        f"loss: {record['loss']:>10.7f}",
    ]
    if "loss_caps" in record:
        parts.append(f"loss_caps: {record['loss_caps']:>10.7f}")
    parts += [
        f"loss_objs: {record['loss_objs']:>10.7f}",
        f"data time: {record['data_time']:>8.5f}s",
        f"batch time: {record['batch_time']:>8.5f}s",
        f"samples/s: {record['samples_per_sec']:>8.1f}",
    ]
    if step <= warmup:
        parts.append(f"warmup step: {step:05d}")
    return "  ".join(parts)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = epath.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


class _JsonLines:
    """A JSON-lines file that grows by one record at a time, on any epath backend."""

    def __init__(self, path: epath.Path, records: list[dict[str, Any]]):
        self.path = path
        self._lines = [json.dumps(r) + "\n" for r in records]
        self.path.write_text("".join(self._lines))

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        self._lines.append(line)
        if _is_remote(self.path):
            self.path.write_text("".join(self._lines))
        else:
            with self.path.open("a") as f:
                f.write(line)


class _EventFile:
    """A tensorboardX event file on an object store: buffered, uploaded whole through epath at each flush."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EventFiles:
    """tensorboardX's writer factory interface (`record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _EventFile:
        return _EventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def summary_writer(workdir: str | os.PathLike) -> Any:
    """A tensorboardX SummaryWriter on <workdir>/tensorboard, or None (with a warning) without tensorboardX."""
    try:
        from tensorboardX import SummaryWriter, record_writer
    except ImportError:
        log.warning("tensorboardX is not installed, so no TensorBoard scalars are written; `pip install tensorboardX`")
        return None
    logdir = os.fspath(epath.Path(workdir) / TENSORBOARD_DIR)
    if _is_remote(logdir):
        # Through epath, so gs:// needs no google-cloud-storage and every epath backend works.
        record_writer.register_writer_factory(logdir.split("://", 1)[0], _EventFiles())
    return SummaryWriter(logdir)


def write_eval(workdir: str | os.PathLike, step: int, dataset: str, figures: Mapping[str, float], *, tensorboard: bool) -> dict:
    """Appends `figures` as `eval/<dataset>/<name>` at `step` to metrics.jsonl and TensorBoard; returns the record."""
    record = {"step": step, **{f"eval/{dataset}/{k}": v for k, v in figures.items()}}
    _JsonLines(epath.Path(workdir) / METRICS_FILE, read_metrics(workdir)).append(record)
    writer = summary_writer(workdir) if tensorboard else None
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, step)
        writer.close()
    return record


class MetricsLogger:
    def __init__(self, workdir: str | os.PathLike, *, resume_step: int, warmup: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.warmup = warmup
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
        self._lines = _JsonLines(epath.Path(workdir) / METRICS_FILE, kept)
        if tensorboard:
            self._tb = summary_writer(workdir)

    def write(self, record: dict[str, Any]) -> None:
        """Prints the console line and appends the record (JSON numbers; NaN/inf as strings)."""
        if not self.enabled:
            return
        print(console_line(record, self.warmup), flush=True)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self._lines.append(clean)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
