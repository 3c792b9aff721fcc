"""``python -m metaoptimize`` runs the command line."""

from metaoptimize.cli import entrypoint

entrypoint()
