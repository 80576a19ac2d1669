"""The ``nst`` command line: the top layer, above the flows, tasks and engine."""

from nst_cli.main import main

__all__ = ["main"]
