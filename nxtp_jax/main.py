"""Entry point: train, evaluate, or both.

    python -m nxtp_jax.main --config=configs/demo.py
    python -m nxtp_jax.main --config=configs/g3m.py --workdir=runs/g3m --config.data.root=/data
    python -m nxtp_jax.main --config=... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

Multi-host runs are detected under SLURM (more than one task) and on multi-host TPU VMs
(`--distributed=on` leaves the detection to JAX); elsewhere the three flags above start
`jax.distributed` explicitly.

User errors (a bad config, an unusable or locked workdir, a damaged checkpoint) print one
`error: ...` line and exit 1; `--verbose` adds the traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nxtp_jax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; defaults to config.workdir.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed: 'auto' starts it under SLURM with several tasks and on multi-host TPU VMs; "
    "'on' always (JAX detects the cluster: TPU, SLURM, Open MPI, Kubernetes); 'off' never.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for explicit multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")
_VERBOSE = errors.verbose_flag()


def _cluster_detected() -> bool:
    """SLURM with several tasks, or a TPU VM that is one worker of several (or of several slices)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    workers = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in workers or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize_distributed() -> None:
    import jax

    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError(
                "explicit multi-host needs all of --coordinator_address, --num_processes and --process_id; "
                f"found {dict(zip(('coordinator_address', 'num_processes', 'process_id'), explicit))}"
            )
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    elif _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _cluster_detected()):
        jax.distributed.initialize()


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's and grain's INFO records (several per checkpoint save, restore and data read); their warnings pass."""

    _PACKAGES = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "grain"))

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in self._PACKAGES)


def setup_logging() -> None:
    """absl logging at INFO, without orbax's and grain's chatter; an explicit --verbosity shows everything at its level."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.FIELD=VALUE")
    config = _CONFIG.value
    workdir = _WORKDIR.value or config.workdir
    if not workdir:
        raise app.UsageError("no workdir: pass --workdir=DIR (or set config.workdir)")
    setup_logging()
    initialize_distributed()
    try:
        run(config, workdir)
    except errors.USER_ERRORS as e:
        sys.exit(errors.report(e, _VERBOSE.value))


def run(config, workdir: str) -> None:
    import jax

    from nxtp_jax import experiment

    logging.info("JAX %s: process %d of %d, %d devices", jax.__version__, jax.process_index(), jax.process_count(), jax.device_count())
    experiment.validate(config)
    if config.mode in ("train", "train_and_eval"):
        from nxtp_jax.training.loop import train

        result = train(config, workdir)
        if result.preempted:
            return
    if config.mode in ("eval", "train_and_eval"):
        from nxtp_jax.evaluation.job import evaluate

        summary = evaluate(config, workdir)
        if jax.process_index() == 0:
            from nxtp_jax.evaluation.metrics import STATE_KEYS
            from nxtp_jax.training.log import write_eval

            figures = {key: summary[key] for key in (*STATE_KEYS, "num_images")}
            write_eval(workdir, summary["step"], config.eval.dataset, figures, tensorboard=config.tensorboard)
        if config.eval.baseline and jax.process_index() == 0:
            from nxtp_jax.evaluation.baseline import frequency_baseline

            frequency_baseline(config, workdir)


if __name__ == "__main__":
    app.run(main)
