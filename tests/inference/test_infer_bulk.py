"""Bulk tagging (`python -m nxtp_jax.infer --output=OUT.jsonl INPUT...`): files, directories and
tar shards; killed halfway and rerun, every image is in OUT exactly once; bad images are recorded."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from nxtp_jax.cli.tag import tag_command
from nxtp_jax.inference.bulk import iter_images, output_path, prepare_output, read_done, tag_to_file
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


def test_killed_run_resumes_with_every_image_exactly_once(tiny_ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out" / "tags.jsonl"
    args = [f"--ckpt={tiny_ckpt}", "--num_labels=3", "--batch_size=2", f"--output={out}", *inputs["order"]]
    first = subprocess.Popen([sys.executable, "-m", "nxtp_jax.infer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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

    capsys.readouterr()
    assert tag_command(args) == 0  # the rerun, in process
    assert "tagged 3 image(s), 2 could not be read; 4 were already there" in capsys.readouterr().err
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

    assert tag_command(args) == 0  # nothing left to do
    assert "tagged 0 image(s), 0 could not be read; 9 were already there" in capsys.readouterr().err
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


def _never_load():
    raise AssertionError("the model was loaded before the output was checked")


def _tag_to(out, inputs, load_tagger=_never_load, **kw):
    tag_to_file(inputs, str(out), load_tagger, num_labels=3, min_prob=0.0, vocab=None, ranking="prob", batch_size=2,
                process_index=0, process_count=1, **kw)


@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"first line\nlast line without a newline"),
    ("blob.bin", bytes(range(256)) * 4),  # binary, no newline at all
    ("list.jsonl", b'["a", "b"]\n'),
    ("half.jsonl", b'{"image": "a.png", "labels": []}\nsome text\n'),
])
def test_a_foreign_output_is_refused_untouched_before_the_model_loads(tmp_path, inputs, name, data):
    out = tmp_path / name
    out.write_bytes(data)
    with pytest.raises(ValueError, match=f"{out} is not an output of nxtp-tag .*left untouched"):
        _tag_to(out, inputs["order"])
    assert out.read_bytes() == data
    assert not (tmp_path / f"{name}.lock").exists()


def test_only_a_torn_last_line_of_our_own_file_is_dropped(tmp_path):
    first = '{"image": "a.png", "labels": [{"label": "cat", "prob": 0.5}]}\n'
    whole = '{"image": "b.png", "error": "b.png: broken"}'
    torn, kept = tmp_path / "torn.jsonl", tmp_path / "kept.jsonl"
    torn.write_text(first + '{"image": "b.p')
    kept.write_text(first + whole)  # a whole record whose newline was not written: valid JSON, kept
    for path in (torn, kept):
        out = prepare_output(str(path), 0, 1)
        out.close()
    assert torn.read_text() == first
    assert kept.read_text() == first + whole + "\n"
    assert read_done(kept)[0] == {"a.png", "b.png"}


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path, inputs):
    out = tmp_path / "tags.jsonl"
    first = prepare_output(str(out), 0, 1)
    try:
        with pytest.raises(OSError, match=rf"{out} is in use by another run \(pid {os.getpid()} on .*, since "):
            _tag_to(out, inputs["order"])
    finally:
        first.close()
    assert not (tmp_path / "tags.jsonl.lock").exists()
    # The same file by another name (a symlink, or /dev/stdout redirected to it) is the same output.
    (tmp_path / "link.jsonl").symlink_to(out)
    first = prepare_output(str(tmp_path / "link.jsonl"), 0, 1)
    try:
        with pytest.raises(OSError, match="is in use by another run"):
            prepare_output(str(out), 0, 1)
    finally:
        first.close()
    # A run killed while holding the lock leaves its file, but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", "import time; from nxtp_jax.inference.bulk import prepare_output; "
                               f"prepare_output({str(out)!r}, 0, 1); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait()
    assert (tmp_path / "tags.jsonl.lock").exists()
    prepare_output(str(out), 0, 1).close()


def test_an_unwritable_output_fails_before_the_model_loads(tmp_path, inputs):
    (tmp_path / "file").write_text("a file, not a directory")
    with pytest.raises(OSError, match="--output .*file/out.jsonl cannot be written"):
        _tag_to(tmp_path / "file" / "out.jsonl", inputs["order"])


def test_a_pipe_output_is_written_through_and_never_read(tiny_ckpt, tmp_path, inputs):
    os.unlink(inputs["fifo"])
    Image.fromarray(inputs["fifo_image"]).save(inputs["fifo"], format="PNG")
    out = tmp_path / "pipe.jsonl"
    os.mkfifo(out)
    received = []
    reader = threading.Thread(target=lambda: received.append(out.read_text()), daemon=True)
    reader.start()
    writer = threading.Thread(target=_tag_to, args=(out, inputs["order"], lambda: Tagger.load(tiny_ckpt)), daemon=True)
    writer.start()
    writer.join(timeout=120)
    assert not writer.is_alive(), "tagging into a pipe did not finish"
    reader.join(timeout=10)
    assert [json.loads(line)["image"] for line in received[0].splitlines()] == inputs["keys"]
    assert not (tmp_path / "pipe.jsonl.lock").exists()


def test_dev_stdout_into_a_pipe_is_written_through_and_never_read(tiny_ckpt, tmp_path):
    """`--output=/dev/stdout | cat`: this process's fd 1 becomes a pipe while it tags."""
    image = tmp_path / "a.png"
    Image.fromarray(random_images(1, 36, seed=9)[0]).save(image)
    r, w = os.pipe()
    saved = os.dup(1)
    os.dup2(w, 1)
    os.close(w)
    received = []
    reader = threading.Thread(target=lambda: received.append(os.fdopen(r, "rb").read()), daemon=True)
    reader.start()
    try:
        writer = threading.Thread(target=_tag_to, args=("/dev/stdout", [str(image)], lambda: Tagger.load(tiny_ckpt)),
                                  daemon=True)
        writer.start()
        writer.join(timeout=120)
        assert not writer.is_alive(), "tagging into /dev/stdout did not finish"
    finally:
        os.dup2(saved, 1)  # the pipe's last writer closes: the reader gets its end
        os.close(saved)
    reader.join(timeout=10)
    assert [json.loads(line)["image"] for line in received[0].splitlines()] == [str(image)]


def test_every_input_without_an_image_gets_an_error(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "fifo.png")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("gone.png", folder / "dangling.png")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    found = dict(iter_images([str(folder), str(empty)], lambda i, key: True))
    assert list(found) == [str(folder / n) for n in ("dangling.png", "fifo.png", "loop.jpg")] + [str(empty)]
    assert all(isinstance(e, (OSError, ValueError)) for e in found.values())
    assert "not a regular file" in str(found[str(folder / "fifo.png")])
    assert "symbolic links" in str(found[str(folder / "loop.jpg")])
    assert "No such file" in str(found[str(folder / "dangling.png")])
    assert str(found[str(empty)]) == f"{empty}: no sample in this shard (0 bytes)"
