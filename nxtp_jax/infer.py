"""`python -m nxtp_jax.infer`: the `nxtp-tag` command (nxtp_jax/cli/tag.py)."""

if __name__ == "__main__":
    from nxtp_jax.cli.tag import tag_command

    tag_command.entry()
