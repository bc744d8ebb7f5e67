from nxtp_jax.cli.savedmodel import savedmodel_command

savedmodel_command.entry()
