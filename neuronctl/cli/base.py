"""What every command of the CLI shares: the consoles and the ways it prints (`say`, `warn`,
`print_table`), the `--config` and `--url` options, and the client they make (`client`,
`call`: one-line errors). Its own module, imported by each command family's module and by
none of them back (circus' `commands/base.py`), so `app.py` can register them all."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..client import ApiError, Client, DaemonNotRunning, KeyFileError, connect
from ..config import DEFAULT_CONFIG_PATH, ConfigError
from ..errors import EX_CONFIG, fail

out = Console()
err = Console(stderr=True)

# Every option says its environment variable and its default the same way: typer's own
# `[env var: X]` and `[default: Y]`, never written into the description.
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="NEURON_CONFIG", metavar="FILE",
                 show_default=str(DEFAULT_CONFIG_PATH), help="Config file.",
                 rich_help_panel="Connection"),
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="NEURON_URL", metavar="URL",
                 show_default="the port in the config", help="Daemon URL.",
                 rich_help_panel="Connection"),
]


def say(text: str) -> None:
    """`text` on stdout as it is: no markup read in an id, no colours guessed, one line
    however long (for grep)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def warn(text: str, style: str | None = None) -> None:
    """`text` on stderr as it is, one line, in `style` on a terminal."""
    err.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def print_table(make: Callable[[int | None], Table]) -> None:
    """The table `make(width)` returns, on stdout. On a terminal (or with COLUMNS set) it
    fits its width; piped (to grep, awk), every row stays on its one line, every id whole:
    `make(None)` drawn as wide as it needs."""
    if out.is_terminal or os.environ.get("COLUMNS"):
        out.print(make(out.width))
        return
    table = make(None)
    width = out.measure(table, options=out.options.update(width=1 << 16)).maximum
    Console(width=width, force_terminal=False).print(table)


def client(url: str | None, config: Path | None, timeout_s: float = 10.0) -> Client:
    """The client of the node this invocation means (`client.connect`); a bad --url or
    config is one line and its exit status."""
    try:
        made = connect(url, config, timeout_s)
    except ConfigError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    except KeyFileError as exc:
        fail(str(exc), EX_CONFIG)
    except ValueError as exc:  # a --url or NEURON_URL that is no URL
        fail(f"--url: {exc}", 2)
    if made.warning:
        sys.stderr.write(f"neuronctl: warning: {made.warning}\n")
    if made.note:
        sys.stderr.write(f"neuronctl: note: {made.note}\n")
    return made


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, a node that does not answer or refuses one line and exit status 1."""
    try:
        return fn(*args)
    except DaemonNotRunning as exc:
        fail(str(exc))
    except ApiError as exc:
        fail(exc.message)
