"""`nxtp-export` (or `python convert/to_onnx.py`): an nxtp_jax checkpoint to ONNX, checked against JAX.

    nxtp-export --ckpt=DIR|--model=g3m --out=ONNX_DIR [--dtype=float32|float16] [--quantize=none|int8|int4 [--accuracy_level=4|0]] [--opset=N]

Writes encoder.onnx, decoder.onnx + decoder.onnx.data (one graph for the prefill and the
KV-cached steps), embeddings.npy, tokenizer.model and config.json; run the result with
`python convert/onnx_infer.py --onnx_dir=ONNX_DIR IMAGE ...`. Needs the `onnx` extra
(jax2onnx, onnx, onnxruntime).
"""

from __future__ import annotations

import pathlib
import time

from absl import flags

from nxtp_jax.choices import ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL, DEFAULT_OPSET, EXPORT_DTYPES, QUANTIZE
from nxtp_jax.cli import model_flag
from nxtp_jax.cli.command import Command
from nxtp_jax.errors import NxtpError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    model_flag.define(fv, "nxtp_jax checkpoint directory (nxtp-convert or training)")
    flags.DEFINE_string("out", None, "Output directory (must not hold an export yet).", flag_values=fv, required=True)
    flags.DEFINE_enum("dtype", "float32", EXPORT_DTYPES, "Weights' dtype (activations stay float32).", flag_values=fv)
    flags.DEFINE_enum(
        "quantize", "none", QUANTIZE, "Decoder weights in 8 or 4 bits (MatMulNBits, one scale per block of 128 rows and column).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "accuracy_level", str(DEFAULT_ACCURACY_LEVEL), [str(level) for level in ACCURACY_LEVELS],
        "MatMulNBits' arithmetic with --quantize: 4 int8 (fast), 0 float32 (int8 weights: about 10x slower on AVX2).",
        flag_values=fv,
    )
    flags.DEFINE_integer("opset", DEFAULT_OPSET, "ONNX opset.", flag_values=fv)
    flags.DEFINE_bool("no_check", False, "Skip the ONNX Runtime vs JAX check.", flag_values=fv)


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def body(fv: flags.FlagValues, args: list[str]) -> None:
    try:
        from nxtp_jax.export import onnx_export  # the onnx extra: not imported for --help
    except ImportError as e:
        raise NxtpError(f"nxtp-export needs the onnx extra ({e}); make its environment with .ci/export_env.sh") from e

    start = time.perf_counter()
    onnx_export.export_checkpoint(
        model_flag.resolve(fv), fv.out, dtype=fv.dtype, quantize=fv.quantize, accuracy_level=int(fv.accuracy_level), opset=fv.opset,
        check=not fv.no_check,
    )
    for name, size in onnx_export.file_sizes(fv.out).items():
        print(f"{size / 2**20:12.1f} MiB  {name}")
    print(f"exported to {fv.out} in {time.perf_counter() - start:.0f} s, peak memory {peak_rss_gib():.1f} GiB")


export_command = Command("nxtp-export", __doc__, define, body)
