"""'Did you mean …?': the closest of some known names to one an operator typed (a model
id, a config key, a command). Imports nothing of the package: the config, the registry and
the CLI all ask it."""

from __future__ import annotations

from collections.abc import Iterable


def distance(a: str, b: str) -> int:
    """Edit distance with adjacent swaps (optimal string alignment): `tyni`/`tiny` is 2,
    `hots`/`host` 1."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            best = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                best = min(best, prev2[j - 2] + 1)
            row.append(best)
        prev2, prev = prev, row
    return prev[-1]


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name nearest `word` when it is near enough to be a typo (one edit for a
    short name, two from four characters on; case aside), else None. Ties: the first."""
    limit = 1 if len(word) < 4 else 2
    best: tuple[int, str] | None = None
    for name in known:
        d = distance(word.lower(), name.lower())
        if d <= limit and (best is None or d < best[0]):
            best = (d, name)
    return best[1] if best else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """` (did you mean NAME?)`, or "" when nothing is near."""
    name = closest(word, known)
    return f" (did you mean {name}?)" if name else ""
