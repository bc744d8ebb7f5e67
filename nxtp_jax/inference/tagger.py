"""The public API: load a checkpoint, tag images, score labels.

    tagger = Tagger.load("ckpt_dir")
    tagger.predict(["cat.jpg"], num_labels=10)   # [[("cat", 0.61), ("sofa", 0.12), ...]]
    tagger.predict(["cat.jpg"], min_prob=0.1, vocab=["cat", "dog", "sofa"])  # a closed vocabulary
    tagger.loss(["cat.jpg"], [["cat", "sofa"]])  # the training objective, as a float
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nxtp_jax import checkpoint, objective, pretrained, prompts
from nxtp_jax.choices import BEAM_RANKINGS, DEFAULT_NUM_LABELS, QUANTIZE, STRATEGIES
from nxtp_jax.inference import decoding, ranking, sampling, vocabulary
from nxtp_jax.inference.vocabulary import Vocabulary
from nxtp_jax.models import mask
from nxtp_jax.models import quantize as _quantize
from nxtp_jax.data import preprocess
from nxtp_jax.models.recognizer import Recognizer
from nxtp_jax.tokenizer import Tokenizer

MAX_SEQ_LEN = 512  # image tokens + text, as the released models were trained


def check_decoding(strategy: str, ranking_method: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "beam" and ranking_method not in BEAM_RANKINGS:
        raise ValueError(f"beam search records no probabilities: rank by 'sim' or 'none', not {ranking_method!r}")


def default_dtype(backend: str | None = None) -> Any:
    """bf16 on accelerators, fp32 on CPU: `Tagger.load`'s compute and parameter dtype on `backend`
    (default: this host's; the compile check asks for "tpu")."""
    return jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16


class Tagger:
    def __init__(self, model: Recognizer, params: Any, tokenizer: Tokenizer, *, batch_size: int = 8):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"expected batch_size >= 1 (images per forward pass), found {batch_size!r}")
        self.model = model
        self.params = params  # what predict / sample / loss run: Tagger.load's serving layout (`checkpoint_params`)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.image_size = model.config.vision.image_size
        self.prompt = jnp.asarray(prompts.inference_prompt(tokenizer))

    def checkpoint_params(self) -> Any:
        """A copy of `params` in the checkpoint's layout: transposed kernels are expanded back;
        quantized ones stay quantized."""
        return _quantize.untransposed(self.params)

    @classmethod
    def load(
        cls, ckpt_dir: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None, mesh=None, quantize: str = "none", **kw
    ) -> "Tagger":
        """Loads a checkpoint directory written by `convert/from_torch.py`, or a training workdir (latest step).

        `dtype` (compute) and `param_dtype` default to bfloat16 on a TPU or GPU (float32 weights would take
        twice the memory and bandwidth) and float32 on a CPU.

        `quantize` "int8" (per output channel) or "int4" (in groups) stores the decoder's and the
        output layer's weights in that many bits, dequantized at use (`models.quantize`); "none" keeps
        them (on one CPU stored transposed in `params`, where XLA multiplies the sampler's few rows
        faster; `checkpoint_params()` gives them back in the checkpoint's layout).
        """
        if quantize not in QUANTIZE:
            raise ValueError(f"expected quantize in {QUANTIZE}, found {quantize!r}")
        config = checkpoint.load_config(ckpt_dir)
        tok = Tokenizer(checkpoint.tokenizer_path(ckpt_dir))
        if (tok.image_id, tok.empty_id) != (config.special_tokens.image, config.special_tokens.empty):
            raise ValueError(
                f"{ckpt_dir}: config.json says <|image|>={config.special_tokens.image}, <|empty|>="
                f"{config.special_tokens.empty}, but its tokenizer.model gives {tok.image_id}, {tok.empty_id}"
            )
        model = Recognizer(config, dtype=dtype or default_dtype(), param_dtype=param_dtype or default_dtype())
        if checkpoint.is_training_workdir(ckpt_dir):
            params = checkpoint.load_training_params(ckpt_dir, model, mesh)
        else:
            params = checkpoint.load_params(ckpt_dir, checkpoint.abstract_params(model, mesh))
        if quantize != "none":
            params = _quantize.quantize_params(params, quantize, consume=True)
        elif mesh is None and jax.default_backend() == "cpu":
            params = _quantize.transpose_params(params, consume=True)
        return cls(model, params, tok, **kw)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        quantize: str = "none",
        dtype: Any = None,
        cache_dir: str | os.PathLike | None = None,
        llama_dir: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        **kw,
    ) -> "Tagger":
        """A released model ("g3m", "g70m"), a model card .json or a checkpoint directory, loaded as `load` does.

        A released model is downloaded, checked and converted on its first use, then read from
        the cache (`nxtp_jax.pretrained.resolve`, which also takes `cache_dir`, `llama_dir` and
        `tokenizer`); its licence is printed once.
        """
        ckpt_dir = pretrained.resolve(model, cache_dir=cache_dir, llama_dir=llama_dir, tokenizer=tokenizer)
        return cls.load(ckpt_dir, quantize=quantize, dtype=dtype, **kw)

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Paths, PIL images or uint8 arrays -> CLIP-normalised float32 [B, R, R, 3]."""
        return np.stack([preprocess.preprocess(img, self.image_size) for img in images])

    def _batches(self, images: Sequence[Any], errors: str):
        """(indices, [B, R, R, 3]) of up to batch_size images; with errors="return", unreadable
        images are yielded alone as (index, error). Decodes batch by batch, so memory stays bounded."""
        indices, arrays = [], []
        for i, image in enumerate(images):
            try:
                arrays.append(preprocess.preprocess(image, self.image_size))
                indices.append(i)
            except (ValueError, OSError) as e:
                if errors == "raise":
                    raise
                yield i, e
            if len(arrays) == self.batch_size or (arrays and i == len(images) - 1):
                yield indices, np.stack(arrays)
                indices, arrays = [], []

    def predict(
        self,
        images: Sequence[Any],
        num_labels: int = DEFAULT_NUM_LABELS,
        *,
        min_prob: float = 0.0,
        vocab: Any = None,
        ranking_method: str = "prob",
        strategy: str = "one_shot",
        seed: int = 0,
        errors: str = "raise",
        **decoder_kw: Any,
    ) -> list[list[tuple[str, float]]]:
        """Per image, at most `num_labels` (label, score) pairs scored at least `min_prob`, best first.

        `errors="raise"` raises on the first image that cannot be read (ValueError, e.g.
        `BadImageError`, or OSError); `errors="return"` tags every readable image and puts the
        exception in the place of each one that failed: check entries with
        `isinstance(r, Exception)`. Non-finite scores (damaged weights) count as a failure.

        `vocab` (None: open vocabulary) is a list of labels, the path of a file with one label
        per line, or a `Vocabulary` from `self.vocabulary(...)` (build it once when tagging
        many times); one-shot sampling is then constrained to its entries, so every label is one.
        `strategy` is "one_shot" (the paper's, k = num_labels branches), "greedy" or "beam"
        (`decoder_kw` go to `decoding.greedy` / `decoding.beam_search`; beam search records
        no probabilities, so it ranks by "sim" or "none" only, as in the original).
        """
        ranking.check_predict(images, num_labels, min_prob, ranking_method)
        if errors not in ("raise", "return"):
            raise ValueError(f"expected errors='raise' or 'return', found {errors!r}")
        check_decoding(strategy, ranking_method)
        vocab = self.vocabulary(vocab)
        key = jax.random.key(seed)
        images = list(images)
        results: list[Any] = [None] * len(images)
        for indices, batch in self._batches(images, errors):
            if isinstance(batch, Exception):
                results[indices] = batch
                continue
            key, sub = jax.random.split(key)
            sampled = self.sample(jnp.asarray(batch), num_labels, strategy=strategy, key=sub, vocab=vocab, **decoder_kw)
            for i, labels in zip(indices, self.rank(sampled, num_labels, ranking_method, min_prob=min_prob)):
                if not all(np.isfinite(score) for _, score in labels):
                    bad = FloatingPointError(
                        f"image {i}: the model gave non-finite scores; its weights are damaged (reload the checkpoint)"
                    )
                    if errors == "raise":
                        raise bad
                    labels = bad
                results[i] = labels
        return results

    def vocabulary(self, vocab: Any) -> Vocabulary | None:
        """A list of labels, the path of a file with one label per line, or a `Vocabulary` -> a
        `Vocabulary` checked against this tagger's tokenizer, prompt and label-length cap (None stays None)."""
        vocab = vocabulary.resolve(vocab, self.tokenizer)
        if vocab is not None:
            vocab.check_compatible(self.tokenizer, self.prompt, sampling.MAX_UPDATES - 1)
        return vocab

    def sample(
        self, x: jax.Array, num_labels: int, *, strategy: str = "one_shot", key=None, vocab: Any = None, **decoder_kw: Any
    ) -> dict:
        """Decodes normalised images x [B, R, R, 3]; one-shot and greedy return without waiting for the device.

        `vocab` (one-shot only) constrains the branches to a closed vocabulary, as in `predict`.
        """
        ranking.check_num_labels(num_labels)
        vocab = self.vocabulary(vocab)
        if vocab is not None and strategy != "one_shot":
            raise ValueError(f"expected strategy 'one_shot' with a vocabulary (the constrained decoder), found {strategy!r}")
        with _quantize.dequantizing():  # the serving kernels of Tagger.load (models/quantize.py)
            tokens, probs = self._decode(x, num_labels, strategy, key, vocab, **decoder_kw)
        return {"strategy": strategy, "x": x, "tokens": tokens, "probs": probs}

    def _decode(self, x, num_labels, strategy, key, vocab, **decoder_kw):
        tok = self.tokenizer
        if strategy == "one_shot":
            trie = None if vocab is None else sampling.Trie.from_vocabulary(vocab)
            tokens, probs = sampling.one_shot(
                self.model, self.params, x, self.prompt, k=int(num_labels), delimiter_id=tok.delimiter_id, trie=trie
            )
        elif strategy == "greedy":
            key = key if key is not None else jax.random.key(0)
            tokens, probs = decoding.greedy(self.model, self.params, x, self.prompt, key, delimiter_id=tok.delimiter_id, **decoder_kw)
        elif strategy == "beam":
            tokens = decoding.beam_search(self.model, self.params, x, self.prompt, eos_id=tok.eos_id, **decoder_kw)
            probs = [[0.0] * len(t) for t in tokens]
        else:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        return tokens, probs

    def rank(
        self, sampled: dict, num_labels: int | None, ranking_method: str = "prob", *, min_prob: float = 0.0
    ) -> list[list[tuple[str, float]]]:
        """The output of `sample` -> per image, at most `num_labels` (None: all) ranked (label, score) pairs
        scored at least `min_prob`."""
        ranking.check_threshold(min_prob, ranking_method)
        delim = self.tokenizer.delimiter_id
        tokens, probs = sampled["tokens"], sampled["probs"]
        if sampled["strategy"] == "one_shot":
            groups = [ranking.groups_from_branches(t, p, delim) for t, p in zip(np.asarray(tokens), np.asarray(probs))]
        else:
            rows = lambda a: a if isinstance(a, list) else np.asarray(a).tolist()  # noqa: E731 (beam: ragged lists)
            groups = [ranking.groups_from_stream(t, p, delim) for t, p in zip(rows(tokens), rows(probs))]
        sim = ranking_method == "sim"
        image_tokens = self.image_tokens(sampled["x"]) if sim else [None] * len(groups)
        table = self.embeddings() if sim else None
        return [
            ranking.threshold(ranking.rank(g, self.tokenizer, ranking_method, image_tokens=img, embeddings=table), num_labels, min_prob)
            for g, img in zip(groups, image_tokens)
        ]

    def image_tokens(self, x: Any) -> np.ndarray:
        """Projected image tokens [B, N, D] of normalised images (as the decoder sees them)."""
        with _quantize.dequantizing():
            out = self.model.apply({"params": self.params}, jnp.asarray(x), method=Recognizer.encode_images)
        return np.asarray(out, np.float32)

    def attention_maps(self, image: Any) -> np.ndarray:
        """Image-to-image attention of the prefix pass, [layers, heads, N, N] (row = query token)."""
        n = self.model.config.vision.num_patches
        with _quantize.dequantizing():
            weights = _prefix_attention(self.model, self.params, jnp.asarray(self.preprocess([image])), self.prompt)
        return np.stack([np.asarray(w[0, :, :n, :n]) for w in weights])

    def embeddings(self) -> np.ndarray:
        """The token embedding table in fp32 on the host, copied once (it is ~0.5 GB at full size)."""
        table = self.params["language_decoder"]["tok_embeddings"]["embedding"]
        if getattr(self, "_table_source", None) is not table:
            self._table, self._table_source = np.asarray(table, np.float32), table
        return self._table

    def loss(self, images: Sequence[Any], labels: Sequence[Sequence[str]], *, max_seq_len: int = MAX_SEQ_LEN) -> float:
        """The training objective on one batch: first template, labels in the given order, token mean.

        Labels are lowercased, as every label path of the original does (caption nouns, or
        `skip_extract_nouns`).
        """
        if isinstance(labels, str):
            raise ValueError(f"expected one list of label strings per image, found the string {labels!r}; write [[{labels!r}]]")
        if len(images) != len(labels):
            raise ValueError(f"expected one label list per image, found {len(images)} images and {len(labels)} label lists")
        for i, sample in enumerate(labels):
            if isinstance(sample, str):
                raise ValueError(f"expected a list of label strings for image {i}, found the string {sample!r}; write [{sample!r}]")
            if not all(isinstance(label, str) for label in sample):
                raise ValueError(f"expected a list of label strings for image {i}, found {sample!r}")
        n = self.model.config.vision.num_patches
        labels = [[label.lower() for label in sample] for sample in labels]
        text = prompts.object_batch(
            self.tokenizer, labels, max_text_len=max_seq_len - n, template=prompts.OBJECT_TEMPLATES[0], rng=None
        )
        images = jnp.asarray(self.preprocess(images))
        with _quantize.dequantizing():
            return float(
                _loss(self.model, self.params, images, text.tokens, text.targets, text.answer_pos, self.tokenizer.delimiter_id)
            )


@functools.partial(jax.jit, static_argnames=("model", "delimiter_id"))
def _loss(model, params, images, tokens, targets, answer_pos, delimiter_id):
    m = mask.label_mask(tokens, answer_pos, delimiter_id=delimiter_id, num_image_tokens=model.config.vision.num_patches)
    logits = model.apply({"params": params}, images, tokens, m)
    return objective.token_mean_cross_entropy(logits, targets)


@functools.partial(jax.jit, static_argnames=("model",))
def _prefix_attention(model, params, images, prompt):
    h = sampling.prefix_embeddings(model, params, images, prompt)
    n, t = model.config.vision.num_patches, h.shape[1]
    _, state = model.apply(
        {"params": params}, h, jnp.arange(t)[None], mask.prefix_mask(n, t), None, 0, True,
        method=Recognizer.decode, mutable=["intermediates"],
    )
    layers = state["intermediates"]["language_decoder"]
    return [layers[f"layers_{i}"]["attention"]["attention_weights"][0] for i in range(model.config.decoder.layers)]
