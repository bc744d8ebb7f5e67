"""`python -m nxtp_jax.main` in process: its flags, config overrides, usage errors (exit 2), user errors
(exit 1), and its logging (absl at INFO without orbax's and grain's per-save and per-read records)."""

import logging
import pathlib
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from nxtp_jax.cli import main as main_cli
from nxtp_jax.cli.command import _QuietLibraries

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def parse(*argv: str):
    """The parsed config of `python -m nxtp_jax.main ARGV` (no run)."""
    command = main_cli.main
    fv = command.flag_values(list(argv))
    fv(["main", *argv])
    return fv.config


def test_config_overrides_on_the_command_line_are_typed(monkeypatch):
    monkeypatch.chdir(REPO)
    c = parse("--config=configs/demo.py", "--config.optim.lr=3", "--config.total_steps=7", "--config.prompt_augmentation=true")
    assert [(type(v).__name__, v) for v in (c.optim.lr, c.total_steps, c.prompt_augmentation)] == [
        ("float", 3.0), ("int", 7), ("bool", True)]


def test_bad_config_overrides_are_one_usage_line_naming_the_closest_field(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cases = {
        "--config.total_steps=1.5": "error: flag --config.total_steps=1.5: ",
        "--config.optim.lrr=1": "error: --config.optim.lrr: the config has no field 'optim.lrr'; did you mean --config.optim.lr?",
        "--config.train.batch_size=0": "error: --config.train.batch_size: the config has no field 'train.batch_size'; "
                                       "did you mean --config.eval.batch_size?",
    }
    for override, line in cases.items():
        assert main_cli.main(["--config=configs/demo.py:tiny", override, "--workdir=unused"]) == 2, override
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(line), err


def test_a_missing_init_checkpoint_fails_before_the_workdir_is_made(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    assert main_cli.main(["--config=configs/g3m.py", f"--workdir={tmp_path / 'w'}"]) == 1
    err = capsys.readouterr().err  # every problem of the config, one per line
    assert err.startswith("error: invalid config:") and "Traceback" not in err
    assert "model.checkpoint" in err and "nxtp-convert" in err
    assert not (tmp_path / "w").exists()


def test_main_usage_errors_exit_two(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main_cli.main([]) == 2
    assert main_cli.main(["--config=configs/demo.py:tiny", "--workdirr=x"]) == 2
    assert main_cli.main(["--config=configs/demo.py:tiny", "--workdir=x", "extra"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: no config") and "Did you mean: workdir" in err[1] and "unexpected arguments ['extra']" in err[2]


def test_python_m_main_help_lists_its_flags_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "nxtp_jax.main", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    for flag in ("--config", "--workdir", "--distributed", "--coordinator_address", "--verbose"):
        assert flag in out.stdout, flag


def test_gs_paths_without_gcsfs_name_the_extra_in_one_line(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as where the gcs extra is not installed
    assert main_cli.main(["--config=configs/demo.py:tiny", "--workdir=gs://bucket/run"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: gs:// paths need gcsfs") and err[-1].endswith('run: pip install -e ".[gcs]"')
    assert not any("Traceback" in line for line in err)
