"""Training logs: the original's console line, <workdir>/metrics.jsonl and TensorBoard scalars.

Only process 0 writes. A resumed run appends to metrics.jsonl after dropping the lines
of steps past the checkpoint it resumed from, so the file always reads as one run.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any, Mapping

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


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(self, workdir: str | pathlib.Path, *, resume_step: int, warmup: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.warmup = warmup
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed, so no TensorBoard scalars are written; `pip install tensorboardX`")
            else:
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / TENSORBOARD_DIR))

    def write(self, record: dict[str, Any]) -> None:
        """Prints the console line and appends the record (JSON numbers; NaN/inf as strings)."""
        if not self.enabled:
            return
        print(console_line(record, self.warmup), flush=True)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
