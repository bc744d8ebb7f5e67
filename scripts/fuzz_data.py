"""Fuzz the data readers with mutated tar shards and image bytes (hypothesis).

    python scripts/fuzz_data.py --cases 3000 --seed 0 --timeout 20 --max_memory_mb 4096

Every tar case goes through the shard checker (`check.check_shard`) and the training
stream's shard reading and decoding (`stream.TarStreamIterDataset` + `samples.decode_sample`);
every image case through `preprocess.preprocess`. Each must finish within --timeout seconds
and end in a documented outcome: samples, skip counts, `check.NotATarShard`, or
`preprocess.ImageError`. The address space is capped (RLIMIT_AS), so a blow-up fails
instead of swapping. Prints the cases tried, hangs, undocumented exceptions (with the first
tracebacks), the documented outcomes and the peak RSS; exits 1 on any hang or undocumented
exception. tests/data/test_data_fuzz.py runs the same cases under pytest.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import resource
import signal
import struct
import sys
import tarfile
import tempfile
import logging
import time
import traceback
import warnings
import zlib

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from nxtp_jax.data import check, preprocess
from nxtp_jax.data.samples import Skip, decode_sample
from nxtp_jax.data.stream import TarStreamIterDataset


class Hang(BaseException):
    """Raised by the per-case alarm; a BaseException, so no `except Exception` in the readers hides it."""


# -- base inputs --


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _base_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    palette = rgb.convert("P")
    return [
        _encode(rgb, "PNG"),
        _encode(rgb, "JPEG"),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "WEBP"),
        _encode(palette, "PNG", transparency=0),
        _encode(palette, "GIF"),
        _encode(rgb, "BMP"),
        _encode(rgb.convert("LA"), "PNG"),
        _encode(Image.fromarray(rng.integers(0, 65536, (12, 16), dtype=np.uint16)), "PNG"),
        _encode(rgb, "TIFF"),
    ]


BASE_IMAGES = _base_images()


def _tar(members: list[tuple[str, bytes]], fmt: int, pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax and i == 1:
                info.pax_headers = pax
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _base_shards() -> list[bytes]:
    samples = []
    for i, image in enumerate(BASE_IMAGES[:4]):
        ext = ("png", "jpg", "jpg", "webp")[i]
        samples += [(f"k{i}.{ext}", image), (f"k{i}.txt", f"caption {i}".encode()), (f"k{i}.json", b'{"labels": ["a"]}')]
    long_name = [(f"{'d' * 120}/x.png", BASE_IMAGES[0]), (f"{'d' * 120}/x.txt", b"long")]
    return [
        _tar(samples, tarfile.USTAR_FORMAT),
        _tar(samples, tarfile.GNU_FORMAT),
        _tar(samples, tarfile.PAX_FORMAT, {"comment": "x"}),
        _tar(long_name + samples[:6], tarfile.PAX_FORMAT),
        _tar(long_name + samples[:6], tarfile.GNU_FORMAT),
    ]


BASE_SHARDS = _base_shards()
# Where each base shard's member headers start, last first: a lie there leaves the samples
# before it readable, so the cases reach past the first header.
HEADER_OFFSETS = {
    shard: sorted((m.offset for m in tarfile.open(fileobj=io.BytesIO(shard)).getmembers()), reverse=True)
    for shard in BASE_SHARDS
}

# Values a lying header field or pax record may hold.
LIES = [b"-1", b"-1536", b"-512", b"abc", b"1e3", b"+5", b"0x10", b" 12", b"99999999999", b"0", b"\xff" * 11,
        b"\x80" + b"\xff" * 10, b"777777777777", b"", b"\0" * 12, b"0000000001"]
PAX_RECORDS = [b"size=-1536", b"size=-1", b"size=abc", b"size=99999999999", b"size=0", b"path=a\0b.txt",
               b"path=", b"path=../../x.txt", b"path=k0.txt", b"comment=\xff\xfe"]
COMPRESSION_MAGIC = [b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"PK\x03\x04"]
HEADER_FIELDS = [(0, 100), (100, 108), (124, 136), (136, 148), (148, 156), (156, 157), (257, 263), (345, 500)]


def _fix_checksum(raw: bytearray, header: int) -> None:
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\0 " % sum(raw[header : header + 512])


def _pax_block(records: list[bytes], length_lie: bytes | None) -> bytes:
    payload = b""
    for record in records:
        length = len(record) + 2
        length += len(str(length + len(str(length))))
        payload += (length_lie or str(length).encode()) + b" " + record + b"\n"
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(payload)
    block = bytearray(header.tobuf(tarfile.USTAR_FORMAT))
    return bytes(block) + payload + b"\0" * (-len(payload) % 512)


@st.composite
def tar_cases(draw) -> bytes:
    """A base shard with 1-4 mutations: lying header fields (checksum fixed or not), inserted
    pax headers, byte flips, truncation, a compression magic."""
    base = draw(st.sampled_from(BASE_SHARDS))
    raw = bytearray(base)
    headers = HEADER_OFFSETS[base] + list(range(0, len(raw), 512))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "pax", "flip", "truncate", "field", "pax", "flip", "truncate", "magic"]))
        if kind == "field":
            header = draw(st.sampled_from(headers))
            start, end = draw(st.sampled_from(HEADER_FIELDS))
            value = draw(st.one_of(st.sampled_from(LIES), st.binary(max_size=end - start)))[: end - start]
            raw[header + start : header + end] = value.ljust(end - start, b"\0")
            if draw(st.sampled_from([True, False])):  # a fixed checksum lets the lie through to the field checks
                _fix_checksum(raw, header)
        elif kind == "pax":
            at = draw(st.sampled_from(headers))
            records = draw(st.lists(st.sampled_from(PAX_RECORDS), min_size=1, max_size=3))
            lie = draw(st.one_of(st.none(), st.sampled_from([b"0", b"xx", b"999", b"-5", b"1"])))
            raw[at:at] = _pax_block(records, lie)
        elif kind == "flip" and raw:  # near a header: its fields, or the data after it
            position = min(draw(st.sampled_from(headers)) + draw(st.integers(0, 1023)), len(raw) - 1)
            raw[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[draw(st.sampled_from(headers)) + draw(st.integers(0, 1023)) :]
        elif kind == "magic":
            raw[0:0] = draw(st.sampled_from(COMPRESSION_MAGIC))
        headers = [h for h in headers if h < len(raw)] or [0]
    return bytes(raw)


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a PNG) with its IHDR claiming width x height, CRC fixed."""
    raw = bytearray(data)
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


