"""How late the supervisor's own event loop ran while something was awaited.

A liveness probe that times out says the worker did not answer in time, unless the loop
that should have read its answer was itself busy elsewhere (a huge listing, a slow
callback): then the timeout measured the supervisor, not the worker. `lag_during` awaits
something and measures that beside it. Imports nothing of the package.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

TICK_S = 0.05  # how often the loop is asked to wake while it is measured


async def lag_during(awaitable: Awaitable[T]) -> tuple[T, float]:
    """`awaitable`'s result, and the seconds the loop woke late meanwhile: summed over
    ticks every TICK_S, the last one (perhaps not yet woken after a stall) included."""
    loop = asyncio.get_running_loop()
    lag = 0.0
    due = loop.time() + TICK_S

    async def tick() -> None:
        nonlocal lag, due
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            lag += max(0.0, now - due)
            due = now + TICK_S

    ticker = asyncio.ensure_future(tick())
    try:
        result = await awaitable
    finally:
        ticker.cancel()
    return result, lag + max(0.0, loop.time() - due)
