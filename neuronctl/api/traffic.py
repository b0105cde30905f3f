"""Per-model admission for the router: at most `slots` requests in flight to a model's
worker, the rest waiting in a bounded FIFO queue.

A request is let through only while its model is ready and a slot is free; until then it
waits in order, also while the model is still loading or restarting. The queue is
bounded in length (`max_queue`: one more is a 429 with Retry-After), in time
(`queue_timeout_s`: then a 503) and, all queues of the node together, in the bytes of the
bodies waiting (`QueuedBytes`, `max_queued_bytes`: a 429 too). A waiter whose client hangs
up is cancelled by the router and leaves the queue at once; a model that fails or is
unloaded answers every waiter. Nothing here grows with what clients send: a queue holds at
most `max_queue` waiters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .. import errors
from ..errors import NeuronError

RETRY_AFTER_S = 2  # told to clients refused by a full queue


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    since: float


@dataclass
class QueuedBytes:
    """The bodies waiting in any of the node's queues, in bytes: one count for all models,
    since a client can name many."""

    held: int = 0

    def take(self, size: int, limit: int | None) -> None:
        if limit is not None and self.held + size > limit:
            raise errors.QueueBytesFull(
                f"the node holds {self.held} bytes of requests waiting for a slot; this one "
                f"({size} bytes) would pass max_queued_bytes ({limit}); retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)})
        self.held += size


@dataclass
class ModelQueue:
    model_id: str
    clock: Callable[[], float]
    in_flight: int = 0
    slots: int = 1
    serving: bool = False  # the model is ready: waiters may be let through
    budget: QueuedBytes = field(default_factory=QueuedBytes)  # shared by the node's queues
    _waiters: collections.deque[_Waiter] = field(default_factory=collections.deque)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def admit(self, max_queue: int, timeout_s: float, size: int = 0,
                    max_bytes: int | None = None) -> AsyncIterator[float]:
        """Hold one slot for the body of the `async with`; yields the seconds waited.
        `size`: the bytes the request holds while it waits, counted against `max_bytes`
        for all queues sharing the budget. Raises QueueFull (QueueBytesFull),
        QueueTimeout, or the model's failure (see `fail`)."""
        waited = await self._acquire(max_queue, timeout_s, size, max_bytes)
        try:
            yield waited
        finally:
            self._release()

    async def _acquire(self, max_queue: int, timeout_s: float, size: int,
                       max_bytes: int | None) -> float:
        if self.serving and self.in_flight < self.slots and not self._waiters:
            self.in_flight += 1
            return 0.0
        if len(self._waiters) >= max_queue:
            raise errors.QueueFull(
                f"model {self.model_id!r} has {len(self._waiters)} requests waiting "
                f"(max_queue {max_queue}); retry later",
                param="model", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.budget.take(size, max_bytes)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), self.clock())
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter.future}, timeout=timeout_s)
        except asyncio.CancelledError:  # the client hung up, or the node is stopping
            self._leave(waiter)
            raise
        finally:  # forwarded or refused, the body no longer waits
            self.budget.held -= size
        if not waiter.future.done():
            self._leave(waiter)
            raise errors.QueueTimeout(
                f"model {self.model_id!r}: no slot within queue_timeout_s "
                f"({timeout_s:g} s); {self._why_waiting()}", param="model")
        waiter.future.result()  # the model's failure, if that is what ended the wait
        return self.clock() - waiter.since

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gives up; if a slot was granted to it meanwhile, pass it on."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self._release()
        else:
            fut.cancel()

    def _release(self) -> None:
        self.in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        while self.serving and self.in_flight < self.slots and self._waiters:
            waiter = self._waiters.popleft()
            if waiter.future.done():
                continue
            self.in_flight += 1
            waiter.future.set_result(None)

    def _why_waiting(self) -> str:
        if not self.serving:
            return "the model is not ready yet"
        return f"all {self.slots} of its worker's slots stayed busy"

    # --- what the model's lifecycle says -----------------------------------------------

    def ready(self, slots: int) -> None:
        self.serving = True
        self.slots = max(1, slots)
        self._grant()

    def not_ready(self) -> None:
        """Loading again (a restart): waiters keep waiting, new requests queue."""
        self.serving = False

    def fail(self, error: NeuronError) -> None:
        """The model failed or was unloaded: every waiter answers `error`."""
        self.serving = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
                waiter.future.exception()  # retrieved: its waiter may be gone already
