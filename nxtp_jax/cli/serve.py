"""`python -m nxtp_jax.serve`: serve a checkpoint over HTTP.

    python -m nxtp_jax.serve --ckpt=DIR|--model=g3m [--host=127.0.0.1] [--port=8080] [--vocab=NAME:FILE ...]
        [--max_batch=8] [--max_wait_ms=5] [--max_num_labels=20] [--api_key_file=FILE] ...

Needs the `serve` extra: `pip install -e ".[serve]"`. Endpoints, limits and the memory
bound: docs/serving.md.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

from absl import flags, logging

from nxtp_jax.cli import model_flag
from nxtp_jax.cli.command import Command, UsageError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    def positive(name: str, what: str) -> None:
        flags.register_validator(name, lambda v: v > 0, message=f"{what} must be > 0", flag_values=fv)

    model_flag.define(fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.", flag_values=fv)
    flags.DEFINE_integer("port", 8080, "Port to listen on.", lower_bound=1, upper_bound=65535, flag_values=fv)
    flags.DEFINE_multi_string(
        "vocab", [], "NAME:FILE, a closed vocabulary (one label per line) that requests name with vocab=NAME; repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_integer("max_batch", 8, "Most images per device batch.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("max_wait_ms", 5.0, "How long the first queued image waits for others to join its batch.",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("max_num_labels", 20, "Largest num_labels a request may ask for.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_queue", 256, "Images waiting for the device (tag and attention) before requests get 503.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_float("max_body_mb", 20.0, "Largest request body, in MiB (413 above).", flag_values=fv)
    positive("max_body_mb", "--max_body_mb")
    flags.DEFINE_float("max_inflight_mb", 256.0, "Request bodies held at once, all requests together, in MiB "
                       "(503 above); at least --max_body_mb.", flag_values=fv)
    flags.register_multi_flags_validator(
        ["max_body_mb", "max_inflight_mb"], lambda v: v["max_inflight_mb"] >= v["max_body_mb"],
        message="--max_inflight_mb must be at least --max_body_mb (one request's body)", flag_values=fv,
    )
    flags.DEFINE_integer("max_pixels", 40_000_000, "Largest image, in pixels from its header (413 above).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_images", 16, "Most images in one request (the multipart field 'image' repeated).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("decode_threads", 2, "Images decoded at once (each up to --max_pixels in memory).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_float("timeout_s", 60.0, "Per-request timeout in seconds (504 after).", flag_values=fv)
    positive("timeout_s", "--timeout_s")
    flags.DEFINE_float("header_timeout_s", 10.0,
                       "Seconds a connection has to send complete request headers, from opening or its last answer.",
                       flag_values=fv)
    positive("header_timeout_s", "--header_timeout_s")
    flags.DEFINE_float("keep_alive_s", 5.0, "Seconds an idle keep-alive connection stays open.", flag_values=fv)
    positive("keep_alive_s", "--keep_alive_s")
    flags.DEFINE_integer("max_connections", 512, "Open connections; more are answered 503.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("drain_s", 10.0, "On SIGTERM: seconds queued requests may still finish; then 503, exit 0.",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_string("api_key_file", None, "File of API keys, one per line: requests need 'Authorization: Bearer KEY' "
                        "(/healthz and /readyz stay open).", flag_values=fv)
    flags.DEFINE_list("cors_origins", [], "Web origins allowed to call the API from a browser (CORS), e.g. "
                      "https://app.example.com; * for any.", flag_values=fv)
    flags.DEFINE_bool("access_log", False, "One JSON line per request on stdout, with its X-Request-ID.", flag_values=fv)


def api_keys(path: str | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        keys = tuple(line.strip() for line in pathlib.Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--api_key_file {path!r} cannot be read: {e}") from e
    if not keys:
        raise UsageError(f"--api_key_file {path!r} has no key; write one key per line")
    return keys


def vocab_files(specs: Sequence[str]) -> dict[str, str]:
    files = {}
    for spec in specs:
        name, sep, path = spec.partition(":")
        if not sep or not name or not path:
            raise UsageError(f"--vocab expects NAME:FILE, found {spec!r}")
        if name in files:
            raise UsageError(f"--vocab {name} is given twice; give each vocabulary its own name")
        if not pathlib.Path(path).is_file():
            raise UsageError(f"--vocab {name}: file {path!r} not found")
        files[name] = path
    return files


def body(fv: flags.FlagValues, args: list[str]) -> None:
    try:
        import uvicorn

        from nxtp_jax.serve import connections
        from nxtp_jax.serve.app import Access, Limits, Service, create_app
    except ImportError as e:
        raise UsageError(f"the service needs the serve extra ({e}); run: pip install -e \".[serve]\"") from e
    from nxtp_jax.inference.tagger import Tagger

    vocabs = vocab_files(fv.vocab)
    access = Access(api_keys=api_keys(fv.api_key_file), cors_origins=tuple(fv.cors_origins), access_log=fv.access_log)
    before, after = connections.raise_open_file_limit()
    logging.info("open-file limit: %d%s", after, f" (raised from {before} to the hard limit)" if after > before else "")
    if fv.max_connections + connections.RESERVED_FILES > after:
        raise UsageError(f"--max_connections={fv.max_connections} needs {fv.max_connections + connections.RESERVED_FILES} "
                         f"open files, the limit is {after}; lower --max_connections or raise the hard limit (ulimit -Hn)")
    limits = Limits(
        max_body_bytes=int(fv.max_body_mb * 2**20), max_inflight_bytes=int(fv.max_inflight_mb * 2**20),
        max_pixels=fv.max_pixels, max_images=fv.max_images, max_queue=fv.max_queue, decode_threads=fv.decode_threads,
        timeout_s=fv.timeout_s,
    )
    tagger = Tagger.load(model_flag.resolve(fv), batch_size=fv.max_batch)
    service = Service(
        tagger, vocabs=vocabs, max_batch=fv.max_batch, max_wait_ms=fv.max_wait_ms, max_num_labels=fv.max_num_labels,
        limits=limits,
    )
    logging.info("compiling batch sizes %s x k %s; GET /readyz turns 200 when done",
                 service.runner.batch_sizes, service.runner.label_sizes)
    config = uvicorn.Config(
        create_app(service, access), host=fv.host, port=fv.port, log_level="warning", access_log=False,
        http=connections.protocol(header_timeout_s=fv.header_timeout_s, max_connections=fv.max_connections),
        timeout_keep_alive=fv.keep_alive_s, timeout_graceful_shutdown=fv.drain_s + 1.0,  # +1 s to send the 503s
    )
    connections.Server(config, on_drain=lambda: service.drain(fv.drain_s)).run()


serve_command = Command("python -m nxtp_jax.serve", __doc__, define, body, log_level="info")
