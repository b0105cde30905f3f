"""The node-wide load lock: one worker start at a time, restarts first.

Starts are serialized so that each start's memory check sees what the one before it took.
A plain FIFO lock let a client hold every restart up: a crashed model's restart queued
behind client loads, and a start kept the lock while its worker warmed up, for as long as
its `ready_timeout_s` (a never-ready load held a crashed default model down that long).

So waiting restarts go before waiting loads, and a holder whose worker has spawned *lends*
the lock to restarts while it waits for the worker to be ready: a restart (of a model that
ran before, on memory it held before) may start meanwhile, a new load may not.
`RoomSignal` wakes the loads waiting outside the lock for a busy model to make room. Imports
nothing of the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

_RESTART, _LOAD = 0, 1  # the order waiters are let in


class Hold:
    """One holder's turn; `lend()` once its worker has spawned."""

    def __init__(self, lock: LoadLock, token: int) -> None:
        self._lock = lock
        self._token = token

    def lend(self) -> None:
        """From now until the release, restarts may start beside this holder."""
        self._lock._lend(self._token)


class LoadLock:
    def __init__(self) -> None:
        self._holders: dict[int, bool] = {}  # token -> lent to restarts
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # sorted
        self._tokens = itertools.count()

    def locked(self) -> bool:
        return bool(self._holders)

    @contextlib.asynccontextmanager
    async def hold(self, restart: bool = False) -> AsyncIterator[Hold]:
        token = await self._acquire(_RESTART if restart else _LOAD)
        try:
            yield Hold(self, token)
        finally:
            self._release(token)

    def _may_enter(self, kind: int) -> bool:
        if not self._holders:
            return True
        return kind == _RESTART and all(self._holders.values())

    async def _acquire(self, kind: int) -> int:
        token = next(self._tokens)
        if self._may_enter(kind):
            self._holders[token] = False
            return token
        waiter = (kind, token, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._waiting.sort(key=lambda w: w[:2])
        try:
            await waiter[2]
        except asyncio.CancelledError:
            if waiter[2].done() and not waiter[2].cancelled():
                self._release(token)  # let in, then cancelled before it could run
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise
        return token

    def _lend(self, token: int) -> None:
        if token in self._holders:
            self._holders[token] = True
            self._wake()

    def _release(self, token: int) -> None:
        self._holders.pop(token, None)
        self._wake()

    def _wake(self) -> None:
        """Let in the first waiter, in priority order, that may enter now. One at a time:
        whoever enters has not lent the lock, so nobody else may enter after it."""
        for waiter in self._waiting:
            kind, token, future = waiter
            if future.done():  # cancelled; its task removes it
                continue
            if self._may_enter(kind):
                self._waiting.remove(waiter)
                self._holders[token] = False
                future.set_result(None)
                return


class RoomSignal:
    """Wakes the loads waiting for room (every model that could make it busy) as soon as a
    request ends, rather than at their next poll."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def waiter(self) -> asyncio.Future[None]:
        """Done at the next `notify`: taken before room is judged, so a request that ends
        between the judgement and the wait is not missed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)  # cancelled: forgotten at once
        return waiter

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def notify(self) -> None:
        if not self._waiters:  # the usual case, once per request: nothing to do
            return
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
