"""Where an option goes, said when it was put in the wrong place: `neuronctl status
--key-file F` (an option of neuronctl itself, which goes before the command) and
`neuronctl --config F status` (an option of each command, which goes after it) would
otherwise get click's bare "No such option"."""

from __future__ import annotations

from typing import Any

import typer.core

# neuronctl's own options (the app's callback): before the command.
APP_OPTIONS = {"--key-file": "FILE", "--version": ""}
# Options every command that talks to a node has: after the command.
COMMAND_OPTIONS = {"--config": "FILE", "-c": "FILE", "--url": "URL"}


def _hint(exc: Exception, command: str | None, later: str | None = None) -> None:
    """Add where the option goes to click's NoSuchOption `exc` (click's own class or the
    copy newer typers carry: told apart by its `option_name`): raised by `command`'s
    parser, or by neuronctl's own (None) with `later` the command that follows."""
    option = getattr(exc, "option_name", None)
    if not isinstance(option, str) or not isinstance(getattr(exc, "message", None), str):
        return
    if option in APP_OPTIONS and command is not None:
        value = f" {APP_OPTIONS[option]}" if APP_OPTIONS[option] else ""
        where = (f"{option} is an option of neuronctl itself: give it before the command, "
                 f"`neuronctl {option}{value} {command} ...`")
    elif option in COMMAND_OPTIONS and command is None:
        where = (f"{option} is an option of each command: give it after the command, "
                 f"`neuronctl {later or 'status'} {option} {COMMAND_OPTIONS[option]}`")
    else:
        return
    exc.message = f"{exc.message} ({where})"  # type: ignore[attr-defined]
    # Not also click's look-alikes (`--key-file`: "Possible options: --file").
    exc.possibilities = None  # type: ignore[attr-defined]


class Group(typer.core.TyperGroup):
    """The app's command group: its usage errors say where a misplaced option goes."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:  # re-raised: only its message is added to
            _hint(exc, None, next((a for a in args if a in self.commands), None))
            raise

    def invoke(self, ctx: Any) -> Any:
        command = next((a for a in [*getattr(ctx, "_protected_args", []), *ctx.args]
                        if not a.startswith("-")), None)
        try:
            return super().invoke(ctx)
        except Exception as exc:  # re-raised: only its message is added to
            _hint(exc, command)
            raise
