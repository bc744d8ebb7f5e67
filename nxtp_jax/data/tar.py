"""Reading WebDataset tar shards by offset: member headers, grouping members into samples.

Every read is a ranged read (`ShardFile.pread`: seek + read through a read-ahead buffer)
on a shard file the caller opened, on local disk or any `etils.epath` backend (`gs://`, ...).
A ShardFile belongs to one thread: threads and processes open their own. Nothing is indexed
ahead of time: a caller walks a shard sample by sample from a byte offset, and that offset
(plus a sample counter) is all the state needed to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from typing import Iterator

from etils import epath

BLOCK = 512
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
JSON_EXT = "json"
_USED_EXTS = frozenset(IMAGE_EXTS + (CAPTION_EXT, JSON_EXT))
_REGULAR_TYPES = (b"0", b"\0", b"7")
_LONGNAME_TYPES = (b"L",)
_PAX_TYPES = (b"x",)
_SKIPPED_TYPES = (b"g", b"K", b"1", b"2", b"3", b"4", b"5", b"6")
# A pax or GNU long-name payload above this is refused: real ones are a few hundred bytes,
# and each is read into memory whole.
MAX_HEADER_BYTES = 1 << 20
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"))
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(rb"[0-9]+")


class ShardOpenError(OSError):
    """A shard that cannot be opened at all."""


class TarFormatError(Exception):
    """The tar stream of `shard` is broken at byte `offset`; nothing after it can be trusted.

    `kind` is "corrupt_tar", "truncated_tar" or "compressed_tar" (a skip kind); the message
    names the shard and the offset.
    """

    def __init__(self, kind: str, offset: int, message: str, member: str = "", shard: str = ""):
        super().__init__(f"{shard}: byte {offset}: {message}" if shard else f"byte {offset}: {message}")
        self.kind = kind
        self.offset = offset
        self.member = member
        self.shard = shard


@dataclasses.dataclass(frozen=True)
class TarMember:
    """A regular file in a tar stream; `header_offset` is where its header chain starts."""

    name: str
    header_offset: int
    data_offset: int
    size: int

    @property
    def next_offset(self) -> int:
        return self.data_offset + _round_up(self.size)


@dataclasses.dataclass(frozen=True)
class SampleGroup:
    """Consecutive members sharing one key; `members` maps extension -> member (first wins)."""

    key: str
    index: int
    members: dict[str, TarMember]
    next_offset: int


class ShardFile:
    """A shard opened for ranged reads. Sequential small reads (tar headers, the members of
    one sample) are served from one read-ahead buffer, so a remote shard costs one request
    per `buffer_size` bytes rather than one per header."""

    def __init__(self, path: str, buffer_size: int = 1 << 20):
        self.path = path
        self.buffer_size = buffer_size
        try:
            self._file = epath.Path(path).open("rb")
            self._file.seek(0, io.SEEK_END)
            self.size = self._file.tell()  # tf.io.gfile's seek (epath's gs:// backend with TF) returns None
        except OSError as e:
            raise ShardOpenError(
                e.errno, f"cannot open shard {path!r}: {e.strerror or e}; check the path and permissions"
            ) from e
        self._buffer, self._buffer_offset = b"", 0

    def pread(self, n: int, offset: int) -> bytes:
        """Up to `n` bytes at `offset` (fewer only at the end of the file), like `os.pread`."""
        start = offset - self._buffer_offset
        if 0 <= start and start + n <= len(self._buffer):
            return self._buffer[start : start + n]
        self._file.seek(offset)
        if n >= self.buffer_size:
            return self._file.read(n)
        self._buffer, self._buffer_offset = self._file.read(self.buffer_size), offset
        return self._buffer[:n]

    def close(self) -> None:
        self._file.close()
        self._buffer = b""


def open_shard(path: str) -> tuple[ShardFile, int]:
    """Open a shard read-only; returns (file, size). Raises ShardOpenError naming the shard."""
    f = ShardFile(path)
    return f, f.size


def _round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _parse_number(field: bytes) -> int | None:
    """A numeric header field: octal digits padded with NULs or spaces, or GNU base-256
    (a leading 0x80); None if it is neither (negative base-256 included)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    return int(text, 8) if _OCTAL.fullmatch(text) else None


