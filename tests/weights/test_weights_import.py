"""The importers' tables: truncation, shards, formats, special-token rows, the nxtp checkpoint, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torch_layouts as tl
from nxtp_jax.models.config import SpecialTokens
from nxtp_jax.weights import clip, llama, nxtp, specials
from nxtp_jax.weights.sources import StateDictSource, is_torchscript
from nxtp_jax.weights.tables import WeightImportError, apply_table

V = 400
SPECIAL = SpecialTokens(image=V, empty=V + 1)
DIMS = dict(dim=64, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32)


def import_meta(directory, layers: int, seed: int = 0):
    header = llama.read_meta_params(directory)
    cfg = header.decoder_config(layers, V, n_special=2)
    table = llama.llama_table(cfg, header.n_layers, hf=False, special=SPECIAL, seed=seed)
    return apply_table(llama.open_meta_weights(directory), table)


def import_hf(directory, layers: int):
    header = llama.read_hf_config(directory)
    cfg = header.decoder_config(layers, V, n_special=2)
    return apply_table(llama.open_hf_weights(directory), llama.llama_table(cfg, header.n_layers, hf=True, special=SPECIAL, seed=0))


# ---------------------------------------------------------------------------------------
# special-token rows


def test_special_rows_keep_llama_rows_and_follow_the_spec_init():
    d, v = 4096, 10
    sp = SpecialTokens(image=v, empty=v + 1)
    rows = np.random.default_rng(0).standard_normal((v, d)).astype(np.float32)

    emb = specials.extend_embedding(rows, sp, seed=0)
    assert emb.shape == (v + 2, d) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[:v], rows)
    new = emb[v:]
    assert abs(new.mean()) < 0.05 and abs(new.std() - 1.0) < 0.05  # N(0, 1)

    out = specials.extend_output(rows, sp, seed=0)
    assert out.shape == (v + 2, d)
    np.testing.assert_array_equal(out[:v], rows)
    np.testing.assert_array_equal(out[sp.empty], np.zeros(d))
    bound = 1 / math.sqrt(d)  # kaiming_uniform(a=sqrt 5) on a fan-in of d
    image_row = out[sp.image]
    assert np.abs(image_row).max() <= bound and np.abs(image_row).max() > 0.95 * bound
    assert abs(image_row.std() - bound / math.sqrt(3)) < 0.05 * bound

    np.testing.assert_array_equal(specials.extend_embedding(rows, sp, seed=0), emb)
    np.testing.assert_array_equal(specials.extend_output(rows, sp, seed=0), out)
    assert not np.array_equal(specials.extend_embedding(rows, sp, seed=1)[v:], new)
    assert not np.array_equal(specials.extend_output(rows, sp, seed=1)[sp.image], image_row)


def test_special_rows_must_follow_the_vocabulary():
    with pytest.raises(ValueError, match=r"<\|image\|> = 7"):
        specials.extend_embedding(np.zeros((10, 4), np.float32), SpecialTokens(image=7, empty=8), seed=0)


# ---------------------------------------------------------------------------------------
# LLaMA: Meta layout


def test_truncation_keeps_the_first_blocks_and_reports_the_rest(tmp_path):
    state = tl.write_meta_llama_dir(tmp_path, n_layers=4, seed=1, **DIMS)
    flat, report = import_meta(tmp_path, layers=2)

    blocks = {k.split("/")[1] for k in flat if "/layers_" in k}
    assert blocks == {"layers_0", "layers_1"}
    truncated = {k for k, reason in report.dropped.items() if reason.startswith("truncated")}
    assert truncated == {k for k in state if k.startswith(("layers.2.", "layers.3."))}
    assert len(truncated) == 18
    assert report.dropped["rope.freqs"].startswith("RoPE buffer")
    assert len(report.kept) == 2 * 9 + 3
    np.testing.assert_array_equal(flat["language_decoder/layers_1/attention/wq/kernel"], state["layers.1.attention.wq.weight"].numpy().T)
    np.testing.assert_array_equal(flat["language_decoder/layers_1/feed_forward/w2/kernel"], state["layers.1.feed_forward.w2.weight"].numpy().T)
    np.testing.assert_array_equal(flat["language_decoder/layers_0/ffn_norm/weight"], state["layers.0.ffn_norm.weight"].numpy())
    np.testing.assert_array_equal(flat["language_decoder/tok_embeddings/embedding"][:V], state["tok_embeddings.weight"].numpy())
    np.testing.assert_array_equal(flat["language_decoder/output/kernel"][:, :V], state["output.weight"].numpy().T)
    np.testing.assert_array_equal(flat["language_decoder/output/kernel"][:, SPECIAL.empty], np.zeros(64))


def test_model_parallel_shards_are_joined(tmp_path):
    state = tl.random_meta_llama_state(n_layers=2, seed=2, **DIMS)
    tl.write_meta_llama_dir(tmp_path / "one", n_layers=2, state=state, **DIMS)
    tl.write_meta_llama_dir(tmp_path / "two", n_layers=2, state=state, n_shards=2, **DIMS)
    assert len(list((tmp_path / "two").glob("consolidated.*.pth"))) == 2
    one, _ = import_meta(tmp_path / "one", layers=2)
    two, report = import_meta(tmp_path / "two", layers=2)
    assert len(report.files) == 2 and one.keys() == two.keys()
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)


def test_vocab_size_comes_from_the_tokenizer_unless_params_json_disagrees(tmp_path):
    tl.write_meta_llama_dir(tmp_path / "auto", n_layers=1, params_vocab_size=-1, **DIMS)
    assert llama.read_meta_params(tmp_path / "auto").decoder_config(1, V, 2).vocab_size == V + 2
    tl.write_meta_llama_dir(tmp_path / "other", n_layers=1, params_vocab_size=300, write_weights=False, **DIMS)
    with pytest.raises(WeightImportError, match="vocab_size 300.*400"):
        llama.read_meta_params(tmp_path / "other").decoder_config(1, V, 2)


def test_layers_beyond_the_source_depth_fail(tmp_path):
    tl.write_meta_llama_dir(tmp_path, n_layers=2, write_weights=False, **DIMS)
    with pytest.raises(WeightImportError, match=r"--layers in \[1, 2\].*found 3"):
        llama.read_meta_params(tmp_path).decoder_config(3, V, 2)


# ---------------------------------------------------------------------------------------
# LLaMA: Hugging Face layout


@pytest.mark.parametrize(
    "fmt", [dict(safetensors=True, max_shard_size="40KB"), dict(safetensors=False), dict(safetensors=False, max_shard_size="40KB")]
)
def test_hf_file_formats_give_identical_params(tmp_path, fmt):
    tl.write_hf_llama_dir(tmp_path / "ref", n_layers=2, n_kv_heads=2, seed=3)
    tl.write_hf_llama_dir(tmp_path / "alt", n_layers=2, n_kv_heads=2, seed=3, **fmt)
    if "max_shard_size" in fmt:
        assert list((tmp_path / "alt").glob("*.index.json"))
    ref, _ = import_hf(tmp_path / "ref", layers=2)
    alt, report = import_hf(tmp_path / "alt", layers=2)
    assert (len(report.files) > 1) == ("max_shard_size" in fmt)
    assert ref.keys() == alt.keys()
    for k in ref:
        np.testing.assert_array_equal(ref[k], alt[k], err_msg=k)


@pytest.mark.parametrize(
    "dim, intermediate", [(4096, 11008), (5120, 13824), (8192, 28672), (64, 192), (96, 320)]
)
def test_hf_intermediate_size_is_rewritten_as_metas_hidden_dim(dim, intermediate):
    multiple_of, multiplier = llama.find_ffn_params(dim, intermediate)
    assert tl.meta_llama_hidden_dim(dim, multiple_of, multiplier) == intermediate


def test_llama_2_7b_gets_metas_own_ffn_params():
    assert llama.find_ffn_params(4096, 11008) == (256, None)


def test_unreachable_intermediate_size_fails():
    with pytest.raises(WeightImportError, match="intermediate_size 7 cannot"):
        llama.find_ffn_params(64, 7)


# ---------------------------------------------------------------------------------------
# OpenAI CLIP


def test_clip_config_is_read_off_a_torchscript_archive_built_by_openai_clip(tmp_path):
    """The archive comes from openai-clip's own model code (build_model, fp16, traced), as ViT-L-14.pt."""
    state = tl.write_openai_clip_archive_from_openai_code(tmp_path / "clip.pt", width=128, layers=3, patch=4, resolution=16)
    assert state["visual.conv1.weight"].dtype == torch.float16
    assert is_torchscript(tmp_path / "clip.pt")
    source = clip.open_openai_clip(tmp_path / "clip.pt")
    cfg, archive_size = clip.infer_vision_config(source)
    assert (cfg.width, cfg.layers, cfg.patch_size, cfg.image_size, archive_size) == (128, 3, 4, 16, 16)
    flat, report = apply_table(source, clip.openai_clip_table(cfg, archive_size))
    assert len(report.kept) == 7 + 3 * 12
    assert set(report.kept) | set(report.dropped) == set(state)
    assert report.dropped["visual.proj"].startswith("CLIP's own projection")
    not_text = {"logit_scale", "input_resolution", "context_length", "vocab_size"}
    text_tower = [k for k in state if not k.startswith("visual.") and k not in not_text]
    assert report.drop_counts()["CLIP text tower"] == len(text_tower) == 17
    np.testing.assert_array_equal(
        np.asarray(flat["vision_encoder/conv1/kernel"], np.float32),
        state["visual.conv1.weight"].float().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(flat["vision_encoder/transformer/resblocks_2/attn/in_proj/kernel"], np.float32),
        state["visual.transformer.resblocks.2.attn.in_proj_weight"].float().numpy().T,
    )


