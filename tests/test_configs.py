"""The config files: they load, lock, validate, and hold the paper's recipe."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nxtp_jax import experiment
from nxtp_jax.experiment import ConfigError, load_config_module, validate

REPO = pathlib.Path(__file__).parents[1]
CONFIGS = REPO / "configs"


def get(name: str, variant: str | None = None):
    module = load_config_module(CONFIGS / name, name)
    return module.get_config() if variant is None else module.get_config(variant)


def fake_init_checkpoint(tmp_path) -> str:
    ckpt = tmp_path / "init"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return str(ckpt)


def with_data(config, tmp_path):
    for name in list(config.data.train) + [config.eval.dataset]:
        (tmp_path / "data" / config.data.registry[name]["root"]).mkdir(parents=True, exist_ok=True)
    config.data.root = str(tmp_path / "data")
    return config


@pytest.mark.parametrize("name", ["base.py", "g3m.py", "g70m.py"])
def test_paper_configs_validate_once_their_inputs_exist(name, tmp_path):
    config = with_data(get(name), tmp_path)
    config.model.checkpoint = fake_init_checkpoint(tmp_path)
    validate(config, process_count=4, device_count=32)


def test_g3m_is_the_papers_recipe():
    c = get("g3m.py")
    assert c.data.train == ("cc3m", "sbu", "coco")
    assert (c.batch_size, c.grad_accum_steps, c.epochs, c.max_seq_len) == (512, 1, 3, 512)
    o = c.optim
    assert (o.lr, o.lr_min, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (1e-5, 0.0, 0.9, 0.98, 1e-6, 0.1, 0.0)
    assert (o.warmup_ratio, o.warmup_steps, o.schedule) == (0.2, 2000, "original")
    assert (c.model.vision.width, c.model.vision.layers, c.model.vision.patch_size, c.model.vision.image_size) == (1024, 24, 14, 224)
    assert (c.model.decoder.dim, c.model.decoder.layers, c.model.decoder.n_heads) == (4096, 6, 32)
    assert c.embedding_rows == ("<|image|>",)
    assert (c.weight_loss_obj, c.weight_loss_cap, c.prompt_augmentation) == (1.0, 0.0, True)
    # 2,698,118 + 828,816 + 118,287 pairs at batch 512, 3 epochs; warmup is the 2000-step minimum.
    assert experiment.total_steps(c) == 3 * (3645221 // 512) == 21357
    assert experiment.warmup_steps(c) == 2000
    assert experiment.text_length(c) == 512 - 256
    assert (c.eval.k, c.eval.strategy, c.eval.ranking, c.eval.embedder) == (10, "one_shot", "prob", "minilm")


def test_g70m_adds_laion():
    assert get("g70m.py").data.train == ("laion115m", "cc3m", "sbu", "coco")


def test_demo_validates_without_data_on_disk():
    c = get("demo.py")
    validate(c, process_count=1, device_count=1)
    assert c.model.init == "scratch" and c.data.synthesize == "shapes"
    assert experiment.num_image_tokens(c) == 64
    validate(get("demo.py", "tiny"), process_count=1, device_count=8)
    with pytest.raises(ValueError, match="variant"):
        get("demo.py", "huge")


def test_locked_config_rejects_unknown_fields():
    c = get("base.py")
    c.lock()
    with pytest.raises(AttributeError):
        c.optim.learning_rate = 1e-4


def test_validate_reports_every_problem_with_what_to_do(tmp_path):
    c = get("g3m.py")
    c.model.checkpoint = str(tmp_path / "missing")
    c.data.train = ("cc3m", "nope")
    c.mesh.fsdp = 3
    c.optim.schedule = "linear"
    c.embedding_rows = ("<|img|>",)
    with pytest.raises(ConfigError) as e:
        validate(c, process_count=1, device_count=8)
    message = str(e.value)
    assert "convert/from_torch.py" in message and "llama" in message.lower()
    assert "'nope' is not in data.registry" in message
    assert "does not fit the 8 devices" in message
    assert "optim.schedule" in message and "embedding_rows" in message


def test_batch_must_split_over_devices_and_micro_batches():
    c = get("demo.py")
    c.batch_size = 48
    c.grad_accum_steps = 4
    with pytest.raises(ConfigError, match="batch_size 48"):
        validate(c, process_count=1, device_count=8)
