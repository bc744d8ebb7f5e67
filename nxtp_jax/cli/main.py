"""`python -m nxtp_jax.main`: train, evaluate, or both.

    python -m nxtp_jax.main --config=configs/demo.py
    python -m nxtp_jax.main --config=configs/g3m.py --workdir=runs/g3m --config.data.root=/data
    python -m nxtp_jax.main --config=... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

Multi-host runs are detected under SLURM (more than one task) and on multi-host TPU VMs
(`--distributed=on` leaves the detection to JAX); elsewhere the three flags above start
`jax.distributed` explicitly.

User errors (a bad config, an unusable or locked workdir, a damaged checkpoint) print one
`error: ...` line and exit 1; usage errors (an unknown flag or config field) exit 2;
`--verbose` adds the traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

from absl import flags, logging
from ml_collections import config_flags

from nxtp_jax.cli.command import Command, UsageError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/*.py, optionally FILE:VARIANT).", flag_values=fv, lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "Run directory; defaults to config.workdir.", flag_values=fv)
    flags.DEFINE_enum(
        "distributed", "auto", ["auto", "on", "off"],
        "jax.distributed: 'auto' starts it under SLURM with several tasks and on multi-host TPU VMs; "
        "'on' always (JAX detects the cluster: TPU, SLURM, Open MPI, Kubernetes); 'off' never.",
        flag_values=fv,
    )
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for explicit multi-host runs.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).", flag_values=fv)
    _check_overrides(argv)


def _check_overrides(argv: list[str]) -> None:
    """An unknown --config.FIELD is one usage line naming the closest field (ml_collections raises a bare KeyError)."""
    overrides = [a[len("--config."):].partition("=")[0] for a in argv if a.startswith("--config.")]
    path = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), None)
    if not overrides or not path:
        return
    try:
        file, _, variant = path.partition(":")
        spec = importlib.util.spec_from_file_location("nxtp_config_overrides_check", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(variant) if variant else module.get_config()
    except Exception:  # noqa: BLE001 - the real parse reports a bad config file in its own words
        return
    known = _field_names(config.to_dict())
    for field in overrides:
        if field not in known and not any(k.startswith(field + ".") for k in known):
            close = difflib.get_close_matches(field, known, n=1, cutoff=0.5)
            hint = f"; did you mean --config.{close[0]}?" if close else ""
            raise UsageError(f"--config.{field}: the config has no field {field!r}{hint}")


def _field_names(tree: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in tree.items():
        names.append(prefix + key)
        if isinstance(value, dict):
            names += _field_names(value, prefix + key + ".")
    return names


def _cluster_detected() -> bool:
    """SLURM with several tasks, or a TPU VM that is one worker of several (or of several slices)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    workers = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in workers or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize_distributed(mode: str, coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    import jax

    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in explicit.values()):
        if any(v is None for v in explicit.values()):
            raise UsageError(
                f"explicit multi-host needs all of --coordinator_address, --num_processes and --process_id; found {explicit}"
            )
        jax.distributed.initialize(**explicit)
    elif mode == "on" or (mode == "auto" and _cluster_detected()):
        jax.distributed.initialize()


def body(fv: flags.FlagValues, args: list[str]) -> None:
    config = fv.config
    if config is None:
        raise UsageError("no config: pass --config=configs/FILE.py")
    workdir = fv.workdir or config.workdir
    if not workdir:
        raise UsageError("no workdir: pass --workdir=DIR (or set config.workdir)")
    initialize_distributed(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id)
    return run(config, workdir)


def run(config, workdir: str) -> int | None:
    """Validates `config`, then trains and/or evaluates into `workdir`, as config.mode says."""
    if config.mode == "compile":  # no accelerator: libtpu compiles for the named topology on this host
        from nxtp_jax.aot import check

        return check.run(config, workdir)
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


main = Command("python -m nxtp_jax.main", __doc__, define, body, log_level="info")
