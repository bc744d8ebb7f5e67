"""PyTorch weights -> a self-describing nxtp_jax checkpoint directory.

Sources, in order of precedence (a later one never overrides an earlier one):
1. the released nxtp checkpoint (`nxtp_ckpt`, optional): the trained params;
2. OpenAI's CLIP archive: the rest of the encoder;
3. LLaMA-2 (Meta or HF layout): the rest of the decoder, truncated to `layers` blocks;
4. fresh seeded init: the new `proj`, the special-token rows, a resized positional embedding.
The result is checked against the model's own param tree: every param given exactly once,
with its shape.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nxtp_jax import checkpoint
from nxtp_jax.choices import DTYPES
from nxtp_jax.models.config import ModelConfig, SpecialTokens
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.tokenizer import Tokenizer
from nxtp_jax.weights import clip, llama, nxtp, specials
from nxtp_jax.weights.tables import SourceReport, WeightImportError, apply_table, nest



@dataclasses.dataclass
class Conversion:
    """Imported params (nested dict of numpy arrays, Flax layout), their config and where each came from."""

    params: dict[str, Any]
    config: ModelConfig
    sources: list[SourceReport]
    origin: dict[str, str]  # Flax path -> source name ("nxtp", "clip", "llama", "fresh")
    fresh: dict[str, str]  # Flax path -> how it (or its new rows) was initialised
    info: dict[str, Any]  # seed, dtype, nxtp epoch / global_step

    def provenance(self) -> dict[str, Any]:
        """JSON-able record for the checkpoint's config.json."""
        return {
            "sources": {
                r.name: {"files": r.files, "kept": len(r.kept), "dropped": r.drop_counts()} for r in self.sources
            },
            "origin": dict(sorted(self.origin.items())),
            "fresh": dict(sorted(self.fresh.items())),
            **self.info,
        }

    def report(self) -> str:
        return format_report(self)


