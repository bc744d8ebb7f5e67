"""Tiny checkpoints written by torch in the exact layouts the released weights use.

- `write_openai_clip_torchscript`: OpenAI's CLIP TorchScript archive (`ViT-L-14.pt`), image
  and text towers, with the `input_resolution` / `context_length` / `vocab_size` entries.
- `write_openai_clip_archive_from_openai_code`: the same kind of archive made by openai-clip's
  own `clip/model.py` (`build_model`, fp16 weights), traced and saved.
- `write_meta_llama_dir`: Meta's LLaMA-2 directory (`params.json`, `consolidated.*.pth`),
  optionally split into model-parallel shards as fairscale splits them.
- `write_hf_llama_dir`: a Hugging Face `LlamaForCausalLM` directory (`save_pretrained`).
- `random_nxtp_model_state` / `write_nxtp_checkpoint`: the released nxtp checkpoint, a
  torch pickle whose "model" holds only the trainable params under `module.` keys.

Every writer is seeded and returns the state dict it wrote (torch tensors, source names),
so tests compare imported params against it. All values are random with non-trivial
norm scales and biases, so a swapped or untransposed tensor changes the outputs.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from collections import OrderedDict
from typing import Iterable, Mapping

import torch
from torch import nn

Tensor = torch.Tensor

# fairscale's model-parallel split of Meta's checkpoints: column-parallel layers
# (and the output head) along dim 0, row-parallel layers and the embedding along dim 1.
META_SHARD_DIM0 = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.", "output.")
META_SHARD_DIM1 = ("attention.wo.", "feed_forward.w2.", "tok_embeddings.")


def _scaled(noise: Tensor, norm_scale: bool) -> Tensor:
    """Standard normal `noise` as a matrix ~ N(0, 1/fan_in), a norm scale ~ 1 + N(0, 0.1^2) or a bias ~ N(0, 0.1^2)."""
    if noise.ndim >= 2:
        return noise / math.sqrt(noise[0].numel())
    return 1.0 + 0.1 * noise if norm_scale else 0.1 * noise


def randomize(module: nn.Module, seed: int) -> None:
    """Seeded values: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            # vectors named .weight are LayerNorm / RMSNorm scales
            p.copy_(_scaled(noise, name.endswith(".weight")).to(p.dtype))


# ---------------------------------------------------------------------------------------
# OpenAI CLIP


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()), ("c_proj", nn.Linear(4 * width, width))])
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class _VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, output_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, width // 64)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        """OpenAI's visual tower, except that ln_post covers every token and `proj` is skipped."""
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)


