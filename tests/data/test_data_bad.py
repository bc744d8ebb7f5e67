"""Bad data is skipped and counted per kind, never a crash or a hang; a bomb is refused."""

import gzip
import io
import logging
import os
import pathlib
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from hang_guard import hang_guard
from PIL import Image

from nxtp_jax.cli.check import check_command
from nxtp_jax.data import check, pipeline
from nxtp_jax.data.samples import MAX_TEXT_BYTES, SKIP_KINDS
from nxtp_jax.data.skips import skip_summary
from nxtp_jax.data.tar import ShardOpenError
from nxtp_jax.data.writer import write_shard

SIZE = 8


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_bomb(side: int = 50000) -> bytes:
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good(key, value):
    return key, {"jpg": jpeg(value), "txt": f"a thing {value}".encode(), "json": b'{"labels": ["thing"]}'}


# (key, members, kind) for every bad case a sample can have on its own.
BAD_SAMPLES = [
    ("noimage", {"txt": b"caption"}, "missing_image"),
    ("nocaption", {"jpg": jpeg(1)}, "missing_caption"),
    ("zerobytes", {"jpg": b"", "txt": b"caption"}, "not_an_image"),
    ("garbage", {"jpg": b"not a jpeg at all", "txt": b"caption"}, "not_an_image"),
    ("jpegheader", {"jpg": jpeg(2)[:300], "txt": b"caption"}, "not_an_image"),
    ("halfjpeg", {"jpg": noisy_jpeg()[:2000], "txt": b"caption"}, "truncated_image"),
    ("bomb", {"png": png_bomb(), "txt": b"caption"}, "too_large"),
    ("hugecaption", {"jpg": jpeg(7), "txt": b"x" * (MAX_TEXT_BYTES + 1)}, "text_too_large"),
    ("hugejson", {"jpg": jpeg(8), "txt": b"caption", "json": b" " * (MAX_TEXT_BYTES + 1)}, "text_too_large"),
    ("latin1", {"jpg": jpeg(3), "txt": "café".encode("latin-1")}, "bad_caption"),
    ("blank", {"jpg": jpeg(4), "txt": b"  \n "}, "empty_caption"),
    ("badjson", {"jpg": jpeg(5), "txt": b"caption", "json": b"{not json"}, "bad_json"),
    ("badlabels", {"jpg": jpeg(6), "txt": b"caption", "json": b'{"labels": "cat"}'}, "bad_json"),
    ("deepjson", {"jpg": jpeg(9), "txt": b"caption", "json": b"[" * 100_000}, "bad_json"),  # RecursionError
]


def make_bad_shards(tmp_path):
    """Three shards: per-sample problems, a corrupt tar header, a truncated file."""
    samples = [good("good0", 10)]
    for key, members, _ in BAD_SAMPLES:
        samples += [(key, members), good(f"good_after_{key}", 20)]
    first = str(tmp_path / "a.tar")
    write_shard(first, samples)

    corrupt = str(tmp_path / "b.tar")
    write_shard(corrupt, [good("b1", 30), good("b2", 31), good("b3", 32)])
    raw = bytearray(open(corrupt, "rb").read())
    header = raw.index(b"b2.jpg")
    raw[header + 148 : header + 150] = b"77"  # break the checksum of b2's first member
    open(corrupt, "wb").write(bytes(raw))

    truncated = str(tmp_path / "c.tar")
    write_shard(truncated, [good("c1", 40), good("c2", 41)])
    raw = open(truncated, "rb").read()
    open(truncated, "wb").write(raw[: raw.index(b"c2.jpg") + 512 + 100])  # cut inside c2.jpg

    good_keys = [k for k, _ in samples if k.startswith("good")] + ["b1", "c1"]
    expected = {kind: 0 for kind in SKIP_KINDS}
    for _, _, kind in BAD_SAMPLES:
        expected[kind] += 1
    expected["corrupt_tar"] += 1
    expected["truncated_tar"] += 1
    return [first, corrupt, truncated], good_keys, expected


def test_every_bad_case_is_skipped_and_counted_in_training(tmp_path, caplog):
    shards, good_keys, expected = make_bad_shards(tmp_path)
    g = len(good_keys)
    it = pipeline.build_train_iterator(
        shards, image_size=SIZE, batch_size=1, seed=0, process_index=0, process_count=1, window_size=7
    )
    with caplog.at_level(logging.WARNING, logger="nxtp_jax.data.skips"):
        batches = [next(it) for _ in range(4 * g)]
    by_epoch = {}
    for b in batches:
        by_epoch.setdefault(int(b["epoch"][0]), []).append(str(b["key"][0]))
    assert sorted(by_epoch) == [0, 1, 2, 3]
    for keys in by_epoch.values():
        assert sorted(keys) == sorted(good_keys)
    # Epochs 0-2 are followed by good samples, so their skips are all counted; epoch 3's
    # trailing skips may still be pending.
    totals = {kind: sum(skip_summary(b)[f"skipped/{kind}"] for b in batches) for kind in SKIP_KINDS}
    for kind in SKIP_KINDS:
        assert 3 * expected[kind] <= totals[kind] <= 4 * expected[kind], (kind, totals[kind])
    assert sum(skip_summary(b)["skipped"] for b in batches) == sum(totals.values())
    warned = [r.getMessage() for r in caplog.records]
    for kind in SKIP_KINDS:
        if expected[kind]:
            assert sum(f"skipping bad sample ({kind})" in m for m in warned) == 1, kind


