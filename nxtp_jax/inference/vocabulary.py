"""A closed vocabulary for constrained one-shot sampling: its entries' token sequences as a prefix trie.

    vocab = Vocabulary(["red", "red circle", "blue square"], tokenizer)
    vocab = Vocabulary.from_file("labels.txt", tokenizer)   # one label per line

Each entry is tokenized as the model emits a label right after the prompt
("... are red circle,"), so it is the token sequence a branch of `sampling.one_shot`
(docs/method.md §4) would sample. Entries that tokenize identically are one entry.

Trie node 0 is the root (no token yet) and node 1 the end (the delimiter was sampled).
Each node's edges are the tokens that continue some entry, plus the delimiter where an
entry ends. They lie in flat arrays sorted by (node, token): node n's edges are
`token[offset[n] : offset[n] + count[n]]`, leading to the nodes `next[...]`. A decoder
gathers a fixed window of `window` edges per branch, so the trie works as device arrays
in one compiled loop, and its size grows with the entries, not with nodes x tokenizer
vocabulary.

JAX-free (numpy and sentencepiece), so the ONNX runner uses it too; `select` is the
numpy form of the constrained step.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from nxtp_jax import prompts
from nxtp_jax.tokenizer import DELIMITER, IMAGE_TOKEN, Tokenizer

ROOT, END = 0, 1


class Vocabulary:
    """The entries of a closed label set and their prefix trie over `tokenizer`'s ids."""

    def __init__(self, labels: Iterable[str], tokenizer: Tokenizer, *, template: str = prompts.OBJECT_TEMPLATES[0]):
        if isinstance(labels, (str, bytes, os.PathLike)) or not isinstance(labels, (list, tuple)):
            raise ValueError(
                f"expected the vocabulary as a list of label strings, found {type(labels).__name__}; "
                "use Vocabulary.from_file for a file with one label per line"
            )
        bad = [label for label in labels if not isinstance(label, str)]
        if bad:
            raise ValueError(f"expected every vocabulary label to be a string, found {bad[:3]!r}")
        self.delimiter_id = tokenizer.delimiter_id
        self.tokenizer_size = tokenizer.vocab_size
        self.prompt = prompts.inference_prompt(tokenizer, template).tolist()
        prefix = tokenizer.encode(IMAGE_TOKEN + template, bos=True, eos=False)
        self.sequences: dict[tuple[int, ...], str] = {}  # token ids -> the first entry with them
        for label in labels:
            ids = _label_ids(tokenizer, template, prefix, label)
            self.sequences.setdefault(ids, label.strip())
        if not self.sequences:
            raise ValueError("expected at least one label in the vocabulary, found none")
        self.labels = tuple(self.sequences.values())
        self.max_tokens = max(len(ids) for ids in self.sequences)
        self._build_trie()

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer: Tokenizer, **kw: Any) -> "Vocabulary":
        """One label per line in UTF-8 (a byte-order mark and CRLF line ends are fine); blank lines are skipped."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(
                f"expected a vocabulary file with one label per line at {path}, found no file there; "
                "pass a list to give the labels inline"
            )
        labels = [line.strip() for line in read_lines(path)]
        labels = [label for label in labels if label]
        if not labels:
            raise ValueError(f"expected at least one label in the vocabulary file {path}, found none")
        return cls(labels, tokenizer, **kw)

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: str) -> bool:
        return label in self._label_set

    def _build_trie(self) -> None:
        children: list[dict[int, int]] = [{}, {}]  # root, end
        for ids in self.sequences:
            node = ROOT
            for t in ids:
                if t not in children[node]:
                    children.append({})
                    children[node][t] = len(children) - 1
                node = children[node][t]
            children[node][self.delimiter_id] = END
        self.count = np.asarray([len(c) for c in children], np.int32)
        self.offset = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int32)
        edges = [sorted(c.items()) for c in children]
        self.token = np.asarray([t for e in edges for t, _ in e], np.int32)
        self.next = np.asarray([n for e in edges for _, n in e], np.int32)
        self.window = int(self.count.max())  # the most edges of any node
        self._label_set = frozenset(self.labels)

    def check_compatible(self, tokenizer: Tokenizer, prompt: Sequence[int], sampled: int) -> None:
        """Raises ValueError unless the trie is over `tokenizer`'s ids and `prompt`, and fits `sampled` tokens."""
        found = (tokenizer.vocab_size, tokenizer.delimiter_id, np.asarray(prompt).tolist())
        if (self.tokenizer_size, self.delimiter_id, self.prompt) != found:
            raise ValueError(
                "expected a Vocabulary built with this tagger's tokenizer and prompt, found one built with "
                "another; build it with the tagger's `vocabulary(...)`"
            )
        # A label's tokens and its delimiter must all be sampled before the cap forces a delimiter.
        long = [label for ids, label in self.sequences.items() if len(ids) + 1 > sampled]
        if long:
            raise ValueError(
                f"expected vocabulary labels of at most {sampled - 1} tokens (a branch samples at most "
                f"{sampled} tokens, the delimiter included), found {len(long)} longer, e.g. {long[0]!r}; "
                "shorten or drop them"
            )

    def edges(self, nodes: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first `width` edges of each of `nodes` [...]: token ids, next nodes, validity, each [..., width]."""
        j = np.arange(width)
        idx = np.minimum(self.offset[nodes][..., None] + j, len(self.token) - 1)
        return self.token[idx], self.next[idx], j < self.count[nodes][..., None]


def read_lines(path: pathlib.Path) -> list[str]:
    """The lines of a UTF-8 text file, without a leading byte-order mark; ValueError naming the
    file, line and column of the first byte that is not UTF-8."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"expected UTF-8 text in {path}, found byte 0x{raw[e.start]:02x} at line {number}, column {e.start + 1} "
                "(another encoding, e.g. Latin-1 or UTF-16?); save the file as UTF-8"
            ) from None
    return [line.removesuffix("\r") for line in lines]


