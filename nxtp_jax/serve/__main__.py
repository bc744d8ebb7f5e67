"""`python -m nxtp_jax.serve`: the serve command (nxtp_jax/cli/serve.py)."""

if __name__ == "__main__":
    from nxtp_jax.cli.serve import serve_command

    serve_command.entry()
