"""Tar reading by offset: member headers in every tar flavour, grouping members into samples."""

import bz2
import gzip
import io
import lzma
import tarfile

import pytest
from hang_guard import hang_guard

from nxtp_jax.data import tar as T


def make_tar(path, members, fmt=tarfile.PAX_FORMAT, dirs=()):
    with tarfile.open(path, "w", format=fmt) as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def groups(path):
    fd, size = T.open_shard(path)
    try:
        return list(T.iter_groups(fd, size))
    finally:
        fd.close()


def contents(path, group):
    fd, _ = T.open_shard(path)
    try:
        return {ext: T.read_bytes(fd, m) for ext, m in group.members.items()}
    finally:
        fd.close()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_sharing_a_key_form_one_sample(tmp_path, fmt):
    path = make_tar(
        tmp_path / "a.tar",
        [
            ("a.jpg", b"img-a"),
            ("a.txt", b"cap-a"),
            ("a.json", b"{}"),
            ("b.txt", b"cap-b"),
            ("b.png", b"img-b" * 300),  # spans several blocks
            ("c.seg.png", b"ignored ext"),
            ("c.txt", b"cap-c"),
        ],
        fmt=fmt,
    )
    got = groups(path)
    assert [g.key for g in got] == ["a", "b", "c"]
    assert [g.index for g in got] == [0, 1, 2]
    assert contents(path, got[0]) == {"jpg": b"img-a", "txt": b"cap-a", "json": b"{}"}
    assert contents(path, got[1]) == {"txt": b"cap-b", "png": b"img-b" * 300}
    assert contents(path, got[2]) == {"txt": b"cap-c"}  # "seg.png" is not an image of the sample


def test_long_names_gnu_and_pax_and_prefix(tmp_path):
    long_dir = "d" * 120
    names = [(f"{long_dir}/x.jpg", b"1"), (f"{long_dir}/x.txt", b"2"), ("ünï/ç.txt", b"3")]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = make_tar(tmp_path / f"long{fmt}.tar", names, fmt=fmt)
        got = groups(path)
        assert [g.key for g in got] == [f"{long_dir}/x", "ünï/ç"]
        assert contents(path, got[0]) == {"jpg": b"1", "txt": b"2"}
    # ustar splits a long path into prefix + name
    path = make_tar(tmp_path / "ustar.tar", [(f"{'p' * 110}/y.txt", b"4")], fmt=tarfile.USTAR_FORMAT)
    assert [g.key for g in groups(path)] == [f"{'p' * 110}/y"]


def test_directories_and_extensionless_members_are_stepped_over(tmp_path):
    path = make_tar(
        tmp_path / "d.tar",
        [("00000/k1.jpg", b"a"), ("00000/k1.txt", b"b"), ("README", b"x"), ("00000/.hidden", b"h"), ("00000/k2.TXT", b"c")],
        dirs=("00000",),
    )
    got = groups(path)
    assert [g.key for g in got] == ["00000/k1", "00000/k2"]
    assert contents(path, got[1]) == {"txt": b"c"}  # extensions are case-insensitive


def test_same_key_again_later_is_a_new_sample(tmp_path):
    path = make_tar(tmp_path / "r.tar", [("a.jpg", b"1"), ("b.txt", b"2"), ("a.txt", b"3")])
    assert [g.key for g in groups(path)] == ["a", "b", "a"]


def test_split_key():
    assert T.split_key("dir/sub/000123.jpg") == ("dir/sub/000123", "jpg")
    assert T.split_key("./x.tar.gz") == ("x", "tar.gz")
    assert T.split_key("x.JPG") == ("x", "jpg")
    assert T.split_key("noext") is None
    assert T.split_key("dir/.hidden") is None
    assert T.split_key("a.b/c") is None


