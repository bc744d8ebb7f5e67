"""Importers of PyTorch weights: OpenAI CLIP, LLaMA-2 (Meta and HF layouts), the released nxtp checkpoint.

Every source key is consumed by a table rule or dropped by a named rule; shapes are
checked before any tensor is read. `convert` merges the sources into our param tree and
`save` writes a self-describing checkpoint directory (see `nxtp_jax.checkpoint`).
"""

from nxtp_jax.weights.convert import Conversion, convert, format_report, save
from nxtp_jax.weights.tables import WeightImportError

__all__ = ["Conversion", "WeightImportError", "convert", "format_report", "save"]
