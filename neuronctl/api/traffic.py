"""The router's traffic per model: the queue of its requests and its counters.

`ModelQueue`: at most `slots` requests in flight to a model's worker, the rest waiting in
a bounded queue: one FIFO per key, served round-robin, so a key that floods a model waits
behind itself while another key's request is next but one (fairness between keys; each
key's own order is kept).

A request is let through only while its model is ready and a slot is free; until then it
waits in order, also while the model is still loading or restarting. The queue is
bounded in length (`max_queue`: one more is a 429 with Retry-After), in time
(`queue_timeout_s`: then a 503) and, all queues of the node together, in the bytes of the
bodies waiting (`QueuedBytes`, `max_queued_bytes`: a 429 too). A waiter whose client hangs
up is cancelled by the router and leaves the queue at once; a model that fails or is
unloaded answers every waiter. Nothing here grows with what clients send: a queue holds at
most `max_queue` waiters.

`RouterStats`: per model, what became of its `/v1` requests and its queue; written only by
the router, read by `/metrics`, `/models/stats`, and through `RouterStats.activity` (the one
answer to "is this model busy, and since when idle") by eviction, the idle unloader and
`/models`. The daemon makes it before the registry, which is given its `activity`: so this
module imports neither aiohttp nor prometheus_client (the start path stays light). An entry
exists only for a model the node knows, and an ad-hoc model's entry goes when it is
unloaded: neither made-up names nor load/unload churn grow it without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .. import errors
from ..errors import NeuronError
from ..events import ModelEvent
from ..states import WorkerState
from ..supervisor.eviction import IDLE, Activity
from ..supervisor.registry import ModelRegistry

QUEUE_FULL_RETRY_S = 2  # Retry-After told to clients refused by a full queue


@dataclass(eq=False)  # compared by identity: a waiter leaves its queue, not its twin
class _Waiter:
    future: asyncio.Future[None]
    since: float
    key: str


@dataclass
class QueuedBytes:
    """The bodies waiting in any of the node's queues, in bytes: one count for all models,
    since a client can name many."""

    held: int = 0

    def take(self, size: int, limit: int | None) -> None:
        if limit is not None and self.held + size > limit:
            raise errors.QueueBytesFull(
                f"the node holds {self.held} bytes of requests waiting for a slot or still "
                f"being read; this one ({size} bytes) would pass max_queued_bytes ({limit}); "
                "retry later", headers={"Retry-After": str(QUEUE_FULL_RETRY_S)})
        self.held += size

    def give_back(self, size: int) -> None:
        self.held -= size


@dataclass
class ModelQueue:
    model_id: str
    clock: Callable[[], float]
    in_flight: int = 0
    slots: int = 1
    serving: bool = False  # the model is ready: waiters may be let through
    budget: QueuedBytes = field(default_factory=QueuedBytes)  # shared by the node's queues
    # Per key (api/auth.py's name, "" without keys), in the order their turns come.
    _waiters: collections.OrderedDict[str, collections.deque[_Waiter]] = field(
        default_factory=collections.OrderedDict)

    @property
    def queued(self) -> int:
        return sum(len(waiting) for waiting in self._waiters.values())

    def queued_for(self, key: str) -> int:
        return len(self._waiters.get(key, ()))

    @contextlib.asynccontextmanager
    async def admit(self, max_queue: int, timeout_s: float, size: int = 0,
                    max_bytes: int | None = None, key: str = "") -> AsyncIterator[float]:
        """Hold one slot for the body of the `async with`; yields the seconds waited.
        `size`: the bytes the request holds while it waits, counted against `max_bytes`
        for all queues sharing the budget. Raises QueueFull (QueueBytesFull),
        QueueTimeout, or the model's failure (see `fail`)."""
        waited = await self._acquire(max_queue, timeout_s, size, max_bytes, key)
        try:
            yield waited
        finally:
            self._release()

    async def _acquire(self, max_queue: int, timeout_s: float, size: int,
                       max_bytes: int | None, key: str) -> float:
        if self.serving and self.in_flight < self.slots and not self._waiters:
            self.in_flight += 1
            return 0.0
        queued = self.queued
        if queued >= max_queue:
            raise errors.QueueFull(
                f"model {self.model_id!r} has {queued} requests waiting "
                f"(max_queue {max_queue}); retry later",
                param="model", headers={"Retry-After": str(QUEUE_FULL_RETRY_S)})
        self.budget.take(size, max_bytes)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), self.clock(), key)
        # A key with nobody waiting takes its turn after the keys already waiting.
        self._waiters.setdefault(key, collections.deque()).append(waiter)
        try:
            await asyncio.wait({waiter.future}, timeout=timeout_s)
        except asyncio.CancelledError:  # the client hung up, or the node is stopping
            self._leave(waiter)
            raise
        finally:  # forwarded or refused, the body no longer waits
            self.budget.give_back(size)
        if not waiter.future.done():
            self._leave(waiter)
            raise errors.QueueTimeout(
                f"model {self.model_id!r}: no slot within queue_timeout_s "
                f"({timeout_s:g} s); {self._why_waiting()}", param="model")
        waiter.future.result()  # the model's failure, if that is what ended the wait
        return self.clock() - waiter.since

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gives up; if a slot was granted to it meanwhile, pass it on."""
        waiting = self._waiters.get(waiter.key)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                del self._waiters[waiter.key]
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self._release()
        else:
            fut.cancel()

    def _release(self) -> None:
        self.in_flight -= 1
        self._grant()

    def _next(self) -> _Waiter:
        """The head of the key whose turn it is; that key's turn passes to the next."""
        key, waiting = next(iter(self._waiters.items()))
        waiter = waiting.popleft()
        if waiting:
            self._waiters.move_to_end(key)
        else:
            del self._waiters[key]
        return waiter

    def _grant(self) -> None:
        while self.serving and self.in_flight < self.slots and self._waiters:
            waiter = self._next()
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
            waiter = self._next()
            if not waiter.future.done():
                waiter.future.set_exception(error)
                waiter.future.exception()  # retrieved: its waiter may be gone already