def test_corrupt_header_keeps_earlier_samples_then_reports(tmp_path):
    path = make_tar(tmp_path / "c.tar", [("a.jpg", b"1"), ("a.txt", b"2"), ("b.jpg", b"3"), ("b.txt", b"4")])
    raw = bytearray(open(path, "rb").read())
    third_header = 4 * 512  # a.jpg hdr+data, a.txt hdr+data
    assert raw[third_header : third_header + 5] == b"b.jpg"
    raw[third_header + 148] ^= 0x07  # checksum field
    open(path, "wb").write(bytes(raw))
    got = groups(path)
    assert [g.key for g in got[:1]] == ["a"]
    assert isinstance(got[1], T.TarFormatError) and got[1].kind == "corrupt_tar"
    assert len(got) == 2


def test_truncated_file(tmp_path):
    path = make_tar(tmp_path / "t.tar", [("a.jpg", b"1"), ("a.txt", b"2"), ("b.jpg", b"3" * 5000), ("b.txt", b"4")])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: 4 * 512 + 512 + 1000])  # cut inside b.jpg's data
    got = groups(path)
    assert got[0].key == "a"
    assert isinstance(got[1], T.TarFormatError) and got[1].kind == "truncated_tar"
    assert got[1].member == "b.jpg"
    assert len(got) == 2


def test_missing_end_blocks_is_tolerated(tmp_path):
    path = make_tar(tmp_path / "e.tar", [("a.jpg", b"1"), ("a.txt", b"2")])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: 4 * 512])
    assert [g.key for g in groups(path)] == ["a"]


