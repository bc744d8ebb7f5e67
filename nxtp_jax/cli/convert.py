"""`nxtp-convert` (or `python convert/from_torch.py`): PyTorch weights into an nxtp_jax checkpoint.

Inputs: OpenAI CLIP + LLaMA-2, and optionally a released nxtp checkpoint; or a released
model by name or model card (`--model`), downloaded and checked as `nxtp-tag --model` does:

    nxtp-convert --model=g3m --out=gs://bucket/nxtp-g3m

    nxtp-convert --clip=ViT-L-14.pt --llama_dir=llama-2-7b \\
        --tokenizer=tokenizer.model --layers=6 --out=ckpts/nxtp-init
    nxtp-convert --clip=ViT-L-14.pt --llama_dir=llama-2-7b \\
        --tokenizer=tokenizer.model --nxtp_ckpt=ckpt_epoch_03_iter_0021360.pth --out=ckpts/nxtp-g3m

`--llama_hf_dir` reads the Hugging Face layout instead of Meta's; a `--llama_dir` with a
config.json and no params.json is read that way too. With `--nxtp_ckpt`, the
LLaMA directory needs only params.json when the checkpoint holds every decoder param
(the released ones do), and `--layers` defaults to the checkpoint's depth.

No input runs code: `--clip` may be a TorchScript archive, read as data (never
`torch.jit.load`); every other torch file loads with `weights_only=True`. Integer, complex
and non-finite weights are refused, naming the tensor. `--out` must be new or empty; the
checkpoint is written beside it and moved into place whole.
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags

from nxtp_jax.choices import DTYPES
from nxtp_jax.cli.command import Command, UsageError


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("model", None, "A released model (g3m, g70m) or model card .json instead of the files below: "
                        "downloaded, checked and converted into --out (--llama_dir / --tokenizer: local stand-ins for the "
                        "gated LLaMA files).", flag_values=fv)
    flags.DEFINE_string("clip", None, "OpenAI CLIP archive (ViT-L-14.pt) or a state dict with its keys.", flag_values=fv)
    flags.DEFINE_string("llama_dir", None, "Meta layout: params.json + consolidated.*.pth (a Hugging Face folder works too).", flag_values=fv)
    flags.DEFINE_string("llama_hf_dir", None, "Hugging Face layout: config.json + *.safetensors / pytorch_model*.bin.", flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["llama_dir", "llama_hf_dir"], flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "LLaMA's sentencepiece tokenizer.model.", flag_values=fv)
    flags.DEFINE_string("nxtp_ckpt", None, "Released nxtp checkpoint (trained params), merged over CLIP and LLaMA.", flag_values=fv)
    flags.DEFINE_integer("layers", None, "LLaMA blocks to keep (6 in the paper; default: the nxtp checkpoint's).", flag_values=fv, lower_bound=1)
    flags.DEFINE_integer(
        "image_size", None, "Input resolution; another than the archive's means a fresh positional embedding.", flag_values=fv, lower_bound=1
    )
    flags.DEFINE_integer("seed", 0, "Seed of the fresh inits (new proj, special-token rows).", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", DTYPES, "Dtype the params are written in.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output checkpoint directory: new or empty (written whole, then moved in place).", flag_values=fv, required=True)


def llama_folders(llama_dir: str | None, llama_hf_dir: str | None) -> tuple[str | None, str | None]:
    """(llama_dir, llama_hf_dir), with a --llama_dir holding config.json and no params.json read as the Hugging Face folder it is."""
    if llama_dir is not None:
        folder = pathlib.Path(llama_dir)
        if (folder / "config.json").is_file() and not (folder / "params.json").exists():
            print(f"note: {folder} has config.json and no params.json: reading it as the Hugging Face layout "
                  "(--llama_hf_dir)", file=sys.stderr)
            return None, llama_dir
    return llama_dir, llama_hf_dir


def body(fv: flags.FlagValues, args: list[str]) -> None:
    from nxtp_jax import checkpoint  # JAX, and torch (the convert extra): not imported for --help
    from nxtp_jax.weights import convert, save

    if fv.model:
        from nxtp_jax import pretrained

        if given := [f"--{n}" for n in ("clip", "llama_hf_dir", "nxtp_ckpt", "layers", "image_size") if fv[n].present]:
            raise UsageError(f"--model names every input; drop {', '.join(given)}")
        pretrained.convert_into(fv.model, fv.out, llama_dir=fv.llama_dir, tokenizer=fv.tokenizer, dtype=fv.dtype)
        print(f"wrote {fv.out}")
        return
    if missing := [f"--{n}" for n in ("clip", "tokenizer") if fv[n].value is None] + (
        [] if fv.llama_dir or fv.llama_hf_dir else ["--llama_dir or --llama_hf_dir"]
    ):
        raise UsageError(f"expected --model, or the files: missing {', '.join(missing)}")
    llama_dir, llama_hf_dir = llama_folders(fv.llama_dir, fv.llama_hf_dir)
    checkpoint.check_new_dir(fv.out)
    conversion = convert(
        clip_path=fv.clip,
        tokenizer_path=fv.tokenizer,
        llama_dir=llama_dir,
        llama_hf_dir=llama_hf_dir,
        nxtp_ckpt=fv.nxtp_ckpt,
        layers=fv.layers,
        image_size=fv.image_size,
        seed=fv.seed,
        dtype=fv.dtype,
    )
    print(conversion.report())
    print(f"wrote {save(conversion, fv.out, fv.tokenizer)}")


convert_command = Command("nxtp-convert", __doc__, define, body)
