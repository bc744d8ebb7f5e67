"""Convert PyTorch weights into an nxtp_jax checkpoint: `nxtp-convert`, runnable from a checkout.

    python convert/from_torch.py --clip ViT-L-14.pt --llama_dir llama-2-7b \\
        --tokenizer tokenizer.model --layers 6 --out ckpts/nxtp-init

The command lives in `nxtp_jax/weights/cli.py`; `--help` lists its flags.
"""

import sys

from nxtp_jax.weights.cli import main

if __name__ == "__main__":
    sys.exit(main())
