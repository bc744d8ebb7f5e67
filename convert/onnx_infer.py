from nxtp_jax.cli.onnx_infer import onnx_infer_command

onnx_infer_command.entry()
