"""The HTTP tagging service: `python -m nxtp_jax.serve --ckpt=DIR` (docs/serving.md).

`app` holds the endpoints and the limits, `batcher` the dynamic batching onto a few
compiled batch shapes, `connections` what happens to a connection before the app sees a
request (deadlines, the connection cap, the drain on SIGTERM), `openapi` the description at
`/openapi.json`, `page` the web page served at `/`.
"""