def _fresh_normal(seed: int, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return (std * rng.standard_normal(shape)).astype(np.float32)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The model's own param tree, without allocating it."""
    flat = jax.tree_util.tree_flatten_with_path(checkpoint.abstract_params(Recognizer(config)))[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert(
    *,
    clip_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    llama_dir: str | os.PathLike | None = None,
    llama_hf_dir: str | os.PathLike | None = None,
    nxtp_ckpt: str | os.PathLike | None = None,
    layers: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> Conversion:
    """Imports and merges the sources (see the module docstring) into our param tree."""
    if (llama_dir is None) == (llama_hf_dir is None):
        raise ValueError("expected exactly one of llama_dir (Meta layout) and llama_hf_dir (HF layout), "
                         f"found {'both' if llama_dir else 'neither'}")
    if dtype not in DTYPES:
        raise ValueError(f"expected dtype in {DTYPES}, found {dtype!r}")

    tok = Tokenizer(tokenizer_path)
    special = SpecialTokens(image=tok.image_id, empty=tok.empty_id)
    clip_src = clip.open_openai_clip(clip_path)
    if llama_dir is not None:
        header, llama_src = llama.read_meta_params(llama_dir), llama.open_meta_weights(llama_dir)
    else:
        header, llama_src = llama.read_hf_config(llama_hf_dir), llama.open_hf_weights(llama_hf_dir)
    nxtp_src, info = (None, {})
    if nxtp_ckpt is not None:
        nxtp_src, meta = nxtp.open_nxtp_checkpoint(nxtp_ckpt)
        info = {f"nxtp_{k}": v for k, v in meta.items()}
    if layers is None:
        if nxtp_src is None:
            raise ValueError("expected --layers (how many LLaMA blocks to keep, 6 in the paper), found none")
        layers = nxtp.decoder_layers(nxtp_src)

    vision, archive_size = clip.infer_vision_config(clip_src, image_size)
    if image_size is None and nxtp_src is not None:
        # A checkpoint trained at another input size carries its own positional embedding.
        vision = dataclasses.replace(vision, image_size=nxtp.image_size(nxtp_src, vision.patch_size) or vision.image_size)
    decoder = header.decoder_config(layers, tok.num_base, n_special=2)
    config = ModelConfig(vision=vision, decoder=decoder, special_tokens=special)

    flat: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    reports: list[SourceReport] = []

    def take(params: dict[str, np.ndarray], report: SourceReport) -> None:
        flat.update(params)
        origin.update({k: report.name for k in params})
        reports.append(report)

    if nxtp_src is not None:
        take(*apply_table(nxtp_src, nxtp.nxtp_table(config, header.n_layers), require_all=False))
    superseded = dict(origin)
    take(*apply_table(clip_src, clip.openai_clip_table(vision, archive_size), superseded=superseded))

    table = llama.llama_table(decoder, header.n_layers, hf=llama_dir is None, special=special, seed=seed)
    take(*apply_table(llama_src, table, superseded=superseded))

    fresh: dict[str, str] = {}
    if origin.get("language_decoder/tok_embeddings/embedding") == "llama":
        fresh.update({k: v for k, v in specials.describe(special, decoder.dim).items() if origin.get(k) == "llama"})
    std = vision.width**-0.5
    for path, shape in (
        ("vision_encoder/proj/kernel", (vision.width, decoder.dim)),
        ("vision_encoder/positional_embedding", (vision.num_patches + 1, vision.width)),
    ):
        if path not in flat:
            flat[path] = _fresh_normal(seed, path, shape, std)
            origin[path] = "fresh"
            fresh[path] = f"N(0, {vision.width}^-0.5)"

    expected = _expected_shapes(config)
    missing, extra = sorted(expected.keys() - flat.keys()), sorted(flat.keys() - expected.keys())
    wrong = [f"{k}: {flat[k].shape} vs {expected[k]}" for k in sorted(expected.keys() & flat.keys()) if flat[k].shape != expected[k]]
    if missing or extra or wrong:
        raise WeightImportError(f"imported params do not match the model: missing {missing}, unexpected {extra}, shapes {wrong}")

    np_dtype = jnp.dtype(dtype)
    # Pop as we cast, so a source array is freed once its cast copy exists.
    params = nest({k: np.ascontiguousarray(flat.pop(k), dtype=np_dtype) for k in sorted(flat)})
    return Conversion(params, config, reports, origin, fresh, {"seed": seed, "dtype": dtype, **info})


def save(conversion: Conversion, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike) -> pathlib.Path:
    """Writes the checkpoint directory that `nxtp_jax.checkpoint` loads with no other input."""
    return checkpoint.save(out_dir, conversion.params, conversion.config, tokenizer_path, provenance=conversion.provenance())


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def format_report(conv: Conversion) -> str:
    """Kept / dropped key counts per source, fresh inits, and the param table (blocks folded)."""
    lines = ["sources:"]
    for r in conv.sources:
        lines.append(f"  {r.name}: kept {len(r.kept)} keys, dropped {len(r.dropped)} ({', '.join(r.files) or 'no weight files read'})")
        for reason, n in sorted(r.drop_counts().items()):
            lines.append(f"    dropped {n:4d}: {reason}")
    lines.append("initialised fresh:" if conv.fresh else "initialised fresh: nothing")
    lines += [f"  {k}: {v}" for k, v in sorted(conv.fresh.items())]

    flat = jax.tree_util.tree_flatten_with_path(conv.params)[0]
    groups: dict[tuple[str, tuple[int, ...], str], list[int]] = {}
    total = 0
    for path, leaf in flat:
        name = "/".join(k.key for k in path)
        total += leaf.size
        m = re.search(r"(layers|resblocks)_(\d+)", name)
        pattern = name[: m.start(2)] + "{i}" + name[m.end(2):] if m else name
        groups.setdefault((pattern, leaf.shape, conv.origin[name]), []).append(int(m.group(2)) if m else -1)
    dtype = flat[0][1].dtype if flat else ""
    lines.append(f"params: {total:,} ({dtype})")
    width = max(len(p) for p, _, _ in groups) + 4
    for (pattern, shape, src), idx in sorted(groups.items()):
        name = pattern.replace("{i}", "{" + _ranges(sorted(idx)) + "}") if idx[0] >= 0 else pattern
        lines.append(f"  {name:<{width}} {str(list(shape)):<16} {src}")
    return "\n".join(lines)
