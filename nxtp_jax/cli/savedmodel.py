"""`python convert/to_savedmodel.py`: an nxtp_jax checkpoint as a TF SavedModel (jax2tf, native serialization), checked against JAX.

    python convert/to_savedmodel.py --ckpt=DIR --out=SM_DIR [--dtype=float32|float16]

The SavedModel has the signatures `encode` and `decode` (see nxtp_jax/export/savedmodel.py) for
TF Serving; the sampling loop and the ranking stay with the client, as in convert/onnx_infer.py.
Needs the `savedmodel` extra (tensorflow-cpu) and nothing of the `onnx` one.
"""

from __future__ import annotations

from absl import flags

from nxtp_jax.choices import EXPORT_DTYPES
from nxtp_jax.cli.command import Command
from nxtp_jax.errors import NxtpError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("ckpt", None, "nxtp_jax checkpoint directory.", flag_values=fv, required=True)
    flags.DEFINE_string("out", None, "Output SavedModel directory (must be empty or absent).", flag_values=fv, required=True)
    flags.DEFINE_enum("dtype", "float32", EXPORT_DTYPES, "Weights' dtype (activations stay float32).", flag_values=fv)
    flags.DEFINE_bool("no_check", False, "Skip the TF vs JAX check.", flag_values=fv)


def body(fv: flags.FlagValues, args: list[str]) -> None:
    try:
        from nxtp_jax.export import savedmodel  # the savedmodel extra: not imported for --help
    except ImportError as e:
        raise NxtpError(f"the SavedModel export needs the savedmodel extra ({e}); run: pip install -e \".[savedmodel]\"") from e
    from nxtp_jax.export import graphs

    model, params = graphs.load(fv.ckpt, fv.dtype)
    savedmodel.export_savedmodel(model, params, fv.out)
    if not fv.no_check:
        for name, diff in savedmodel.check_savedmodel(model, params, fv.out).items():
            print(f"TF vs JAX, {name}: max abs diff {diff:.3g}")
    print(f"wrote {fv.out}")


savedmodel_command = Command("python convert/to_savedmodel.py", __doc__, define, body)
