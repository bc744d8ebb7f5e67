"""`nxtp-tag` (or `python -m nxtp_jax.infer`): tag images from the command line.

    nxtp-tag --model=g3m photo.jpg        # the released model: downloaded and converted on first use
    nxtp-tag --ckpt=DIR --num_labels=20 [--json] IMAGE [IMAGE ...]
    nxtp-tag --ckpt=DIR --num_labels=K --output=OUT.jsonl INPUT [INPUT ...]
    nxtp-tag --ckpt=DIR --save_attention_maps=MAPS IMAGE [IMAGE ...]

Every readable image is tagged; each one that is not gets an `error: ...` line on stderr
(with --json, an entry {"image": path, "error": "..."}), and the exit status is then 1.

Bulk tagging (`--output`): INPUTs are image files, directories (searched recursively) or
WebDataset `.tar` shards; one JSON line per image into OUT, fsynced batch by batch, and a
rerun skips the images already there. Bad images are recorded and counted; the exit status
stays 0 (docs/serving.md).
"""

from __future__ import annotations

import pathlib
import sys
import time
import traceback

from absl import flags, logging

from nxtp_jax.choices import DEFAULT_NUM_LABELS, QUANTIZE, RANKINGS
from nxtp_jax.cli import model_flag
from nxtp_jax.cli.command import Command, UsageError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    model_flag.define(fv)
    flags.DEFINE_integer("num_labels", DEFAULT_NUM_LABELS, "k of the one-shot sampling: labels per image.", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("json", False, "Print JSON instead of the original's text lines.", flag_values=fv)
    flags.DEFINE_enum("ranking", "prob", list(RANKINGS), "How labels are ranked.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum(
        "quantize", "none", list(QUANTIZE),
        "Decoder weights in 8 bits per output channel or 4 bits in groups: less memory (docs/benchmarks.md).", flag_values=fv,
    )
    flags.DEFINE_float("min_prob", 0.0, "Drop labels scored below this probability (ranking 'prob').", flag_values=fv)
    flags.DEFINE_string(
        "vocab", None, "A closed vocabulary, one label per line: decoding is constrained to its labels (docs/tagging.md).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "save_attention_maps", None, "Directory for per-layer/per-head image-token attention grids (PNG).", flag_values=fv
    )
    flags.DEFINE_string(
        "output", None, "Bulk tagging: one JSON line per image into this file; a rerun skips the images already in it.",
        flag_values=fv,
    )
    flags.DEFINE_integer("process_index", None, "Bulk tagging: this process's share (default: jax.process_index()).", flag_values=fv)
    flags.DEFINE_integer("process_count", None, "Bulk tagging: number of processes (default: jax.process_count()).", flag_values=fv)


def body(fv: flags.FlagValues, paths: list[str]) -> int:
    from nxtp_jax.inference import ranking

    if not paths:
        raise UsageError("give at least one image path" + (", directory or .tar shard" if fv.output else ""))
    ranking.check_threshold(fv.min_prob, fv.ranking)
    if fv.output:
        if fv.save_attention_maps:
            raise UsageError("--save_attention_maps works without --output only")
        return bulk(fv, paths)
    return tag(fv, paths)


def load_tagger(fv: flags.FlagValues):
    from nxtp_jax.inference.tagger import Tagger

    return Tagger.load(model_flag.resolve(fv), batch_size=fv.batch_size, quantize=fv.quantize)


def tag(fv: flags.FlagValues, paths: list[str]) -> int:
    """Tags every readable image; prints one error line (or JSON entry) per other one; returns 1 if any failed."""
    from nxtp_jax.inference.attention import save_attention_maps
    from nxtp_jax.inference.formatting import format_json, format_text, image_error

    tagger = load_tagger(fv)
    vocab = tagger.vocabulary(fv.vocab)
    start = time.perf_counter()
    exists = [pathlib.Path(p).is_file() for p in paths]
    found = [p for p, e in zip(paths, exists) if e]
    tagged = iter(tagger.predict(
        found, num_labels=fv.num_labels, min_prob=fv.min_prob, vocab=vocab, ranking_method=fv.ranking, errors="return"
    ))
    results = [next(tagged) if e else FileNotFoundError(f"{p}: image file not found") for p, e in zip(paths, exists)]
    logging.info("inference time: %.3fs for %d image(s)", time.perf_counter() - start, len(paths))
    failed = [(p, r) for p, r in zip(paths, results) if isinstance(r, Exception)]
    for path, error in failed:
        if fv.verbose:
            traceback.print_exception(error, file=sys.stderr)
        print(f"error: {image_error(path, error)}", file=sys.stderr, flush=True)
    if fv.json:
        print(format_json(paths, results))
    else:
        print("\n\n".join(format_text(p, r, fv.num_labels) for p, r in zip(paths, results) if not isinstance(r, Exception)))
    if fv.save_attention_maps:
        for path, result in zip(paths, results):
            if not isinstance(result, Exception):
                out = pathlib.Path(fv.save_attention_maps) / pathlib.Path(path).stem
                count = save_attention_maps(tagger, path, out)
                logging.info("wrote %d attention maps to %s", count, out)
    return 1 if failed else 0


def bulk(fv: flags.FlagValues, inputs: list[str]) -> int:
    import jax

    from nxtp_jax.inference.bulk import tag_to_file

    tag_to_file(
        inputs, fv.output, lambda: load_tagger(fv),
        num_labels=fv.num_labels, min_prob=fv.min_prob, vocab=fv.vocab,
        ranking=fv.ranking, batch_size=fv.batch_size,
        process_index=jax.process_index() if fv.process_index is None else fv.process_index,
        process_count=jax.process_count() if fv.process_count is None else fv.process_count,
    )
    return 0


tag_command = Command("nxtp-tag", __doc__, define, body, positional="IMAGE [IMAGE ...]")
