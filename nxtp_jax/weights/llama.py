"""LLaMA-2 weights in Meta's layout or Hugging Face's, mapped to our (Meta-named) decoder.

Meta: `params.json` + `consolidated.*.pth`. Several files are fairscale's model-parallel
shards: column-parallel weights (wq, wk, wv, w1, w3, output) are split along dim 0,
row-parallel ones (wo, w2) and `tok_embeddings` along dim 1, norms are replicated.

Hugging Face: `config.json` + `*.safetensors` or `pytorch_model*.bin`. HF's conversion
permutes the rows of wq / wk so that its rotate-half RoPE equals Meta's rotation of
consecutive pairs; we undo that, because our decoder rotates pairs as Meta does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from nxtp_jax.models.config import DecoderConfig, SpecialTokens, swiglu_hidden_dim
from nxtp_jax.weights.sources import (
    ConcatSource,
    EmptySource,
    SafetensorsSource,
    TensorSource,
    StateDictSource,
    load_torch,
    require_file,
)
from nxtp_jax.weights.specials import extend_embedding, extend_output
from nxtp_jax.weights.tables import Rule, Table, Transform, WeightImportError, identity, transpose

TARGET = "language_decoder/"
SHARD_DIM0 = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.", "output.")
SHARD_DIM1 = ("attention.wo.", "feed_forward.w2.", "tok_embeddings.")
META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
               "rope_theta", "max_batch_size", "max_seq_len", "use_scaled_rope"}
# multiple_of values tried when only HF's intermediate_size is known: Meta's 256 first.
MULTIPLE_OF_CANDIDATES = (256, 4096, 2048, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class LlamaHeader:
    """The source model's dimensions, as params.json (or HF's config.json) gives them."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: from the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def decoder_config(self, layers: int, base_vocab: int, n_special: int) -> DecoderConfig:
        """Our decoder: the first `layers` blocks, the vocabulary plus `n_special` appended tokens."""
        if not 1 <= layers <= self.n_layers:
            raise WeightImportError(f"llama: expected --layers in [1, {self.n_layers}] (the source's depth), found {layers}")
        if self.vocab_size not in (-1, base_vocab):
            raise WeightImportError(
                f"llama: the weights' config says vocab_size {self.vocab_size}, the tokenizer has {base_vocab} pieces; "
                "pass the tokenizer.model these weights were trained with"
            )
        kv = self.n_kv_heads if self.n_kv_heads not in (None, self.n_heads) else None
        if self.dim % self.n_heads or self.n_heads % (kv or self.n_heads):
            raise WeightImportError(
                f"llama: expected dim divisible by n_heads and n_heads by n_kv_heads, found dim {self.dim}, "
                f"n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}"
            )
        return DecoderConfig(
            dim=self.dim,
            layers=layers,
            n_heads=self.n_heads,
            n_kv_heads=kv,
            vocab_size=base_vocab + n_special,
            multiple_of=self.multiple_of,
            ffn_dim_multiplier=self.ffn_dim_multiplier,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
        )


def read_meta_params(directory: str | os.PathLike) -> LlamaHeader:
    path = require_file(pathlib.Path(directory) / "params.json", "Meta's params.json of the LLaMA weights")
    params = json.loads(path.read_text())
    unknown = sorted(set(params) - META_PARAMS)
    if unknown:
        raise WeightImportError(f"llama: {path}: unknown field(s) {unknown}; expected LLaMA-2's params.json fields")
    if params.get("use_scaled_rope"):
        raise WeightImportError(f"llama: {path}: use_scaled_rope is true (LLaMA-3.1); expected LLaMA-2's plain RoPE")
    return LlamaHeader(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=params.get("vocab_size", -1),
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
    )


