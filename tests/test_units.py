"""The package's one byte formatter."""

from __future__ import annotations

import pytest

from neuronctl.units import fmt_bytes


@pytest.mark.parametrize(("n", "said"), [
    (None, "?"), (0, "0 B"), (1023, "1023 B"), (15000, "15 KiB"), (412 << 20, "412 MiB"),
    (1_200_000_000, "1.1 GiB"), (3 << 40, "3.0 TiB"),
])
def test_sizes_are_said_in_binary_units(n: int | None, said: str) -> None:
    assert fmt_bytes(n) == said
