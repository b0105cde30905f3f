"""Byte counts as people read them, one way for the whole package: binary units, as
nvidia-smi and free count, so a model's log and the CLI say the same size."""

from __future__ import annotations


def fmt_bytes(n: int | None) -> str:
    """`412 MiB`, `1.2 GiB`; `?` for a size nobody knows."""
    if n is None:
        return "?"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}"
    return f"{n} B"


def plural(n: int, noun: str) -> str:
    """`1 model`, `2 models`: counts as people write them."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
