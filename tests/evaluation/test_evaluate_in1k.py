"""ImageNet-1k evaluation: the original's class names as targets, TFDS (random-access) and folder inputs."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from nxtp_jax import checkpoint
from nxtp_jax.cli.imagenet import imagenet_command
from nxtp_jax.data import eval_inputs, imagenet
from nxtp_jax.evaluation import job
from nxtp_jax.data import tfds_source
from nxtp_jax.configs import base
from nxtp_jax.tokenizer import Tokenizer
from tiny_models import tiny_recognizer


def test_class_file_is_the_originals():
    text = imagenet.CLASSES_FILE.read_text(encoding="utf-8")
    assert len(text) == 26553 + 1  # src/imagenet/tools/in1k_label.name, plus a final newline
    names = imagenet.class_names()
    assert len(names) == 1000
    assert names[0] == ("tench", "Tinca tinca")
    assert names[477] == ("carpenters kit", "tool kit")
    assert names[639] == ("maillot", "tank suit")
    assert names[999] == ("toilet tissue", "toilet paper", "bathroom tissue")
    assert imagenet.class_targets(1) == ["goldfish", "carassius auratus"]
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        imagenet.class_targets(1000)


def _record(i: int, label: int, bad: bool = False) -> dict:
    pixels = np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return {"image": b"junk" if bad else buf.getvalue(), "label": label, "file_name": f"val_{i:05d}.JPEG".encode()}


def test_tfds_record_becomes_an_element_with_the_class_targets():
    element = imagenet.In1kRecord(16)(_record(0, 2))
    assert element["labels"] == "great white shark,white shark,man-eater,man-eating shark,carcharodon carcharias"
    assert element["key"] == "val_00000.JPEG" and element["image"].shape == (16, 16, 3)
    assert element["caption"] == "a photo of a great white shark."


def test_random_access_eval_loader_deals_every_record_once():
    source = [_record(i, i % 1000, bad=(i == 6)) for i in range(11)]
    seen, unreadable, batches = [], [], []
    for p in range(2):
        loader = eval_inputs.build_random_access_eval_loader(
            source, imagenet.In1kRecord(8), image_size=8, batch_size=4, process_index=p, process_count=2
        )
        assert loader.num_samples == 11
        n = 0
        for batch in loader:
            n += 1
            for key, valid in zip(batch["key"], batch["valid"]):
                if valid:
                    seen.append(str(key))
                elif key:
                    unreadable.append(str(key))
        batches.append(n)
    assert batches == [2, 2]
    assert sorted(seen) == sorted(f"val_{i:05d}.JPEG" for i in range(11) if i != 6)
    assert unreadable == ["val_00006.JPEG"]


def test_captions_file_for_an_imagenet_val_folder(tmp_path):
    val = tmp_path / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
    for folder, name in (("n00000000", "b.JPEG"), ("n00000000", "a.JPEG"), ("n00000999", "c.JPEG"), ("n00000999", "notes.txt")):
        (val / folder / name).write_bytes(b"")
    out = tmp_path / "in1k_val.jsonl"
    assert imagenet_command([f"--val_dir={val}", f"--out={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"path": "n00000000/a.JPEG", "caption": "a photo of a tench.", "labels": ["tench", "tinca tinca"]},
        {"path": "n00000000/b.JPEG", "caption": "a photo of a tench.", "labels": ["tench", "tinca tinca"]},
        {"path": "n00000999/c.JPEG", "caption": "a photo of a toilet tissue.",
         "labels": ["toilet tissue", "toilet paper", "bathroom tissue"]},
    ]
    (val / "n00000999" / "c.JPEG").unlink()
    (val / "n00000999" / "notes.txt").unlink()
    (val / "n00000999").rmdir()
    with pytest.raises(ValueError, match="expected 1000 class folders"):
        imagenet.captions_rows(val)


def test_eval_job_on_a_tfds_split(sp_model_path, tmp_path, monkeypatch):
    tok = Tokenizer(sp_model_path)
    model, params = tiny_recognizer(tok, delimiter_boost=3.0)
    ckpt = checkpoint.save(tmp_path / "ckpt", params, model.config, sp_model_path)
    source = [_record(i, 10 * i) for i in range(5)]
    opened = []

    def fake_source(name, split, data_dir=None):
        opened.append((name, split, data_dir))
        return source

    monkeypatch.setattr(tfds_source, "tfds_data_source", fake_source)
    c = base.get_config()
    c.model.dtype = "float32"
    c.data.root = str(tmp_path / "data")
    c.data.registry = {
        "in1k_valid": {"root": "tensorflow_datasets", "length": 5, "tfds": "imagenet2012", "split": "validation", "classes": "in1k"}
    }
    c.data.worker_count = 0
    c.eval.update(dataset="in1k_valid", ckpt=str(ckpt), k=2, batch_size=8, embedder="exact")
    summary = job.evaluate(c, tmp_path / "work", progress=False)

    assert opened == [("imagenet2012", "validation", str(tmp_path / "data" / "tensorflow_datasets"))]
    assert summary["num_images"] == 5 and summary["dataset"] == "in1k_valid"
    records = [json.loads(line) for line in (tmp_path / "work" / "eval_in1k_valid.jsonl").read_text().splitlines()]
    assert [r["targets"] for r in records] == [imagenet.class_targets(10 * i) for i in range(5)]
    c.data.registry["in1k_valid"] = {"root": "tensorflow_datasets", "length": 5, "tfds": "imagenet2012"}
    with pytest.raises(ValueError, match='needs "classes"'):
        eval_inputs.build_loader(c, "in1k_valid", image_size=32, batch_size=8, process_index=0, process_count=1)