def _label_ids(tokenizer: Tokenizer, template: str, prefix: list[int], label: str) -> tuple[int, ...]:
    """The ids of `label` as the model emits it after the prompt `prefix` (without the delimiter)."""
    text = label.strip()
    if not text:
        raise ValueError("expected non-empty vocabulary labels, found an empty one; drop it")
    if DELIMITER in text:
        raise ValueError(f"expected vocabulary labels without the delimiter {DELIMITER!r}, found {text!r}; split it")
    ids = tokenizer.encode(IMAGE_TOKEN + template + " " + text, bos=True, eos=False)
    if ids[: len(prefix)] != prefix or len(ids) == len(prefix):
        raise ValueError(
            f"expected the vocabulary label {text!r} to tokenize after the prompt {template!r} without "
            "merging into its last token, found it does; change the label"
        )
    ids = tuple(ids[len(prefix) :])
    decoded = tokenizer.decode(list(ids))
    if decoded != text:
        raise ValueError(f"expected the vocabulary label {text!r} to decode back to itself, found {decoded!r}; change the label")
    return ids


def resolve(vocab: Any, tokenizer: Tokenizer) -> Vocabulary | None:
    """None, a `Vocabulary`, a list of labels, or the path of a file with one label per line -> a Vocabulary (or None)."""
    if vocab is None or isinstance(vocab, Vocabulary):
        return vocab
    if isinstance(vocab, (str, os.PathLike)):
        return Vocabulary.from_file(vocab, tokenizer)
    if isinstance(vocab, (list, tuple)):
        return Vocabulary(vocab, tokenizer)
    raise ValueError(
        f"expected vocab as a list of labels, a path to a file with one label per line, or a Vocabulary; "
        f"found {type(vocab).__name__}"
    )


def softmax(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """fp32 softmax over the `valid` entries of the last axis (the others get 0; a row with none, all 0)."""
    z = np.where(valid, logits.astype(np.float32), -np.inf)
    top = np.max(z, axis=-1, keepdims=True)
    e = np.where(valid, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return (e / np.where(total > 0, total, 1.0)).astype(np.float32)


def first_step(vocab: Vocabulary, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k step over the root's tokens: logits [B, V] -> tokens, probs, nodes [B, k].

    A branch beyond the root's edge count does not exist: its token is -1 and its node END.
    """
    width = max(vocab.window, k)
    roots = np.zeros(logits.shape[:-1], np.int32)
    tokens, nxt, valid = vocab.edges(roots, width)
    p = softmax(np.take_along_axis(logits, tokens, axis=-1), valid)
    pos = np.argsort(-p, axis=-1, kind="stable")[..., :k]  # ties to the lower token id, as lax.top_k
    exists = pos < vocab.count[ROOT]
    take = lambda a: np.take_along_axis(a, pos, axis=-1)  # noqa: E731
    return (
        np.where(exists, take(tokens), -1).astype(np.int32),
        np.where(exists, take(p), 0.0).astype(np.float32),
        np.where(exists, take(nxt), END).astype(np.int32),
    )


def select(vocab: Vocabulary, logits: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A greedy step restricted to the edges of `nodes`: logits [..., V] -> token, prob, next node [...].

    A branch at END (it has sampled its delimiter) gets the delimiter again with probability 1.
    """
    tokens, nxt, valid = vocab.edges(nodes, vocab.window)
    p = softmax(np.take_along_axis(logits, tokens, axis=-1), valid)
    j = p.argmax(axis=-1)[..., None]
    alive = vocab.count[nodes] > 0
    pick = lambda a: np.take_along_axis(a, j, axis=-1)[..., 0]  # noqa: E731
    return (
        np.where(alive, pick(tokens), vocab.delimiter_id).astype(np.int32),
        np.where(alive, pick(p), 1.0).astype(np.float32),
        np.where(alive, pick(nxt), END).astype(np.int32),
    )
