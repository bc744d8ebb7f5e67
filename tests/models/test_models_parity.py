"""Parity of our Flax CLIP ViT and LLaMA decoder, loaded through the importers, with torch references.

References: Hugging Face transformers' CLIPVisionModel and LlamaForCausalLM (independent
implementations), and the OpenAI-layout torch module that wrote the TorchScript archive.
Everything runs in fp32; outputs must agree within 1e-5.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import torch_layouts as tl
from nxtp_jax.models.clip import VisionTransformer
from nxtp_jax.models.config import SpecialTokens
from nxtp_jax.models.llama import Decoder, apply_rope
from nxtp_jax.weights import clip, llama
from nxtp_jax.weights.sources import StateDictSource
from nxtp_jax.weights.tables import apply_table, nest

TOL = 1e-5
V = 400  # base vocabulary of the tiny decoders
SPECIAL = SpecialTokens(image=V, empty=V + 1)


def hf_clip_to_openai(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPVisionModel names -> OpenAI's `visual.*` names (q, k, v fused into in_proj)."""
    hf = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    out = {
        "visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["embeddings.class_embedding"],
        "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["post_layernorm.weight"],
        "visual.ln_post.bias": hf["post_layernorm.bias"],
    }
    layers = len({k.split(".")[2] for k in hf if k.startswith("encoder.layers.")})
    for i in range(layers):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[o + f"attn.in_proj_{leaf}"] = torch.cat([hf[h + f"self_attn.{n}_proj.{leaf}"] for n in "qkv"])
            out[o + f"attn.out_proj.{leaf}"] = hf[h + f"self_attn.out_proj.{leaf}"]
            out[o + f"ln_1.{leaf}"] = hf[h + f"layer_norm1.{leaf}"]
            out[o + f"ln_2.{leaf}"] = hf[h + f"layer_norm2.{leaf}"]
            out[o + f"mlp.c_fc.{leaf}"] = hf[h + f"mlp.fc1.{leaf}"]
            out[o + f"mlp.c_proj.{leaf}"] = hf[h + f"mlp.fc2.{leaf}"]
    return out


def run_our_vit(state: dict[str, torch.Tensor], images_nchw: np.ndarray) -> np.ndarray:
    """Imports `state` (OpenAI names) and runs our encoder with `proj` = identity: [B, 1 + N, W]."""
    source = StateDictSource("clip", state, ["test"])
    cfg, archive_size = clip.infer_vision_config(source)
    flat, _ = apply_table(source, clip.openai_clip_table(cfg, archive_size))
    flat["vision_encoder/proj/kernel"] = np.eye(cfg.width, dtype=np.float32)
    params = nest(flat)["vision_encoder"]
    model = VisionTransformer(cfg, out_dim=cfg.width)
    return np.asarray(model.apply({"params": params}, jnp.asarray(images_nchw.transpose(0, 2, 3, 1))))


def test_clip_vit_matches_hf_clip_vision_model():
    config = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModel(config).eval()
    tl.randomize(model, seed=1)
    images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(images)).last_hidden_state
        ref = model.post_layernorm(hidden).numpy()  # every token, as the paper does

    ours = run_our_vit(hf_clip_to_openai(model.state_dict()), images)
    assert ours.shape == ref.shape == (2, 17, 128)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_clip_vit_from_torchscript_archive_matches_openai_layout_module(tmp_path):
    state = tl.write_openai_clip_torchscript(tmp_path / "ViT-T-4.pt", width=128, layers=2, patch=4, resolution=16, seed=3)
    source = clip.open_openai_clip(tmp_path / "ViT-T-4.pt")
    images = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = tl.openai_clip_visual(state)(torch.from_numpy(images)).numpy()
    ours = run_our_vit(dict(source.tensors), images)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------
# LLaMA


def import_decoder(directory, *, hf: bool, layers: int):
    """Our decoder config and nested params from a HF or Meta directory, through the importer."""
    header = llama.read_hf_config(directory) if hf else llama.read_meta_params(directory)
    source = llama.open_hf_weights(directory) if hf else llama.open_meta_weights(directory)
    cfg = header.decoder_config(layers, V, n_special=2)
    flat, _ = apply_table(source, llama.llama_table(cfg, header.n_layers, hf=hf, special=SPECIAL, seed=0))
    return cfg, flat


