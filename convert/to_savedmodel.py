"""Export an nxtp_jax checkpoint as a TF SavedModel (jax2tf, native serialization), checked against JAX.

    python convert/to_savedmodel.py --ckpt DIR --out SM_DIR [--dtype float32|float16]

The SavedModel has the signatures `encode` and `decode` (see nxtp_jax/export/savedmodel.py) for
TF Serving; the sampling loop and the ranking stay with the client, as in convert/onnx_infer.py.
Needs the `savedmodel` extra (tensorflow-cpu).
"""

from __future__ import annotations

import argparse
import sys

from nxtp_jax.export import onnx_export, savedmodel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="nxtp_jax checkpoint directory")
    p.add_argument("--out", required=True, help="output SavedModel directory (must be empty or absent)")
    p.add_argument("--dtype", choices=sorted(onnx_export.DTYPES), default="float32", help="weights and activations")
    p.add_argument("--no_check", action="store_true", help="skip the TF vs JAX check")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, params = onnx_export.load(args.ckpt, args.dtype)
        savedmodel.export_savedmodel(model, params, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.no_check:
        for name, diff in savedmodel.check_savedmodel(model, params, args.out).items():
            print(f"TF vs JAX, {name}: max abs diff {diff:.3g}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
