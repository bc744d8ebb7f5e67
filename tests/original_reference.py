"""The original nxtp's inference and training-loss path, restated in torch (fp32, CPU).

kaiyuyue/nxtp cannot run here (it needs CUDA, fairscale and OpenAI's `clip` package), so
this module restates the code path of `src/infer.py` and the object-branch loss of
`src/train.py`, function by function; each docstring names the original it restates.
Weights are read straight from the files in the released layouts (OpenAI's TorchScript
CLIP archive, Meta's `params.json`, the nxtp checkpoint pickle), never through nxtp_jax.

Where this differs from the original, only because it runs here:
- the hard-coded ids 526 ("▁are", the end of the prompt) and 29892 (",") are the
  arguments `answer_id` and `delimiter_id` (see `answer_id()` / `delimiter_id()`);
- everything runs in fp32 (the original runs CUDA fp16 autocast);
- config values the code reads from `configs/config_g3m.py` are constants below, and the
  dead branches they switch off (`decouple_freqs_cis`, the caption branch whose loss
  weight is 0, prompt augmentation, label shuffling) are left out;
- the few pieces taken from `clip` and torchvision are restated (fp32 LayerNorm,
  QuickGELU, Resize(BICUBIC) + CenterCrop + ToTensor + Normalize on PIL).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import warnings
from collections import OrderedDict, defaultdict
from typing import Sequence

import numpy as np
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

# configs/config_g3m.py (+ config_base.py) values on the inference and loss path.
MAX_SEQ_LEN = 512
SPECIAL_TOKENS = ("<|image|>",)  # load_llama appends "<|empty|>" after these
OBJECT_TEMPLATE = "The objects in the image are"  # enable_prompt_augmentation is off at inference
IMAGE_PREFIX = "<|image|>"
MAX_UPDATE_ITER = 20  # OneShotDecoder's default
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------
# src/tokenizer.py


class Tokenizer:
    """src/tokenizer.py `Tokenizer`: sentencepiece plus special tokens appended after its vocabulary."""

    def __init__(self, model_path: str | pathlib.Path):
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.pad_id()
        self.special_tokens_itot: dict[int, str] = {}
        self.special_tokens_ttoi: dict[str, int] = {}
        self.n_special_tokens = 0

    def add_special_tokens(self, special_tokens: Sequence[str]) -> None:
        for i, t in enumerate(special_tokens):
            tid = self.sp_model.vocab_size() + i
            self.special_tokens_itot[tid] = t
            self.special_tokens_ttoi[t] = tid
        self.n_special_tokens = len(special_tokens)
        self.n_words += self.n_special_tokens

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Cuts the special-token strings out; every other segment goes to sentencepiece alone."""
        starts: dict[int, str] = {}
        for t in self.special_tokens_ttoi:
            i = s.find(t)
            while i != -1:
                starts[i] = t
                i = s.find(t, i + 1)
        segments, prev = [], 0
        for i in sorted(starts):
            segments += [s[prev:i], starts[i]]
            prev = i + len(starts[i])
        segments.append(s[prev:])
        ids: list[int] = []
        for seg in segments:
            if seg in self.special_tokens_ttoi:
                ids.append(self.special_tokens_ttoi[seg])
            else:
                ids += self.sp_model.encode(seg)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, t: list[int]) -> str:
        """Special ids become their strings; each run between them is decoded alone."""
        parts, prev = [], 0
        for i in [j for j, tid in enumerate(t) if tid in self.special_tokens_itot]:
            parts += [self.sp_model.decode(t[prev:i]), self.special_tokens_itot[t[i]]]
            prev = i + 1
        parts.append(self.sp_model.decode(t[prev:]))
        return "".join(parts)


def answer_id(tokenizer: Tokenizer) -> int:
    """What the original hard-codes as 526: the last token of the object prompt ("▁are")."""
    return tokenizer.encode(OBJECT_TEMPLATE, bos=False, eos=False)[-1]


def delimiter_id(tokenizer: Tokenizer) -> int:
    """What the original hard-codes as 29892: the "," piece."""
    return tokenizer.sp_model.piece_to_id(",")


# ---------------------------------------------------------------------------------------
# src/loader.py


