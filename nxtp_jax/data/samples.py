"""One sample from raw member bytes to a pipeline element, or a counted reason to skip it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from nxtp_jax.choices import LABEL_SOURCES
from nxtp_jax.data import preprocess
from nxtp_jax.data.tar import CAPTION_EXT, IMAGE_EXTS, JSON_EXT, ShardFile, TarFormatError, TarMember, read_bytes

# Every reason a sample can be skipped. Elements carry one count per kind, so the set is
# fixed: batches then have the same structure whatever went wrong.
SKIP_KINDS = (
    "corrupt_tar",  # a tar header that fails a check (checksum, size, type, pax record); the rest of the shard is lost
    "truncated_tar",  # a member or header cut by the end of the file
    "compressed_tar",  # a gzip/bzip2/xz/zstd/zip file where a plain tar was expected
    "missing_image",
    "missing_caption",
    *preprocess.ERROR_KINDS,  # the image's: not_an_image, truncated_image, too_large
    "text_too_large",  # a txt or json member above MAX_TEXT_BYTES, left unread
    "bad_caption",  # caption bytes that are not UTF-8
    "empty_caption",  # caption that is empty or whitespace only
    "bad_json",  # json member that does not parse, or whose "labels" is not a list of strings
)
# Captions and json above this are not captions: they are skipped unread.
MAX_TEXT_BYTES = 1 << 20


@dataclasses.dataclass
class RawSample:
    """Member bytes of one sample (by extension), or the problem that stands in for it."""

    key: str
    shard: str
    members: dict[str, bytes]
    epoch: int = 0
    problem: tuple[str, str, str] | None = None  # (kind, member, message)


def read_sample(fd: ShardFile, key: str, members: dict[str, TarMember], epoch: int = 0) -> RawSample:
    """The bytes of a sample's `members`, or a RawSample carrying the problem: a txt/json member
    above MAX_TEXT_BYTES or an image above preprocess.MAX_IMAGE_BYTES (left unread), or a cut member."""
    for ext, member in members.items():
        limit, kind = (
            (MAX_TEXT_BYTES, "text_too_large") if ext in (CAPTION_EXT, JSON_EXT)
            else (preprocess.MAX_IMAGE_BYTES, "too_large") if ext in IMAGE_EXTS
            else (None, "")
        )
        if limit is not None and member.size > limit:
            why = f"{member.name} has {member.size} bytes, above the {limit}-byte limit for .{ext} members; skipped unread"
            return RawSample(key, fd.path, {}, epoch, (kind, member.name, why))
    try:
        data = {ext: read_bytes(fd, m) for ext, m in members.items()}
    except TarFormatError as e:
        return RawSample(key, fd.path, {}, epoch, (e.kind, e.member, str(e)))
    return RawSample(key, fd.path, data, epoch)


def read_texts(fd: ShardFile, key: str, members: dict[str, TarMember]) -> dict[str, bytes]:
    """A sample's txt and json bytes, for readers that need no image (tokenizer corpus, label
    counts); {} if one is above MAX_TEXT_BYTES or cut short."""
    return read_sample(fd, key, {ext: m for ext, m in members.items() if ext in (CAPTION_EXT, JSON_EXT)}).members


def load_json(data: bytes) -> Any:
    """The parsed json, or None where it does not parse (not UTF-8, bad syntax, nested too deep)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def broken_sample(e: TarFormatError, epoch: int = 0) -> RawSample:
    """The stand-in for the rest of a shard after a TarFormatError: one skip of its kind."""
    return RawSample(f"@{e.offset}", e.shard, {}, epoch, (e.kind, e.member or f"@{e.offset}", str(e)))


@dataclasses.dataclass(frozen=True)
class Skip:
    """A sample that was dropped: its kind (one of SKIP_KINDS), where, and why."""

    kind: str
    where: str
    message: str


def _parse_labels(meta: Any) -> str | None:
    """`json["labels"]` joined by ',' if present; None if absent. Raises ValueError if malformed."""
    if not isinstance(meta, dict) or "labels" not in meta:
        return None
    labels = meta["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f'expected "labels" to be a list of strings, found {labels!r:.80}')
    if any("," in x for x in labels):
        raise ValueError(f'labels must not contain ",", the label delimiter; found {labels!r:.80}')
    return ",".join(labels)


def decode_sample(
    raw: RawSample,
    image_size: int | None,
    label_source: str = "auto",
) -> dict[str, Any] | Skip:
    """Decode, resize and crop the image, read caption and labels; or say why not.

    `image_size=None` decodes fully but keeps the image as decoded (for checking shards).
    Labels: `json["labels"]` when present (label_source "auto"), else the nouns of the
    caption; "caption" always uses the caption; "none" gives "".
    """
    where = f"{raw.shard}:{raw.key}"
    if raw.problem is not None:
        kind, member, message = raw.problem
        return Skip(kind, f"{raw.shard}:{member or raw.key}", message)
    image_ext = next((ext for ext in IMAGE_EXTS if ext in raw.members), None)
    if image_ext is None:
        return Skip("missing_image", where, f"no {'/'.join(IMAGE_EXTS)} member")
    if CAPTION_EXT not in raw.members:
        return Skip("missing_caption", where, "no txt member")
    try:
        caption = raw.members[CAPTION_EXT].decode("utf-8")
    except UnicodeDecodeError as e:
        return Skip("bad_caption", f"{where}.txt", f"caption is not UTF-8: {e}")
    if not caption.strip():
        return Skip("empty_caption", f"{where}.txt", "caption is empty")
    json_labels = None
    if JSON_EXT in raw.members:
        try:
            json_labels = _parse_labels(json.loads(raw.members[JSON_EXT]))
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
            return Skip("bad_json", f"{where}.json", f"json is unusable: {e}")
    try:
        img = preprocess.load_image(raw.members[image_ext])
    except preprocess.ImageError as e:
        return Skip(e.kind, f"{where}.{image_ext}", str(e))
    if image_size is None:
        image = np.asarray(img, dtype=np.uint8)
    else:
        image = preprocess.resize_center_crop(img, image_size)
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"expected label_source in {LABEL_SOURCES}, found {label_source!r}")
    if label_source == "none":
        labels = ""
    elif label_source == "auto" and json_labels is not None:
        labels = json_labels
    else:
        from nxtp_jax.data.labels import caption_to_nouns  # lazy: NLTK is slow to import

        labels = ",".join(caption_to_nouns(caption))
    return {"image": image, "key": raw.key, "caption": caption, "labels": labels}
