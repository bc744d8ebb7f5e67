"""Ahead-of-time compile checks for TPU topologies on any host (docs/training.md, "Will it fit?")."""
