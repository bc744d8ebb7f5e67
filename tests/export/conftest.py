"""Export tests: collected only in the export environment, which `.ci/export_env.sh test` makes and runs.

The export environment has nxtp_jax with jax2onnx, onnx, onnxruntime, tensorflow-cpu and torch;
NXTP_ORT_PYTHON names the python of a second environment with only onnxruntime, numpy, pillow
and sentencepiece, in which the ONNX runner must work. Without NXTP_ORT_PYTHON (the main
environment's test run) this directory is not collected; with it, a missing package is an error.
"""

import os
import shutil
import subprocess
import sys

import pytest

SETUP = "create both environments and run these tests with `bash .ci/export_env.sh test`"
REQUIRED = ("jax2onnx", "onnx", "onnxruntime", "tensorflow", "torch")

collect_ignore_glob = [] if os.environ.get("NXTP_ORT_PYTHON") else ["*.py"]


def pytest_configure(config):
    if collect_ignore_glob:
        return
    missing = []
    for module in REQUIRED:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise pytest.UsageError(f"tests/export need {', '.join(missing)}, not installed in {sys.prefix}; {SETUP}")


@pytest.fixture(scope="session")
def ort_python() -> str:
    """The runner-only environment's python, checked to have no JAX, flax, torch or TensorFlow."""
    python = os.environ["NXTP_ORT_PYTHON"]
    if not shutil.which(python):
        raise RuntimeError(f"expected NXTP_ORT_PYTHON to name the runner environment's python, found {python!r}; {SETUP}")
    probe = "import importlib.util as u; print([m for m in ('jax', 'flax', 'torch', 'tensorflow') if u.find_spec(m)])"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    if found != "[]":
        raise RuntimeError(f"expected {python} to have no jax, flax, torch or tensorflow, found {found}; {SETUP}")
    return python
