"""What the export commands import: the ONNX runner's command no JAX (it runs where only onnxruntime,
numpy, pillow, sentencepiece and absl-py are installed), and no command's --help an extra's packages."""

import ast
import subprocess
import sys

HEAVY = ("jax", "flax", "torch", "tensorflow", "jax2onnx", "onnx", "onnxruntime")


def imported_by(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return ast.literal_eval(res.stdout.strip().splitlines()[-1])


def test_the_onnx_runner_command_imports_no_jax():
    assert imported_by("import nxtp_jax.cli.onnx_infer, nxtp_jax.inference.formatting, nxtp_jax.inference.ranking") == []


def test_export_commands_print_their_help_without_importing_an_extra():
    code = (
        "import contextlib, io\n"
        "from nxtp_jax.cli import convert, export, imagenet, onnx_infer, savedmodel\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    codes = [c(['--help']) for c in (convert.convert_command, export.export_command, savedmodel.savedmodel_command,\n"
        "             onnx_infer.onnx_infer_command, imagenet.imagenet_command)]\n"
        "assert codes == [0] * 5 and out.getvalue().count('usage: ') == 5, (codes, out.getvalue())"
    )
    assert imported_by(code) == []
