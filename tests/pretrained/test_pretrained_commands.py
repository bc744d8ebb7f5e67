"""`--model=NAME|CARD.json|DIR` in the commands, run in process against the local Hub."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nxtp_jax import pretrained
from nxtp_jax.cli.tag import tag_command
from nxtp_jax.inference.tagger import Tagger
from tiny_models import random_images


def test_nxtp_tag_model_card_tags_as_from_pretrained_and_prints_the_licence(hub, card, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(random_images(1, 16, seed=5)[0]).save(image)
    assert tag_command([f"--model={card}", "--json", "--num_labels=5", str(image)]) == 0
    out, err = capsys.readouterr()
    found = json.loads(out)[0]["labels"]
    assert "tiny: licence: CC-BY-NC 4.0 (test release)" in err
    expected = Tagger.from_pretrained(card).predict([str(image)], num_labels=5)[0]
    assert [x["label"] for x in found] == [label for label, _ in expected] and found
    np.testing.assert_allclose([x["prob"] for x in found], [p for _, p in expected], atol=1e-6)
    # --ckpt takes the converted directory (the DIR form) and gives the same labels.
    assert tag_command([f"--ckpt={pretrained.resolve(card)}", "--json", "--num_labels=5", str(image)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["labels"] == found


def test_nxtp_tag_gated_llama_is_one_error_line(hub, card, tmp_path, capsys):
    hub.gated.add("meta-llama/Llama-2-7b-hf")
    image = tmp_path / "photo.png"
    Image.fromarray(random_images(1, 16)[0]).save(image)
    assert tag_command([f"--model={card}", str(image)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: tokenizer: meta-llama/Llama-2-7b-hf answered 401: it is gated; accept its licence at "
        "https://huggingface.co/meta-llama/Llama-2-7b-hf , then run `huggingface-cli login` (or set HF_TOKEN) or pass "
        "local copies with --llama_dir DIR and --tokenizer FILE"
    ]


class _Stop(Exception):
    pass


def test_eval_config_ckpt_takes_a_released_models_card(hub, card, tmp_path, monkeypatch):
    from nxtp_jax.evaluation import job
    from tiny_models import demo_config

    seen = []

    def stop(ckpt):  # the first use of the checkpoint in job.evaluate: record what it was given
        seen.append(ckpt)
        raise _Stop

    monkeypatch.setattr(job, "checkpoint_step", stop)
    config = demo_config(tmp_path / "data")
    config.eval.ckpt = str(card)
    with pytest.raises(_Stop):
        job.evaluate(config, tmp_path / "work")
    assert seen == [str(tmp_path / "nxtp" / "tiny")]


def test_nxtp_convert_model_writes_the_released_model_where_asked(hub, card, tmp_path):
    from nxtp_jax import checkpoint
    from nxtp_jax.cli.convert import convert_command

    out = tmp_path / "mine" / "g3m-copy"
    assert convert_command([f"--model={card}", f"--out={out}"]) == 0
    meta = checkpoint.read_meta(out)
    assert meta["release"]["name"] == "tiny" and meta["provenance"]["dtype"] == "float32"
    assert not (tmp_path / "nxtp").exists()  # written where asked, not into the cache
    images = random_images(1, 16, seed=4)
    assert Tagger.load(out).predict(images, num_labels=5) == Tagger.from_pretrained(card).predict(images, num_labels=5)


def test_nxtp_convert_model_refuses_file_inputs_beside_it_and_asks_for_them_without(card, tmp_path, capsys):
    from nxtp_jax.cli.convert import convert_command

    assert convert_command([f"--model={card}", "--clip=ViT-L-14.pt", f"--out={tmp_path / 'x'}"]) == 2
    assert "error: --model names every input; drop --clip" in capsys.readouterr().err
    assert convert_command([f"--out={tmp_path / 'x'}", "--llama_dir=llama"]) == 2
    assert "error: expected --model, or the files: missing --clip, --tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("module, name, required", [
    ("tag", "tag_command", []), ("serve", "serve_command", []), ("export", "export_command", ["--out=x"]),
])
def test_model_is_the_ckpt_flag_in_every_command_that_loads_one(module, name, required):
    import importlib

    command = getattr(importlib.import_module(f"nxtp_jax.cli.{module}"), name)
    argv = [command.prog, "--model=g3m", "--llama_dir=llama", "--tokenizer=tok.model", *required]
    fv = command.flag_values(argv[1:])
    fv(argv)
    assert (fv.ckpt, fv.llama_dir, fv.tokenizer) == ("g3m", "llama", "tok.model")
