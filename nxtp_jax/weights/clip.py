"""OpenAI CLIP ViT: the vision config read off the shapes, and the key table to our encoder.

The nxtp checkpoint stores the same block names under `vision_encoder.` instead of
`visual.`, so both tables come from `vision_rules`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping

from nxtp_jax.models.config import VisionConfig
from nxtp_jax.weights.sources import TensorSource, StateDictSource, load_torch
from nxtp_jax.weights.tables import Rule, Table, WeightImportError, conv_kernel, transpose

TARGET = "vision_encoder/"
TEXT_TOWER = "CLIP text tower"


def block_rules(prefix: str, i: int, width: int) -> list[Rule]:
    """The rules of residual block `i` (`{prefix}transformer.resblocks.{i}.*`)."""
    src, dst, w = f"{prefix}transformer.resblocks.{i}.", f"{TARGET}transformer/resblocks_{i}/", width
    rules = []
    for ln in ("ln_1", "ln_2"):
        rules += [Rule(f"{src}{ln}.weight", f"{dst}{ln}/scale", (w,)), Rule(f"{src}{ln}.bias", f"{dst}{ln}/bias", (w,))]
    return rules + [
        Rule(src + "attn.in_proj_weight", dst + "attn/in_proj/kernel", (3 * w, w), transpose),
        Rule(src + "attn.in_proj_bias", dst + "attn/in_proj/bias", (3 * w,)),
        Rule(src + "attn.out_proj.weight", dst + "attn/out_proj/kernel", (w, w), transpose),
        Rule(src + "attn.out_proj.bias", dst + "attn/out_proj/bias", (w,)),
        Rule(src + "mlp.c_fc.weight", dst + "mlp/c_fc/kernel", (4 * w, w), transpose),
        Rule(src + "mlp.c_fc.bias", dst + "mlp/c_fc/bias", (4 * w,)),
        Rule(src + "mlp.c_proj.weight", dst + "mlp/c_proj/kernel", (w, 4 * w), transpose),
        Rule(src + "mlp.c_proj.bias", dst + "mlp/c_proj/bias", (w,)),
    ]


def vision_rules(cfg: VisionConfig, prefix: str, *, positional: bool = True) -> list[Rule]:
    """Every rule of the ViT except the projection (OpenAI's is dropped, ours is new)."""
    w, p = cfg.width, cfg.patch_size
    rules = [
        Rule(prefix + "conv1.weight", TARGET + "conv1/kernel", (w, 3, p, p), conv_kernel),
        Rule(prefix + "class_embedding", TARGET + "class_embedding", (w,)),
        Rule(prefix + "ln_pre.weight", TARGET + "ln_pre/scale", (w,)),
        Rule(prefix + "ln_pre.bias", TARGET + "ln_pre/bias", (w,)),
        Rule(prefix + "ln_post.weight", TARGET + "ln_post/scale", (w,)),
        Rule(prefix + "ln_post.bias", TARGET + "ln_post/bias", (w,)),
    ]
    if positional:
        rules.append(Rule(prefix + "positional_embedding", TARGET + "positional_embedding", (cfg.num_patches + 1, w)))
    for i in range(cfg.layers):
        rules += block_rules(prefix, i, w)
    return rules


def openai_clip_table(cfg: VisionConfig, archive_image_size: int) -> Table:
    """OpenAI's state dict -> our encoder; the text tower, `visual.proj` and metadata are dropped by rule."""
    resized = cfg.image_size != archive_image_size
    table = Table(
        rules=vision_rules(cfg, "visual.", positional=not resized),
        drops={
            "visual.proj": "CLIP's own projection (replaced by the new proj to the decoder width)",
            "token_embedding.weight": TEXT_TOWER,
            "positional_embedding": TEXT_TOWER,
            "ln_final.weight": TEXT_TOWER,
            "ln_final.bias": TEXT_TOWER,
            "text_projection": TEXT_TOWER,
            "logit_scale": "CLIP's logit scale (unused)",
            "input_resolution": "archive metadata",
            "context_length": "archive metadata",
            "vocab_size": "archive metadata",
        },
        drop_patterns=[(r"transformer\.resblocks\.\d+\..+", TEXT_TOWER)],
    )
    if resized:
        table.drops["visual.positional_embedding"] = (
            f"replaced by a fresh positional embedding for {cfg.image_size}px (the archive's is for {archive_image_size}px)"
        )
    return table


def infer_text_tower(source: TensorSource) -> dict[str, int]:
    """The `models.clip.TextTransformer` fields of an OpenAI CLIP archive's text tower, read off the shapes."""
    needed = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
    missing = [k for k in needed if k not in set(source.keys())]
    if missing:
        raise WeightImportError(
            f"clip: expected OpenAI CLIP text-tower weights {list(needed)} in {source.where}, missing "
            f"{missing}; pass an OpenAI CLIP checkpoint such as ViT-L-14.pt"
        )
    vocab_size, width = source.shape("token_embedding.weight")
    if width % 64:
        raise WeightImportError(f"clip: expected a text width that is a multiple of 64 (heads = width // 64), found {width}")
    blocks = sorted(
        int(m.group(1)) for k in source.keys() if (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", k))
    )
    if blocks != list(range(len(blocks))) or not blocks:
        raise WeightImportError(f"clip: expected text blocks numbered 0..n-1, found {blocks}")
    return dict(
        vocab_size=vocab_size,
        context_length=source.shape("positional_embedding")[0],
        width=width,
        layers=len(blocks),
        embed_dim=source.shape("text_projection")[1],
    )


def text_tower_table(vocab_size: int, context_length: int, width: int, layers: int, embed_dim: int) -> Table:
    """OpenAI's text-tower keys -> `text/...` (`models.clip.TextTransformer`); the image tower and metadata are dropped."""
    w = width
    rules = [
        Rule("token_embedding.weight", "text/token_embedding", (vocab_size, w)),
        Rule("positional_embedding", "text/positional_embedding", (context_length, w)),
        Rule("ln_final.weight", "text/ln_final/scale", (w,)),
        Rule("ln_final.bias", "text/ln_final/bias", (w,)),
        Rule("text_projection", "text/text_projection", (w, embed_dim)),
    ]
    for i in range(layers):
        # The blocks are the ViT's; only the target prefix differs.
        rules += [dataclasses.replace(r, target="text/" + r.target.removeprefix(TARGET)) for r in block_rules("", i, w)]
    return Table(
        rules=rules,
        drop_patterns=[
            (r"visual\..+", "the image tower"),
            (r"logit_scale|input_resolution|context_length|vocab_size", "CLIP's logit scale and archive metadata"),
        ],
    )


def open_openai_clip(path: str | os.PathLike) -> StateDictSource:
    """OpenAI's TorchScript archive (`ViT-L-14.pt`) or a plain state dict with the same keys."""
    state = load_torch(path, "an OpenAI CLIP archive (e.g. ViT-L-14.pt)", torchscript=True)
    if not isinstance(state, Mapping):
        raise WeightImportError(
            f"clip: expected {path} to hold a state dict (or be a TorchScript archive), found a {type(state).__name__}"
        )
    return StateDictSource("clip", state, [str(path)])


def infer_vision_config(source: TensorSource, image_size: int | None = None) -> tuple[VisionConfig, int]:
    """Width, layers, patch and resolution from the shapes; returns the config and the archive's resolution.

    `image_size` other than the archive's means a new positional embedding (as the original did).
    """
    keys = set(source.keys())
    if "visual.conv1.weight" not in keys or "visual.positional_embedding" not in keys:
        raise WeightImportError(
            f"clip: expected an OpenAI CLIP ViT state dict with visual.conv1.weight and visual.positional_embedding "
            f"in {source.where}, found neither (ResNet CLIPs and other layouts are not supported)"
        )
    width, channels, patch, patch_w = source.shape("visual.conv1.weight")
    if channels != 3 or patch != patch_w:
        raise WeightImportError(
            f"clip: visual.conv1.weight: expected shape [width, 3, patch, patch], found {source.shape('visual.conv1.weight')}"
        )
    if width % 64:
        raise WeightImportError(f"clip: expected a ViT width that is a multiple of 64 (heads = width // 64), found {width}")
    blocks = sorted(
        int(m.group(1)) for k in keys if (m := re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", k))
    )
    if blocks != list(range(len(blocks))) or not blocks:
        raise WeightImportError(f"clip: expected visual blocks numbered 0..n-1, found {blocks}")
    positions = source.shape("visual.positional_embedding")[0]
    grid = round(math.sqrt(positions - 1))
    if grid * grid + 1 != positions:
        raise WeightImportError(
            f"clip: visual.positional_embedding: expected (grid^2 + 1) rows, found {positions}"
        )
    archive_size = grid * patch
    size = archive_size if image_size is None else int(image_size)
    if size <= 0 or size % patch:
        raise WeightImportError(f"clip: expected an image size that is a positive multiple of the patch {patch}, found {size}")
    return VisionConfig(width=width, layers=len(blocks), patch_size=patch, image_size=size), archive_size
