"""`--ckpt` / `--model`: one name for a model in every command (NAME | CARD.json | DIR).

A checkpoint directory (local or gs://) is used as it is; a released model's name ("g3m",
"g70m") or a model card's path is downloaded, checked and converted on first use
(`nxtp_jax.pretrained.resolve`). `--llama_dir` / `--tokenizer` stand in for the gated LLaMA
files of the Hub at that first use.
"""

from __future__ import annotations

import pathlib

from absl import flags


def define(fv: flags.FlagValues, what: str = "Checkpoint directory (from nxtp-convert or training)") -> None:
    flags.DEFINE_string(
        "ckpt", None,
        f"{what}, or a released model by name (g3m, g70m) or model card .json: downloaded, checked and converted "
        "on first use into $NXTP_JAX_CACHE (default ~/.cache/nxtp_jax).",
        flag_values=fv, required=True,
    )
    flags.DEFINE_alias("model", "ckpt", flag_values=fv)
    define_llama_stand_ins(fv)


def define_llama_stand_ins(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "llama_dir", None, "A released model's first use: a local LLaMA-2 7B folder (Meta's params.json or Hugging Face's "
        "config.json) instead of the gated meta-llama/Llama-2-7b-hf.", flag_values=fv,
    )
    flags.DEFINE_string(
        "tokenizer", None, "A released model's first use: a local LLaMA-2 tokenizer.model instead of the gated Hub's.",
        flag_values=fv,
    )


def resolve(fv: flags.FlagValues) -> pathlib.Path:
    """The checkpoint directory `--ckpt` / `--model` names (a released model converted on first use)."""
    from nxtp_jax import pretrained

    return pretrained.resolve(fv.ckpt, llama_dir=fv.llama_dir, tokenizer=fv.tokenizer)