# --- the router's counters ----------------------------------------------------------


@dataclass
class ModelStats:
    """What the router did for one model; written only by the router."""

    queue: ModelQueue
    requests: int = 0  # every request naming this model, whatever became of it
    in_flight: int = 0  # forwarded to the worker and not yet answered in full
    worker_errors: int = 0  # the worker could not be reached or broke off its answer
    client_disconnects: int = 0  # the client left before the answer was complete
    # Generated tokens: a JSON answer's usage.completion_tokens, a stream's `data: {` chunks
    # (about one token each) until its usage says the real count. For the dashboard's tokens/s.
    tokens: int = 0
    last_used: float = 0.0  # monotonic time a request last arrived or finished (eviction)
    # The idle time its latest request asked for (Ollama's keep_alive, seconds; negative:
    # forever); None: the config's ttl_s. See Activity.
    keep_alive_s: float | None = None
    responses: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    rejections: dict[str, int] = field(default_factory=dict)  # the router's refusals, by code

    def count(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def reject(self, refusal: NeuronError) -> None:
        self.count(refusal.status)
        self.rejections[refusal.code] = self.rejections.get(refusal.code, 0) + 1


class RouterStats:
    """Per-model counters and queues. Only models the node knows get an entry, so a client
    naming made-up models cannot grow this without bound, and an ad-hoc model's entry goes
    when it is unloaded (`forget`), so load/unload churn cannot either. The router's
    histograms are the metrics' (metrics.RequestTimes), which drop a model's series at the
    same event."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}
        self.queued_bytes = QueuedBytes()  # what every model's queue holds, together

    def activity(self, model_id: str) -> Activity:
        """A model's traffic right now: the one answer to "busy, or idle since when?" that
        eviction, the idle unloader and `/models`' `idle_until` read (the registry is given
        this method as its `activity`)."""
        stats = self.models.get(model_id)
        if stats is None:
            return IDLE
        return Activity(max(stats.in_flight, stats.queue.in_flight), stats.queue.queued,
                        stats.last_used, stats.keep_alive_s)

    def traffic(self) -> dict[str, dict[str, int]]:
        """Every counted model's requests in flight, waiting, and its worker's slots: what
        a gateway needs to tell a free worker from a busy one (`/models/events?traffic_s`)."""
        return {model_id: {"in_flight": max(stats.in_flight, stats.queue.in_flight),
                           "queued": stats.queue.queued, "slots": stats.queue.slots}
                for model_id, stats in self.models.items()}

    def model(self, model_id: str) -> ModelStats:
        stats = self.models.get(model_id)
        if stats is None:
            queue = ModelQueue(model_id, time.monotonic, budget=self.queued_bytes)
            stats = self.models[model_id] = ModelStats(queue)
        return stats

    def keeps(self, model_id: str, stats: ModelStats) -> bool:
        """Whether `stats` are still the model's counters: a request that ends after its
        ad-hoc model was forgotten must not bring its series back."""
        return self.models.get(model_id) is stats

    def forget(self, model_id: str) -> None:
        self.models.pop(model_id, None)


def unloaded_for_good(registry: ModelRegistry, event: ModelEvent) -> bool:
    """Whether `event` ends an ad-hoc model (one not in the catalogue): stopped, with no
    newer lifecycle of its id. Its counters and metric series go with it; a catalogue model keeps
    its own across unloads, as dashboards follow it by name."""
    if event.new is not WorkerState.STOPPED or event.model in registry.catalogue:
        return False
    current = registry.get(event.model)  # still listed while its stop completes
    return current is None or current.state is WorkerState.STOPPED
