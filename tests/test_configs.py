"""What every config file must satisfy: it loads by path and by package alike, imports no JAX, sets
only fields base.py declares, validates once its inputs exist, and locks; plus the paper's run length."""

import importlib
import pathlib
import pkgutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_dict, config_flags

import nxtp_jax.configs
from nxtp_jax import checkpoint, experiment
from nxtp_jax.cli.main import main
from nxtp_jax.configs import base, demo, g3m, g70m
from nxtp_jax.experiment import ConfigError, validate

REPO = pathlib.Path(__file__).parents[1]
NAMES = sorted(m.name for m in pkgutil.iter_modules(nxtp_jax.configs.__path__))
# Every config and every variant it offers.
CONFIGS = [(name, "") for name in NAMES] + [("demo", "tiny")]


def load(name: str, variant: str = "") -> config_dict.ConfigDict:
    module = importlib.import_module(f"nxtp_jax.configs.{name}")
    return module.get_config(variant) if variant else module.get_config()


def with_inputs(config: config_dict.ConfigDict, tmp_path: pathlib.Path) -> config_dict.ConfigDict:
    """The files a config points at but cannot ship: an init checkpoint and dataset folders."""
    if config.model.init == "checkpoint":
        (tmp_path / "init").mkdir(exist_ok=True)
        (tmp_path / "init" / "config.json").write_text("{}")
        config.model.checkpoint = str(tmp_path / "init")
    if not config.data.synthesize:
        for name in list(config.data.train) + [config.eval.dataset]:
            (tmp_path / "data" / config.data.registry[name]["root"]).mkdir(parents=True, exist_ok=True)
        config.data.root = str(tmp_path / "data")
    return config


def leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and key != "registry" else {prefix + key}
    return out


def test_the_package_holds_the_experiment_files():
    assert {"base", "demo", "g3m", "g70m"} <= set(NAMES)


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_a_config_file_loaded_by_path_equals_its_package_module(name, variant):
    """`--config=configs/NAME.py[:VARIANT]` from a checkout reads what the installed module returns."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    spec = f"{REPO / 'configs' / name}.py" + (f":{variant}" if variant else "")
    fv(["prog", f"--config={spec}"])
    assert fv.config.to_dict() == load(name, variant).to_dict()


def test_configs_import_no_jax():
    code = f"import sys\nfor n in {NAMES!r}: __import__('nxtp_jax.configs.' + n)\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_a_config_sets_only_fields_that_base_declares(name, variant):
    assert leaves(load(name, variant).to_dict()) == leaves(base.get_config().to_dict())


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_a_config_validates_once_its_inputs_exist(name, variant, tmp_path):
    config = with_inputs(load(name, variant), tmp_path)
    validate(config, process_count=1, device_count=8)
    assert config.model.name in experiment.ARCHITECTURES


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_a_locked_config_rejects_unknown_fields(name, variant):
    config = load(name, variant)
    config.lock()
    with pytest.raises(AttributeError):
        config.optim.learning_rate = 1e-4


def test_an_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        demo.get_config("huge")


def test_g3m_runs_the_papers_number_of_updates():
    # docs/method.md: batch 512, 3 epochs of G3M's ~3.6M pairs = 21,360 updates (our registry's lengths give 21,357).
    assert abs(experiment.total_steps(g3m.get_config()) - 21360) <= 5


def test_g70m_is_g3m_with_laion_added_to_the_training_data():
    a, b = g3m.get_config().to_dict(), g70m.get_config().to_dict()
    assert {k for k in a if a[k] != b[k]} == {"data"}
    assert {k for k in a["data"] if a["data"][k] != b["data"][k]} == {"train"}
    assert set(b["data"]["train"]) - set(a["data"]["train"]) == {"laion115m"}


def test_an_unknown_architecture_is_a_config_error():
    config = demo.get_config()
    config.model.name = "vit_gpt"
    with pytest.raises(ConfigError, match=r"model.name: expected one of \('nxtp',\), found 'vit_gpt'"):
        validate(config, process_count=1, device_count=1)


def test_validate_reports_every_problem_with_what_to_do(tmp_path):
    c = g3m.get_config()
    c.model.checkpoint = str(tmp_path / "missing")
    c.data.train = ("cc3m", "nope")
    c.mesh.data, c.mesh.fsdp = -1, 3  # 3 does not divide the 8 devices
    c.optim.schedule = "linear"
    c.embedding_rows = ("<|img|>",)
    with pytest.raises(ConfigError) as e:
        validate(c, process_count=1, device_count=8)
    message = str(e.value)
    assert checkpoint.CONVERT_COMMAND in message
    assert "'nope' is not in data.registry" in message
    assert "does not fit the 8 devices" in message
    assert "optim.schedule" in message and "embedding_rows" in message


def test_batch_must_split_over_devices_and_micro_batches():
    c = demo.get_config()
    c.batch_size = 48
    c.grad_accum_steps = 4
    with pytest.raises(ConfigError, match="batch_size 48"):
        validate(c, process_count=1, device_count=8)


def test_main_fails_fast_on_a_missing_init_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["--config=configs/g3m.py", f"--workdir={tmp_path / 'w'}"]) == 1
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and checkpoint.CONVERT_COMMAND in err
    assert not (tmp_path / "w").exists()


def test_config_overrides_on_the_command_line_are_typed(monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--config=configs/demo.py", "--config.optim.lr=3", "--config.total_steps=7", "--config.prompt_augmentation=true"]
    fv = main.flag_values(argv)
    fv(["prog", *argv])
    c = fv.config
    assert [(type(v), v) for v in (c.optim.lr, c.total_steps, c.prompt_augmentation)] == [(float, 3.0), (int, 7), (bool, True)]


def test_a_mistyped_override_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["--config=configs/demo.py", "--config.total_steps=1.5"]) == 2
    assert "total_steps" in capsys.readouterr().err