@st.composite
def image_cases(draw) -> bytes:
    """A base image (10 formats and modes) with 0-3 mutations: byte flips, truncation, a PNG
    header claiming other dimensions (1 x 300,000, 65535 x 65535, 0 x 5), junk appended."""
    raw = bytearray(draw(st.sampled_from(BASE_IMAGES)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "dims", "append"]))
        if kind == "flip" and raw:
            position = draw(st.integers(0, len(raw) - 1))
            raw[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[draw(st.integers(0, len(raw))) :]
        elif kind == "dims" and raw.startswith(b"\x89PNG") and len(raw) >= 33:
            dims = draw(st.sampled_from([(1, 300_000), (300_000, 1), (65535, 65535), (0, 5), (20_000, 1), (8193, 8193)]))
            raw = bytearray(_png_with_size(bytes(raw), *dims))
        elif kind == "append":
            raw += draw(st.binary(max_size=64))
    return bytes(raw)


# -- one case --


def _check_tar(data: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "case.tar")
        with open(path, "wb") as f:
            f.write(data)
        try:
            valid, problems = check.check_shard(path)
        except check.NotATarShard:
            return "checker:not_a_tar_shard"
        kinds = sorted({p.kind for p in problems})
        stream = TarStreamIterDataset([path], seed=0, shuffle=False, repeat=False, window_size=4)
        decoded = [decode_sample(raw, 16, "none") for raw in stream]
        skipped = sum(isinstance(d, Skip) for d in decoded)
        if len(decoded) - skipped != valid or skipped != len(problems):
            return f"undocumented:checker and stream disagree ({valid}/{len(problems)} vs {len(decoded) - skipped}/{skipped})"
        return "shard:" + (",".join(kinds) if kinds else "clean")


def _preprocess(data: bytes) -> str:
    try:
        x = preprocess.preprocess(data, 32)
    except preprocess.ImageError as e:
        return f"image_error:{e.kind}"
    if x.shape != (32, 32, 3) or x.dtype != np.float32:
        return f"undocumented:preprocess returned {x.dtype} {x.shape}"
    return "image:ok"


TARGETS = {"tar": _check_tar, "image": _preprocess}


def run_case(target: str, data: bytes, timeout: float) -> tuple[str, str]:
    """(outcome, traceback or ""): a documented outcome, "hang", or "undocumented:<type>"."""

    def on_alarm(*_):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return TARGETS[target](data), ""
    except Hang:
        return "hang", ""
    except Exception as e:  # anything else is a finding
        return f"undocumented:{type(e).__name__}", traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_finding(outcome: str) -> bool:
    return outcome == "hang" or outcome.startswith("undocumented")


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux: VmHWM, whose count starts at exec; getrusage's ru_maxrss keeps the
    peak of the process that forked it (a test runner of several GB)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3000, help="cases in all, split evenly between tar and image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--max_memory_mb", type=int, default=4096, help="address-space cap (RLIMIT_AS); 0 for none")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # PIL warns about each corrupt file; outcomes are counted instead
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    if args.max_memory_mb:
        cap = args.max_memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    outcomes: dict[str, collections.Counter] = {t: collections.Counter() for t in TARGETS}
    findings: list[tuple[str, str, bytes, str]] = []
    start = time.perf_counter()
    for target, strategy in (("tar", tar_cases()), ("image", image_cases())):

        def record(data: bytes, target: str = target) -> None:
            outcome, trace = run_case(target, data, args.timeout)
            outcomes[target][outcome] += 1
            if is_finding(outcome):
                findings.append((target, outcome, data, trace))

        run = given(strategy)(lambda data: record(data))
        settings(max_examples=args.cases // 2, deadline=None, database=None, phases=[Phase.generate],
                 suppress_health_check=list(HealthCheck))(seed(args.seed)(run))()
    seconds = time.perf_counter() - start
    tried = sum(sum(c.values()) for c in outcomes.values())
    hangs = sum(c["hang"] for c in outcomes.values())
    undocumented = sum(n for c in outcomes.values() for o, n in c.items() if o.startswith("undocumented"))
    for target, counter in outcomes.items():
        print(f"{target}: {sum(counter.values())} cases; " + ", ".join(f"{o}={n}" for o, n in counter.most_common()))
    for target, outcome, data, trace in findings[:3]:
        print(f"--- {target} {outcome}: {len(data)} bytes, starting {data[:32]!r}\n{trace}")
    print(
        f"cases={tried} hangs={hangs} undocumented={undocumented} peak_rss_mb={peak_rss_mb():.0f} "
        f"seconds={seconds:.0f} machine={platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}"
    )
    return 1 if hangs or undocumented else 0


if __name__ == "__main__":
    sys.exit(main())
