"""Shared fixtures, and the markers every test gets from its path or from what it runs.

The environment lines run before any test module imports jax; subprocesses inherit them.
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the tests and their subprocesses: a rerun loads each
# executable instead of compiling it (tests/test_compilation_cache.py checks a hit computes
# the same bits). Every executable is cached, however quick its compilation.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax_compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import inspect  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from nxtp_jax import checkpoint  # noqa: E402
from nxtp_jax.prompts import CAPTION_TEMPLATES, OBJECT_TEMPLATES  # noqa: E402
from nxtp_jax.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from tiny_models import tiny_recognizer  # noqa: E402

# Markers by path (relative to tests/): whole folders or files, or single tests (FILE::NAME).
BY_PATH = {
    "serve": ("serve/",),
    "browser": ("serve/test_serve_page.py",),
    "export": ("export/",),
    # Over ~5 s each on 2 cores (measured with --durations; the figures are in the README).
    "slow": ("test_install.py",),
}
# A test starts a process when its code, a helper of its module or one of its fixtures does so.
SPAWNS = re.compile(r"\bsubprocess\.|\bPopen\b|\bmultiprocessing\b|sys\.executable")


def _starts_processes(item: pytest.Item) -> bool:
    if not isinstance(item, pytest.Function):
        return False
    module = item.module
    todo = [item.function] + [d[-1].func for d in item._fixtureinfo.name2fixturedefs.values() if _in_tests(d[-1].func)]
    seen = set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen or not inspect.isfunction(fn):
            continue
        seen.add(fn)
        source = inspect.getsource(fn)
        if SPAWNS.search(source):
            return True
        names = set(re.findall(r"\b[A-Za-z_]\w*\b", source))
        for home in (inspect.getmodule(fn), module):  # test code only: helpers of the tests, never the library
            todo += [f for f in (getattr(home, n, None) for n in names) if inspect.isfunction(f) and _in_tests(f)]
    return False


def _in_tests(fn) -> bool:
    source = inspect.getsourcefile(fn) if inspect.isfunction(fn) else None
    return source is not None and pathlib.Path(source).is_relative_to(ROOT / "tests")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = pathlib.Path(item.fspath).relative_to(ROOT / "tests").as_posix()
        test = f"{path}::{item.originalname}"
        for marker, prefixes in BY_PATH.items():
            if any(path.startswith(p) if p.endswith("/") else p in (path, test) for p in prefixes):
                item.add_marker(marker)
        if _starts_processes(item):
            item.add_marker("subprocess")


LABEL_WORDS = (
    "cloud", "sky", "logo", "dog", "cat", "red", "blue", "green", "circle", "square",
    "triangle", "tree", "car", "house", "bird", "water", "grass", "road", "person", "table",
)


def tiny_corpus() -> list[str]:
    """Templates, label lists and captions covering the words the tests use."""
    texts = list(OBJECT_TEMPLATES) + list(CAPTION_TEMPLATES)
    for i in range(len(LABEL_WORDS)):
        texts.append(", ".join(LABEL_WORDS[i:] + LABEL_WORDS[:i]))
    texts += [f"a {w} next to the {v}" for w, v in zip(LABEL_WORDS, reversed(LABEL_WORDS))]
    return texts


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny LLaMA-like sentencepiece model (vocab 400) trained on `tiny_corpus()`."""
    return train_sentencepiece(tiny_corpus(), tmp_path_factory.mktemp("spm") / "tiny.model", 400)


@pytest.fixture(scope="session")
def tiny_ckpt(sp_model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A checkpoint directory of a tiny random recognizer whose delimiter is boosted, so branches end early."""
    model, params = tiny_recognizer(Tokenizer(sp_model_path), delimiter_boost=3.0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(out, params, model.config, sp_model_path)
    return out
