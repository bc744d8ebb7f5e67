"""`nxtp-export` (or `python convert/to_onnx.py`): an nxtp_jax checkpoint to ONNX, checked against JAX.

    nxtp-export --ckpt DIR --out ONNX_DIR [--dtype float32|float16] [--quantize none|int8|int4 [--accuracy_level 4|0]] [--opset N]

Writes encoder.onnx, decoder.onnx + decoder.onnx.data (one graph for the prefill and the
KV-cached steps), embeddings.npy, tokenizer.model and config.json; run the result with
`python convert/onnx_infer.py --onnx_dir ONNX_DIR IMAGE ...`. Needs the `onnx` extra
(jax2onnx, onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from nxtp_jax.export import onnx_export


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nxtp-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="nxtp_jax checkpoint directory (convert/from_torch.py or training)")
    p.add_argument("--out", required=True, help="output directory (must not hold an export yet)")
    p.add_argument("--dtype", choices=sorted(onnx_export.DTYPES), default="float32", help="weights and activations")
    p.add_argument(
        "--quantize", choices=onnx_export.QUANTIZE, default="none",
        help="decoder weights in 8 or 4 bits (MatMulNBits, one scale per block of 128 rows and column)",
    )
    p.add_argument(
        "--accuracy_level", type=int, choices=onnx_export.ACCURACY_LEVELS, default=onnx_export.DEFAULT_ACCURACY_LEVEL,
        help="MatMulNBits' arithmetic with --quantize: 4 int8 (fast), 0 float32 (int8 weights: about 10x slower on AVX2)",
    )
    p.add_argument("--opset", type=int, default=onnx_export.DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--no_check", action="store_true", help="skip the ONNX Runtime vs JAX check")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        onnx_export.export_checkpoint(
            args.ckpt, args.out, dtype=args.dtype, quantize=args.quantize, accuracy_level=args.accuracy_level, opset=args.opset, check=not args.no_check
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, size in onnx_export.file_sizes(args.out).items():
        print(f"{size / 2**20:12.1f} MiB  {name}")
    print(f"exported to {args.out} in {time.perf_counter() - start:.0f} s, peak memory {peak_rss_gib():.1f} GiB")
    return 0

