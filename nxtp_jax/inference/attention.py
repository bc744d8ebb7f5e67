"""Pictures of the decoder's image-token attention: one PNG mosaic per layer and head."""

from __future__ import annotations

import pathlib

import numpy as np


def attention_grid(maps: np.ndarray) -> np.ndarray:
    """[N, N] attention (row = query) -> a uint8 RGB mosaic: one g x g tile per query token, g = sqrt(N).

    Each tile is min-max normalised on its own and drawn white-to-blue, like the original's plots.
    """
    n = maps.shape[0]
    g = int(round(np.sqrt(n)))
    tiles = maps.reshape(n, g, g)
    lo, hi = tiles.min(axis=(1, 2), keepdims=True), tiles.max(axis=(1, 2), keepdims=True)
    tiles = (tiles - lo) / (hi - lo + 1e-6)
    tiles = np.pad(tiles, ((0, 0), (0, 1), (0, 1)), constant_values=0.0)  # a 1-pixel gutter
    mosaic = tiles.reshape(g, g, g + 1, g + 1).transpose(0, 2, 1, 3).reshape(g * (g + 1), g * (g + 1))
    white, blue = np.array([247, 251, 255], np.float32), np.array([8, 48, 107], np.float32)
    return (white + mosaic[..., None] * (blue - white)).astype(np.uint8)


def save_attention_maps(tagger, image, out_dir: pathlib.Path) -> int:
    """Writes layer_L_head_H.png for every decoder layer and head into out_dir; returns how many."""
    from PIL import Image

    maps = tagger.attention_maps(image)  # [layers, heads, N, N]
    out_dir.mkdir(parents=True, exist_ok=True)
    for layer in range(maps.shape[0]):
        for head in range(maps.shape[1]):
            grid = attention_grid(maps[layer, head])
            Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
                out_dir / f"layer_{layer}_head_{head}.png"
            )
    return maps.shape[0] * maps.shape[1]
