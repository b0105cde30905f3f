"""The `neuronctl` console script."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["start"]:
        # The daemon skips the typer app entirely (see neuronctl/node/start.py for why).
        from .node.start import run

        sys.exit(run(sys.argv[2:]))
    from .cli.app import main as cli_main

    cli_main()
