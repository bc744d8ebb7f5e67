"""`pretrained.resolve` against a local Hub: download, check, convert once, reuse; the failure paths."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import constants

from fake_hub import COMMIT
from tiny_release import CKPT_FILE, CLIP_PATH, LLAMA, make_card
from nxtp_jax import checkpoint, pretrained
from nxtp_jax.errors import CheckpointError, NxtpError, WeightImportError
from nxtp_jax.inference.tagger import Tagger
from nxtp_jax.weights import convert, save
from tiny_models import random_images

ROOT = pathlib.Path(__file__).resolve().parents[2]
CKPT_GET = f"/kaiyuyue/nxtp/resolve/main/{CKPT_FILE}"


def tags(ckpt_dir) -> list:
    return Tagger.load(ckpt_dir).predict(random_images(2, 16, seed=3), num_labels=5)


def test_first_use_downloads_converts_and_tags_as_the_converter_route_does(hub, card, release_files, tmp_path, capsys):
    out = pretrained.resolve(card)
    assert out == str(tmp_path / "nxtp" / "tiny")
    assert sorted(hub.downloads()) == sorted(
        [CKPT_GET, CLIP_PATH, f"/{LLAMA}/resolve/{COMMIT}/tokenizer.model", f"/{LLAMA}/resolve/{COMMIT}/config.json"])
    assert "tiny: licence: CC-BY-NC 4.0 (test release)" in capsys.readouterr().err
    release = checkpoint.read_meta(out)["release"]
    assert release["sources"]["checkpoint"]["md5"] == hashlib.md5(release_files["checkpoint"].read_bytes()).hexdigest()
    assert release["sources"]["clip"]["sha256"] == hashlib.sha256(release_files["clip"].read_bytes()).hexdigest()

    # The long route: the converter on the same local files.
    header = tmp_path / "llama"
    header.mkdir()
    (header / "config.json").write_bytes(release_files["llama_config"].read_bytes())
    by_hand = save(convert(clip_path=release_files["clip"], tokenizer_path=release_files["tokenizer"], llama_hf_dir=header,
                           nxtp_ckpt=release_files["checkpoint"], layers=2, dtype="float16"),
                   tmp_path / "by_hand", release_files["tokenizer"])
    found, expected = tags(out), tags(by_hand)
    assert found[0]
    assert [[label for label, _ in t] for t in found] == [[label for label, _ in t] for t in expected]
    np.testing.assert_allclose([[p for _, p in t] for t in found], [[p for _, p in t] for t in expected], atol=1e-6)


def test_second_use_sends_no_request_and_converts_nothing(hub, card, monkeypatch, capsys):
    out = pretrained.resolve(card)
    written = (pathlib.Path(out) / "config.json").stat().st_mtime_ns
    hub.log.clear()
    monkeypatch.setattr(pretrained, "convert", lambda **kw: pytest.fail("converted again"))
    assert pretrained.resolve(card) == out
    assert hub.log == []
    assert (pathlib.Path(out) / "config.json").stat().st_mtime_ns == written
    assert capsys.readouterr().err.count("licence:") == 1  # once per model and process


def test_cut_connections_resume_with_a_range_request(hub, card, monkeypatch):
    # huggingface_hub writes in 10 MB chunks: a cut inside the first one resumes from 0, so chunk the tiny file finer.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.cut_once |= {CKPT_GET, CLIP_PATH}
    pretrained.resolve(card)
    ranged = {p for m, p, r in hub.log if m == "GET" and r and r != "bytes=0-"}
    assert ranged == {CKPT_GET, CLIP_PATH}
    assert not list(pathlib.Path(constants.HF_HOME).rglob("*.incomplete"))


def test_clip_already_in_openai_clips_folder_is_not_downloaded(hub, card, release_files, tmp_path):
    folder = tmp_path / "home" / ".cache" / "clip"  # openai-clip's download_root under this test's HOME
    folder.mkdir(parents=True)
    (folder / "ViT-L-14.pt").write_bytes(release_files["clip"].read_bytes())
    out = pretrained.resolve(card)
    assert CLIP_PATH not in hub.downloads() and CKPT_GET in hub.downloads()
    assert checkpoint.read_meta(out)["release"]["sources"]["clip"]["sha256"] == hashlib.sha256(
        release_files["clip"].read_bytes()).hexdigest()


def test_wrong_checkpoint_md5_is_refused_and_the_file_deleted(hub, release_files, tmp_path):
    card = make_card(release_files, tmp_path / "bad.json", hub.url, checkpoint={"md5_prefix": "000000"})
    with pytest.raises(WeightImportError, match=rf"checkpoint: kaiyuyue/nxtp@main/{CKPT_FILE} has md5 [0-9a-f]+, expected one starting 000000 .*; deleted"):
        pretrained.resolve(card)
    blobs = pathlib.Path(constants.HF_HUB_CACHE) / "models--kaiyuyue--nxtp" / "blobs"
    assert list(blobs.iterdir()) == []
    assert not (tmp_path / "nxtp" / "tiny").exists()


def test_wrong_clip_sha256_is_refused_and_the_file_deleted(hub, release_files, tmp_path):
    card = make_card(release_files, tmp_path / "bad.json", hub.url, clip={"sha256": "0" * 64})
    with pytest.raises(WeightImportError, match=r"clip: .*ViT-L-14.pt has sha256 [0-9a-f]{64}, expected 0{64} \(the card's\); deleted"):
        pretrained.resolve(card)
    assert not list((pathlib.Path(constants.HF_HOME) / "nxtp_jax" / "urls").rglob("ViT-L-14.pt"))


def test_a_tampered_cached_tokenizer_is_refused_on_reuse(hub, card, tmp_path):
    pretrained.resolve(card)
    blob = pathlib.Path(os.path.realpath(next(pathlib.Path(constants.HF_HUB_CACHE).rglob("snapshots/*/tokenizer.model"))))
    data = blob.read_bytes()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    shutil.rmtree(tmp_path / "nxtp" / "tiny")  # a new conversion, which reuses the cached files
    with pytest.raises(WeightImportError, match="tokenizer: .*tokenizer.model has sha256 .*the Hub's ETag.*deleted"):
        pretrained.resolve(card)
    assert not blob.exists()


def test_gated_llama_answers_with_the_licence_line(hub, card):
    hub.gated.add(LLAMA)
    with pytest.raises(NxtpError) as e:
        pretrained.resolve(card)
    assert str(e.value) == (
        f"tokenizer: {LLAMA} answered 401: it is gated; accept its licence at https://huggingface.co/{LLAMA} , then run "
        "`huggingface-cli login` (or set HF_TOKEN) or pass local copies with --llama_dir DIR and --tokenizer FILE"
    )


def test_local_llama_files_stand_in_for_the_gated_repo(hub, card, release_files, tmp_path):
    hub.gated.add(LLAMA)
    llama = tmp_path / "llama-2-7b-hf"
    llama.mkdir()
    (llama / "config.json").write_bytes(release_files["llama_config"].read_bytes())
    out = pretrained.resolve(card, llama_dir=llama, tokenizer=release_files["tokenizer"])
    assert checkpoint.read_meta(out)["release"]["sources"]["tokenizer"]["source"] == str(release_files["tokenizer"].resolve())
    assert not [p for p in hub.downloads() if LLAMA in p]


def test_offline_with_a_warm_hub_cache_converts_without_a_request(hub, card, tmp_path, monkeypatch):
    first = pretrained.resolve(card)
    meta = checkpoint.read_meta(first)
    monkeypatch.setenv("NXTP_JAX_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.log.clear()
    out = pretrained.resolve(card)
    assert out == str(tmp_path / "other" / "tiny") and hub.log == []
    assert checkpoint.read_meta(out)["release"] == meta["release"]


def test_offline_with_a_cold_cache_says_what_is_missing(hub, card, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NxtpError, match=r"tokenizer: tokenizer.model of meta-llama/Llama-2-7b-hf is not in the Hugging Face cache .* downloads are off \(HF_HUB_OFFLINE=1\)"):
        pretrained.resolve(card)


def test_two_concurrent_first_uses_give_one_valid_cache(hub, card, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": constants.HF_HOME, "NXTP_JAX_CACHE": str(tmp_path / "nxtp"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "JAX_PLATFORMS": "cpu"}
    code = f"from nxtp_jax import pretrained; print(pretrained.resolve({str(card)!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert {out.strip() for out, _ in results} == {str(tmp_path / "nxtp" / "tiny")}
    assert hub.downloads().count(CKPT_GET) == 1
    assert sorted(p.name for p in (tmp_path / "nxtp").iterdir()) == ["tiny", "tiny.lock"]
    assert checkpoint.load_config(tmp_path / "nxtp" / "tiny").decoder.layers == 2


def test_a_cache_made_from_another_card_is_not_used(hub, card, release_files, tmp_path):
    pretrained.resolve(card)
    other = make_card(release_files, tmp_path / "other.json", hub.url, layers=1)
    with pytest.raises(CheckpointError, match="converted from other inputs than the card 'tiny' names; remove that folder"):
        pretrained.resolve(other)


def test_a_local_or_gs_directory_is_returned_as_it_is_and_an_unknown_name_is_refused(tmp_path):
    assert pretrained.resolve(tmp_path) == str(tmp_path)
    assert pretrained.resolve("gs://bucket/ckpt") == "gs://bucket/ckpt"
    with pytest.raises(NxtpError, match=r"expected a released model \(g3m, g70m\), a model card .json or a checkpoint directory, found 'g4m'"):
        pretrained.resolve("g4m")


def test_the_shipped_cards_name_the_released_files_and_their_published_figures():
    g3m, g70m = pretrained.load_card("g3m"), pretrained.load_card("g70m")
    assert (g3m["checkpoint"]["file"], g3m["checkpoint"]["md5_prefix"]) == ("ckpt_epoch_03_iter_0021360.pth", "b2a69b")
    assert (g70m["checkpoint"]["file"], g70m["checkpoint"]["md5_prefix"]) == ("ckpt_epoch_03_iter_1656549.pth", "e177c7")
    assert g3m["published"]["top10_recall"] == {"cc3m": 0.740, "coco": 0.703, "openimages": 0.616}
    assert g70m["published"]["top10_recall"] == {"cc3m": 0.721, "coco": 0.765, "openimages": 0.662}
    assert g3m["clip"]["url"].endswith(f"/{g3m['clip']['sha256']}/ViT-L-14.pt")
    assert g3m["layers"] == g70m["layers"] == 6 and "CC-BY-NC 4.0" in g3m["license"] and "LLaMA 2" in g3m["license"]
