"""Tag images with the exported ONNX graphs in ONNX Runtime: no JAX, flax or torch.

    tagger = OrtTagger("onnx_dir")
    tagger.predict(["cat.jpg"], num_labels=10)   # [[("cat", 0.61), ("sofa", 0.12), ...]]
    tagger.predict(["cat.jpg"], min_prob=0.1, vocab=["cat", "dog", "sofa"])  # a closed vocabulary

The sampling is `nxtp_jax.inference.sampling.one_shot` step for step: one prefill over image tokens and
prompt fills a KV cache that the k branches of an image share, branch j's step-s key goes to slot
T0 + s*k + j, and a branch sees the prefix plus its own tokens only. `cache=False` is the
original's strategy instead (`sampling.one_shot_recompute`): k copies of the prefix and the whole
sequence again at every step. With a vocabulary, each step is constrained to its trie
(`nxtp_jax.inference.vocabulary.first_step` / `select`, the numpy form of the device loop's
steps). Ranking is `nxtp_jax.inference.ranking`, so labels and scores are those of
`nxtp_jax.inference.tagger.Tagger`.

Needs only onnxruntime, numpy, pillow and sentencepiece (the imported nxtp_jax modules import no
JAX).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from nxtp_jax import prompts
from nxtp_jax.choices import DEFAULT_NUM_LABELS
from nxtp_jax.inference import ranking, vocabulary
from nxtp_jax.inference.vocabulary import Vocabulary
from nxtp_jax.data import preprocess
from nxtp_jax.tokenizer import Tokenizer

FORMAT = "nxtp_jax.onnx/1"
CONFIG_FILE = "config.json"


def read_config(onnx_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(onnx_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {onnx_dir} is not an nxtp_jax ONNX export "
            "(make one with `python convert/to_onnx.py --ckpt DIR --out ONNX_DIR`)"
        )
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}; re-export with convert/to_onnx.py")
    return config


def make_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; `threads` None lets ONNX Runtime use one thread per physical core."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def prefix_mask(num_image_tokens: int, length: int) -> np.ndarray:
    """bool [T, T]: causal plus the bidirectional image block (`nxtp_jax.models.mask.prefix_mask`)."""
    row, col = np.arange(length)[:, None], np.arange(length)[None, :]
    return (col <= row) | ((row < num_image_tokens) & (col < num_image_tokens))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_k(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Values and indices of the k largest entries of the last axis, ties to the lower index (as lax.top_k)."""
    idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(p, idx, axis=-1), idx.astype(np.int32)


