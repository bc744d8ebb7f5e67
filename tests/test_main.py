"""The entry point's logging: absl at INFO without orbax's and grain's per-save and per-read records."""

import logging

import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from nxtp_jax.main import _QuietLibraries


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_orbax_info_is_filtered_while_its_warnings_and_ours_pass(tmp_path):
    raw, filtered = _Capture(), _Capture()
    filtered.addFilter(_QuietLibraries())
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.INFO)
    absl_logger.addHandler(raw)
    absl_logger.addHandler(filtered)
    try:
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
        with ocp.CheckpointManager(tmp_path / "steps", options=options) as manager:
            manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.ones(3)})))
        ocp.CheckpointManagerOptions(read_only=True)  # orbax warns that it turns saving off
        absl_logging.info("our own line")
    finally:
        absl_logger.removeHandler(raw)
        absl_logger.removeHandler(filtered)
        absl_logger.setLevel(level)

    def from_orbax(records, level):
        return [r for r in records if "/orbax/" in r.pathname and r.levelno == level]

    assert len(from_orbax(raw.records, logging.INFO)) >= 3  # the chatter exists: several records for one save
    assert from_orbax(filtered.records, logging.INFO) == []
    assert len(from_orbax(filtered.records, logging.WARNING)) >= 1
    assert [r.getMessage() for r in filtered.records if r.levelno == logging.INFO] == ["our own line"]