def test_empty_file_and_unopenable_shard(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert groups(str(empty)) == []
    with pytest.raises(T.ShardOpenError, match="nope.tar"):
        T.open_shard(str(tmp_path / "nope.tar"))


def test_resume_from_offset(tmp_path):
    path = make_tar(tmp_path / "o.tar", [(f"k{i}.txt", str(i).encode()) for i in range(5)])
    fd, size = T.open_shard(path)
    try:
        first = T.read_group(fd, 0, size, 0)
        second = T.read_group(fd, first.next_offset, size, 1)
        assert (first.key, second.key, second.index) == ("k0", "k1", 1)
    finally:
        fd.close()


# -- lying headers: every field is checked before use (docs/data.md, "Tar reading") --


def pax_shard(path, pax):
    """a.jpg, then a.txt carrying the pax records `pax`, then b.txt; the pax header is at byte 1024."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [("a.jpg", b"img"), ("a.txt", b"cap"), ("b.txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "a.txt":
                info.pax_headers = pax
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def with_header_field(path, header, start, end, value):
    """Overwrite bytes [start, end) of the header at `header` and fix its checksum, so only the field lies."""
    raw = bytearray(open(path, "rb").read())
    raw[header + start : header + end] = value.ljust(end - start, b"\0")
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\0 " % sum(raw[header : header + 512])
    open(path, "wb").write(bytes(raw))
    return path


def only_error(path):
    with hang_guard():
        got = groups(path)
    errors = [g for g in got if isinstance(g, T.TarFormatError)]
    assert len(errors) == 1 and got[-1] is errors[0], got
    return errors[0]


@pytest.mark.parametrize("size", ["-1536", "-1", "-512", "abc", "1e3", "+5", "0x10", " 12", "١٢"])
def test_pax_size_that_is_not_a_non_negative_integer_is_refused_naming_shard_and_offset(tmp_path, size):
    # "-1536" points the next header back at the pax header: the reader looped forever.
    path = pax_shard(tmp_path / "lying.tar", {"size": size})
    error = only_error(path)
    assert error.kind == "corrupt_tar" and error.offset == 1024 and error.shard == path
    assert str(error).startswith(f"{path}: byte 1024: pax size") and "rest of the shard" in str(error)


def test_pax_size_past_the_end_of_the_file_is_a_truncated_shard(tmp_path):
    path = pax_shard(tmp_path / "big.tar", {"size": "99999999999"})
    error = only_error(path)
    assert error.kind == "truncated_tar" and error.member == "a.txt" and "past the end" in str(error)


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"xx path=a.txt\n", "decimal length"),
        (b"0 path=a.txt\n", "claims length 0"),
        (b"99 path=a.txt\n", "claims length 99"),
        (b"14 path=a.txtX", "newline"),
        (b"12 pathatxt\n", "key=value"),
        (b"16 path=a\0b.txt\n", "NUL"),
    ],
)
def test_malformed_pax_records_are_refused(tmp_path, payload, reason):
    path = pax_shard(tmp_path / "pax.tar", {"path": "a.txt"})
    raw = bytearray(open(path, "rb").read())
    assert raw[1024 + 512 : 1024 + 512 + 14] == b"14 path=a.txt\n"
    raw[1024 + 512 : 1024 + 512 + len(payload)] = payload
    open(path, "wb").write(bytes(raw))
    with_header_field(path, 1024, 124, 136, b"%011o" % len(payload))
    error = only_error(path)
    assert error.kind == "corrupt_tar" and error.offset == 1024 and reason in str(error)


@pytest.mark.parametrize(
    "field,reason",
    [
        (b"-0000000001", "size field"),  # int(..., 8) accepted a sign
        (b"0o000000017", "size field"),  # and a prefix
        (b"\xff" * 12, "size field"),  # GNU base-256, negative
    ],
)
def test_header_size_that_is_not_a_non_negative_octal_number_is_refused(tmp_path, field, reason):
    path = make_tar(tmp_path / "h.tar", [("a.jpg", b"1"), ("b.jpg", b"2")], fmt=tarfile.USTAR_FORMAT)
    with_header_field(path, 1024, 124, 136, field)
    error = only_error(path)
    assert error.kind == "corrupt_tar" and error.offset == 1024 and reason in str(error)


def test_extended_header_above_the_cap_is_refused_unread(tmp_path):
    path = pax_shard(tmp_path / "long.tar", {"comment": "x" * T.MAX_HEADER_BYTES})
    error = only_error(path)
    assert error.kind == "corrupt_tar" and "MAX_HEADER_BYTES" in str(error)


def test_signed_checksums_of_old_tars_are_accepted(tmp_path):
    path = make_tar(tmp_path / "s.tar", [("é.txt", b"1")], fmt=tarfile.USTAR_FORMAT)
    raw = bytearray(open(path, "rb").read())
    raw[148:156] = b" " * 8
    signed = sum(b - 256 if b >= 128 else b for b in raw[:512])
    assert signed != sum(raw[:512])
    raw[148:156] = b"%06o\0 " % signed
    open(path, "wb").write(bytes(raw))
    assert [g.key for g in groups(path)] == ["é"]


@pytest.mark.parametrize(
    "name,compress",
    [
        ("gzip", lambda data: gzip.compress(data)),
        ("bzip2", lambda data: bz2.compress(data)),
        ("xz", lambda data: lzma.compress(data)),
        ("zstd", lambda data: b"\x28\xb5\x2f\xfd" + data),  # the magic is what is recognised
        ("zip", lambda data: b"PK\x03\x04" + data),
    ],
)
def test_compressed_shards_are_recognised_and_named(tmp_path, name, compress):
    plain = open(make_tar(tmp_path / "p.tar", [("a.jpg", b"1"), ("a.txt", b"2")]), "rb").read()
    path = tmp_path / "c.tar"
    path.write_bytes(compress(plain))
    error = only_error(str(path))
    assert error.kind == "compressed_tar" and error.offset == 0 and f"a {name} file" in str(error)


def test_shard_file_ranged_reads_match_the_bytes_across_buffer_refills(tmp_path):
    data = bytes(range(256)) * 40  # 10240 bytes
    path = tmp_path / "raw.tar"
    path.write_bytes(data)
    f = T.ShardFile(str(path), buffer_size=1000)
    try:
        assert f.size == len(data)
        # Forward and backward jumps, reads straddling the buffer's end, reads larger than the
        # buffer, and reads cut by the end of the file (short, like os.pread).
        for n, offset in [(512, 0), (512, 512), (100, 950), (10, 3), (2500, 4000), (700, 9900), (0, 10240), (5, 10240)]:
            assert f.pread(n, offset) == data[offset : offset + n], (n, offset)
    finally:
        f.close()
