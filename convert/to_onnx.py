"""Export an nxtp_jax checkpoint to ONNX: `nxtp-export`, runnable from a checkout.

    python convert/to_onnx.py --ckpt DIR --out ONNX_DIR [--dtype float32|float16] [--quantize none|int8|int4 [--accuracy_level 4|0]] [--opset N]

The command lives in `nxtp_jax/export/cli.py`; `--help` lists its flags.
"""

import sys

from nxtp_jax.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
