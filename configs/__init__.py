"""The experiment configs, installed as `nxtp_jax.configs` (pyproject.toml maps this folder there).

Each file's `get_config()` returns an `ml_collections.ConfigDict`; files build on each other
by ordinary import (`from nxtp_jax.configs import base`). Configs import nothing from JAX.
From a checkout: `--config=configs/demo.py`; from an installed package, the same file by path:

    --config=$(python -c "import nxtp_jax.configs as c; print(c.__path__[0])")/demo.py
"""
