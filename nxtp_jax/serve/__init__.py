"""The HTTP tagging service: `python -m nxtp_jax.serve --ckpt=DIR` (docs/serving.md).

`app` holds the endpoints and the limits, `batcher` the dynamic batching onto a few
compiled batch shapes, `page` the web page served at `/`.
"""
