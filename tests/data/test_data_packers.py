"""Packers: COCO layout, folder + captions file, synthetic shapes, label pre-extraction."""

import contextlib
import io
import json
import os
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from nxtp_jax.data import labels, pipeline
from nxtp_jax.data.shapes import COLOURS, COUNTS, SHAPES, make_shapes
from nxtp_jax.data.tar import iter_groups, open_shard, read_bytes
from scripts import extract_labels, folder_to_wds, mscoco_to_wds
from scripts import make_shapes as make_shapes_script


def run_script(script, *args):
    """A script's main in process, as its command line ends: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = script.main(list(map(str, args)))
        except SystemExit as e:  # argparse: --help and usage errors
            status = e.code
    return types.SimpleNamespace(returncode=status or 0, stdout=out.getvalue(), stderr=err.getvalue())


def jpeg_bytes(value, size=(12, 10)):
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def tar_members(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def test_coco_packer_layout_and_resume(tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    images = {139: jpeg_bytes(1), 42: jpeg_bytes(2), 724: jpeg_bytes(3)}
    for image_id, data in images.items():
        (coco / "val2017" / f"{image_id:012d}.jpg").write_bytes(data)
    annotations = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 10, "width": 12} for i in images],
        "annotations": [
            {"id": 1, "image_id": 139, "caption": "A woman stands in the kitchen. "},
            {"id": 2, "image_id": 42, "caption": " Two dogs on grass.\n"},
            {"id": 3, "image_id": 139, "caption": "A kitchen with a table."},
            {"id": 4, "image_id": 724, "caption": "A stop sign."},
            {"id": 5, "image_id": 42, "caption": "Dogs playing"},
        ],
    }
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(annotations))
    out = tmp_path / "coco_valid"
    proc = run_script(mscoco_to_wds, "--root", coco, "--split", "val2017", "--out", out, "--samples_per_shard", 2, "--no_progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar"]
    expected = {
        42: "Two dogs on grass. Dogs playing",
        139: "A woman stands in the kitchen. A kitchen with a table.",
        724: "A stop sign.",
    }
    members = tar_members(out / "000000.tar") + tar_members(out / "000001.tar")
    want = []
    for image_id in (42, 139, 724):  # by image id
        key = f"{image_id:012d}"
        cap = expected[image_id]
        meta = {"path": f"{key}.jpg", "cap": cap, "split": "val2017"}
        want += [(f"{key}.jpg", images[image_id]), (f"{key}.txt", cap.encode()), (f"{key}.json", json.dumps(meta).encode())]
    assert members == want
    assert json.loads(members[2][1]) == {"path": "000000000042.jpg", "cap": expected[42], "split": "val2017"}

    first, second = (out / "000000.tar").read_bytes(), (out / "000001.tar").read_bytes()
    (out / "000001.tar").unlink()
    (out / "000007.tar").write_bytes(b"stale")  # from an earlier, larger run
    args = ("--root", coco, "--split", "val2017", "--out", out, "--samples_per_shard", 2, "--no_progress")
    proc = run_script(mscoco_to_wds, *args)
    assert proc.returncode == 1 and one_line_error(proc, "is not empty", "--overwrite")
    assert sorted(os.listdir(out)) == ["000000.tar", "000007.tar"]  # untouched
    proc = run_script(mscoco_to_wds, *args, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar"]  # the stale shard is gone
    assert (out / "000000.tar").read_bytes() == first and (out / "000001.tar").read_bytes() == second


def one_line_error(proc, *words):
    """The script failed with one `error: ...` line naming `words`, and no traceback."""
    lines = proc.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words)


def test_coco_packer_explains_a_wrong_root(tmp_path):
    proc = run_script(mscoco_to_wds, "--root", tmp_path, "--out", tmp_path / "o")
    assert proc.returncode == 1 and one_line_error(proc, "captions_val2017.json"), proc.stderr


def make_coco(tmp_path, file_names):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    for i, name in enumerate(file_names):
        target = coco / "val2017" / name
        if target.resolve().is_relative_to(coco.resolve()):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jpeg_bytes(i))
    annotations = {
        "images": [{"id": i, "file_name": name} for i, name in enumerate(file_names)],
        "annotations": [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in range(len(file_names))],
    }
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(annotations))
    return coco


def test_coco_file_names_with_extra_dots_keep_distinct_keys(tmp_path):
    # "a.b.jpg" and "a.c.jpg" were both keyed "a": one merged sample.
    coco = make_coco(tmp_path, ["a.b.jpg", "a.c.jpg", "a%2Eb.jpg"])
    proc = run_script(mscoco_to_wds, "--root", coco, "--out", tmp_path / "o", "--no_progress")
    assert proc.returncode == 0, proc.stderr
    fd, size = open_shard(str(tmp_path / "o" / "000000.tar"))
    groups = list(iter_groups(fd, size))
    paths = [json.loads(read_bytes(fd, g.members["json"]))["path"] for g in groups]
    fd.close()
    assert [g.key for g in groups] == ["a%2Eb", "a%2Ec", "a%252Eb"]
    assert paths == ["a.b.jpg", "a.c.jpg", "a%2Eb.jpg"]


@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "/etc/hostname"])
def test_coco_file_names_outside_the_split_folder_are_refused(tmp_path, name):
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(1))
    coco = make_coco(tmp_path, ["fine.jpg", name])
    proc = run_script(mscoco_to_wds, "--root", coco, "--out", tmp_path / "o", "--no_progress")
    assert proc.returncode == 1 and one_line_error(proc, repr(name)), proc.stderr
    assert not (tmp_path / "o").exists()


def test_coco_duplicate_file_names_are_refused(tmp_path):
    coco = make_coco(tmp_path, ["x.jpg", "x.jpg"])
    proc = run_script(mscoco_to_wds, "--root", coco, "--out", tmp_path / "o", "--no_progress")
    assert proc.returncode == 1 and one_line_error(proc, "'x'", "unique"), proc.stderr


@pytest.mark.parametrize("path", ["../secret.jpg", "a/../../secret.jpg", "/tmp/secret.jpg"])
def test_folder_packer_refuses_caption_paths_outside_images(tmp_path, path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(5))
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(6))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"path": "a.jpg", "caption": "ok"}) + "\n" + json.dumps({"path": path, "caption": "x"}) + "\n")
    proc = run_script(folder_to_wds, "--images", images, "--captions", tmp_path / "caps.jsonl", "--out", tmp_path / "o", "--no_progress")
    assert proc.returncode == 1 and one_line_error(proc, repr(path)), proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prefix", ["../x", "a/../../x", "/tmp/nxtp-escape"])
def test_folder_packer_refuses_a_prefix_that_leads_outside_out(tmp_path, prefix):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(5))
    (tmp_path / "caps.tsv").write_text("path\tcaption\na.jpg\tcap\n")
    out = tmp_path / "o"
    proc = run_script(folder_to_wds, "--images", images, "--captions", tmp_path / "caps.tsv", "--out", out, "--prefix", prefix, "--no_progress")
    assert proc.returncode == 1 and one_line_error(proc, "outside --out"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.tsv", "imgs"]
    assert not os.path.exists(f"{prefix}-000000.tar")


def test_packers_refuse_an_out_that_is_a_file(tmp_path):
    (tmp_path / "caps.tsv").write_text("path\tcaption\n")
    (tmp_path / "file").write_text("x")
    proc = run_script(folder_to_wds, "--images", tmp_path, "--captions", tmp_path / "caps.tsv", "--out", tmp_path / "file")
    assert proc.returncode == 1 and one_line_error(proc, "is a file"), proc.stderr


def test_folder_packer_tsv_and_jsonl(tmp_path):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg_bytes(5))
    Image.fromarray(np.full((6, 6, 3), 9, np.uint8)).save(images / "sub" / "b.bmp")
    (tmp_path / "caps.tsv").write_text("path\tcaption\tlabels\na.jpg\ta red thing\tthing, red\nsub/b.bmp\tgrey box\t\nmissing.jpg\tgone\t\n")
    proc = run_script(folder_to_wds, "--images", images, "--captions", tmp_path / "caps.tsv", "--out", tmp_path / "o1", "--no_progress")
    assert proc.returncode == 0, proc.stderr
    assert "missing.jpg" in proc.stderr
    fd, size = open_shard(str(tmp_path / "o1" / "000000.tar"))
    groups = list(iter_groups(fd, size))
    assert [g.key for g in groups] == ["000000", "000001"]
    a = {ext: read_bytes(fd, m) for ext, m in groups[0].members.items()}
    b = {ext: read_bytes(fd, m) for ext, m in groups[1].members.items()}
    fd.close()
    assert a["jpg"] == (images / "a.jpg").read_bytes()
    assert json.loads(a["json"]) == {"path": "a.jpg", "cap": "a red thing", "labels": ["thing", "red"]}
    assert (np.asarray(Image.open(io.BytesIO(b["png"]))) == 9).all()
    assert json.loads(b["json"]) == {"path": "sub/b.bmp", "cap": "grey box"}

    lines = [{"path": "a.jpg", "caption": "x", "labels": ["cat"]}, {"path": "sub/b.bmp", "caption": "y", "labels": []}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    proc = run_script(folder_to_wds, "--images", images, "--captions", tmp_path / "caps.jsonl", "--out", tmp_path / "o2", "--samples_per_shard", 1, "--prefix", "f", "--no_progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "o2")) == ["f-000000.tar", "f-000001.tar"]
    loader = pipeline.build_eval_loader(sorted(str(p) for p in (tmp_path / "o2").iterdir()), image_size=4, batch_size=2, process_index=0, process_count=1)
    (batch,) = list(loader)
    assert batch["labels"].tolist() == ["cat", ""] and batch["caption"].tolist() == ["x", "y"]


def test_make_shapes_is_deterministic_and_varied(tmp_path):
    a = make_shapes(tmp_path / "a", num_train=120, num_val=30, image_size=32, samples_per_shard=50, seed=3, progress=False)
    b = make_shapes(tmp_path / "b", num_train=120, num_val=30, image_size=32, samples_per_shard=50, seed=3, progress=False)
    c = make_shapes(tmp_path / "c", num_train=120, num_val=30, image_size=32, samples_per_shard=50, seed=4, progress=False)
    assert [len(a["train"]), len(a["val"])] == [3, 1]
    for pa, pb, pc in zip(a["train"] + a["val"], b["train"] + b["val"], c["train"] + c["val"]):
        assert open(pa, "rb").read() == open(pb, "rb").read()
        assert open(pa, "rb").read() != open(pc, "rb").read()
    loader = pipeline.build_eval_loader(a["train"] + a["val"], image_size=32, batch_size=150, process_index=0, process_count=1)
    (batch,) = list(loader)
    assert batch["valid"].all() and batch["image"].shape == (150, 32, 32, 3)
    keys = batch["key"].tolist()
    assert len(set(keys)) == 150 and sum(k.startswith("val") for k in keys) == 30
    label_lists = [x.split(",") for x in batch["labels"]]
    assert all(len(labels) == 3 for labels in label_lists)  # colour, shape, count: always three
    colours, shapes, counts = zip(*label_lists)
    assert set(colours) == set(COLOURS) and set(shapes) == set(SHAPES) and set(counts) == set(COUNTS)
    for caption, (colour, shape, count) in zip(batch["caption"], label_lists):
        words = caption.lower().rstrip(".").split()
        assert colour in words and any(w.startswith(shape) for w in words), caption
        assert (count in words) if count != "one" else ({"a", "an"} & set(words)), caption
    # The image shows what the labels say: the bright pixels (the background is dark) are
    # closest to the labelled colour.
    names, rgbs = list(COLOURS), np.array(list(COLOURS.values()), np.float64)
    hits = 0
    for image, colour in zip(batch["image"], colours):
        pixels = image.reshape(-1, 3).astype(np.float64)
        mean = pixels[pixels.max(axis=1) > 120].mean(axis=0)
        hits += names[int(np.argmin(((rgbs - mean) ** 2).sum(axis=1)))] == colour
    assert hits >= 0.95 * len(colours)


def test_make_shapes_script(tmp_path):
    proc = run_script(make_shapes_script, "--out", tmp_path, "--num_train", 5, "--num_val", 3, "--image_size", 24, "--samples_per_shard", 4, "--no_progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "train")) == ["shapes-train-000000.tar", "shapes-train-000001.tar"]
    assert os.listdir(tmp_path / "val") == ["shapes-val-000000.tar"]


def test_extract_labels_adds_labels_and_copies_members(tmp_path, monkeypatch):
    from nxtp_jax.data.writer import write_shard

    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "000000.tar", [
        ("k1", {"jpg": b"img1", "txt": b"a brown dog", "json": b'{"url": "u1"}', "cls": b"7"}),
        ("k2", {"jpg": b"img2", "txt": "caf\xe9".encode("latin-1")}),  # not UTF-8: left out
        ("k3", {"png": b"img3", "txt": b"grey cats"}),  # no json: created
    ])
    monkeypatch.setattr(labels, "check_nltk_data", lambda: None)
    monkeypatch.setattr(labels, "caption_to_nouns", lambda caption: [w for w in caption.split() if len(w) > 3])
    assert extract_labels.main(["--input", str(src), "--out", str(tmp_path / "out"), "--no_progress"]) == 0
    got = tar_members(tmp_path / "out" / "000000.tar")
    assert got == [
        ("k1.jpg", b"img1"), ("k1.txt", b"a brown dog"), ("k1.json", json.dumps({"url": "u1", "labels": ["brown"]}).encode()),
        ("k1.cls", b"7"), ("k3.png", b"img3"), ("k3.txt", b"grey cats"), ("k3.json", json.dumps({"labels": ["grey", "cats"]}).encode()),
    ]


def test_extract_labels_refuses_an_out_holding_its_inputs_and_a_rerun_without_overwrite(tmp_path, monkeypatch, capsys):
    from nxtp_jax.data.writer import write_shard

    src = tmp_path / "in"
    src.mkdir()
    write_shard(src / "000000.tar", [("k1", {"jpg": b"img1", "txt": b"a dog"})])
    monkeypatch.setattr(labels, "check_nltk_data", lambda: None)
    monkeypatch.setattr(labels, "caption_to_nouns", lambda caption: caption.split())
    for out in (src, tmp_path):  # --overwrite there would delete the inputs
        assert extract_labels.main(["--input", str(src), "--out", str(out), "--overwrite", "--no_progress"]) == 1
        assert "holds input shards" in capsys.readouterr().err
    assert (src / "000000.tar").exists()
    out = tmp_path / "out"
    assert extract_labels.main(["--input", str(src), "--out", str(out), "--no_progress"]) == 0
    (out / "old.tar").write_bytes(b"stale")
    assert extract_labels.main(["--input", str(src), "--out", str(out), "--no_progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert extract_labels.main(["--input", str(src), "--out", str(out), "--overwrite", "--no_progress"]) == 0
    assert sorted(os.listdir(out)) == ["000000.tar"]


def test_extract_labels_without_nltk_data_says_how_to_get_it(tmp_path, monkeypatch):
    labels.check_nltk_data.cache_clear()
    import nltk

    monkeypatch.setattr(nltk.data, "find", lambda path: (_ for _ in ()).throw(LookupError(path)))
    assert extract_labels.main(["--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    labels.check_nltk_data.cache_clear()


@pytest.mark.parametrize("script", [mscoco_to_wds, folder_to_wds, make_shapes_script, extract_labels], ids=lambda m: m.__name__)
def test_scripts_have_help(script):
    proc = run_script(script, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
