from nxtp_jax.cli.convert import convert_command

convert_command.entry()
