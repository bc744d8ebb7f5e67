"""Model dimensions: everything a checkpoint needs to rebuild the network.

`ModelConfig` is what `config.json` of a checkpoint directory holds. Derived sizes
(heads of the ViT, the SwiGLU hidden size, the number of image tokens) are
properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """OpenAI CLIP ViT. Heads are width // 64, as in OpenAI's code."""

    width: int = 1024
    layers: int = 24
    patch_size: int = 14
    image_size: int = 224

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
    """Meta LLaMA, truncated to its first `layers` blocks (written once, here)."""

    dim: int = 4096
    layers: int = 6
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32002  # sentencepiece vocabulary + the appended special tokens
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
        # Meta's rounding: int(2 * 4D / 3), optional multiplier, up to a multiple_of.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens appended after the sentencepiece vocabulary."""

    image: int = 32000
    empty: int = 32001


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = VisionConfig()
    decoder: DecoderConfig = DecoderConfig()
    special_tokens: SpecialTokens = SpecialTokens()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(
                vision=VisionConfig(**d["vision"]),
                decoder=DecoderConfig(**d["decoder"]),
                special_tokens=SpecialTokens(**d["special_tokens"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def full_size(layers: int = 6, image_size: int = 224) -> ModelConfig:
    """The paper's architecture: ViT-L/14 + the first `layers` blocks of LLaMA-2 7B."""
    return ModelConfig(
            vision=VisionConfig(width=1024, layers=24, patch_size=14, image_size=image_size),
            decoder=DecoderConfig(dim=4096, layers=layers, n_heads=32, vocab_size=32002),
            special_tokens=SpecialTokens(image=32000, empty=32001),
    )
