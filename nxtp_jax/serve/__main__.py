"""Serve a checkpoint over HTTP.

    python -m nxtp_jax.serve --ckpt=DIR [--host=127.0.0.1] [--port=8080] [--vocab=NAME:FILE ...]
        [--max_batch=8] [--max_wait_ms=5] [--max_num_labels=20]

Needs the `serve` extra: `pip install -e ".[serve]"`. Endpoints and limits: docs/serving.md.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Sequence

from absl import app, flags, logging

from nxtp_jax import errors

CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory (from convert/from_torch.py or training).", required=True)
HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
PORT = flags.DEFINE_integer("port", 8080, "Port to listen on.")
VOCAB = flags.DEFINE_multi_string(
    "vocab", [], "NAME:FILE, a closed vocabulary (one label per line) that requests name with vocab=NAME; repeatable."
)
MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most images per device batch.")
MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 5.0, "How long the first queued image waits for others to join its batch.")
MAX_NUM_LABELS = flags.DEFINE_integer("max_num_labels", 20, "Largest num_labels a request may ask for.")
MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Images waiting for the device before requests get 503.")
MAX_BODY_MB = flags.DEFINE_float("max_body_mb", 20.0, "Largest request body, in MiB (413 above).")
MAX_PIXELS = flags.DEFINE_integer("max_pixels", 40_000_000, "Largest image, in pixels from its header (413 above).")
TIMEOUT_S = flags.DEFINE_float("timeout_s", 60.0, "Per-request timeout in seconds (504 after).")


def vocab_files(specs: Sequence[str]) -> dict[str, str]:
    files = {}
    for spec in specs:
        name, sep, path = spec.partition(":")
        if not sep or not name or not path:
            raise app.UsageError(f"--vocab expects NAME:FILE, found {spec!r}")
        if name in files:
            raise app.UsageError(f"--vocab {name} is given twice; give each vocabulary its own name")
        if not pathlib.Path(path).is_file():
            raise app.UsageError(f"--vocab {name}: file {path!r} not found")
        files[name] = path
    return files


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        import uvicorn

        from nxtp_jax.serve.app import Limits, Service, create_app
    except ImportError as e:
        sys.exit(f"the service needs the serve extra ({e}); run: pip install -e \".[serve]\"")
    from nxtp_jax.inference.tagger import Tagger

    vocabs = vocab_files(VOCAB.value)
    limits = Limits(
        max_body_bytes=int(MAX_BODY_MB.value * 2**20), max_pixels=MAX_PIXELS.value, max_queue=MAX_QUEUE.value,
        timeout_s=TIMEOUT_S.value,
    )
    try:
        tagger = Tagger.load(CKPT.value, batch_size=MAX_BATCH.value)
        service = Service(
            tagger, vocabs=vocabs, max_batch=MAX_BATCH.value, max_wait_ms=MAX_WAIT_MS.value,
            max_num_labels=MAX_NUM_LABELS.value, limits=limits,
        )
    except errors.USER_ERRORS as e:  # a bad checkpoint, vocabulary file or flag value
        sys.exit(errors.report(e, False))
    logging.info("compiling batch sizes %s x k %s; GET /readyz turns 200 when done",
                 service.runner.batch_sizes, service.runner.label_sizes)
    uvicorn.run(create_app(service), host=HOST.value, port=PORT.value, log_level="warning", timeout_keep_alive=30)


if __name__ == "__main__":
    app.run(main)