def _checksum_ok(block: bytes) -> bool:
    """The stored checksum equals the header's byte sum (checksum field read as spaces), as
    unsigned bytes or, as some old tars wrote it, signed bytes."""
    stored = _parse_number(block[148:156])
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 32
    signed = unsigned - 256 * sum(b >= 128 for b in rest)
    return stored is not None and stored in (unsigned, signed)


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """pax records `"<length> <key>=<value>\\n"`; raises ValueError saying what is malformed.

    Values stay bytes (xattr values need not be UTF-8); NUL padding after the last record is
    allowed.
    """
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos:].strip(b"\0"):
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not _DECIMAL.fullmatch(data[pos:space]):
            raise ValueError(f"record at +{pos} does not start with a decimal length and a space: {data[pos:pos + 24]!r}")
        length = int(data[pos:space])
        end = pos + length
        if length < space - pos + 4 or end > len(data):  # "<length> k=\\n" at least, inside the payload
            raise ValueError(f"record at +{pos} claims length {length}; the payload has {len(data) - pos} bytes left")
        if data[end - 1 : end] != b"\n":
            raise ValueError(f"record at +{pos} does not end with a newline")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise ValueError(f"record at +{pos} is not key=value: {data[pos:end]!r:.80}")
        records[key.decode("utf-8", "replace")] = value
        pos = end
    return records


def _check_pax(records: dict[str, bytes]) -> str | None:
    """What is wrong with the `size` and `path` records (the ones read here), or None."""
    size = records.get("size", b"")
    if size and not _DECIMAL.fullmatch(size):
        return f"pax size {size!r:.40} is not a non-negative decimal number"
    if b"\0" in records.get("path", b""):
        return "pax path contains a NUL byte"
    return None


def _broken(fd: ShardFile, offset: int, file_size: int, kind: str, why: str, member: str = "") -> TarFormatError:
    return TarFormatError(
        kind, offset, f"{why}; the rest of the shard ({file_size - offset} bytes) is skipped", member, fd.path
    )