class _CLIP(nn.Module):
    """OpenAI's `clip.model.CLIP` parameter layout (ViT image tower plus the text tower)."""

    def __init__(self, width: int, layers: int, patch: int, resolution: int, embed_dim: int, text_width: int,
                 text_layers: int, context_length: int, vocab_size: int):
        super().__init__()
        self.visual = _VisionTransformer(resolution, patch, width, layers, embed_dim)
        self.transformer = _Transformer(text_width, text_layers, max(1, text_width // 64))
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.zeros(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # OpenAI's archives carry these three as entries of the state dict.
        self.register_buffer("input_resolution", torch.tensor(resolution))
        self.register_buffer("context_length", torch.tensor(context_length))
        self.register_buffer("vocab_size", torch.tensor(vocab_size))

    def forward(self, image: Tensor) -> Tensor:
        return self.visual(image)


def write_openai_clip_torchscript(
    path: str | os.PathLike,
    width: int = 128,
    layers: int = 2,
    patch: int = 4,
    resolution: int = 16,
    seed: int = 0,
    *,
    embed_dim: int = 32,
    text_width: int = 64,
    text_layers: int = 1,
    context_length: int = 8,
    text_vocab_size: int = 50,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Writes a scripted CLIP like OpenAI's `ViT-*.pt` and returns its state dict (OpenAI names).

    Heads are width // 64, as in OpenAI's code, so `width` must be a multiple of 64.
    """
    if width % 64:
        raise ValueError(f"expected a CLIP width that is a multiple of 64 (heads = width // 64), found {width}")
    model = _CLIP(width, layers, patch, resolution, embed_dim, text_width, text_layers, context_length, text_vocab_size)
    randomize(model, seed)
    model = model.to(dtype)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch deprecates TorchScript, but it is the format OpenAI distributes CLIP in.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        scripted = torch.jit.script(model.eval())
        torch.jit.save(scripted, str(path))
    return {k: v.detach().clone() for k, v in scripted.state_dict().items()}


def openai_clip_model_code():
    """openai-clip's `clip/model.py`, loaded by file: the package's __init__ needs torchvision."""
    import importlib.util

    package = importlib.util.find_spec("clip")
    if package is None or not package.submodule_search_locations:
        raise ImportError("expected the openai-clip package (the test extra installs it), found no 'clip'")
    path = pathlib.Path(list(package.submodule_search_locations)[0]) / "model.py"
    spec = importlib.util.spec_from_file_location("_openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_openai_clip_archive_from_openai_code(
    path: str | os.PathLike, width: int = 128, layers: int = 2, patch: int = 4, resolution: int = 16, seed: int = 0
) -> dict[str, Tensor]:
    """A CLIP archive made by OpenAI's own code; returns its state dict (fp16, OpenAI names).

    `clip.model.CLIP` with random weights -> `build_model(state_dict)` (which reads the
    architecture off the state dict and casts the weights to fp16, as in OpenAI's archives) ->
    `torch.jit.trace` on an image and a text -> `torch.jit.save`.
    """
    code = openai_clip_model_code()
    torch.manual_seed(seed)
    model = code.CLIP(
        embed_dim=32, image_resolution=resolution, vision_layers=layers, vision_width=width,
        vision_patch_size=patch, context_length=8, vocab_size=50, transformer_width=64,
        transformer_heads=1, transformer_layers=1,
    )
    randomize(model, seed)
    built = code.build_model(model.state_dict()).eval()
    image, text = torch.zeros(1, 3, resolution, resolution), torch.zeros(1, 8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")  # tracer warnings; TorchScript is deprecated but is OpenAI's format
        # check_trace would rerun the fp16 model and trip on dtype attributes it compares
        traced = torch.jit.trace(built, (image, text), check_trace=False)
        torch.jit.save(traced, str(path))
    return {k: v.detach().clone() for k, v in traced.state_dict().items()}


def openai_clip_visual(state: Mapping[str, Tensor]) -> nn.Module:
    """A torch module computing OpenAI's visual tower (ln_post on every token, no `proj`) from `state`."""
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
    layers = len([k for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    visual = _VisionTransformer(grid * patch, patch, width, layers, state["visual.proj"].shape[1])
    visual.load_state_dict({k[len("visual."):]: v.float() for k, v in state.items() if k.startswith("visual.")})
    return visual.eval()


# ---------------------------------------------------------------------------------------
# Meta LLaMA


def meta_llama_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden size, written out here so tests do not take it from the code under test."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def random_meta_llama_state(
    dim: int,
    n_layers: int,
    n_heads: int,
    vocab_size: int,
    multiple_of: int,
    *,
    n_kv_heads: int | None = None,
    ffn_dim_multiplier: float | None = None,
    seed: int = 0,
    layer_range: Iterable[int] | None = None,
    prefix: str = "",
) -> dict[str, Tensor]:
    """A random state dict with Meta's LLaMA names (`layers.{i}.attention.wq.weight`, ...)."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = dim // n_heads
    kv = (n_kv_heads or n_heads) * head_dim
    hidden = meta_llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier)

    def mat(rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    def norm() -> Tensor:
        return 1.0 + 0.1 * torch.randn(dim, generator=gen)

    state = {f"{prefix}tok_embeddings.weight": torch.randn(vocab_size, dim, generator=gen)}
    for i in layer_range if layer_range is not None else range(n_layers):
        p = f"{prefix}layers.{i}."
        state[p + "attention.wq.weight"] = mat(n_heads * head_dim, dim)
        state[p + "attention.wk.weight"] = mat(kv, dim)
        state[p + "attention.wv.weight"] = mat(kv, dim)
        state[p + "attention.wo.weight"] = mat(dim, n_heads * head_dim)
        state[p + "feed_forward.w1.weight"] = mat(hidden, dim)
        state[p + "feed_forward.w2.weight"] = mat(dim, hidden)
        state[p + "feed_forward.w3.weight"] = mat(hidden, dim)
        state[p + "attention_norm.weight"] = norm()
        state[p + "ffn_norm.weight"] = norm()
    state[f"{prefix}norm.weight"] = norm()
    state[f"{prefix}output.weight"] = mat(vocab_size, dim)
    return state


def shard_meta_llama_state(state: Mapping[str, Tensor], n_shards: int) -> list[dict[str, Tensor]]:
    """Splits a Meta state dict into fairscale's model-parallel shards (norms and rope.freqs replicated)."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(n_shards)]
    for key, value in state.items():
        if any(s in key for s in META_SHARD_DIM0):
            parts = torch.chunk(value, n_shards, dim=0)
        elif any(s in key for s in META_SHARD_DIM1):
            parts = torch.chunk(value, n_shards, dim=1)
        else:
            parts = [value] * n_shards
        if len(parts) != n_shards:
            raise ValueError(f"{key} of shape {tuple(value.shape)} does not split into {n_shards} shards")
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def write_meta_llama_dir(
    directory: str | os.PathLike,
    dim: int = 64,
    n_layers: int = 3,
    n_heads: int = 4,
    vocab_size: int = 400,
    multiple_of: int = 32,
    *,
    n_kv_heads: int | None = None,
    ffn_dim_multiplier: float | None = None,
    norm_eps: float = 1e-5,
    params_vocab_size: int = -1,
    n_shards: int = 1,
    rope_freqs: bool = True,
    seed: int = 0,
    state: Mapping[str, Tensor] | None = None,
    write_weights: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Writes `params.json` and `consolidated.{00..}.pth` as Meta distributes LLaMA-2.

    `state` (Meta names) is written instead of random weights when given. Like Meta's
    files, `params.json` says `vocab_size: -1` unless `params_vocab_size` says otherwise,
    and the weights carry the `rope.freqs` buffer (`rope_freqs`). Returns the full
    (unsharded) state dict, `rope.freqs` included when written.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {"dim": dim, "multiple_of": multiple_of, "n_heads": n_heads, "n_layers": n_layers, "norm_eps": norm_eps,
              "vocab_size": params_vocab_size}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    (directory / "params.json").write_text(json.dumps(params))
    if state is None:
        state = random_meta_llama_state(dim, n_layers, n_heads, vocab_size, multiple_of, n_kv_heads=n_kv_heads,
                                        ffn_dim_multiplier=ffn_dim_multiplier, seed=seed)
    state = {k: v.to(dtype) for k, v in state.items()}
    if rope_freqs:
        head_dim = dim // n_heads
        state["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if write_weights:
        for i, shard in enumerate(shard_meta_llama_state(state, n_shards)):
            torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    return dict(state)


# ---------------------------------------------------------------------------------------
# Hugging Face LLaMA


def hf_permute(w: Tensor, n_heads: int) -> Tensor:
    """Meta -> HF q/k rows, as transformers' convert_llama_weights_to_hf.py permutes them."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_unpermute(w: Tensor, n_heads: int) -> Tensor:
    """HF -> Meta q/k rows (the inverse of `hf_permute`), written independently of nxtp_jax."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_state(hf: Mapping[str, Tensor], n_heads: int, n_kv_heads: int) -> dict[str, Tensor]:
    """Renames a HF LLaMA state dict to Meta names, un-permuting wq/wk for Meta's RoPE."""
    top = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
    block = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    meta: dict[str, Tensor] = {}
    for key, value in hf.items():
        if key in top:
            meta[top[key]] = value
            continue
        _, _, i, rest = key.split(".", 3)  # model.layers.{i}.{module}.weight
        name = block[rest.removesuffix(".weight")]
        if name == "attention.wq":
            value = hf_unpermute(value, n_heads)
        elif name == "attention.wk":
            value = hf_unpermute(value, n_kv_heads)
        meta[f"layers.{i}.{name}.weight"] = value
    return meta


def write_hf_llama_dir(
    directory: str | os.PathLike,
    dim: int = 64,
    n_layers: int = 3,
    n_heads: int = 4,
    vocab_size: int = 400,
    intermediate_size: int = 192,
    *,
    n_kv_heads: int | None = None,
    norm_eps: float = 1e-5,
    seed: int = 0,
    safetensors: bool = True,
    max_shard_size: str | int | None = None,
) -> dict[str, Tensor]:
    """Writes a random `LlamaForCausalLM` with `save_pretrained`; returns its state dict (HF names).

    `safetensors=False` writes `pytorch_model*.bin`; a small `max_shard_size` (e.g. "20KB")
    writes several shards plus the index file.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=dim,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        vocab_size=vocab_size,
        rms_norm_eps=norm_eps,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    randomize(model, seed)
    kwargs = {"safe_serialization": safetensors}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# Released nxtp checkpoint

NXTP_CLIP_BLOCK_KEYS = (
    "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight", "ln_1.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias",
)


def random_nxtp_model_state(
    vision_width: int = 128,
    trained_vision_blocks: Iterable[int] = (1,),
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    vocab_size: int = 402,
    multiple_of: int = 32,
    *,
    n_kv_heads: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The trainable params of an nxtp model (keys without `module.`), as config_g3m's optim_filter picks them.

    `trained_vision_blocks` are the CLIP blocks trained (18..23 for ViT-L/14); `vocab_size`
    counts the appended special tokens (V + 2).
    """
    gen = torch.Generator().manual_seed(seed)
    w = vision_width
    shapes = {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
              "attn.out_proj.bias": (w,), "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,),
              "mlp.c_proj.weight": (w, 4 * w), "mlp.c_proj.bias": (w,)}
    state: dict[str, Tensor] = {}
    for i in trained_vision_blocks:
        for leaf in NXTP_CLIP_BLOCK_KEYS:
            noise = torch.randn(shapes.get(leaf, (w,)), generator=gen)
            norm_scale = leaf.startswith("ln_") and leaf.endswith(".weight")
            state[f"vision_encoder.transformer.resblocks.{i}.{leaf}"] = _scaled(noise, norm_scale)
    state["vision_encoder.ln_post.weight"] = 1.0 + 0.1 * torch.randn(w, generator=gen)
    state["vision_encoder.ln_post.bias"] = 0.1 * torch.randn(w, generator=gen)
    state["vision_encoder.proj.weight"] = torch.randn(dim, w, generator=gen) / math.sqrt(w)
    state.update(random_meta_llama_state(dim, n_layers, n_heads, vocab_size, multiple_of, n_kv_heads=n_kv_heads,
                                         seed=seed + 1, prefix="language_decoder."))
    return state


def write_nxtp_checkpoint(
    path: str | os.PathLike,
    model_state: Mapping[str, Tensor],
    *,
    prefix: str = "module.",
    epoch: int = 3,
    global_step: int = 21360,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Tensor]:
    """Writes `{"epoch", "global_step", "model", "optimizer", "scheduler"}` as the original's save_checkpoint.

    The params are saved as `nn.Parameter`s in `dtype` (fp16, as the released models
    were trained), with a real AdamW state and CosineAnnealingLR state next to them.
    Returns the "model" dict that was written.
    """
    params = {prefix + k: nn.Parameter(v.detach().to(dtype).clone()) for k, v in model_state.items()}
    fp32 = [nn.Parameter(p.detach().float().clone()) for p in params.values()]
    optimizer = torch.optim.AdamW(fp32, lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    for p in fp32:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "global_step": global_step, "model": params, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, path)
    return {k: v.detach().clone() for k, v in params.items()}
