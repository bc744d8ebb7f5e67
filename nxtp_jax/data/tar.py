"""Reading WebDataset tar shards by offset: member headers, grouping members into samples.

Every read is a ranged read (`ShardFile.pread`: seek + read through a read-ahead buffer)
on a shard file the caller opened, on local disk or any `etils.epath` backend (`gs://`, ...).
A ShardFile belongs to one thread: threads and processes open their own. Nothing is indexed
ahead of time: a caller walks a shard sample by sample from a byte offset, and that offset
(plus a sample counter) is all the state needed to resume.
"""

from __future__ import annotations

import dataclasses
import io
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


class ShardOpenError(OSError):
    """A shard that cannot be opened at all."""


class TarFormatError(Exception):
    """The tar stream is broken at `offset`; nothing after it can be trusted."""

    def __init__(self, kind: str, offset: int, message: str, member: str = ""):
        super().__init__(message)
        self.kind = kind
        self.offset = offset
        self.member = member


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
            self.size = self._file.seek(0, io.SEEK_END)
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


def _parse_number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes above 8 GiB
        value = field[0] & 0x3F
        for b in field[1:]:
            value = value << 8 | b
        return value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _parse_number(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == unsigned


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("pax record length must be positive")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def read_member(fd: ShardFile, offset: int, file_size: int) -> TarMember | None:
    """The next regular file at or after `offset`, or None at the end of the archive.

    Directories, links and global headers are stepped over; GNU long names and pax
    `path`/`size` records apply to the member that follows them.
    """
    start = offset
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = fd.pread(BLOCK, offset)
        if len(block) == 0:
            return None  # archive without end-of-archive blocks: tolerated, as GNU tar does
        if len(block) < BLOCK:
            raise TarFormatError(
                "truncated_tar", offset, f"tar header at byte {offset} is cut short by the end of the file"
            )
        if block == b"\0" * BLOCK:
            return None
        if not _checksum_ok(block):
            raise TarFormatError("corrupt_tar", offset, f"tar header at byte {offset} has a bad checksum")
        try:
            size = _parse_number(block[124:136])
        except ValueError:
            raise TarFormatError("corrupt_tar", offset, f"tar header at byte {offset} has an unreadable size")
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        typeflag = block[156:157]
        data_offset = offset + BLOCK
        if data_offset + size > file_size:
            member_name = name.decode("utf-8", "replace")
            raise TarFormatError(
                "truncated_tar",
                offset,
                f"member {member_name!r} claims {size} bytes at byte {data_offset}, past the end "
                f"of the file ({file_size} bytes)",
                member=member_name,
            )
        if typeflag in _LONGNAME_TYPES or typeflag in _PAX_TYPES:
            payload = fd.pread(size, data_offset)
            if typeflag in _LONGNAME_TYPES:
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                try:
                    pax.update(_parse_pax(payload))
                except (ValueError, UnicodeDecodeError) as e:
                    raise TarFormatError("corrupt_tar", offset, f"pax header at byte {offset} is unreadable: {e}")
            offset = data_offset + _round_up(size)
            continue
        if typeflag in _REGULAR_TYPES:
            if "size" in pax:
                size = int(pax["size"])
            member_name = pax.get("path") or long_name or name.decode("utf-8", "replace")
            if data_offset + size > file_size:
                raise TarFormatError(
                    "truncated_tar",
                    offset,
                    f"member {member_name!r} claims {size} bytes, past the end of the file",
                    member=member_name,
                )
            return TarMember(member_name, start, data_offset, size)
        if typeflag not in _SKIPPED_TYPES:
            raise TarFormatError("corrupt_tar", offset, f"tar header at byte {offset} has unknown type {typeflag!r}")
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
            "truncated_tar", member.header_offset, f"member {member.name!r} is cut short", member=member.name
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
