"""The `neuronctl` command line: the typer app, `--version`, and every command registered
from the module of its family (circus' one file per command): `status.py` (status, ps,
events), `models.py` (load, unload, reload), `store.py` (pull, models/ls, show, rm),
`chat.py`, `logs.py`, and `fleet.py`'s sub-app. What the commands share is in `base.py`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .. import __version__
from ..client import KeyFileError, read_named_key
from ..config import DEFAULT_CONFIG_PATH
from ..errors import EX_CONFIG, fail
from . import chat, helpstyle, logs, models, status, store, usage
from .base import say
from .fleet import app as fleet_app
from .keys import app as keys_app

helpstyle.apply()

app = typer.Typer(
    help="Run and control llama.cpp model servers on this node.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    # Help strings hold "[default: ...]": shown as written, never read as rich markup.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=usage.Group,  # "No such option" says where a misplaced option goes
)
app.add_typer(fleet_app, name="fleet",  # docs/fleet.md
              short_help="Many nodes: LiteLLM's proxy config, one status table.")
app.add_typer(keys_app, name="key",  # docs/security.md
              short_help="API keys: make one, with its role and models.")


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
            "--key-file", metavar="FILE",
            help="A file holding the key to send, given before the command "
                 "(`neuronctl --key-file F status`); it wins over $NEURON_API_KEY "
                 "[default: $NEURON_API_KEY, else $NEURON_API_KEY_FILE, else the config's]")
    ] = None,
) -> None:
    if key_file is not None:
        # Read now, so what is wrong with it names the option; then where every command's
        # client looks (client.connect). Typed on this command line, it wins over an
        # exported $NEURON_API_KEY.
        try:
            read_named_key(key_file, f"--key-file {key_file}")
        except KeyFileError as exc:
            fail(str(exc), EX_CONFIG)
        os.environ["NEURON_API_KEY_FILE"] = str(key_file)
        os.environ.pop("NEURON_API_KEY", None)


StartConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="NEURON_CONFIG", metavar="FILE",
                 show_default=str(DEFAULT_CONFIG_PATH), help="Config file."),
]


def _handed_over(command: str, options: dict[str, object]) -> NoReturn:
    """Run `neuronctl COMMAND` the way the console script does (main.py runs `start` and
    `check` before typer is even imported: neuronctl/node/start.py says why), in a process
    of its own, so the CLI never imports the daemon side. These typer commands exist for
    --help, in the same style as the others, and for whoever calls this app directly."""
    argv = [sys.executable, "-m", "neuronctl", command]
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    os.execv(sys.executable, argv)


def start(
    config: StartConfigOpt = None,
    port: Annotated[int | None, typer.Option(
        metavar="PORT", min=1, max=65535, help="Listen on this port instead of the config's.",
        show_default="the config's port")] = None,
    log_level: Annotated[str, typer.Option(
        metavar="LEVEL", help="The daemon's log level: debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(
        metavar="FORMAT", help="text: plain lines (no time stamp under the journal); json: "
                               "one object per line.")] = "text",
) -> None:
    """Load the default models one by one, then serve the API until SIGTERM."""
    _handed_over("start", {"--config": config, "--port": port, "--log-level": log_level,
                           "--log-format": log_format})


def check(config: StartConfigOpt = None) -> None:
    """Validate a config without starting anything: every problem at once, exit 0 or 78
    (for ExecStartPre= and CI)."""
    _handed_over("check", {"--config": config})


# In --help's order, each with a summary that fits the list whole (typer cuts a
# docstring's first sentence at about 45 characters). `ps`, as in `ollama ps` and `lms
# ps`: the same command as `status`.
app.command(short_help="Run the node: load the default models, serve the API.")(start)
app.command(short_help="Validate a config without starting anything.")(check)
app.command(short_help="Show every model on the node.")(status.status)
app.command("ps", short_help="The same as status.")(status.status)
app.command(short_help="Print model state changes as they happen.")(status.events)
app.command(short_help="Load a model and wait until it is ready.")(models.load)
app.command(short_help="Stop a model's worker, or every model's.")(models.unload)
app.command(short_help="Re-read the daemon's config and apply it.")(models.reload)
app.command(short_help="Chat with a model, answers streamed.")(chat.chat)
app.command(short_help="Print a model's log, daemon running or not.")(logs.logs)
# The model store, as `ollama pull/list/show/rm` and `lms get/ls`: `ls` is `models`.
app.command(short_help="Download models into the cache, no load.")(store.pull)
app.command(short_help="List the GGUF files the node has.")(store.models)
app.command("ls", short_help="The same as models.")(store.models)
app.command(short_help="What a model's GGUF header says.")(store.show)
app.command(short_help="Remove a model's files from the store.")(store.rm)


# What Ollama users type, answered with this tool's equivalent rather than a bare "No such
# command" (only where no command of that name exists).
OLLAMA_HINTS = {
    "list": "`neuronctl status` (the models this node runs, its catalogue too) or "
            "`neuronctl models` (the model files it has)",
    "run": "`neuronctl chat MODEL` (a prompt, or an interactive chat)",
    "version": "`neuronctl --version`",
}


def _commands() -> set[str]:
    names = {c.name or (c.callback.__name__ if c.callback else "")
             for c in app.registered_commands}
    return names | {g.name or "" for g in app.registered_groups}


def main() -> None:
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    if verb in OLLAMA_HINTS and verb not in _commands():
        sys.stderr.write(f"neuronctl: no command {verb!r} (that is Ollama's); "
                         f"use {OLLAMA_HINTS[verb]}\n")
        sys.exit(2)
    app()
