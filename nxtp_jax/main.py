"""`python -m nxtp_jax.main`: the training and evaluation command (nxtp_jax/cli/main.py)."""

if __name__ == "__main__":
    from nxtp_jax.cli.main import main

    main.entry()
