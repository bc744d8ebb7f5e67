"""Hugging Face BERT `model.safetensors` -> `models.bert.BertMeanPool` params, without torch.

The file is read with `safetensors.numpy`; the key table maps every tensor of the encoder
and drops the pooler (mean pooling does not use it) and the `position_ids` buffer.
"""

from __future__ import annotations

import os
from typing import Any

from nxtp_jax.models.bert import BertConfig
from nxtp_jax.weights.sources import StateDictSource, require_file
from nxtp_jax.weights.tables import Rule, Table, apply_table, nest, transpose


def bert_table(cfg: BertConfig) -> Table:
    w, m = cfg.width, cfg.mlp_width
    norm = lambda src, dst: [Rule(f"{src}.weight", f"{dst}/scale", (w,)), Rule(f"{src}.bias", f"{dst}/bias", (w,))]
    dense = lambda src, dst, n_in, n_out: [
        Rule(f"{src}.weight", f"{dst}/kernel", (n_out, n_in), transpose),
        Rule(f"{src}.bias", f"{dst}/bias", (n_out,)),
    ]
    rules = [
        Rule("embeddings.word_embeddings.weight", "word_embeddings", (cfg.vocab_size, w)),
        Rule("embeddings.position_embeddings.weight", "position_embeddings", (cfg.max_positions, w)),
        Rule("embeddings.token_type_embeddings.weight", "token_type_embeddings", (cfg.type_vocab_size, w)),
        *norm("embeddings.LayerNorm", "embeddings_norm"),
    ]
    for i in range(cfg.layers):
        src, dst = f"encoder.layer.{i}.", f"layer_{i}/"
        for name in ("query", "key", "value"):
            rules += dense(f"{src}attention.self.{name}", dst + name, w, w)
        rules += dense(f"{src}attention.output.dense", dst + "attention_out", w, w)
        rules += norm(f"{src}attention.output.LayerNorm", dst + "attention_norm")
        rules += dense(f"{src}intermediate.dense", dst + "intermediate", w, m)
        rules += dense(f"{src}output.dense", dst + "output", m, w)
        rules += norm(f"{src}output.LayerNorm", dst + "output_norm")
    return Table(
        rules=rules,
        drops={"embeddings.position_ids": "a buffer of 0..max_positions-1 (positions are computed)"},
        drop_patterns=[(r"pooler\..+", "BERT's CLS pooler (the embedding is the mean over tokens)")],
    )


def load_bert(path: str | os.PathLike, cfg: BertConfig) -> dict[str, Any]:
    """The nested float32 params of `BertMeanPool(cfg)` from a Hugging Face BERT `model.safetensors`."""
    from safetensors.numpy import load_file

    path = require_file(path, "a BERT model.safetensors")
    flat, _ = apply_table(StateDictSource("bert", load_file(str(path)), [str(path)]), bert_table(cfg))
    return nest(flat)
