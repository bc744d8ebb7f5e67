"""`python convert/onnx_infer.py`: tag images with an ONNX export in ONNX Runtime, without JAX, flax or torch.

    python convert/onnx_infer.py --onnx_dir=ONNX_DIR --num_labels=20 [--json] IMAGE [IMAGE ...]
    python convert/onnx_infer.py --onnx_dir=ONNX_DIR --min_prob=0.1 --vocab=labels.txt IMAGE [IMAGE ...]

Prints what `nxtp-tag` prints for the checkpoint the export came from. Needs onnxruntime,
numpy, pillow, sentencepiece, absl-py and this package installed without its dependencies
(`pip install --no-deps -e .`): this module and the ones it imports (nxtp_jax.tokenizer,
.prompts, .inference.ranking, .inference.vocabulary, .data.preprocess, .export.ort_tagger)
import no JAX.
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import flags

from nxtp_jax.choices import DEFAULT_NUM_LABELS, RANKINGS
from nxtp_jax.cli.command import Command, UsageError
from nxtp_jax.inference import ranking
from nxtp_jax.inference.formatting import format_json, format_text


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("onnx_dir", None, "Directory written by nxtp-export.", flag_values=fv, required=True)
    flags.DEFINE_integer("num_labels", DEFAULT_NUM_LABELS, "k of the one-shot sampling: labels per image.", flag_values=fv, lower_bound=1)
    flags.DEFINE_bool("json", False, "Print JSON instead of the original's text lines.", flag_values=fv)
    flags.DEFINE_enum("ranking", "prob", RANKINGS, "How labels are ranked.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", flag_values=fv, lower_bound=1)
    flags.DEFINE_integer("threads", None, "ONNX Runtime intra-op threads (default: one per core).", flag_values=fv, lower_bound=1)
    flags.DEFINE_bool("no_cache", False, "Recompute the whole sequence at every step (the original's way).", flag_values=fv)
    flags.DEFINE_float("min_prob", 0.0, "Drop labels scored below this probability (ranking 'prob').", flag_values=fv)
    flags.DEFINE_string("vocab", None, "A closed vocabulary, one label per line: decoding is constrained to its labels.", flag_values=fv)


def body(fv: flags.FlagValues, images: list[str]) -> None:
    from nxtp_jax.export.ort_tagger import OrtTagger  # onnxruntime: not imported for --help

    if not images:
        raise UsageError("expected at least one IMAGE")
    missing = [p for p in images if not pathlib.Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    tagger = OrtTagger(fv.onnx_dir, batch_size=fv.batch_size, threads=fv.threads)
    ranking.check_threshold(fv.min_prob, fv.ranking)
    vocab = tagger.vocabulary(fv.vocab)
    start = time.perf_counter()
    results = tagger.predict(images, fv.num_labels, min_prob=fv.min_prob, vocab=vocab, ranking_method=fv.ranking, cache=not fv.no_cache)
    print(f"inference time: {time.perf_counter() - start:.3f}s for {len(images)} image(s)", file=sys.stderr)
    if fv.json:
        print(format_json(images, results))
    else:
        print("\n\n".join(format_text(p, r, fv.num_labels) for p, r in zip(images, results)))


onnx_infer_command = Command("python convert/onnx_infer.py", __doc__, define, body, positional="IMAGE [IMAGE ...]")
