"""nxtp_jax: Object Recognition as Next Token Prediction, in JAX/Flax.

    from nxtp_jax import Tagger
"""

__version__ = "0.1.0"
__all__ = ["Tagger"]


def __getattr__(name):
    # Lazy, so that importing a light module (the tokenizer, the ranking) never pulls in JAX.
    if name == "Tagger":
        from nxtp_jax.tagger import Tagger

        return Tagger
    raise AttributeError(f"module 'nxtp_jax' has no attribute {name!r}")
