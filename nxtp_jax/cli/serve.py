"""`python -m nxtp_jax.serve`: serve a checkpoint over HTTP.

    python -m nxtp_jax.serve --ckpt=DIR [--host=127.0.0.1] [--port=8080] [--vocab=NAME:FILE ...]
        [--max_batch=8] [--max_wait_ms=5] [--max_num_labels=20]

Needs the `serve` extra: `pip install -e ".[serve]"`. Endpoints and limits: docs/serving.md.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

from absl import flags, logging

from nxtp_jax.cli.command import Command, UsageError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("ckpt", None, "Checkpoint directory (from nxtp-convert or training).", flag_values=fv, required=True)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.", flag_values=fv)
    flags.DEFINE_integer("port", 8080, "Port to listen on.", flag_values=fv)
    flags.DEFINE_multi_string(
        "vocab", [], "NAME:FILE, a closed vocabulary (one label per line) that requests name with vocab=NAME; repeatable.",
        flag_values=fv,
    )
    flags.DEFINE_integer("max_batch", 8, "Most images per device batch.", flag_values=fv)
    flags.DEFINE_float("max_wait_ms", 5.0, "How long the first queued image waits for others to join its batch.", flag_values=fv)
    flags.DEFINE_integer("max_num_labels", 20, "Largest num_labels a request may ask for.", flag_values=fv)
    flags.DEFINE_integer("max_queue", 256, "Images waiting for the device before requests get 503.", flag_values=fv)
    flags.DEFINE_float("max_body_mb", 20.0, "Largest request body, in MiB (413 above).", flag_values=fv)
    flags.DEFINE_integer("max_pixels", 40_000_000, "Largest image, in pixels from its header (413 above).", flag_values=fv)
    flags.DEFINE_float("timeout_s", 60.0, "Per-request timeout in seconds (504 after).", flag_values=fv)


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

        from nxtp_jax.serve.app import Limits, Service, create_app
    except ImportError as e:
        raise UsageError(f"the service needs the serve extra ({e}); run: pip install -e \".[serve]\"") from e
    from nxtp_jax.inference.tagger import Tagger

    vocabs = vocab_files(fv.vocab)
    limits = Limits(
        max_body_bytes=int(fv.max_body_mb * 2**20), max_pixels=fv.max_pixels, max_queue=fv.max_queue, timeout_s=fv.timeout_s,
    )
    tagger = Tagger.load(fv.ckpt, batch_size=fv.max_batch)
    service = Service(
        tagger, vocabs=vocabs, max_batch=fv.max_batch, max_wait_ms=fv.max_wait_ms, max_num_labels=fv.max_num_labels,
        limits=limits,
    )
    logging.info("compiling batch sizes %s x k %s; GET /readyz turns 200 when done",
                 service.runner.batch_sizes, service.runner.label_sizes)
    uvicorn.run(create_app(service), host=fv.host, port=fv.port, log_level="warning", timeout_keep_alive=30)


serve = Command("python -m nxtp_jax.serve", __doc__, define, body, log_level="info")
