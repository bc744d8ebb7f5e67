"""The released nxtp checkpoint (e.g. `ckpt_epoch_03_iter_0021360.pth`).

A torch pickle `{"epoch", "global_step", "model", "optimizer", "scheduler"}` whose "model"
holds only the params that were trained (config_g3m's optim_filter), DDP-prefixed:
`module.vision_encoder.transformer.resblocks.{18..23}.*`, `module.vision_encoder.ln_post.*`,
`module.vision_encoder.proj.weight` [D, W], `module.language_decoder.tok_embeddings.weight`
[V + 2, D], `module.language_decoder.layers.{0..5}.*`, `...norm.weight`, `...output.weight`
[V + 2, D]. A run at another input size also trained conv1, class_embedding,
positional_embedding and ln_pre, so every encoder param is accepted; keys without the
`module.` prefix are accepted too. A key that maps to no param is an error.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

from nxtp_jax.models.config import ModelConfig
from nxtp_jax.weights.clip import vision_rules
from nxtp_jax.weights.llama import meta_table
from nxtp_jax.weights.sources import StateDictSource, load_torch
from nxtp_jax.weights.tables import Rule, Table, WeightImportError, identity, transpose

VISION = "vision_encoder."
DECODER = "language_decoder."


def open_nxtp_checkpoint(path: str | os.PathLike) -> tuple[StateDictSource, dict[str, Any]]:
    """The checkpoint's "model" params (prefix `module.` stripped) and its epoch / global_step."""
    ckpt = load_torch(path, "a released nxtp checkpoint (e.g. ckpt_epoch_03_iter_0021360.pth)")
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise WeightImportError(
            f"nxtp: expected {path} to be a dict with a 'model' state dict (as nxtp's save_checkpoint writes), found {found}"
        )
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    info = {k: ckpt[k] for k in ("epoch", "global_step") if isinstance(ckpt.get(k), int)}
    return StateDictSource("nxtp", state, [str(path)]), info


def decoder_layers(source: StateDictSource) -> int:
    """The number of decoder blocks the checkpoint trained (1 + the highest block index)."""
    found = [int(m.group(1)) for k in source.keys() if (m := re.match(r"language_decoder\.layers\.(\d+)\.", k))]
    if not found:
        raise WeightImportError(
            f"nxtp: expected decoder blocks (language_decoder.layers.*) in {source.where}, found none; pass --layers"
        )
    return max(found) + 1


def image_size(source: StateDictSource, patch: int) -> int | None:
    """The input size the checkpoint's positional embedding was trained for, if it holds one."""
    key = VISION + "positional_embedding"
    if key not in source.keys():
        return None
    return round(math.sqrt(source.shape(key)[0] - 1)) * patch


def nxtp_table(config: ModelConfig, n_source_layers: int) -> Table:
    """Every param the model could have trained, under the checkpoint's names."""
    dec = config.decoder
    vocab = dec.vocab_size
    table = Table(
        rules=vision_rules(config.vision, VISION)
        + [Rule(VISION + "proj.weight", "vision_encoder/proj/kernel", (dec.dim, config.vision.width), transpose)],
        drops={VISION + "logit_scale": "CLIP's logit scale (unused)"},
    )
    return table.extend(
        meta_table(dec, max(n_source_layers, dec.layers), prefix=DECODER, vocab_rows=vocab, embedding=identity, output=transpose)
    )
