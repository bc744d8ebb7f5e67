"""Tag images with an ONNX export in ONNX Runtime, without JAX, flax or torch.

    python convert/onnx_infer.py --onnx_dir ONNX_DIR --num_labels 20 [--json] IMAGE [IMAGE ...]
    python convert/onnx_infer.py --onnx_dir ONNX_DIR --min_prob 0.1 --vocab labels.txt IMAGE [IMAGE ...]

Prints what `python -m nxtp_jax.infer` prints for the checkpoint the export came from. Needs
onnxruntime, numpy, pillow and sentencepiece, and this checkout (for the JAX-free modules
nxtp_jax.tokenizer, .prompts, .ranking, .vocabulary, .data.preprocess and .export.ort_tagger).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

# The checkout's root, so that the JAX-free nxtp_jax modules import without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from nxtp_jax.export.ort_tagger import OrtTagger  # noqa: E402
from nxtp_jax.inference import ranking  # noqa: E402
from nxtp_jax.inference.formatting import format_json, format_text  # noqa: E402
from nxtp_jax.choices import RANKINGS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx_dir", required=True, help="directory written by convert/to_onnx.py")
    p.add_argument("--num_labels", type=int, default=10, help="k of the one-shot sampling: labels per image")
    p.add_argument("--json", action="store_true", help="print JSON instead of the original's text lines")
    p.add_argument("--ranking", choices=RANKINGS, default="prob", help="how labels are ranked")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: one per core)")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence at every step (the original's way)")
    p.add_argument("--min_prob", type=float, default=0.0, help="drop labels scored below this probability (ranking 'prob')")
    p.add_argument("--vocab", default=None, help="a closed vocabulary, one label per line: decoding is constrained to its labels")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [p for p in args.images if not pathlib.Path(p).is_file()]
    if missing:
        print(f"error: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        tagger = OrtTagger(args.onnx_dir, batch_size=args.batch_size, threads=args.threads)
        ranking.check_threshold(args.min_prob, args.ranking)
        vocab = tagger.vocabulary(args.vocab)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    results = tagger.predict(
        args.images, args.num_labels, min_prob=args.min_prob, vocab=vocab, ranking_method=args.ranking, cache=not args.no_cache
    )
    print(f"inference time: {time.perf_counter() - start:.3f}s for {len(args.images)} image(s)", file=sys.stderr)
    if args.json:
        print(format_json(args.images, results))
    else:
        print("\n\n".join(format_text(p, r, args.num_labels) for p, r in zip(args.images, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
