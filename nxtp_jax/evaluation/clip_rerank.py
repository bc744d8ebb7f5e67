"""CLIP re-ranking of predicted labels (`ranking="clip"`, Eq. A.1 of the paper), with OpenAI's CLIP towers.

Per image, the model's candidate labels (deduplicated; [""] when there are none) are scored
by softmax(logit_scale * cos(image, label)) over that image's candidates, and the best k
are kept, as the original's evaluation engine did:
- label text: `label.replace("_", " ")[:77]` (77 characters), no prompt template, encoded by
  CLIP's text tower (`embedders.ClipText`, Flax, jitted on the mesh's first device; fp32);
- image: the recognizer's preprocessed image (CLIP normalisation), resized bilinearly
  (no antialiasing, half-pixel centres, as `F.interpolate(..., align_corners=False)`) to the
  archive's resolution, through CLIP's image tower: our Flax `VisionTransformer` with
  OpenAI's own `visual.proj` restored as the projection, read at the CLS token. It runs
  jitted on the eval mesh, next to the recognizer.
Both towers and `logit_scale` come from the same OpenAI archive (ViT-L-14.pt in the paper).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nxtp_jax import sharding
from nxtp_jax.evaluation.embedders import ClipText
from nxtp_jax.models.clip import VisionTransformer
from nxtp_jax.weights.clip import infer_vision_config, open_openai_clip, vision_rules
from nxtp_jax.weights.tables import Rule, Table, apply_table, nest

# The original shaved every label text to 77 characters before CLIP's tokenizer.
MAX_LABEL_CHARS = 77


def label_text(label: str) -> str:
    """The text CLIP's text tower sees for a label."""
    return label.replace("_", " ")[:MAX_LABEL_CHARS]


def clip_softmax(image: np.ndarray, labels: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale * cos) of one image feature [E] against label features [N, E] (any norms)."""
    image = np.asarray(image, np.float64)
    labels = np.asarray(labels, np.float64)
    cos = labels @ image / (np.linalg.norm(labels, axis=-1) * np.linalg.norm(image))
    logits = logit_scale * cos
    e = np.exp(logits - logits.max())
    return e / e.sum()


@functools.partial(jax.jit, static_argnames=("encoder", "size"))
def _image_features(encoder: VisionTransformer, params: Any, images: jax.Array, size: int) -> jax.Array:
    b, r = images.shape[0], images.shape[1]
    if r != size:
        images = jax.image.resize(images, (b, size, size, images.shape[-1]), "bilinear", antialias=False)
    return encoder.apply({"params": params}, images)[:, 0].astype(jnp.float32)


class ClipReranker:
    """Eq. A.1 with the image and text towers of one OpenAI CLIP archive; label features are cached per text."""

    def __init__(
        self,
        archive: str | os.PathLike,
        *,
        mesh: Mesh | None = None,
        bpe_path: str | os.PathLike | None = None,
    ):
        source = open_openai_clip(archive)
        vision, self.image_size = infer_vision_config(source)
        if "visual.proj" not in source.keys() or "logit_scale" not in source.keys():
            raise KeyError(
                f"expected visual.proj and logit_scale in the CLIP archive {archive}, found "
                f"{'neither' if 'visual.proj' not in source.keys() else 'no logit_scale'}; pass OpenAI's ViT-L-14.pt"
            )
        embed_dim = source.shape("visual.proj")[1]
        table = Table(
            rules=vision_rules(vision, "visual.") + [Rule("visual.proj", "vision_encoder/proj/kernel", (vision.width, embed_dim))],
            drops={"logit_scale": "read on its own"},
            drop_patterns=[(r"(?!visual\.).*", "text tower and metadata (embedders.ClipText reads the tower)")],
        )
        flat, _ = apply_table(source, table)
        mesh = mesh if mesh is not None else sharding.one_device_mesh()
        self.params = jax.device_put(nest(flat)["vision_encoder"], sharding.replicated(mesh))
        self.encoder = VisionTransformer(vision, embed_dim)
        self.logit_scale = float(np.exp(source.read("logit_scale")))
        self.text = ClipText(source, bpe_path=bpe_path, device=mesh.devices.flat[0])
        self._cache: dict[str, np.ndarray] = {}

    def image_features(self, images: jax.Array) -> jax.Array:
        """CLIP image features [B, E] of CLIP-normalised images [B, R, R, 3] (dispatched, not waited for)."""
        return _image_features(self.encoder, self.params, images, self.image_size)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Unit CLIP text features [N, E]; each new text is encoded once."""
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            self._cache.update(zip(new, self.text.embed(new)))
        return np.stack([self._cache[t] for t in texts])

    def rerank(self, image_feature: np.ndarray, candidates: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The best min(k, #unique candidates) labels with their CLIP probabilities, best first."""
        labels = list(dict.fromkeys(candidates)) or [""]
        probs = clip_softmax(image_feature, self.text_features([label_text(label) for label in labels]), self.logit_scale)
        order = np.argsort(-probs, kind="stable")[: min(k, len(labels))]
        return [(labels[i], float(probs[i])) for i in order]