def run_our_decoder(cfg, flat, tokens: np.ndarray) -> np.ndarray:
    params = nest(flat)["language_decoder"]
    model = Decoder(cfg)
    b, t = tokens.shape
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, 1, t, t))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))

    def forward(m, ids):
        hidden, _ = m(m.embed(ids), positions, mask)
        return m.logits(hidden)

    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), method=forward))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny LLaMA with GQA (4 heads, 2 kv heads), saved by transformers, and its torch logits."""
    directory = tmp_path_factory.mktemp("hf_llama")
    tl.write_hf_llama_dir(directory, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, intermediate_size=192, seed=5)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = np.random.default_rng(2).integers(0, V, (2, 12))
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.numpy()
    return directory, model, tokens, logits


def test_llama_hf_layout_matches_hf_llama_for_causal_lm(hf_llama):
    directory, _, tokens, ref = hf_llama
    cfg, flat = import_decoder(directory, hf=True, layers=2)
    assert (cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == (4, 2, 192)
    ours = run_our_decoder(cfg, flat, tokens)
    assert ours.shape == (2, 12, V + 2)
    np.testing.assert_allclose(ours[..., :V], ref, atol=TOL, rtol=0)


def test_llama_meta_layout_matches_hf_and_gives_identical_params(hf_llama, tmp_path):
    directory, model, tokens, ref = hf_llama
    meta_state = tl.hf_to_meta_state(model.state_dict(), n_heads=4, n_kv_heads=2)
    tl.write_meta_llama_dir(tmp_path, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32,
                            state=meta_state)
    cfg_meta, flat_meta = import_decoder(tmp_path, hf=False, layers=2)
    cfg_hf, flat_hf = import_decoder(directory, hf=True, layers=2)
    assert cfg_meta.hidden_dim == cfg_hf.hidden_dim and cfg_meta.kv_heads == cfg_hf.kv_heads
    assert flat_meta.keys() == flat_hf.keys()
    for k in flat_hf:
        np.testing.assert_array_equal(flat_meta[k], flat_hf[k], err_msg=k)
    np.testing.assert_allclose(run_our_decoder(cfg_meta, flat_meta, tokens)[..., :V], ref, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------
# RoPE conventions


def meta_rope_reference(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Meta's RoPE written with complex numbers: pairs (x[2i], x[2i+1]) times exp(i * pos * theta^(-2i/d))."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    rot = np.exp(1j * positions[..., None].astype(np.float64) * freqs)  # [B, T, d/2]
    z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2]
    z = z * rot[:, :, None, :]
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def test_our_rope_is_metas_interleaved_pairs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    positions = np.stack([np.arange(7), np.arange(5, 12)])
    ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0))
    np.testing.assert_allclose(ours, meta_rope_reference(x, positions), atol=1e-5, rtol=0)


def test_unpermuted_hf_weights_give_metas_attention_scores():
    """HF rotate-half on permuted rows == Meta's pair rotation on Meta rows, once the importer un-permutes."""
    dim, n_heads, t = 64, 4, 9
    head_dim = dim // n_heads
    rng = np.random.default_rng(4)
    wq_meta = torch.from_numpy(rng.standard_normal((dim, dim)).astype(np.float32) / 8)
    wk_meta = torch.from_numpy(rng.standard_normal((dim, dim)).astype(np.float32) / 8)
    x = torch.from_numpy(rng.standard_normal((1, t, dim)).astype(np.float32))
    positions = torch.arange(t)[None]

    # HF's side: permuted rows, rotate-half RoPE from transformers.
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=dim, num_attention_heads=n_heads))
    cos, sin = rotary(x, positions)

    def hf_scores(wq, wk):
        q = (x @ wq.T).view(1, t, n_heads, head_dim).transpose(1, 2)
        k = (x @ wk.T).view(1, t, n_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return torch.einsum("bhqd,bhkd->bhqk", q, k).numpy()

    ref = hf_scores(tl.hf_permute(wq_meta, n_heads), tl.hf_permute(wk_meta, n_heads))

    # Our side: the importer's un-permute of HF's rows, then our Meta-style RoPE.
    def our_scores(wq, wk):
        q = (x.numpy() @ wq.T).reshape(1, t, n_heads, head_dim)
        k = (x.numpy() @ wk.T).reshape(1, t, n_heads, head_dim)
        pos = jnp.asarray(positions.numpy())
        q, k = apply_rope(jnp.asarray(q), pos, 10000.0), apply_rope(jnp.asarray(k), pos, 10000.0)
        return np.asarray(jnp.einsum("bqhd,bkhd->bhqk", q, k))

    wq_hf, wk_hf = tl.hf_permute(wq_meta, n_heads).numpy(), tl.hf_permute(wk_meta, n_heads).numpy()
    unpermuted = llama.unpermute_rope_rows(wq_hf, n_heads), llama.unpermute_rope_rows(wk_hf, n_heads)
    np.testing.assert_array_equal(unpermuted[0], wq_meta.numpy())
    np.testing.assert_allclose(our_scores(*unpermuted), ref, atol=1e-5, rtol=0)
    # Without the un-permute the two conventions disagree: the check above can fail.
    assert np.abs(our_scores(wq_hf, wk_hf) - ref).max() > 1e-2
