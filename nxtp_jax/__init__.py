"""nxtp_jax: Object Recognition as Next Token Prediction, in JAX/Flax."""

__version__ = "0.1.0"
