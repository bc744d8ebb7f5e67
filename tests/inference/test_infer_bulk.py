"""Bulk tagging (`python -m nxtp_jax.infer --output=OUT.jsonl INPUT...`): files, directories and
tar shards; killed halfway and rerun, every image is in OUT exactly once; bad images are recorded."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from nxtp_jax.inference.bulk import iter_images, output_path, read_done
from nxtp_jax.inference.tagger import Tagger
from tiny_models import random_images


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture()
def inputs(tmp_path):
    """A directory (nested, with one text file named .png), a FIFO, a shard (one sample's image is
    truncated, one sample has no image) and a file: 9 entries, 3 of them bad."""
    arrays = random_images(6, 36, seed=5)
    root = tmp_path / "in"
    (root / "dir" / "sub").mkdir(parents=True)
    for i, name in enumerate(["dir/a.png", "dir/sub/b.png", "dir/sub/c.jpg"]):
        Image.fromarray(arrays[i]).save(root / name)
    (root / "dir" / "notes.png").write_text("not an image")
    (root / "dir" / "readme.txt").write_text("skipped: not an image suffix")
    fifo = root / "fifo.png"
    os.mkfifo(fifo)  # reading it blocks: the first run is killed there
    broken = png_bytes(arrays[4])
    write_shard(root / "shard.tar", {"s0.png": png_bytes(arrays[3]), "s0.txt": b"a caption",
                                     "s1.png": broken[: len(broken) // 2], "s2.txt": b"no image"})
    Image.fromarray(arrays[5]).save(root / "last.png")
    order = [str(root / "dir"), str(fifo), str(root / "shard.tar"), str(root / "last.png")]
    keys = [str(root / "dir" / n) for n in ("a.png", "notes.png", "sub/b.png", "sub/c.jpg")] + [str(fifo)] + [
        f"{root / 'shard.tar'}/{k}" for k in ("s0.png", "s1.png", "s2")] + [str(root / "last.png")]
    sources = {keys[0]: arrays[0], keys[2]: arrays[1], keys[3]: root / "dir/sub/c.jpg", keys[4]: arrays[2],
               keys[5]: arrays[3], keys[8]: arrays[5]}
    return {"order": order, "keys": keys, "fifo": fifo, "fifo_image": arrays[2], "sources": sources,
            "bad": {keys[1], keys[6], keys[7]}}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_killed_run_resumes_with_every_image_exactly_once(tiny_ckpt, inputs, tmp_path):
    out = tmp_path / "out" / "tags.jsonl"
    cmd = [sys.executable, "-m", "nxtp_jax.infer", f"--ckpt={tiny_ckpt}", "--num_labels=3", "--batch_size=2",
           f"--output={out}", *inputs["order"]]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while len(_lines(out)) < 4:  # the directory's two batches; then it blocks on the FIFO
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run wrote no 4 lines in 600 s"
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert [x["image"] for x in _lines(out)] == inputs["keys"][:4]
    with open(out, "a") as f:
        f.write('{"image": "' + inputs["keys"][4][:10])  # a line torn by the kill
    os.unlink(inputs["fifo"])
    Image.fromarray(inputs["fifo_image"]).save(inputs["fifo"], format="PNG")

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "tagged 3 image(s), 2 could not be read; 4 were already there" in second.stderr
    lines = _lines(out)
    assert [x["image"] for x in lines] == inputs["keys"]  # each exactly once, in input order
    assert {x["image"] for x in lines if "error" in x} == inputs["bad"]
    assert all(x["image"] in x["error"] for x in lines if "error" in x)

    tagger = Tagger.load(tiny_ckpt)
    by_key = {x["image"]: x for x in lines}
    sources = inputs["sources"]
    want = tagger.predict([sources[k] for k in sources], num_labels=3)
    for key, w in zip(sources, want):
        got = by_key[key]["labels"]
        assert [x["label"] for x in got] == [label for label, _ in w], key
        # Batches of 2 here, of 6 in the reference: XLA rounds differently per batch shape.
        np.testing.assert_allclose([x["prob"] for x in got], [p for _, p in w], rtol=1e-4)

    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # nothing left to do
    assert third.returncode == 0 and "tagged 0 image(s), 0 could not be read; 9 were already there" in third.stderr
    assert [x["image"] for x in _lines(out)] == inputs["keys"]


def test_processes_split_the_images_by_index_modulo_count(inputs):
    os.unlink(inputs["fifo"])
    Image.fromarray(inputs["fifo_image"]).save(inputs["fifo"], format="PNG")
    shares = [[key for key, _ in iter_images(inputs["order"], lambda i, key, p=p: i % 3 == p)] for p in range(3)]
    assert sorted(sum(shares, [])) == sorted(inputs["keys"])
    assert shares[1] == inputs["keys"][1::3]
    skipped = [key for key, _ in iter_images(inputs["order"], lambda i, key: key not in inputs["bad"])]
    assert skipped == [k for k in inputs["keys"] if k not in inputs["bad"]]


def test_output_names_per_process():
    assert str(output_path("runs/tags.jsonl", 0, 1)) == "runs/tags.jsonl"
    assert str(output_path("runs/tags.jsonl", 1, 4)) == "runs/tags.process-00001-of-00004.jsonl"


def test_read_done_refuses_a_file_that_is_not_tagger_output(tmp_path):
    out = tmp_path / "other.jsonl"
    out.write_text('{"image": "a.png", "labels": []}\n["not", "a", "record"]\n')
    with pytest.raises(ValueError, match="line 2"):
        read_done(out)