def test_clip_plain_state_dict_is_accepted(tmp_path):
    state = tl.write_openai_clip_torchscript(tmp_path / "clip.pt", layers=1)
    torch.save(state, tmp_path / "state.pt")
    assert not is_torchscript(tmp_path / "state.pt")
    source = clip.open_openai_clip(tmp_path / "state.pt")
    assert set(source.keys()) == set(state)
    _, report = apply_table(source, clip.openai_clip_table(*clip.infer_vision_config(source)))
    assert report.dropped["input_resolution"] == "archive metadata"


def test_clip_other_image_size_drops_the_positional_embedding(tmp_path):
    tl.write_openai_clip_torchscript(tmp_path / "clip.pt", layers=1, patch=4, resolution=16)
    source = clip.open_openai_clip(tmp_path / "clip.pt")
    cfg, archive_size = clip.infer_vision_config(source, image_size=32)
    assert (cfg.image_size, cfg.num_patches, archive_size) == (32, 64, 16)
    flat, report = apply_table(source, clip.openai_clip_table(cfg, archive_size))
    assert "vision_encoder/positional_embedding" not in flat
    assert "fresh positional embedding for 32px" in report.dropped["visual.positional_embedding"]
    with pytest.raises(WeightImportError, match="multiple of the patch 4"):
        clip.infer_vision_config(source, image_size=30)


