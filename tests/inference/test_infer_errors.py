"""Per-image errors and one-line user errors of `python -m nxtp_jax.infer` and the Tagger API."""

import json
import types

import jax
import numpy as np
import pytest
from PIL import Image

from nxtp_jax import checkpoint
from nxtp_jax.cli.tag import tag_command
from nxtp_jax.errors import CheckpointError
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import random_images, tiny_recognizer


@pytest.fixture(scope="module")
def tiny(sp_model_path, tmp_path_factory):
    tok = Tokenizer(sp_model_path)
    model, params = tiny_recognizer(tok, delimiter_boost=3.0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(out, params, model.config, sp_model_path)
    return dict(ckpt=out, model=model, params=params, tok=tok)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two good PNGs around a file that is not an image."""
    d = tmp_path_factory.mktemp("images")
    good = []
    for i, arr in enumerate(random_images(2, 40, seed=3)):
        Image.fromarray(arr).save(d / f"good{i}.png")
        good.append(str(d / f"good{i}.png"))
    bad = d / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 4)
    return dict(good=good, bad=str(bad), mixed=[good[0], str(bad), good[1]])


_CAPTURE = [None]


@pytest.fixture(autouse=True)
def _capture(capsys):
    _CAPTURE[0] = capsys


def _run(*args):
    """nxtp-tag in this process: (exit status, stdout, stderr)."""
    _CAPTURE[0].readouterr()
    code = tag_command(list(map(str, args)))
    out, err = _CAPTURE[0].readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_predict_returns_an_error_in_place_of_an_unreadable_image(tiny, images):
    tagger = Tagger(tiny["model"], tiny["params"], tiny["tok"], batch_size=2)
    results = tagger.predict(images["mixed"], num_labels=3, errors="return")
    assert isinstance(results[1], ValueError) and images["bad"] in str(results[1])
    # The good images are tagged exactly as on their own.
    assert [results[0], results[2]] == tagger.predict(images["good"], num_labels=3)
    with pytest.raises(ValueError, match="bad.jpg"):
        tagger.predict(images["mixed"], num_labels=3)  # the default still raises


def test_non_finite_scores_are_an_error_never_a_nan_prob(tiny, images):
    nan_params = jax.tree.map(lambda x: x * np.nan, tiny["params"])
    tagger = Tagger(tiny["model"], nan_params, tiny["tok"], batch_size=2)
    results = tagger.predict(images["good"], num_labels=3, errors="return")
    assert all(isinstance(r, FloatingPointError) and "non-finite scores" in str(r) for r in results)


def test_tagger_load_refuses_nan_params_naming_them(tiny, tmp_path, sp_model_path):
    params = jax.tree.map(lambda x: x, tiny["params"])
    kernel = np.array(params["language_decoder"]["output"]["kernel"])
    kernel[0, 0] = np.nan
    params["language_decoder"]["output"]["kernel"] = kernel
    checkpoint.save(tmp_path / "nan", params, tiny["model"].config, sp_model_path)
    with pytest.raises(CheckpointError, match="param language_decoder/output/kernel holds non-finite values"):
        Tagger.load(tmp_path / "nan")


def test_tagger_load_refuses_integer_params(tiny, tmp_path, sp_model_path):
    params = jax.tree.map(lambda x: x, tiny["params"])
    params["language_decoder"]["norm"]["weight"] = np.ones_like(params["language_decoder"]["norm"]["weight"], np.int32)
    checkpoint.save(tmp_path / "int", params, tiny["model"].config, sp_model_path)
    with pytest.raises(CheckpointError, match=r"expected floating-point params, found language_decoder/norm/weight \(int32\)"):
        Tagger.load(tmp_path / "int")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda t, img: t.predict([img], num_labels=0), "expected num_labels >= 1"),
        (lambda t, img: t.predict([img], errors="ignore"), "expected errors='raise' or 'return'"),
        (lambda t, img: Tagger(t.model, t.params, t.tokenizer, batch_size=-1), "expected batch_size >= 1"),
        (lambda t, img: t.loss([img], ["star"]), "found the string 'star'; write \\['star'\\]"),
        (lambda t, img: t.loss([img], "star"), "found the string 'star'"),
    ],
)
def test_api_rejects_out_of_range_arguments_in_one_line(tiny, images, call, message):
    tagger = Tagger(tiny["model"], tiny["params"], tiny["tok"])
    with pytest.raises(ValueError, match=message) as info:
        call(tagger, images["good"][0])
    assert "\n" not in str(info.value)


def test_cli_tags_the_good_images_and_reports_the_bad_one(tiny, images, tmp_path):
    missing = str(tmp_path / "missing.png")
    res = _run(f"--ckpt={tiny['ckpt']}", "--num_labels=3", "--json", *images["mixed"], missing)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    out = json.loads(res.stdout)
    assert [o["image"] for o in out] == images["mixed"] + [missing]
    assert "labels" in out[0] and "labels" in out[2] and len(out[0]["labels"]) >= 1
    assert out[1].keys() == {"image", "error"} and out[1]["error"].startswith(images["bad"])
    assert out[3] == {"image": missing, "error": f"{missing}: image file not found"}
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {out[1]['error']}", f"error: {out[3]['error']}"]

    res = _run(f"--ckpt={tiny['ckpt']}", "--num_labels=3", images["bad"], images["good"][0])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stdout.startswith(f"image: {images['good'][0]}\ntop-3 predictions:\n| prob: ")
    assert "prob: nan" not in res.stdout


@pytest.mark.parametrize("flag", ["--num_labels=0", "--batch_size=-1"])
def test_cli_rejects_out_of_range_flags_as_usage_errors(tiny, images, flag):
    res = _run(f"--ckpt={tiny['ckpt']}", flag, images["good"][0])
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stdout == ""
    assert f"flag {flag}: " in res.stderr


def test_cli_damaged_checkpoints_are_one_line_errors(tiny, images, tmp_path):
    import shutil

    bad_json = tmp_path / "bad_json"
    shutil.copytree(tiny["ckpt"], bad_json)
    (bad_json / "config.json").write_text("{truncated")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny["ckpt"], truncated)
    for f in (truncated / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1:
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    for ckpt, why in ((bad_json, "found unreadable JSON"), (truncated, "cannot restore the params")):
        res = _run(f"--ckpt={ckpt}", images["good"][0])
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error: ") and why in res.stderr
        assert res.stdout == ""
