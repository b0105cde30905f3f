"""How `--help` names values, the same on every command: `--lines N`, `--path FILE`,
`MODEL_ID`, never a Python type (`<list[int]>`, `<float range>`) or typer's braces for a
required argument (`{MODEL_ID}`).

An option's own `metavar` wins; without one, its type's word below. Typer (0.29) has no
setting for this, so its two display methods are replaced once, when the app is built; what
they return is all that changes."""

from __future__ import annotations

from typing import Any

import typer.core

# Typer's labels, as `display_type` writes them, to the words --help uses instead.
_WORDS = {"int": "N", "float": "NUMBER", "str": "TEXT", "path": "PATH", "bool": "BOOL"}


def _word(label: str) -> str:
    label = label.strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    label = label.removesuffix(" range")
    return _WORDS.get(label, label.upper())


def _option_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    if self.metavar is not None:
        return self.metavar
    shown = self.display_type(ctx)
    return _word(shown) if shown else None


def _argument_type(self: typer.core.TyperArgument, ctx: Any) -> str | None:
    return None  # the argument's name (MODEL_ID) says what it is


def _argument_usage(self: typer.core.TyperArgument) -> str:
    name = self.display_name_raw.upper()  # `model`, the parameter's name, reads as MODEL
    name = name if self.required else f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


def apply() -> None:
    option, argument = typer.core.TyperOption, typer.core.TyperArgument
    option.display_type_rich = _option_type  # type: ignore[method-assign]
    argument.display_type_rich = _argument_type  # type: ignore[method-assign,assignment]
    argument._usage_display_name = _argument_usage  # type: ignore[method-assign]
