"""The `neuronctl` command line: the typer app, `--version`, and every command registered
from the module of its family (circus' one file per command): `status.py` (status, ps,
events), `models.py` (load, unload, reload), `chat.py`, `logs.py`, and `fleet.py`'s
sub-app. What the commands share is in `base.py`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from . import chat, logs, models, status
from .base import say
from .fleet import app as fleet_app
from .keys import app as keys_app

app = typer.Typer(
    help="Run and control llama.cpp model servers on this node.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    # Help strings hold "[default: ...]": shown as written, never read as rich markup.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(fleet_app, name="fleet")  # docs/fleet.md
app.add_typer(keys_app, name="key")  # docs/security.md


def _version(value: bool) -> None:
    if value:
        say(f"neuronctl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    key_file: Annotated[
        Path | None, typer.Option(
            "--key-file", help="A file holding the key to send (before the command: "
                               "`neuronctl --key-file F status`) [default: "
                               "$NEURON_API_KEY_FILE, else the config's]")
    ] = None,
) -> None:
    if key_file is not None:
        # The one place the client looks for it (client.connect), for every command.
        os.environ["NEURON_API_KEY_FILE"] = str(key_file)


@app.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
def start(ctx: typer.Context) -> None:
    """Load the default models one by one, then serve the API until SIGTERM.

    Options: --config F, --port P, --log-level L, --log-format F (see `neuronctl start
    --help`).
    """
    # Listed here for --help only: the console script runs `start` before typer is even
    # imported (neuronctl/main.py, node/start.py). Whoever calls this app directly is
    # handed over to that path in a process of its own, so the CLI never imports the
    # daemon side.
    os.execv(sys.executable, [sys.executable, "-m", "neuronctl", "start", *ctx.args])


# In --help's order. `ps`, as in `ollama ps` and `lms ps`: the same command as `status`,
# not listed twice.
app.command()(status.status)
app.command("ps", hidden=True)(status.status)
app.command()(status.events)
app.command()(models.load)
app.command()(models.unload)
app.command()(models.reload)
app.command()(chat.chat)
app.command()(logs.logs)


def main() -> None:
    app()
