"""asyncio helpers that the standard library gets subtly wrong on the Pythons we support."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """Like `asyncio.wait_for`, but never swallows a cancellation of the caller.

    Before Python 3.12, `wait_for` could return the inner result and drop a `cancel()` that
    arrived in the same loop iteration (CPython gh-86296); a readiness loop polling in a
    tight cycle hits that window, and a cancelled load would then run to its timeout.
    Raises `asyncio.TimeoutError` when `timeout_s` passes first.

    The task is abandoned when the caller is cancelled or the time is up, and may end (or
    have ended, in the same iteration) with an exception nobody asks for: it is retrieved,
    or asyncio logs "Task exception was never retrieved" at ERROR for a mere refused probe.
    """
    task = asyncio.ensure_future(aw)
    task.add_done_callback(_retrieve)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise asyncio.TimeoutError
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # marks it seen; whoever awaits the result still gets it raised


async def in_thread(fn: Callable[[], T], name: str) -> T:
    """Run blocking `fn` in a daemon thread and await its result.

    Not `asyncio.to_thread`: the default executor's threads are joined at interpreter exit,
    so a multi-gigabyte download would hold up a supervisor that was told to stop. Cancelling
    the await returns at once; the thread finishes (or notices its cancel flag) on its own.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # delivered to the awaiting task, not lost in a thread
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
