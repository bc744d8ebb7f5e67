"""TPU names as users type them -> libtpu's topology arguments (no libtpu needed), and the hint when libtpu is missing."""

import importlib.util

import pytest

from nxtp_jax.aot import check, topologies
from nxtp_jax.cli import main as main_cli


@pytest.mark.parametrize(
    "name, libtpu_name, chips, host",
    [
        ("v4-8", "v4:2x2x1", 4, (2, 2, 1)),  # v4 and v5p names count TensorCores, two per chip
        ("v4-32", "v4:2x2x4", 16, (2, 2, 1)),
        ("v5p-8", "v5:2x2x1", 4, (2, 2, 1)),
        ("v5p-64", "v5:2x4x4", 32, (2, 2, 1)),
        ("v5e-1", "v5e:1x1", 1, (1, 1, 1)),
        ("v5e-4", "v5e:2x2", 4, (2, 2, 1)),
        ("v5e-16", "v5e:4x4", 16, (2, 2, 1)),
        ("v5litepod-16", "v5e:4x4", 16, (2, 2, 1)),
        ("v6e-8", "v6e:2x4", 8, (2, 4, 1)),
        ("v5e:4x4", "v5e:4x4", 16, (2, 2, 1)),
        ("v4:2x2x1", "v4:2x2x1", 4, (2, 2, 1)),
    ],
)
def test_names_map_to_libtpu_topologies(name, libtpu_name, chips, host):
    t = topologies.parse(name)
    assert (t.libtpu_name, t.num_chips) == (libtpu_name, chips)
    kwargs = t.libtpu_kwargs()
    assert kwargs["topology_name"] == libtpu_name and kwargs["chips_per_host_bounds"] == host
    # Without "megacore" libtpu makes each v4/v5p core a device (v4:2x2x1 would give 8).
    assert kwargs["chip_config_name"] == ("megacore" if name.startswith(("v4", "v5p")) else "default")


@pytest.mark.parametrize("name", ["v4-6", "v5e-3", "v7-8", "v5e:2x2x2", "tpu", "v5p-7"])
def test_unknown_names_are_one_line_errors(name):
    with pytest.raises(ValueError, match=r"^compile.topology"):
        topologies.parse(name)


def test_without_libtpu_the_command_is_one_line_naming_the_install_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    argv = ["--config=configs/demo.py:tiny", "--config.mode=compile", f"--workdir={tmp_path}"]
    assert main_cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: compiling for a TPU needs libtpu, which is not installed: pip install -e ".[tpu]"']
