"""The command layer: every console entry point, each a thin `command.Command` over library functions."""