def build_preprocess(img: Image.Image, input_size: int) -> Tensor:
    """src/loader.py `build_preprocess`: Resize(BICUBIC) + CenterCrop + ToTensor + Normalize -> [3, R, R].

    torchvision on PIL: the short side becomes `input_size`, the long one
    int(size * long / short), resized only if that changes the size; the crop starts at
    int(round((h - size) / 2)).
    """
    w, h = img.size
    target = (input_size, int(input_size * h / w)) if w <= h else (int(input_size * w / h), input_size)
    if target != (w, h):
        img = img.resize(target, Image.BICUBIC)
    img = img.convert("RGB")
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    top = int(round((x.shape[1] - input_size) / 2.0))
    left = int(round((x.shape[2] - input_size) / 2.0))
    x = x[:, top : top + input_size, left : left + input_size]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


# ---------------------------------------------------------------------------------------
# src/models/clip.py (with clip.model.LayerNorm / QuickGELU) and src/functions.py load_clip


class LayerNorm(nn.LayerNorm):
    """clip.model.LayerNorm: computed in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CLIPViT(nn.Module):
    """src/models/clip.py `CLIPViT`: ln_post on every token, then the projection."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.scale = width**-0.5
        self.class_embedding = nn.Parameter(self.scale * torch.randn(width))
        n_tokens = (input_resolution // patch_size) ** 2 + 1
        self.positional_embedding = nn.Parameter(self.scale * torch.randn(n_tokens, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(self.scale * torch.randn(width, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        bs, c, h, w = x.shape
        x = x.reshape(bs, c, h * w).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(bs, 1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.proj(self.ln_post(x))


def load_clip(archive: str | pathlib.Path, embed_dim: int) -> CLIPViT:
    """src/functions.py `load_clip` + src/models/clip.py `build_clip_model` (ViT branch).

    OpenAI's TorchScript archive -> its state dict -> CLIPViT (strict load of `visual.*`),
    then CLIP's own `proj` is replaced by a fresh bias-free Linear(width -> embed_dim).
    The archive's resolution is the input size (cfg.input_size == image_resolution).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        state = torch.jit.load(str(archive), map_location="cpu").state_dict()
    width = state["visual.conv1.weight"].shape[0]
    layers = len([k for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    visual = CLIPViT(patch * grid, patch, width, layers, width // 64, state["visual.proj"].shape[1])
    visual.load_state_dict({k[len("visual."):]: v.float() for k, v in state.items() if k.startswith("visual.")})
    del visual.proj
    visual.proj = nn.Linear(width, embed_dim, bias=False)
    visual.proj.weight.data = visual.scale * torch.randn(embed_dim, width)
    return visual


# ---------------------------------------------------------------------------------------
# src/models/lang.py and src/functions.py load_llama


@dataclasses.dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # accepted from params.json, unused by the original's Attention
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None  # accepted from params.json, unused by the original's FeedForward
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    shave_language_decoder_at: int = -1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> Tensor:
    """[end, dim / 2, 2]: (cos, sin) of Meta's rotary angles (lang.py keeps them as view_as_real)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles))


def apply_rotary_emb(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """lang.py's real-valued rotation of the consecutive pairs (x[2i], x[2i+1])."""
    cos = freqs_cis.view(1, freqs_cis.shape[0], 1, -1, 2)[..., 0]
    sin = freqs_cis.view(1, freqs_cis.shape[0], 1, -1, 2)[..., 1]

    def rotate(x: Tensor) -> Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        re, im = pairs[..., 0], pairs[..., 1]
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head = args.n_heads
        self.n_embd = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.n_embd, bias=False)
        self.wk = nn.Linear(args.dim, args.n_heads * self.n_embd, bias=False)
        self.wv = nn.Linear(args.dim, args.n_heads * self.n_embd, bias=False)
        self.wo = nn.Linear(args.n_heads * self.n_embd, args.dim, bias=False)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None) -> Tensor:
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, self.n_head, self.n_embd)
        k = self.wk(x).view(bs, seqlen, self.n_head, self.n_embd)
        v = self.wv(x).view(bs, seqlen, self.n_head, self.n_embd)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.n_embd)
        if mask is not None:
            attn = attn + mask
        out = torch.matmul(F.softmax(attn, dim=-1), v)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, 4 * args.dim, args.multiple_of)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LLaMATransformer(nn.Module):
    """src/models/lang.py `LLaMATransformer`, truncated at `shave_language_decoder_at` blocks."""

    def __init__(self, params: ModelArgs, answer_id: int, delimiter_id: int):
        super().__init__()
        self.params = params
        self.answer_id = answer_id
        self.delimiter_id = delimiter_id
        n_layer = params.n_layers
        if params.shave_language_decoder_at > 0:
            n_layer = min(params.shave_language_decoder_at, n_layer)
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList([TransformerBlock(params) for _ in range(n_layer)])
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.freqs_cis = precompute_freqs_cis(params.dim // params.n_heads, params.max_seq_len * 2)

    def build_mask(
        self, bs: int, seqlen: int, dummy_token_index: int, offset: int, input_tokens: Tensor | None,
        prefix_image_tok_embeds: bool, decouple_label_tok_embeds: bool, is_train: bool,
    ) -> Tensor:
        """The mask part of `LLaMATransformer.forward` (start_pos = 0), loop over delimiters included."""
        bs_mask = bs if decouple_label_tok_embeds else 1
        mask = torch.triu(torch.full((bs_mask, 1, seqlen, seqlen), float("-inf")), diagonal=1)
        if prefix_image_tok_embeds:
            ii, ij = dummy_token_index, dummy_token_index + offset
            mask[:, :, ii:ij, ii:ij] = 0.0
        if decouple_label_tok_embeds:
            answer_index = torch.nonzero(input_tokens[-1] == self.answer_id)[0][0]
            assert answer_index > dummy_token_index
            if is_train:
                mask[:, :, :, answer_index + 1 :] = float("-inf")
            prev_batch_index, prev_token_index = 0, answer_index
            for batch_index, token_index in torch.nonzero(input_tokens == self.delimiter_id):
                token_index = token_index + 1  # the delimiter is conditioned on its label's tokens
                if batch_index != prev_batch_index:
                    prev_batch_index, prev_token_index = batch_index, answer_index
                if is_train:
                    tri_size = int(token_index - prev_token_index)
                    tri = prev_token_index + torch.tril_indices(tri_size, tri_size)
                    mask[batch_index, 0, tri[0], tri[1]] = 0.0
                elif prev_token_index != answer_index:
                    mask[batch_index, 0, prev_token_index:, answer_index:prev_token_index] = float("-inf")
                prev_token_index = token_index
        return mask

    def forward(
        self, h: Tensor, dummy_token_index: int = 0, offset: int = 0, input_tokens: Tensor | None = None,
        prefix_image_tok_embeds: bool = False, decouple_label_tok_embeds: bool = False, is_train: bool = True,
    ) -> Tensor:
        """h: input embeddings [bs, seqlen, dim] (the original also takes ids; this path never passes them).

        Logits at every position when training, else at the last one only.
        """
        bs, seqlen = h.shape[:2]
        freqs_cis = self.freqs_cis[:seqlen]
        mask = None
        if seqlen > 1:
            mask = self.build_mask(bs, seqlen, dummy_token_index, offset, input_tokens, prefix_image_tok_embeds,
                                   decouple_label_tok_embeds, is_train).type_as(h)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        h = self.norm(h)
        return self.output(h) if is_train else self.output(h[:, -1, :])


def load_llama(llama_dir: str | pathlib.Path, tokenizer_path: str | pathlib.Path, shave_language_decoder_at: int,
               max_seq_len: int = MAX_SEQ_LEN) -> tuple[LLaMATransformer, Tokenizer]:
    """src/functions.py `load_llama` with cfg.inference_mode on: params.json only, no Meta weights.

    (Training loads Meta's weights first, but the nxtp checkpoint then overwrites every
    decoder param, so the loss sees the same weights.)
    """
    params = json.loads((pathlib.Path(llama_dir) / "params.json").read_text())
    model_args = ModelArgs(max_seq_len=max_seq_len, **params)
    tokenizer = Tokenizer(tokenizer_path)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS) + ["<|empty|>"])
    model_args.vocab_size = tokenizer.n_words
    model_args.shave_language_decoder_at = shave_language_decoder_at
    return LLaMATransformer(model_args, answer_id(tokenizer), delimiter_id(tokenizer)), tokenizer


# ---------------------------------------------------------------------------------------
# src/models/classifier.py, src/utils.py load_checkpoint, the loading part of src/infer.py


class LangClassifier(nn.Module):
    def __init__(self, vision_encoder: CLIPViT, language_decoder: LLaMATransformer):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.language_decoder = language_decoder

    def encode_images(self, x: Tensor) -> Tensor:
        return self.vision_encoder(x)


def load_checkpoint(path: str | pathlib.Path, model: nn.Module) -> tuple[list[str], list[str]]:
    """src/utils.py `load_checkpoint`: "module." dropped, strict=False. Returns the (missing, unexpected) keys."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {n.replace("module.", "") if "module" in n else n: v for n, v in ckpt["model"].items()}
    keys = model.load_state_dict(state, strict=False)
    return list(keys.missing_keys), list(keys.unexpected_keys)


def load_model(clip_archive, llama_dir, tokenizer_path, nxtp_ckpt, shave_language_decoder_at: int):
    """src/infer.py's loading: load_llama, load_clip(embed_dim = LLaMA dim), LangClassifier, load_checkpoint.

    Returns (model in eval mode, tokenizer, (missing, unexpected) keys of the checkpoint load).
    """
    llama, tokenizer = load_llama(llama_dir, tokenizer_path, shave_language_decoder_at)
    clip = load_clip(clip_archive, embed_dim=llama.params.dim)
    model = LangClassifier(clip, llama)
    keys = load_checkpoint(nxtp_ckpt, model)
    return model.eval(), tokenizer, keys


# ---------------------------------------------------------------------------------------
# src/encoding.py


def construct_text_inputs(
    tokenizer: Tokenizer, captions: Sequence[str], offset: int, is_train: bool, max_seq_len: int = MAX_SEQ_LEN
) -> tuple[Tensor, Tensor | None, int]:
    """src/encoding.py `construct_text_inputs`, object branch, with skip_extract_nouns and no shuffle.

    Returns (tokens [bs, max_seq_len - offset] padded with pad_id, targets [bs, max_seq_len]
    or None, dummy_token_index = 0). Training appends " " + ", ".join(labels) of the
    lower-cased caption and EOS; the EOS target is removed (rm_eos_token_for_objs).
    """
    prompt = IMAGE_PREFIX + OBJECT_TEMPLATE + (" " if is_train else "")
    if is_train:
        objs = [", ".join(cap.lower().split(",")) for cap in captions]  # the original shuffles the split here
    else:
        objs = [""] * len(captions)
    max_len = max_seq_len - offset
    encoded = [tokenizer.encode(prompt + obj, bos=True, eos=is_train)[:max_len] for obj in objs]
    tokens = torch.full((len(encoded), max_len), tokenizer.pad_id, dtype=torch.long)
    for k, t in enumerate(encoded):
        tokens[k, : len(t)] = torch.tensor(t)
    if IMAGE_PREFIX in SPECIAL_TOKENS:  # swap <|image|> and BOS
        tokens[:, 1] = tokenizer.bos_id
        tokens[:, 0] = tokenizer.encode(IMAGE_PREFIX, bos=False, eos=False)[0]
    dummy_token_index = 0
    if not is_train:
        return tokens, None, dummy_token_index
    targets = torch.full((len(encoded), max_seq_len), tokenizer.pad_id, dtype=torch.long)
    for k, t in enumerate(tokens):
        targets[k, dummy_token_index + offset] = tokenizer.pad_id
        targets[k, dummy_token_index + offset + 1 : offset + len(t)] = t[dummy_token_index + 1 :]
    targets[targets == tokenizer.eos_id] = tokenizer.pad_id
    return tokens, targets, dummy_token_index


def construct_embd_inputs(embds_imgs: Tensor, embds_objs: Tensor, tokens_objs: Tensor, dummy_token_index: int,
                          pad_id: int) -> tuple[Tensor, Tensor]:
    """src/encoding.py `construct_embd_inputs`, object branch: image embeddings inserted at the dummy index."""
    embds, tokens = [], []
    for k in range(embds_imgs.shape[0]):
        embds.append(torch.cat([embds_objs[k, :dummy_token_index], embds_imgs[k], embds_objs[k, dummy_token_index:]]))
        pads = torch.full((embds_imgs.shape[1],), pad_id, dtype=torch.long)
        tokens.append(torch.cat([tokens_objs[k, :dummy_token_index], pads, tokens_objs[k, dummy_token_index:]]))
    return torch.stack(embds), torch.stack(tokens)


# ---------------------------------------------------------------------------------------
# src/decoding.py


class OneShotDecoder:
    """src/decoding.py `OneShotDecoder`: top-k first tokens, then greedy, until every branch emitted ","."""

    def __init__(self, k: int, answer_id: int, delimiter_id: int, max_update_iter: int = MAX_UPDATE_ITER):
        self.k = k
        self.answer_id = answer_id
        self.delimiter_id = delimiter_id
        self.max_update_iter = max_update_iter
        self.update_iter = 0
        self.completed_mask: Tensor | None = None
        self.one_shot_size: int | None = None
        self.prob_next_tokens: Tensor | None = None

    def update(self, tokens: Tensor, logits: Tensor) -> tuple[Tensor, bool]:
        probs = F.softmax(logits, dim=-1)
        if self.update_iter == 0:
            topk_vals, topk_inds = torch.topk(probs, k=self.k)
            topk_vals, next_tokens = topk_vals.reshape(-1, 1), topk_inds.reshape(-1, 1)
            if tokens.shape[0] != next_tokens.shape[0]:
                tokens = tokens.repeat_interleave(self.k, dim=0)
            self.prob_next_tokens = topk_vals
            self.one_shot_size = self.k
            self.completed_mask = torch.ones_like(next_tokens, dtype=torch.bool)
        else:
            topk_vals, next_tokens = torch.topk(probs, k=1)
            self.prob_next_tokens = torch.cat([self.prob_next_tokens, topk_vals], dim=-1)
            self.completed_mask &= next_tokens != self.delimiter_id
        tokens = torch.cat([tokens, next_tokens], dim=-1)
        self.update_iter += 1
        completed = bool(self.completed_mask.sum() == 0)
        if self.update_iter >= self.max_update_iter - 1:
            # The original appends a whole row of delimiters, and gives them no probability.
            tokens = torch.cat([tokens, torch.ones_like(tokens) * self.delimiter_id], dim=-1)
            completed = True
        return tokens, completed

    def finalize(self, tokens: Tensor) -> tuple[list[list[int]], list[list[float]]]:
        """Per image, the flattened tokens of every branch up to its first "," and the flattened probs.

        For a branch that hit the cap, `probs[:end]` is one shorter than `tokens[:end]`.
        """
        bs = tokens.shape[0] // self.one_shot_size
        prefix_indice = torch.where(tokens == self.answer_id)[-1][0]
        tokens = tokens[:, prefix_indice + 1 :].reshape(bs, self.one_shot_size, -1)
        probs = self.prob_next_tokens.reshape(bs, self.one_shot_size, -1)
        first_delimiter: dict[int, dict[int, int]] = defaultdict(dict)
        for b, j, s in zip(*torch.where(tokens == self.delimiter_id)):
            first_delimiter[b.item()].setdefault(j.item(), s.item())
        pred_tokens, pred_probs = [], []
        for b in range(bs):
            label_tokens, label_probs = [], []
            for j in range(self.one_shot_size):
                end = first_delimiter[b][j] + 1
                label_tokens.extend(tokens[b, j, :end].tolist())
                label_probs.extend(probs[b, j, :end].tolist())
            pred_tokens.append(label_tokens)
            pred_probs.append(label_probs)
        return pred_tokens, pred_probs


# ---------------------------------------------------------------------------------------
# src/infer.py


@torch.inference_mode()
def one_shot_sample(model: LangClassifier, tokenizer: Tokenizer, image_path: str | pathlib.Path, num_labels: int):
    """src/infer.py from the image file to `text_decoder.finalize`; every step recomputes the whole sequence.

    Returns finalize's (tokens, probs) of the image; `group_labels` is the rest of infer.py.
    """
    image = build_preprocess(Image.open(image_path).convert("RGB"), model.vision_encoder.input_resolution)
    decoder = model.language_decoder
    z = model.encode_images(image[None])
    embds_imgs = z[:, 1:]  # [CLS] dropped
    bs, n_img_tokens = embds_imgs.shape[:2]
    tokens_objs, _, dummy = construct_text_inputs(tokenizer, [""] * bs, offset=n_img_tokens, is_train=False)
    wte = decoder.tok_embeddings.weight
    input_embds, input_tokens = construct_embd_inputs(
        embds_imgs, wte[tokens_objs], tokens_objs, dummy, tokenizer.pad_id
    )
    shave_ind = torch.where(tokens_objs == tokenizer.pad_id)[1][0]
    input_tokens = input_tokens[:, : shave_ind + n_img_tokens]
    x = input_embds[:, : shave_ind + n_img_tokens]

    text_decoder = OneShotDecoder(num_labels, decoder.answer_id, decoder.delimiter_id)
    tokens = tokens_objs[:, :shave_ind]
    forward = dict(dummy_token_index=dummy, offset=n_img_tokens, input_tokens=input_tokens,
                   prefix_image_tok_embeds=True, decouple_label_tok_embeds=True, is_train=False)
    tokens, completed = text_decoder.update(tokens, decoder(x, **forward))
    next_tokens = tokens[:, -1].unsqueeze(1)
    while not completed:
        if x.shape[0] != next_tokens.shape[0]:
            x = x.repeat_interleave(next_tokens.shape[0] // x.shape[0], dim=0)
        x = torch.cat([x, wte[next_tokens]], dim=1)
        tokens, completed = text_decoder.update(tokens, decoder(x, **forward))
        next_tokens = tokens[:, -1].unsqueeze(1).long()
    tokens, probs = text_decoder.finalize(tokens)
    return tokens[0], probs[0]


def group_labels(
    tokenizer: Tokenizer, delimiter: int, tokens: list[int], probs: list[float]
) -> list[tuple[str, float]]:
    """src/infer.py's wrap-up for one image: zip probs with tokens, cut at ",", merge equal texts by summing
    products, sort descending. Scores are returned unrounded (infer.py prints round(score, 5))."""
    per_label_probs: dict[str, list[Tensor]] = defaultdict(list)  # in order of first appearance
    group_probs, group_tokens = [], []
    for prob, token in zip(torch.tensor(probs), torch.tensor(tokens)):  # zip stops at the shorter list
        group_probs.append(prob)
        group_tokens.append(token.item())
        if token == delimiter:
            per_label_probs[tokenizer.decode(group_tokens)].append(torch.stack(group_probs))
            group_probs, group_tokens = [], []
    scores = {label: torch.stack([p.prod() for p in groups]).sum().item() for label, groups in per_label_probs.items()}
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    return [(label.replace(",", ""), score) for label, score in ranked]


# ---------------------------------------------------------------------------------------
# src/train.py


@torch.no_grad()
def training_loss(model: LangClassifier, tokenizer: Tokenizer, image_paths: Sequence[str | pathlib.Path],
                  labels: Sequence[Sequence[str]]) -> float:
    """src/train.py's object loss for one batch: captions = ",".join(labels), is_train=True mask,
    shifted targets, F.cross_entropy(ignore_index=pad_id) (a token mean over the batch)."""
    size = model.vision_encoder.input_resolution
    imgs = torch.stack([build_preprocess(Image.open(p).convert("RGB"), size) for p in image_paths])
    decoder = model.language_decoder
    embds_imgs = model.encode_images(imgs)[:, 1:]
    n_img_tokens = embds_imgs.shape[1]
    captions = [",".join(ls) for ls in labels]
    tokens_objs, target_objs, dummy = construct_text_inputs(tokenizer, captions, offset=n_img_tokens, is_train=True)
    wte = decoder.tok_embeddings.weight
    input_embds, input_tokens = construct_embd_inputs(
        embds_imgs, wte[tokens_objs], tokens_objs, dummy, tokenizer.pad_id
    )
    logits = decoder(input_embds, dummy_token_index=dummy, offset=n_img_tokens, input_tokens=input_tokens,
                     prefix_image_tok_embeds=True, decouple_label_tok_embeds=True, is_train=True)
    n_vocab = logits.shape[-1]
    loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, n_vocab), target_objs[..., 1:].reshape(-1),
                           ignore_index=tokenizer.pad_id)
    return loss.item()
