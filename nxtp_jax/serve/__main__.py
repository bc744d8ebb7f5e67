from nxtp_jax.cli.serve import serve

serve.entry()
