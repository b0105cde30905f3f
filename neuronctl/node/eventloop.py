"""The daemon's event loop: uvloop where it is installed, asyncio's own otherwise.

Every request through the node is accepted, parsed, forwarded and answered in Python;
what the loop itself costs is a large part of it. On uvloop (libuv's loop, as uvicorn
uses when it can) a small request forwarded to a worker cost the daemon about a fifth
less CPU than on asyncio's selector loop (perf stat over 1,000 requests, two nodes side
by side: docs/performance.md). The daemon's code is the same on both: workers are
watched through pidfds (supervisor/childproc.py), not through either loop's own
subprocess machinery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopUnavailable(Exception):
    """`event_loop = "uvloop"` on a host without it."""


def runner(choice: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """How to run the daemon on the config's `event_loop`:
    "auto" (uvloop if it imports), "uvloop" (LoopUnavailable without it), "asyncio"."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise LoopUnavailable(
                    f'"uvloop", but uvloop cannot be imported ({exc}); install it '
                    '(pip install uvloop) or set event_loop = "auto"') from None
        else:
            return uvloop.run
    return asyncio.run


def name() -> str:
    """The running loop's name, for the daemon's first line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
