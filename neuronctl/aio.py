"""asyncio helpers that the standard library gets subtly wrong on the Pythons we support."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """Like `asyncio.wait_for`, but never swallows a cancellation of the caller.

    Before Python 3.12, `wait_for` could return the inner result and drop a `cancel()` that
    arrived in the same loop iteration (CPython gh-86296); a readiness loop polling in a
    tight cycle hits that window, and a cancelled load would then run to its timeout.
    Raises `asyncio.TimeoutError` when `timeout_s` passes first.
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise asyncio.TimeoutError
    return task.result()
