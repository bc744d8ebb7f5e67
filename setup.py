"""The package list, which pyproject.toml cannot state: `nxtp_jax.configs` is the top-level configs/ folder
(so that `--config=configs/g3m.py` works from a checkout and an installed wheel ships the configs too)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["nxtp_jax*"]) + ["nxtp_jax.configs"], package_dir={"nxtp_jax.configs": "configs"})
