"""The benchmarks package: one importable entry point per question, flags with underscores, and a small
data-loading run end to end (its table of rates against the decode ceiling)."""

import contextlib
import importlib
import io
import re

import pytest
from absl import flags

from benchmarks import data, train

ARGPARSE = ("cpu", "data", "serve", "evaluation")
ABSL = ("accelerator", "train")


@pytest.mark.parametrize("name", ARGPARSE)
def test_an_entry_point_prints_its_flags_with_underscores(name):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"benchmarks.{name}").main(["--help"])
    assert exit_.value.code == 0
    names = re.findall(r"--\w[\w-]*", out.getvalue())
    assert names and [n for n in names if "-" in n[2:]] == []


@pytest.mark.parametrize("name", ABSL)
def test_an_absl_entry_point_defines_flags_with_underscores(name):
    module = importlib.import_module(f"benchmarks.{name}")
    names = [f.name for f in flags.FLAGS.get_key_flags_for_module(module.__name__)]
    assert names and [n for n in names if "-" in n] == []
    assert callable(module.main)


def test_data_loading_measures_the_pipeline_against_the_decode_ceiling(capsys):
    data.main(["--num_images", "8", "--image_size", "32", "--batch_size", "4", "--batches", "2", "--workers", "0"])
    out = capsys.readouterr().out
    assert "cores of" in out  # the machine's name
    rows = dict(re.findall(r"^\| (build_train_iterator, 0 worker\(s\)|PIL decode[^|]*) \| (\d+) \|", out, re.M))
    assert len(rows) == 2 and all(int(rate) > 0 for rate in rows.values()), out
    assert re.search(r"\| \d+% of one core's ceiling \|", out)


def test_train_mfu_peak_is_the_named_chips_published_peak_with_its_source():
    """--chip takes the target's figure (v5e: 197 bf16 TFLOP/s, Cloud's v5e page), not this host's device."""
    assert train.peak_tflops(None, chip="v5litepod") == (197.0, "TPU v5e bf16 dense peak, https://cloud.google.com/tpu/docs/v5e")
    assert train.peak_tflops(None, chip="v5e", given=100.0) == (100.0, "given")
