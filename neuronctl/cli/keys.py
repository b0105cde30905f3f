"""`neuronctl key new NAME`: a fresh key, and the `[[keys]]` entry that holds its hash.

Offline: nothing is sent to the node. The key is printed once, on stdout's first line (for
a pipe into a file or a secret store); the entry follows, to paste into neuron.toml and
`systemctl reload neuron` (docs/security.md).
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import KEY_ROLES, ConfigError, config_from_mapping
from ..errors import fail
from ..keys import new_key, toml_entry
from .base import say, warn

app = typer.Typer(help="Make keys with least privilege (docs/security.md).",
                  no_args_is_help=True, rich_markup_mode=None)


@app.command("new")
def new(
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="How logs, /metrics and /keys/usage name it.")],
    role: Annotated[list[str] | None, typer.Option(
        "--role", "-r", metavar="ROLE", show_default=False,
        help=f"One of {', '.join(KEY_ROLES)}; repeat for more [default: inference]")] = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", metavar="MODEL", show_default=False,
        help="A model id or glob an inference key may use; repeat for more "
             "[default: every model]")] = None,
    rpm: Annotated[int | None, typer.Option(metavar="N", help="Requests per minute.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(
        metavar="N", help="Requests in flight at once.")] = None,
) -> None:
    """Print a fresh key, then its [[keys]] entry (which holds only its SHA-256)."""
    key = new_key()
    entry = toml_entry(name, key, role or ["inference"], model or [], rpm, max_concurrent)
    try:  # the daemon's own rules, so a pasted entry never refuses a reload
        config_from_mapping({"keys": [{"name": name, "sha256": "0" * 64,
                                       "roles": role or ["inference"],
                                       "models": model or [], **(
                                           {"rpm": rpm} if rpm is not None else {}),
                                       **({"max_concurrent": max_concurrent}
                                          if max_concurrent is not None else {})}]})
    except ConfigError as exc:
        fail(str(exc).replace("keys[0].", "", 1), 2)
    say(key)
    warn("The key above is shown once; the node keeps only its hash. Add to neuron.toml, "
         "then `systemctl reload neuron`:")
    say("")
    say(entry.rstrip("\n"))

