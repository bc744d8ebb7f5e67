from nxtp_jax.cli.export import export_command

export_command.entry()