# ---------------------------------------------------------------------------------------
# released nxtp checkpoint


def test_nxtp_checkpoint_keys_with_or_without_module_prefix(tmp_path):
    state = tl.random_nxtp_model_state(trained_vision_blocks=(1,), n_layers=2, n_kv_heads=2)
    tl.write_nxtp_checkpoint(tmp_path / "a.pth", state, prefix="module.")
    tl.write_nxtp_checkpoint(tmp_path / "b.pth", state, prefix="")
    a, info = nxtp.open_nxtp_checkpoint(tmp_path / "a.pth")
    b, _ = nxtp.open_nxtp_checkpoint(tmp_path / "b.pth")
    assert set(a.keys()) == set(b.keys()) == set(state)
    assert info == {"epoch": 3, "global_step": 21360}
    assert nxtp.decoder_layers(a) == 2
    assert nxtp.image_size(a, patch=4) is None


def nxtp_config(tmp_path):
    from nxtp_jax.models.config import ModelConfig, VisionConfig

    tl.write_meta_llama_dir(tmp_path / "llama", n_layers=4, write_weights=False, **DIMS)
    header = llama.read_meta_params(tmp_path / "llama")
    return ModelConfig(VisionConfig(128, 2, 4, 16), header.decoder_config(2, V, 2), SPECIAL), header


