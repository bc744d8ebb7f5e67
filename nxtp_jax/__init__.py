"""nxtp_jax: Object Recognition as Next Token Prediction, in JAX/Flax.

    from nxtp_jax import Tagger, SemanticFScore
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"
__all__ = ["SemanticFScore", "Tagger"]

_PUBLIC = {"Tagger": "nxtp_jax.inference.tagger", "SemanticFScore": "nxtp_jax.evaluation.metrics"}

# Module paths of 0.1, before the subsystems became packages; old imports keep working.
_MOVED = {
    "nxtp_jax.mask": "nxtp_jax.models.mask",
    "nxtp_jax.sampling": "nxtp_jax.inference.sampling",
    "nxtp_jax.decoding": "nxtp_jax.inference.decoding",
    "nxtp_jax.ranking": "nxtp_jax.inference.ranking",
    "nxtp_jax.tagger": "nxtp_jax.inference.tagger",
    "nxtp_jax.formatting": "nxtp_jax.inference.formatting",
    "nxtp_jax.train": "nxtp_jax.training.loop",
    "nxtp_jax.train_state": "nxtp_jax.training.step",
    "nxtp_jax.train_inputs": "nxtp_jax.training.inputs",
    "nxtp_jax.train_log": "nxtp_jax.training.log",
    "nxtp_jax.optim": "nxtp_jax.training.optim",
    "nxtp_jax.preemption": "nxtp_jax.training.preemption",
    "nxtp_jax.evaluate": "nxtp_jax.evaluation.job",
    "nxtp_jax.metrics": "nxtp_jax.evaluation.metrics",
    "nxtp_jax.embedders": "nxtp_jax.evaluation.embedders",
    "nxtp_jax.clip_rerank": "nxtp_jax.evaluation.clip_rerank",
    "nxtp_jax.baseline": "nxtp_jax.evaluation.baseline",
    "nxtp_jax.eval_inputs": "nxtp_jax.data.eval_inputs",
    "nxtp_jax.imagenet": "nxtp_jax.data.imagenet",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new home (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed at its new home


sys.meta_path.append(_MovedModules())


def __getattr__(name):
    # Lazy, so that importing a light module (the tokenizer, the ranking) never pulls in JAX.
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nxtp_jax' has no attribute {name!r}")
