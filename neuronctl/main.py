"""The `neuronctl` console script."""

from __future__ import annotations

import sys


def _help(args: list[str]) -> bool:
    # `start --help` is the typer app's, in the same style as every other command's.
    return "-h" in args or "--help" in args


def main() -> None:
    if sys.argv[1:2] == ["start"] and not _help(sys.argv[2:]):
        # The daemon skips the typer app entirely (see neuronctl/node/start.py for why).
        from .node.start import run

        sys.exit(run(sys.argv[2:]))
    if sys.argv[1:2] == ["check"] and not _help(sys.argv[2:]):
        # As `start`: it needs the harnesses, which the typer app never imports.
        from .node.check import run as check

        sys.exit(check(sys.argv[2:]))
    from .cli.app import main as cli_main

    cli_main()