def test_eval_counts_every_bad_sample_exactly(tmp_path):
    shards, good_keys, expected = make_bad_shards(tmp_path)
    loader = pipeline.build_eval_loader(shards, image_size=SIZE, batch_size=4, process_index=0, process_count=1)
    batches = list(loader)
    valid_keys = [k for b in batches for k, v in zip(b["key"].tolist(), b["valid"]) if v]
    assert valid_keys == good_keys
    for kind in SKIP_KINDS:
        assert sum(skip_summary(b)[f"skipped/{kind}"] for b in batches) == expected[kind], kind


def test_check_cli_reports_each_problem(tmp_path):
    shards, good_keys, expected = make_bad_shards(tmp_path)
    os.symlink(tmp_path / "gone.tar", tmp_path / "dangling.tar")
    out = io.StringIO()
    code = check.check_paths([str(tmp_path)], out=out)
    text = out.getvalue()
    assert code == 1  # the dangling shard cannot be opened
    lines = text.splitlines()
    assert f"{shards[0]}: valid={len(BAD_SAMPLES) + 1} skipped={len(BAD_SAMPLES)}" in lines
    assert f"{shards[1]}: valid=1 skipped=1" in lines
    assert f"{shards[2]}: valid=1 skipped=1" in lines
    assert any(line.startswith(f"{tmp_path / 'dangling.tar'}: cannot open") for line in lines)
    for key, members, kind in BAD_SAMPLES:
        assert any(key in line and f": {kind}: " in line for line in lines), (key, kind)
    assert any("c2.jpg" in line and "truncated_tar" in line for line in lines)
    assert any("corrupt_tar" in line for line in lines)
    total = sum(expected.values())
    assert lines[-1] == f"valid={len(good_keys)} skipped={total} shards=4"


