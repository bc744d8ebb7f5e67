"""The inference CLI end to end on a tiny checkpoint, and the Tagger it wraps."""

import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from nxtp_jax.cli.tag import tag_command
from nxtp_jax.inference.attention import attention_grid
from nxtp_jax.inference.tagger import Tagger
from tiny_models import random_images


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, arr in enumerate(random_images(2, 40, seed=3)):
        p = d / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def _run(*args):
    """nxtp-tag in this process: (exit status, stdout, stderr)."""
    capture = _CAPTURE[0]
    capture.readouterr()
    code = tag_command(list(map(str, args)))
    out, err = capture.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


_CAPTURE = [None]


@pytest.fixture(autouse=True)
def _capture(capsys):
    _CAPTURE[0] = capsys


def test_cli_json_matches_tagger(tiny_ckpt, image_paths):
    res = _run(f"--ckpt={tiny_ckpt}", "--num_labels=4", "--json", *image_paths)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    want = Tagger.load(tiny_ckpt).predict(image_paths, num_labels=4)
    assert [o["image"] for o in out] == image_paths
    for o, w in zip(out, want):
        assert [x["label"] for x in o["labels"]] == [label for label, _ in w]
        np.testing.assert_allclose([x["prob"] for x in o["labels"]], [p for _, p in w], rtol=1e-6)


def test_cli_text_and_attention_maps(tiny_ckpt, image_paths, tmp_path):
    res = _run(f"--ckpt={tiny_ckpt}", "--num_labels=3", f"--save_attention_maps={tmp_path}", image_paths[0])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[:2] == [f"image: {image_paths[0]}", "top-3 predictions:"]
    assert all(line.startswith("| prob: ") and " - " in line for line in lines[2:]) and 1 <= len(lines[2:]) <= 3
    pngs = sorted((tmp_path / "img0").glob("*.png"))
    assert len(pngs) == 2 * 4  # layers x heads of the tiny decoder


def test_cli_vocab_and_min_prob_match_tagger(tiny_ckpt, image_paths, tmp_path):
    vocab = ["red", "red circle", "sky", "cloud", "cat", "car"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    want = Tagger.load(tiny_ckpt).predict(image_paths, num_labels=4, vocab=vocab)
    scores = sorted(p for labels in want for _, p in labels)
    cut = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # halfway between two scores
    res = _run(f"--ckpt={tiny_ckpt}", "--num_labels=4", f"--vocab={path}", f"--min_prob={cut!r}", "--json", *image_paths)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for o, w in zip(out, want):
        assert [x["label"] for x in o["labels"]] == [label for label, p in w if p >= cut]
        assert all(x["label"] in vocab and x["prob"] >= cut for x in o["labels"])
    assert 0 < sum(len(o["labels"]) for o in out) < sum(map(len, want))

    bad = _run(f"--ckpt={tiny_ckpt}", "--min_prob=1.5", image_paths[0])
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == "error: expected min_prob in [0, 1], found 1.5"


def test_cli_missing_image(tiny_ckpt, tmp_path):
    res = _run(f"--ckpt={tiny_ckpt}", str(tmp_path / "nope.jpg"))
    assert res.returncode == 1 and "not found" in res.stderr


def test_nxtp_tag_console_script_and_module_print_the_same_json(tiny_ckpt, image_paths):
    args = [f"--ckpt={tiny_ckpt}", "--num_labels=2", "--json", image_paths[0]]
    script = subprocess.run([str(pathlib.Path(sys.executable).with_name("nxtp-tag")), *args], capture_output=True, text=True, timeout=600)
    module = subprocess.run([sys.executable, "-m", "nxtp_jax.infer", *args], capture_output=True, text=True, timeout=600)
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert json.loads(script.stdout) == json.loads(module.stdout) and json.loads(script.stdout)[0]["labels"]


def test_attention_maps_are_probabilities(tiny_ckpt, image_paths):
    tagger = Tagger.load(tiny_ckpt)
    maps = tagger.attention_maps(image_paths[0])
    n = tagger.model.config.vision.num_patches
    assert maps.shape == (2, 4, n, n)
    # Image tokens attend only to image tokens in the prefix (the bidirectional block).
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    grid = attention_grid(maps[0, 0])
    g = int(np.sqrt(n))
    assert grid.shape == (g * (g + 1), g * (g + 1), 3) and grid.dtype == np.uint8


def test_loss_is_token_mean_of_targets(tiny_ckpt, image_paths):
    tagger = Tagger.load(tiny_ckpt)
    a = tagger.loss(image_paths, [["cloud", "sky"], ["dog"]])
    b = tagger.loss(image_paths[:1], [["cloud", "sky"]])
    c = tagger.loss(image_paths[1:], [["dog"]])
    assert np.isfinite(a) and a > 0
    tok = tagger.tokenizer
    # Token mean over the whole batch: weighted by each sample's number of targets.
    from nxtp_jax import prompts

    counts = [int((prompts.object_batch(tok, [lb], max_text_len=400, template=prompts.OBJECT_TEMPLATES[0], rng=None).targets >= 0).sum())
              for lb in (["cloud", "sky"], ["dog"])]
    np.testing.assert_allclose(a, (b * counts[0] + c * counts[1]) / sum(counts), rtol=1e-5)
