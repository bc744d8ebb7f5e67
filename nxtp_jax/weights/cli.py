"""`nxtp-convert` (or `python convert/from_torch.py`): PyTorch weights into an nxtp_jax checkpoint.

Inputs: OpenAI CLIP + LLaMA-2, and optionally a released nxtp checkpoint.

    nxtp-convert --clip ViT-L-14.pt --llama_dir llama-2-7b \\
        --tokenizer tokenizer.model --layers 6 --out ckpts/nxtp-init
    nxtp-convert --clip ViT-L-14.pt --llama_dir llama-2-7b \\
        --tokenizer tokenizer.model --nxtp_ckpt ckpt_epoch_03_iter_0021360.pth --out ckpts/nxtp-g3m

`--llama_hf_dir` reads the Hugging Face layout instead of Meta's; a `--llama_dir` with a
config.json and no params.json is read that way too. With `--nxtp_ckpt`, the
LLaMA directory needs only params.json when the checkpoint holds every decoder param
(the released ones do), and `--layers` defaults to the checkpoint's depth.

No input runs code: `--clip` may be a TorchScript archive, read as data (never
`torch.jit.load`); every other torch file loads with `weights_only=True`. Integer, complex
and non-finite weights are refused, naming the tensor. `--out` must be new or empty; the
checkpoint is written beside it and moved into place whole. Errors print one line
(`--verbose`: with the traceback).

Flags are spelled with underscores, as in every nxtp_jax command; the dashed spellings
(`--llama-dir`, `--llama-hf-dir`, `--nxtp-ckpt`, `--image-size`) still work.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from nxtp_jax import checkpoint, errors
from nxtp_jax.weights import convert, save
from nxtp_jax.choices import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nxtp-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="OpenAI CLIP archive (ViT-L-14.pt) or a state dict with its keys")
    llama = p.add_mutually_exclusive_group(required=True)
    llama.add_argument(
        "--llama_dir", "--llama-dir", help="Meta layout: params.json + consolidated.*.pth (a Hugging Face folder works too)"
    )
    llama.add_argument(
        "--llama_hf_dir", "--llama-hf-dir", help="Hugging Face layout: config.json + *.safetensors / pytorch_model*.bin"
    )
    p.add_argument("--tokenizer", required=True, help="LLaMA's sentencepiece tokenizer.model")
    p.add_argument("--nxtp_ckpt", "--nxtp-ckpt", help="released nxtp checkpoint (trained params), merged over CLIP and LLaMA")
    p.add_argument("--layers", type=int, help="LLaMA blocks to keep (6 in the paper; default: the nxtp checkpoint's)")
    p.add_argument("--image_size", "--image-size", type=int, help="input resolution; another than the archive's means a fresh positional embedding")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh inits (new proj, special-token rows)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the params are written in")
    p.add_argument("--out", required=True, help="output checkpoint directory: new or empty (written whole, then moved in place)")
    p.add_argument("--verbose", action="store_true", help="on an error, print its traceback too")
    return p.parse_args(argv)


def _hf_folder_given_as_meta(args: argparse.Namespace) -> None:
    """A --llama_dir holding config.json and no params.json is a Hugging Face folder: read it as one."""
    if args.llama_dir is None:
        return
    folder = pathlib.Path(args.llama_dir)
    if (folder / "config.json").is_file() and not (folder / "params.json").exists():
        print(f"note: {folder} has config.json and no params.json: reading it as the Hugging Face layout "
              "(--llama_hf_dir)", file=sys.stderr)
        args.llama_hf_dir, args.llama_dir = args.llama_dir, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _hf_folder_given_as_meta(args)
    try:
        checkpoint.check_new_dir(args.out)
        conversion = convert(
            clip_path=args.clip,
            tokenizer_path=args.tokenizer,
            llama_dir=args.llama_dir,
            llama_hf_dir=args.llama_hf_dir,
            nxtp_ckpt=args.nxtp_ckpt,
            layers=args.layers,
            image_size=args.image_size,
            seed=args.seed,
            dtype=args.dtype,
        )
        print(conversion.report())
        out = save(conversion, args.out, args.tokenizer)
    except errors.USER_ERRORS as e:  # WeightImportError, CheckpointError, missing files
        return errors.report(e, args.verbose)
    print(f"wrote {out}")
    return 0

