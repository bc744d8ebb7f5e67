"""The package as a user gets it: `pip install .` (not editable, no extras) into a fresh venv, used from
a folder outside the checkout. Slow (about a minute: pip, then the tiny demo end to end)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Packages of extras (onnx, savedmodel, convert, serve, eval, clip, tfds) that no --help may need.
EXTRA_MODULES = ("jax2onnx", "onnx", "onnxruntime", "tensorflow", "torch", "safetensors", "starlette", "uvicorn", "tokenizers", "clip")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A fresh venv with the working tree's files (a copy: no build/ left over from earlier builds) installed."""
    root = tmp_path_factory.mktemp("install")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / "src" / name)
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True)
    bin_dir = root / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "XLA_FLAGS"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", JAX_PLATFORMS="cpu")
    # --no-compile: byte-compiling every dependency took half the install; Python compiles what it imports.
    pip = [bin_dir / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    subprocess.run([*pip, root / "src"], env=env, cwd=root, check=True, timeout=900)
    (root / "elsewhere").mkdir()
    return bin_dir, env


def run(venv, *argv, timeout=300) -> subprocess.CompletedProcess:
    bin_dir, env = venv
    cwd = bin_dir.parents[1] / "elsewhere"
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_has_no_extras_and_its_version_is_the_metadatas(venv):
    code = (
        "import importlib.metadata, importlib.util, nxtp_jax\n"
        f"print([m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)])\n"
        "print(importlib.metadata.version('nxtp_jax') == nxtp_jax.__version__, nxtp_jax.__file__)"
    )
    out = run(venv, "python", "-c", code)
    assert out.returncode == 0, out.stderr
    extras, same_version = out.stdout.splitlines()
    assert extras == "[]"
    assert same_version.startswith("True ") and "site-packages" in same_version and str(REPO) not in same_version


@pytest.mark.parametrize("script", sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]))
def test_every_console_script_prints_its_flags_without_an_extra(venv, script):
    out = run(venv, script, "--help", timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert re.search(r"^  --(\[no\])?verbose:", out.stdout, re.M), out.stdout  # the command runner's flags


def test_main_prints_its_flags(venv):
    out = run(venv, "python", "-m", "nxtp_jax.main", "--help", timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr, out.stderr
    assert "--config" in out.stdout and "--workdir" in out.stdout


def test_the_tiny_demo_trains_and_evaluates_from_the_installed_configs(venv):
    configs = run(venv, "python", "-c", "import nxtp_jax.configs as c; print(c.__path__[0])").stdout.strip()
    assert "site-packages" in configs
    out = run(venv, "python", "-m", "nxtp_jax.main", f"--config={configs}/demo.py:tiny", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval shapes_val (top-3" in out.stderr + out.stdout
    workdir = venv[0].parents[1] / "elsewhere" / "workdir" / "demo_tiny"
    assert (workdir / "checkpoints" / "40").is_dir()