class OrtTagger:
    def __init__(self, onnx_dir: str | os.PathLike, *, batch_size: int = 8, threads: int | None = None):
        self.onnx_dir = pathlib.Path(onnx_dir)
        self.config = cfg = read_config(onnx_dir)
        files = cfg["files"]
        self.tokenizer = tok = Tokenizer(self.onnx_dir / files["tokenizer"])
        ids = cfg["special_tokens"]
        found = {"image": tok.image_id, "empty": tok.empty_id, "delimiter": tok.delimiter_id}
        if {key: ids[key] for key in found} != found:
            raise ValueError(
                f"{self.onnx_dir / CONFIG_FILE} gives the token ids {ids}, but its tokenizer gives {found}; "
                "export again so that the tokenizer and the graphs agree"
            )
        self.batch_size = batch_size
        self.dtype = np.dtype(cfg["dtype"])
        self.prompt = prompts.inference_prompt(tok)
        self.embeddings = np.load(self.onnx_dir / files["embeddings"], mmap_mode="r")
        self.encoder = make_session(self.onnx_dir / files["encoder"], threads)
        self.decoder = make_session(self.onnx_dir / files["decoder"], threads)
        self._inputs = [i.name for i in self.decoder.get_inputs()]

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Paths, PIL images or uint8 arrays -> resized, center-cropped uint8 [B, R, R, 3]."""
        size = self.config["image_size"]
        return np.stack([preprocess.resize_center_crop(preprocess.load_image(img), size) for img in images])

    def image_tokens(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, R, R, 3] -> projected image tokens [B, N, D]."""
        return self.encoder.run(None, {"images": pixels})[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return np.asarray(self.embeddings[np.where(ids < 0, ids + len(self.embeddings), ids)], self.dtype)

    def decode(self, h, positions, mask, cache_index: int, logit_index, cache: list[np.ndarray]):
        """One decoder call: float32 logits [B, Q, V] and the updated cache."""
        feeds = [h, np.asarray(positions, np.int32), mask, np.asarray(cache_index, np.int32), np.asarray(logit_index, np.int32)]
        out = self.decoder.run(None, dict(zip(self._inputs, feeds + list(cache))))
        return out[0], out[1:]

    def _empty_cache(self, batch: int, length: int) -> list[np.ndarray]:
        cfg = self.config
        zeros = np.zeros((batch, length, cfg["kv_heads"], cfg["head_dim"]), self.dtype)
        return [zeros] * (2 * cfg["layers"])

    def _prefix(self, pixels: np.ndarray) -> np.ndarray:
        img = self.image_tokens(pixels)
        txt = self.embed(self.prompt).astype(img.dtype)
        return np.concatenate([img, np.broadcast_to(txt, (img.shape[0],) + txt.shape)], axis=1)

    def vocabulary(self, vocab: Any) -> Vocabulary | None:
        """A list of labels, a file with one label per line, or a `Vocabulary` -> a checked `Vocabulary` (None stays None)."""
        vocab = vocabulary.resolve(vocab, self.tokenizer)
        if vocab is not None:
            vocab.check_compatible(self.tokenizer, self.prompt, self.config["max_updates"] - 1)
        return vocab

    def sample(
        self, pixels: np.ndarray, k: int, *, cache: bool = True, vocab: Vocabulary | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """tokens, probs [B, k, max_updates - 1], as `sampling.one_shot` returns them."""
        return (self._sample_cached if cache else self._sample_recompute)(self._prefix(pixels), k, self.vocabulary(vocab))

    def _first(self, logits: np.ndarray, k: int, vocab: Vocabulary | None):
        """The top-k step: logits [B, V] -> tokens, probs, trie nodes [B, k] (nodes unused without a vocabulary)."""
        if vocab is not None:
            return vocabulary.first_step(vocab, logits, k)
        probs, tokens = top_k(softmax(logits), k)
        return tokens, probs, np.zeros_like(tokens)

    def _step(self, logits: np.ndarray, nodes: np.ndarray, vocab: Vocabulary | None):
        """A greedy step: logits [..., V] -> tokens, probs, trie nodes [...]."""
        if vocab is not None:
            return vocabulary.select(vocab, logits, nodes)
        p = softmax(logits)
        return p.argmax(axis=-1).astype(np.int32), p.max(axis=-1), nodes

    def _sample_cached(self, h: np.ndarray, k: int, vocab: Vocabulary | None) -> tuple[np.ndarray, np.ndarray]:
        n, delimiter = self.config["num_image_tokens"], self.tokenizer.delimiter_id
        b, t0, _ = h.shape
        sampled = self.config["max_updates"] - 1  # tokens per branch, the top-k one included
        capacity = t0 + k * (sampled - 1)  # the last sampled token is never fed back

        mask = np.zeros((1, 1, t0, capacity), bool)
        mask[0, 0, :, :t0] = prefix_mask(n, t0)
        logits, kv = self.decode(h, np.arange(t0)[None], mask, 0, [t0 - 1], self._empty_cache(b, capacity))
        first, first_probs, nodes = self._first(logits[:, 0], k, vocab)

        tokens = np.full((b, k, sampled), -1, np.int32)
        probs = np.ones((b, k, sampled), np.float32)
        tokens[:, :, 0], probs[:, :, 0] = first, first_probs
        done = (first == delimiter) | (first < 0)

        slot = np.arange(capacity - t0)
        branch_slots = slot[None, :] % k == np.arange(k)[:, None]  # [k, C - T0]
        s = 1
        while s < sampled and not done.all():
            own = branch_slots & (slot[None, :] // k < s)
            step_mask = np.concatenate([np.ones((k, t0), bool), own], axis=1)[None, None]
            positions = np.full((1, k), t0 + s - 1)
            logits, kv = self.decode(self.embed(tokens[:, :, s - 1]), positions, step_mask, t0 + (s - 1) * k, np.arange(k), kv)
            nxt, prob, nodes = self._step(logits, nodes, vocab)  # logits [B, k, V]
            tokens[:, :, s], probs[:, :, s] = nxt, prob
            done |= nxt == delimiter
            s += 1
        return tokens, probs

    def _last_logits(self, h: np.ndarray) -> np.ndarray:
        b, t, _ = h.shape
        mask = prefix_mask(self.config["num_image_tokens"], t)[None, None]
        logits, _ = self.decode(h, np.arange(t)[None], mask, 0, [t - 1], self._empty_cache(b, t))
        return logits[:, 0]

    def _sample_recompute(self, h: np.ndarray, k: int, vocab: Vocabulary | None) -> tuple[np.ndarray, np.ndarray]:
        delimiter, sampled = self.tokenizer.delimiter_id, self.config["max_updates"] - 1
        b = h.shape[0]
        first, first_probs, nodes = self._first(self._last_logits(h), k, vocab)
        h = np.repeat(h, k, axis=0)  # k copies of the prefix, as the original
        tokens, probs, nodes = [first.reshape(b * k)], [first_probs.reshape(b * k)], nodes.reshape(b * k)
        done = (tokens[0] == delimiter) | (tokens[0] < 0)
        while len(tokens) < sampled and not done.all():
            h = np.concatenate([h, self.embed(tokens[-1][:, None]).astype(h.dtype)], axis=1)
            nxt, prob, nodes = self._step(self._last_logits(h), nodes, vocab)
            tokens.append(nxt)
            probs.append(prob)
            done |= nxt == delimiter
        pad = sampled - len(tokens)
        tokens = np.pad(np.stack(tokens, -1), ((0, 0), (0, pad)), constant_values=-1)
        probs = np.pad(np.stack(probs, -1), ((0, 0), (0, pad)), constant_values=1.0)
        return tokens.reshape(b, k, sampled), probs.reshape(b, k, sampled)

    def predict(
        self,
        images: Sequence[Any],
        num_labels: int = DEFAULT_NUM_LABELS,
        *,
        min_prob: float = 0.0,
        vocab: Any = None,
        ranking_method: str = "prob",
        cache: bool = True,
    ) -> list[list[tuple[str, float]]]:
        """Per image, at most `num_labels` (label, score) pairs scored at least `min_prob`, best first;
        `vocab` constrains the labels to a closed vocabulary (`Tagger.predict`)."""
        ranking.check_predict(images, num_labels, min_prob, ranking_method)
        vocab = self.vocabulary(vocab)
        tok, images = self.tokenizer, list(images)
        table = np.asarray(self.embeddings, np.float32) if ranking_method == "sim" else None
        results = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[i : i + self.batch_size])
            tokens, probs = self.sample(pixels, num_labels, cache=cache, vocab=vocab)
            image_tokens = self.image_tokens(pixels).astype(np.float32) if table is not None else [None] * len(pixels)
            for t, p, img in zip(tokens, probs, image_tokens):
                groups = ranking.groups_from_branches(t, p, tok.delimiter_id)
                ranked = ranking.rank(groups, tok, ranking_method, image_tokens=img, embeddings=table)
                results.append(ranking.threshold(ranked, num_labels, min_prob))
        return results
