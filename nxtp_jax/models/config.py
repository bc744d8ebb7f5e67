"""Model dimensions: everything a checkpoint needs to rebuild the network.

`ModelConfig` is what `config.json` of a checkpoint directory holds. The sizes have no
defaults here: the paper's values are written once, in configs/base.py
(`experiment.model_config` builds a ModelConfig from any config's `model` fields, and
`experiment.full_size` the paper's). Derived sizes (heads of the ViT, the SwiGLU hidden
size, the number of image tokens) are properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """OpenAI CLIP ViT. Heads are width // 64, as in OpenAI's code."""

    width: int
    layers: int
    patch_size: int
    image_size: int

    @property
    def heads(self) -> int:
        return self.width // 64

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Meta LLaMA, truncated to its first `layers` blocks. Defaults are those of Meta's params.json."""

    dim: int
    layers: int
    n_heads: int
    vocab_size: int  # sentencepiece vocabulary + the appended special tokens
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


def swiglu_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rounding: int(2 * 4D / 3), optional multiplier, up to a multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens appended after the sentencepiece vocabulary."""

    image: int
    empty: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    decoder: DecoderConfig
    special_tokens: SpecialTokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(
                vision=VisionConfig(**d["vision"]),
                decoder=DecoderConfig(**d["decoder"]),
                special_tokens=SpecialTokens(**d["special_tokens"]),
        )