def read_member(fd: ShardFile, offset: int, file_size: int) -> TarMember | None:
    """The next regular file at or after `offset`, or None at the end of the archive.

    Directories, links and global headers are stepped over; GNU long names and pax
    `path`/`size` records apply to the member that follows them. Every field is checked
    before use (checksum, sizes non-negative and ending inside the file, pax records
    well-formed), so every step moves forward by at least one block; a violation raises
    TarFormatError naming the shard and the header's offset.
    """
    start = offset
    long_name: str | None = None
    pax: dict[str, bytes] = {}
    while True:
        block = fd.pread(BLOCK, offset)
        if len(block) == 0:
            return None  # archive without end-of-archive blocks: tolerated, as GNU tar does
        if offset == 0:
            for magic, compression in _COMPRESSED:
                if block.startswith(magic):
                    why = f"the shard is a {compression} file, not a plain tar; decompress it first"
                    raise _broken(fd, offset, file_size, "compressed_tar", why)
        if len(block) < BLOCK:
            raise _broken(fd, offset, file_size, "truncated_tar", "tar header cut short by the end of the file")
        if block == b"\0" * BLOCK:
            return None
        if not _checksum_ok(block):
            raise _broken(fd, offset, file_size, "corrupt_tar", "tar header has a bad checksum")
        typeflag = block[156:157]
        is_meta = typeflag in _LONGNAME_TYPES or typeflag in _PAX_TYPES
        size = _parse_number(block[124:136])
        if size is None:
            why = f"size field {block[124:136]!r} is not a non-negative octal number"
            raise _broken(fd, offset, file_size, "corrupt_tar", why)
        if not is_meta and pax.get("size"):
            size = int(pax["size"])
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        member_name = (pax.get("path") or b"").decode("utf-8", "replace") or long_name or name.decode("utf-8", "replace")
        data_offset = offset + BLOCK
        if data_offset + size > file_size:
            why = f"member {member_name!r} claims {size} bytes at byte {data_offset}, past the end of the file ({file_size} bytes)"
            raise _broken(fd, offset, file_size, "truncated_tar", why, member_name)
        if is_meta:
            if size > MAX_HEADER_BYTES:
                why = f"extended header claims {size} bytes, above MAX_HEADER_BYTES={MAX_HEADER_BYTES}"
                raise _broken(fd, offset, file_size, "corrupt_tar", why)
            payload = fd.pread(size, data_offset)
            if len(payload) != size:
                raise _broken(fd, offset, file_size, "truncated_tar", "extended header cut short by the end of the file")
            if typeflag in _LONGNAME_TYPES:
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                try:
                    records = _parse_pax(payload)
                except ValueError as e:
                    raise _broken(fd, offset, file_size, "corrupt_tar", f"pax header is malformed: {e}") from None
                problem = _check_pax(records)
                if problem:
                    raise _broken(fd, offset, file_size, "corrupt_tar", problem)
                pax.update(records)
            offset = data_offset + _round_up(size)
            continue
        if typeflag in _REGULAR_TYPES:
            return TarMember(member_name, start, data_offset, size)
        if typeflag not in _SKIPPED_TYPES:
            raise _broken(fd, offset, file_size, "corrupt_tar", f"tar header has unknown type {typeflag!r}")
        offset = data_offset + _round_up(size)
        start = offset
        long_name, pax = None, {}


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset naming: 'dir/base.ext.more' -> ('dir/base', 'ext.more'); None if no extension."""
    if name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def read_group(fd: ShardFile, offset: int, file_size: int, index: int, all_members: bool = False) -> SampleGroup | None:
    """The sample whose first member header is at `offset`; None at the end of the archive.

    `members` holds the image, txt and json members, or every member with `all_members`.

    A sample ends where a member with another key begins. If the stream breaks after
    complete members of this sample, the sample is returned and the error is raised by the
    next call (at `next_offset`); if the break cuts one of this sample's members, the error
    is raised now.
    """
    key: str | None = None
    members: dict[str, TarMember] = {}
    while True:
        try:
            member = read_member(fd, offset, file_size)
        except TarFormatError as e:
            if key is None or (e.member and (split_key(e.member) or ("",))[0] == key):
                raise
            return SampleGroup(key, index, members, offset)
        if member is None:
            break
        parts = split_key(member.name)
        if parts is None:
            offset = member.next_offset
            continue
        member_key, ext = parts
        if key is None:
            key = member_key
        elif member_key != key:
            return SampleGroup(key, index, members, member.header_offset)
        if all_members or ext in _USED_EXTS:
            members.setdefault(ext, member)
        offset = member.next_offset
    if key is None:
        return None
    return SampleGroup(key, index, members, offset)


def read_bytes(fd: ShardFile, member: TarMember) -> bytes:
    data = fd.pread(member.size, member.data_offset)
    if len(data) != member.size:
        raise TarFormatError(
            "truncated_tar", member.header_offset, f"member {member.name!r} is cut short", member.name, fd.path
        )
    return data


def iter_groups(fd: ShardFile, file_size: int, all_members: bool = False) -> Iterator[SampleGroup | TarFormatError]:
    """Every sample of a shard in order; a broken stream ends with its TarFormatError."""
    offset, index = 0, 0
    while True:
        try:
            group = read_group(fd, offset, file_size, index, all_members)
        except TarFormatError as e:
            yield e
            return
        if group is None:
            return
        yield group
        offset, index = group.next_offset, index + 1


@contextlib.contextmanager
def walk(path: str, all_members: bool = False) -> Iterator[tuple[ShardFile, Iterator[SampleGroup | TarFormatError]]]:
    """Opens a shard and walks it: `with walk(path) as (shard, groups):` then `read_bytes(shard, member)`.

    `groups` is `iter_groups` over the whole shard; the file is closed when the block ends.
    Raises ShardOpenError naming the shard if it cannot be opened.
    """
    shard, size = open_shard(path)
    try:
        yield shard, iter_groups(shard, size, all_members)
    finally:
        shard.close()