def find_ffn_params(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """A (multiple_of, ffn_dim_multiplier) for which DecoderConfig.hidden_dim equals `intermediate_size`."""

    def hidden(multiple_of: int, multiplier: float | None) -> int:
        return swiglu_hidden_dim(dim, multiple_of, multiplier)

    multipliers = [None] + [k / 100 for k in range(1, 801)]
    for multiplier in multipliers:
        for multiple_of in MULTIPLE_OF_CANDIDATES:
            if hidden(multiple_of, multiplier) == intermediate_size:
                return multiple_of, multiplier
    raise WeightImportError(
        f"llama: intermediate_size {intermediate_size} cannot be written as Meta's hidden size for dim {dim} "
        "(multiple_of * ceil(int(m * int(8 * dim / 3)) / multiple_of) for a power-of-two multiple_of and "
        "ffn_dim_multiplier m in 0.01 steps); this is not a LLaMA feed-forward this decoder can express"
    )


def read_hf_config(directory: str | os.PathLike) -> LlamaHeader:
    path = require_file(pathlib.Path(directory) / "config.json", "Hugging Face's config.json of the LLaMA weights")
    cfg: dict[str, Any] = json.loads(path.read_text())

    def expect(ok: bool, what: str, found: Any) -> None:
        if not ok:
            raise WeightImportError(f"llama: {path}: expected {what}, found {found}; this decoder is LLaMA-2's")

    expect(cfg.get("model_type") == "llama", 'model_type "llama"', cfg.get("model_type"))
    expect(cfg.get("hidden_act", "silu") == "silu", 'hidden_act "silu"', cfg.get("hidden_act"))
    expect(not cfg.get("attention_bias") and not cfg.get("mlp_bias"), "no biases", "attention_bias/mlp_bias true")
    expect(not cfg.get("tie_word_embeddings"), "tie_word_embeddings false", cfg.get("tie_word_embeddings"))
    expect(cfg.get("rope_scaling") is None, "no rope_scaling", cfg.get("rope_scaling"))
    rope = cfg.get("rope_parameters") or {}
    expect(rope.get("rope_type", "default") == "default", 'rope_type "default"', rope.get("rope_type"))
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    expect(cfg.get("head_dim") in (None, dim // heads), f"head_dim {dim // heads} (hidden_size / heads)", cfg.get("head_dim"))
    multiple_of, multiplier = find_ffn_params(dim, cfg["intermediate_size"])
    return LlamaHeader(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg.get("vocab_size", -1),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's q/k rows -> Meta's: per head, HF holds the even then the odd pair members; Meta interleaves them."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _block_spec(cfg: DecoderConfig) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(Meta name, HF name, Flax path, torch shape) of each param of one block."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    return [
        ("attention.wq.weight", "self_attn.q_proj.weight", "attention/wq/kernel", (q, d)),
        ("attention.wk.weight", "self_attn.k_proj.weight", "attention/wk/kernel", (kv, d)),
        ("attention.wv.weight", "self_attn.v_proj.weight", "attention/wv/kernel", (kv, d)),
        ("attention.wo.weight", "self_attn.o_proj.weight", "attention/wo/kernel", (d, q)),
        ("feed_forward.w1.weight", "mlp.gate_proj.weight", "feed_forward/w1/kernel", (f, d)),
        ("feed_forward.w2.weight", "mlp.down_proj.weight", "feed_forward/w2/kernel", (d, f)),
        ("feed_forward.w3.weight", "mlp.up_proj.weight", "feed_forward/w3/kernel", (f, d)),
        ("attention_norm.weight", "input_layernorm.weight", "attention_norm/weight", (d,)),
        ("ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm/weight", (d,)),
    ]


def _truncated(layers: int) -> str:
    return f"truncated: blocks >= {layers} are not kept (--layers {layers})"


def meta_table(
    cfg: DecoderConfig,
    n_source_layers: int,
    *,
    prefix: str = "",
    vocab_rows: int,
    embedding: Transform,
    output: Transform,
) -> Table:
    """Meta names (under `prefix`) -> our decoder. `embedding` / `output` map the [vocab_rows, D] tensors."""
    table = Table(drops={prefix + "rope.freqs": "RoPE buffer (recomputed by the model)"})
    for i in range(n_source_layers):
        for meta, _, flax, shape in _block_spec(cfg):
            key = f"{prefix}layers.{i}.{meta}"
            if i < cfg.layers:
                table.rules.append(Rule(key, f"{TARGET}layers_{i}/{flax}", shape, transpose if len(shape) == 2 else identity))
            else:
                table.drops[key] = _truncated(cfg.layers)
    table.rules += [
        Rule(prefix + "tok_embeddings.weight", TARGET + "tok_embeddings/embedding", (vocab_rows, cfg.dim), embedding),
        Rule(prefix + "norm.weight", TARGET + "norm/weight", (cfg.dim,)),
        Rule(prefix + "output.weight", TARGET + "output/kernel", (vocab_rows, cfg.dim), output),
    ]
    return table


def hf_table(
    cfg: DecoderConfig,
    n_source_layers: int,
    *,
    vocab_rows: int,
    embedding: Transform,
    output: Transform,
) -> Table:
    """HF LlamaForCausalLM names -> our decoder, un-permuting wq / wk rows to Meta's RoPE pairs."""
    unpermute = {
        "self_attn.q_proj.weight": lambda w: unpermute_rope_rows(w, cfg.n_heads).T,
        "self_attn.k_proj.weight": lambda w: unpermute_rope_rows(w, cfg.kv_heads).T,
    }
    table = Table(drop_patterns=[(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE buffer (recomputed by the model)")])
    for i in range(n_source_layers):
        for _, hf, flax, shape in _block_spec(cfg):
            key = f"model.layers.{i}.{hf}"
            if i < cfg.layers:
                fn = unpermute.get(hf, transpose if len(shape) == 2 else identity)
                table.rules.append(Rule(key, f"{TARGET}layers_{i}/{flax}", shape, fn))
            else:
                table.drops[key] = _truncated(cfg.layers)
    table.rules += [
        Rule("model.embed_tokens.weight", TARGET + "tok_embeddings/embedding", (vocab_rows, cfg.dim), embedding),
        Rule("model.norm.weight", TARGET + "norm/weight", (cfg.dim,)),
        Rule("lm_head.weight", TARGET + "output/kernel", (vocab_rows, cfg.dim), output),
    ]
    return table


def llama_table(cfg: DecoderConfig, n_source_layers: int, *, hf: bool, special: SpecialTokens, seed: int) -> Table:
    """The table for LLaMA weights (HF or Meta names) that also appends the special-token rows."""
    make = hf_table if hf else meta_table
    return make(
        cfg,
        n_source_layers,
        vocab_rows=special.image,
        embedding=lambda x: extend_embedding(x, special, seed),
        output=lambda x: extend_output(x, special, seed).T,
    )


def meta_shard_dim(key: str) -> int | None:
    if any(s in key for s in SHARD_DIM0):
        return 0
    if any(s in key for s in SHARD_DIM1):
        return 1
    return None


def _state_dict(obj: Any, path: pathlib.Path) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise WeightImportError(f"llama: expected {path} to hold a state dict, found a {type(obj).__name__}")
    return obj


def open_meta_weights(directory: str | os.PathLike) -> TensorSource:
    """`consolidated.*.pth` of a Meta directory, shards joined; an EmptySource when there are none."""
    directory = pathlib.Path(directory)
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        return EmptySource("llama", f"no consolidated.*.pth in {directory}")
    shards = [_state_dict(load_torch(f, "a LLaMA consolidated.*.pth shard"), f) for f in files]
    if len(shards) == 1:
        return StateDictSource("llama", shards[0], [str(files[0])])
    return ConcatSource("llama", shards, [str(f) for f in files], meta_shard_dim)


def _index_files(index: pathlib.Path) -> list[pathlib.Path]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightImportError(f"llama: {index}: expected a weight_map, found none")
    return [index.parent / f for f in sorted(set(weight_map.values()))]


def open_hf_weights(directory: str | os.PathLike) -> TensorSource:
    """Safetensors (preferred) or pytorch_model*.bin files of a HF directory, sharded or not."""
    directory = pathlib.Path(directory)
    if (directory / "model.safetensors.index.json").is_file():
        return SafetensorsSource("llama", _index_files(directory / "model.safetensors.index.json"))
    if files := sorted(directory.glob("*.safetensors")):
        return SafetensorsSource("llama", files)
    if (directory / "pytorch_model.bin.index.json").is_file():
        files = _index_files(directory / "pytorch_model.bin.index.json")
    else:
        files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        return EmptySource("llama", f"no *.safetensors or pytorch_model*.bin in {directory}")
    merged: dict[str, Any] = {}
    for f in files:
        for k, v in _state_dict(load_torch(f, "a HF LLaMA weights file"), f).items():
            if k in merged:
                raise WeightImportError(f"llama: key {k} appears in more than one of {[str(x) for x in files]}")
            merged[k] = v
    return StateDictSource("llama", merged, [str(f) for f in files])
