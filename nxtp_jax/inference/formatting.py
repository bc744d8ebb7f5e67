"""How the command-line taggers print predictions (`nxtp_jax.infer` and `convert/onnx_infer.py`).

No JAX and no absl here: the JAX-free ONNX runner imports it too.
"""

from __future__ import annotations

import json
from typing import Sequence

Labels = Sequence[tuple[str, float]]


def format_text(path: str, labels: Labels, k: int) -> str:
    """The original's lines: `top-k predictions:` then one `| prob: 0.12345 - label` per label, under the image path."""
    lines = [f"image: {path}", f"top-{k} predictions:"]
    lines += [f"| prob: {prob:.5f} - {label}" for label, prob in labels]
    return "\n".join(lines)


def image_error(path: str, error: BaseException) -> str:
    """One line saying why `path` could not be tagged (the message names the path once)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return message if path in message else f"{path}: {message}"


def format_json(paths: Sequence[str], results: Sequence[Labels | BaseException]) -> str:
    """`[{"image": path, "labels": [{"label": ..., "prob": ...}]}]`; an image that failed is `{"image": path, "error": ...}`."""
    return json.dumps(
        [
            {"image": path, "error": image_error(path, labels)}
            if isinstance(labels, BaseException)
            else {"image": path, "labels": [{"label": label, "prob": float(prob)} for label, prob in labels]}
            for path, labels in zip(paths, results)
        ],
        indent=2,
    )
