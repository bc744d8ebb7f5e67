"""Out-of-range settings are refused with one line each: the experiment config, and the checkpoint files a run reads."""

import pytest

from nxtp_jax import checkpoint
from nxtp_jax.errors import CheckpointError
from nxtp_jax.experiment import ConfigError, validate
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import demo_config as demo


def test_the_demo_config_is_valid(tmp_path):
    validate(demo(tmp_path), process_count=1, device_count=1)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("optim.lr", -1.0, "optim.lr: expected > 0, found -1.0"),
        ("optim.lr", 0.0, "optim.lr: expected > 0, found 0.0"),
        ("total_steps", -5, "total_steps: expected >= 0 (0 = derive from epochs), found -5"),
        ("batch_size", 0, "batch_size: expected > 0, found 0"),
        ("optim.warmup_steps", -1, "optim.warmup_steps: expected >= 0, found -1"),
        ("optim.warmup_ratio", 1.5, "optim.warmup_ratio: expected between 0 and 1, found 1.5"),
        ("optim.eps", 0.0, "optim.eps: expected > 0, found 0.0"),
        ("optim.weight_decay", -0.1, "optim.weight_decay: expected >= 0, found -0.1"),
        ("optim.grad_clip", -1.0, "optim.grad_clip: expected >= 0 (0 = none), found -1.0"),
        ("optim.b2", 1.0, "optim.b1, optim.b2: expected in [0, 1), found 0.9, 1.0"),
        ("epochs", -1, "epochs: expected >= 0, found -1"),
        ("eval.k", 0, "eval.k: expected >= 1 (labels per image), found 0"),
        ("eval.batch_size", -1, "eval.batch_size: expected >= 1, found -1"),
        ("model.checkpoint", "gs://bucket/init", "model.checkpoint: 'gs://bucket/init' is given but model.init is 'scratch', "
         "which would ignore it; set --config.model.init=checkpoint to start from it, or drop model.checkpoint"),
    ],
)
def test_out_of_range_settings_are_refused_in_one_line(tmp_path, field, value, message):
    with pytest.raises(ConfigError) as info:
        validate(demo(tmp_path, **{field: value}), process_count=1, device_count=1)
    assert str(info.value) == f"invalid config: {message}"


def test_bad_checkpoint_files_are_one_line_checkpoint_errors(tmp_path, sp_model_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="found unreadable JSON"):
        checkpoint.load_config(ckpt)
    (ckpt / "config.json").write_text('{"format": "nxtp_jax.checkpoint/1", "model": {"vision": {}}, "tokenizer": "t"}')
    with pytest.raises(CheckpointError, match="its 'model' entry is not a model config"):
        checkpoint.load_config(ckpt)
    (ckpt / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="found a file sentencepiece cannot read"):
        Tokenizer(ckpt / "tokenizer.model")
