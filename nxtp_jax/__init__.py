"""nxtp_jax: Object Recognition as Next Token Prediction, in JAX/Flax.

    from nxtp_jax import Tagger, SemanticFScore
"""

import importlib

__version__ = "0.2.0"
__all__ = ["SemanticFScore", "Tagger"]

_PUBLIC = {"Tagger": "nxtp_jax.inference.tagger", "SemanticFScore": "nxtp_jax.evaluation.metrics"}


def __getattr__(name):
    # Lazy, so that importing a light module (the tokenizer, the ranking) never pulls in JAX.
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nxtp_jax' has no attribute {name!r}")