def test_nxtp_check_console_script_exits_zero_on_good_shards(tmp_path):
    shard = str(tmp_path / "ok.tar")
    write_shard(shard, [good("k1", 1), good("k2", 2)])
    proc = subprocess.run([str(pathlib.Path(sys.executable).with_name("nxtp-check")), shard], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{shard}: valid=2 skipped=0", "valid=2 skipped=0 shards=1"]


def test_unopenable_shard_fails_naming_it(tmp_path):
    shard = str(tmp_path / "ok.tar")
    write_shard(shard, [good("k1", 1)])
    missing = str(tmp_path / "missing-000.tar")
    it = pipeline.build_train_iterator(
        [shard, missing], image_size=SIZE, batch_size=1, seed=0, process_index=0, process_count=1
    )
    with pytest.raises(ShardOpenError, match="missing-000.tar"):
        next(it)
    with pytest.raises(ShardOpenError, match="missing-000.tar"):
        pipeline.build_eval_loader([shard, missing], image_size=SIZE, batch_size=1, process_index=0, process_count=1)


def test_all_bad_data_raises_instead_of_hanging(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    it = pipeline.build_train_iterator(
        [str(empty)], image_size=SIZE, batch_size=1, seed=0, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="no samples"):
        next(it)
    broken = str(tmp_path / "broken.tar")
    write_shard(broken, [(f"k{i}", {"jpg": b"junk", "txt": b"c"}) for i in range(5)])
    it = pipeline.build_train_iterator(
        [broken], image_size=SIZE, batch_size=1, seed=0, process_index=0, process_count=1, max_consecutive_skips=20
    )
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        next(it)


def not_a_tar(kind: str) -> bytes:
    """Files that are no tar shard at all: text, a gzip'd tar, a tar cut inside its first header."""
    if kind == "text":
        return b"key\tcaption\n" * 100
    if kind == "gzip":
        return gzip.compress(b"\0" * 4096)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("k1.txt")
        info.size = 7
        tf.addfile(info, io.BytesIO(b"caption"))
    return buf.getvalue()[:300]


@pytest.mark.parametrize("kind", ["text", "gzip", "cut_header"])
def test_check_cli_exits_one_on_a_folder_with_a_file_that_is_not_a_tar(tmp_path, kind):
    write_shard(str(tmp_path / "a.tar"), [good("k1", 1), good("k2", 2)])
    write_shard(str(tmp_path / "b.tar"), [good("k3", 3)])
    (tmp_path / "c.tar").write_bytes(not_a_tar(kind))
    out = io.StringIO()
    assert check.check_paths([str(tmp_path)], out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[:2] == [f"{tmp_path / 'a.tar'}: valid=2 skipped=0", f"{tmp_path / 'b.tar'}: valid=1 skipped=0"]
    assert lines[2].startswith(f"{tmp_path / 'c.tar'}: not a readable tar shard: ")
    assert lines[3:] == ["valid=3 skipped=0 shards=3"]


def test_check_command_exit_status_with_and_without_a_file_that_is_not_a_tar(tmp_path, capsys):
    write_shard(str(tmp_path / "a.tar"), [good("k1", 1), good("k2", 2)])
    write_shard(str(tmp_path / "b.tar"), [good("k3", 3)])
    assert check_command([str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "notes.tar").write_bytes(not_a_tar("text"))
    assert check_command([str(tmp_path)]) == 1
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == "valid=3 skipped=0 shards=3"
    assert f"{tmp_path / 'notes.tar'}: not a readable tar shard" in stdout


def test_check_command_usage_errors_exit_two(tmp_path, capsys):
    assert check_command([]) == 2
    assert check_command(["--strictt", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: give at least one") and "Did you mean: strict" in err[1]


def test_check_cli_strict_exits_one_when_a_sample_was_skipped(tmp_path):
    shards, good_keys, expected = make_bad_shards(tmp_path)
    assert check.check_paths(shards, out=io.StringIO()) == 0  # skipped samples alone are not a failure
    assert check.check_paths(shards, strict=True, out=io.StringIO()) == 1
    clean = str(tmp_path / "clean" / "ok.tar")
    os.makedirs(os.path.dirname(clean))
    write_shard(clean, [good("k1", 1)])
    assert check.check_paths([clean], strict=True, out=io.StringIO()) == 0


def lying_pax_shard(path, size):
    """A good sample, then a member whose pax header says `size` (at byte 2560), then more samples."""
    good_key, members = good("before", 50)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        entries = [(f"{good_key}.{ext}", data) for ext, data in members.items()]
        entries += [("liar.txt", b"cap"), ("after.txt", b"x")]
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "liar.txt":
                info.pax_headers = {"size": size}
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_check_reports_a_lying_pax_size_and_moves_on_to_the_next_shard(tmp_path):
    # The case: a negative pax size made the checker loop forever.
    liar = lying_pax_shard(tmp_path / "a.tar", "-1536")
    write_shard(tmp_path / "b.tar", [good("k1", 1), good("k2", 2)])
    out = io.StringIO()
    with hang_guard(120):
        check.check_paths([str(tmp_path)], out=out)
    lines = out.getvalue().splitlines()
    assert f"{liar}: valid=1 skipped=1" in lines, lines
    (problem,) = [line for line in lines if "corrupt_tar" in line]
    assert f"{liar}: byte " in problem and "pax size b'-1536'" in problem and "rest of the shard" in problem
    assert f"{tmp_path / 'b.tar'}: valid=2 skipped=0" in lines
    assert lines[-1] == "valid=3 skipped=1 shards=2"


@pytest.mark.parametrize("size", ["-1536", "abc"])
def test_training_skips_the_rest_of_a_shard_with_a_lying_pax_size_and_keeps_going(tmp_path, size):
    liar = lying_pax_shard(tmp_path / "a.tar", size)
    other = str(tmp_path / "b.tar")
    write_shard(other, [good("k1", 1), good("k2", 2)])
    it = pipeline.build_train_iterator(
        [liar, other], image_size=SIZE, batch_size=1, seed=0, process_index=0, process_count=1, window_size=4
    )
    with hang_guard(120):
        batches = [next(it) for _ in range(6)]  # two epochs of the three good samples
    assert sorted(str(b["key"][0]) for b in batches) == sorted(["before", "k1", "k2"] * 2)
    assert sum(skip_summary(b)["skipped/corrupt_tar"] for b in batches) >= 1


def test_corpus_and_label_readers_skip_bad_json_and_oversized_text(tmp_path):
    from nxtp_jax.evaluation.baseline import training_labels
    from nxtp_jax.training.loop import tokenizer_corpus

    shard = str(tmp_path / "t.tar")
    write_shard(shard, [
        ("a", {"jpg": b"x", "txt": b"first caption", "json": b'{"labels": ["cat"]}'}),
        ("b", {"jpg": b"x", "txt": b"second", "json": b"{not json"}),
        ("c", {"jpg": b"x", "txt": b"x" * (MAX_TEXT_BYTES + 1), "json": b"[" * 100_000}),
        ("d", {"jpg": b"x", "txt": b"last", "json": b'{"labels": ["dog"]}'}),
    ])
    texts = tokenizer_corpus([shard], max_texts=10)
    assert [t for t in texts if t in ("first caption", "cat", "second", "last", "dog")] == ["first caption", "cat", "second", "last", "dog"]
    assert not any(t.startswith("xxx") for t in texts)
    assert list(training_labels([shard], 0)) == [["cat"], ["dog"]]
