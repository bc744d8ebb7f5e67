"""Property tests over mutated tar shards and image bytes (the cases of scripts/fuzz_data.py).

The checker, the training stream's shard reading and `preprocess` always finish and end in a
documented outcome; a run in a fresh process stays under an address-space cap.
"""

import pathlib
import re
import subprocess
import sys

from hypothesis import HealthCheck, given, settings

from scripts import fuzz_data as fuzz

ROOT = pathlib.Path(__file__).resolve().parents[2]

CASES = settings(suppress_health_check=[HealthCheck.too_slow])  # examples: the profile (tests/conftest.py)
TIMEOUT = 60  # seconds a case may run before it counts as a hang (cases take milliseconds)


@CASES
@given(fuzz.tar_cases())
def test_checker_and_stream_finish_on_mutated_shards_with_documented_outcomes(data):
    outcome, trace = fuzz.run_case("tar", data, TIMEOUT)
    assert not fuzz.is_finding(outcome), trace or outcome


@CASES
@given(fuzz.image_cases())
def test_preprocess_finishes_on_mutated_images_with_image_error_or_pixels(data):
    outcome, trace = fuzz.run_case("image", data, TIMEOUT)
    assert not fuzz.is_finding(outcome), trace or outcome


def test_fuzz_script_run_stays_under_a_memory_cap():
    cap_mb = 3072
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.fuzz_data", "--cases", "100", "--seed", "1", "--max_memory_mb", str(cap_mb)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"cases=(\d+) hangs=(\d+) undocumented=(\d+) peak_rss_mb=(\d+)", proc.stdout)
    assert summary, proc.stdout
    cases, hangs, undocumented, peak = map(int, summary.groups())
    assert (cases, hangs, undocumented) == (100, 0, 0) and peak < cap_mb


def test_the_reported_peak_is_the_scripts_own_not_its_parents():
    """getrusage's ru_maxrss survives exec: a child of a 1 GiB parent would report over 1 GiB."""
    parent = bytearray(1 << 30)  # zero-filled on allocation: resident
    child = subprocess.run(
        [sys.executable, "-c", "from scripts.fuzz_data import peak_rss_mb; print(peak_rss_mb())"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    del parent
    assert 0 < float(child.stdout) < 1024