def test_nxtp_table_maps_every_trained_param(tmp_path):
    config, header = nxtp_config(tmp_path)
    state = tl.random_nxtp_model_state(trained_vision_blocks=(1,), n_layers=2, n_kv_heads=2)
    tl.write_nxtp_checkpoint(tmp_path / "ckpt.pth", state)
    source, _ = nxtp.open_nxtp_checkpoint(tmp_path / "ckpt.pth")
    flat, report = apply_table(source, nxtp.nxtp_table(config, header.n_layers), require_all=False)
    assert not report.dropped and len(report.kept) == len(state)
    half = state["vision_encoder.proj.weight"].half().float().numpy()  # written in fp16
    np.testing.assert_array_equal(flat["vision_encoder/proj/kernel"], half.T)
    np.testing.assert_array_equal(
        flat["language_decoder/output/kernel"], state["language_decoder.output.weight"].half().float().numpy().T
    )
    assert flat["language_decoder/tok_embeddings/embedding"].shape == (V + 2, 64)


# ---------------------------------------------------------------------------------------
# error paths


def test_missing_key_names_the_key_and_its_shape(tmp_path):
    state = tl.random_meta_llama_state(n_layers=2, **DIMS)
    del state["layers.1.feed_forward.w2.weight"]
    tl.write_meta_llama_dir(tmp_path, n_layers=2, state=state, **DIMS)
    with pytest.raises(WeightImportError, match=r"not found.*layers\.1\.feed_forward\.w2\.weight \(64, 192\)"):
        import_meta(tmp_path, layers=2)


def test_wrong_shape_names_key_expected_and_found(tmp_path):
    state = tl.random_meta_llama_state(n_layers=2, **DIMS)
    state["layers.0.attention.wk.weight"] = torch.zeros(64, 64)  # 4 kv heads' worth instead of 2
    tl.write_meta_llama_dir(tmp_path, n_layers=2, state=state, **DIMS)
    with pytest.raises(WeightImportError) as e:
        import_meta(tmp_path, layers=2)
    assert "layers.0.attention.wk.weight: expected shape (32, 64), found (64, 64)" in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        llama.read_meta_params(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama.read_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="ViT-L-14.pt"):
        clip.open_openai_clip(tmp_path / "ViT-L-14.pt")
    with pytest.raises(FileNotFoundError, match="ckpt.pth"):
        nxtp.open_nxtp_checkpoint(tmp_path / "ckpt.pth")


def test_missing_weight_files_are_reported_when_needed(tmp_path):
    tl.write_meta_llama_dir(tmp_path, n_layers=2, write_weights=False, **DIMS)
    with pytest.raises(WeightImportError, match="no consolidated.*pth in"):
        import_meta(tmp_path, layers=2)


def test_unknown_key_in_nxtp_checkpoint_fails(tmp_path):
    config, header = nxtp_config(tmp_path)
    state = tl.random_nxtp_model_state(trained_vision_blocks=(1,), n_layers=2, n_kv_heads=2)
    state["language_decoder.adapter.weight"] = torch.zeros(3)
    tl.write_nxtp_checkpoint(tmp_path / "ckpt.pth", state)
    source, _ = nxtp.open_nxtp_checkpoint(tmp_path / "ckpt.pth")
    with pytest.raises(WeightImportError, match=r"belong nowhere.*language_decoder\.adapter\.weight"):
        apply_table(source, nxtp.nxtp_table(config, header.n_layers), require_all=False)


def test_unknown_key_in_clip_fails(tmp_path):
    state = tl.write_openai_clip_torchscript(tmp_path / "clip.pt", layers=1)
    state["visual.adapter"] = torch.zeros(3)
    source = StateDictSource("clip", state, ["clip.pt"])
    cfg, size = clip.infer_vision_config(source)
    with pytest.raises(WeightImportError, match=r"belong nowhere.*visual\.adapter"):
        apply_table(source, clip.openai_clip_table(cfg, size))


def test_nxtp_checkpoint_without_model_dict_fails(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightImportError, match=r"'model' state dict.*\['state_dict'\]"):
        nxtp.open_nxtp_checkpoint(tmp_path / "ckpt.pth")
