"""State changes as events: what happened to which model, published to whoever subscribes.

Every transition a model makes is one `ModelEvent`, published on the node's `EventBus`.
Subscribers are either callbacks (run at once, in the publisher's turn of the event loop:
the journal line, the systemd status) or `Subscription`s, bounded queues read at the
subscriber's own pace (metrics, a client streaming `/models/events`, a test waiting for
a state). Nothing is replayed: a subscriber sees the events published after it subscribed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .aio import bounded
from .states import WorkerState

log = logging.getLogger(__name__)

# A subscription that falls this far behind loses its oldest events (and is told so):
# a stalled client must not make the node hold unbounded memory.
DEFAULT_BACKLOG = 1024


@dataclass(frozen=True)
class ModelEvent:
    model: str
    old: WorkerState
    new: WorkerState
    reason: str = ""
    time: float = field(default_factory=time.time)  # wall clock: shown to people
    # Spawn to ready, on the events that enter READY (the load-duration histogram).
    ready_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "from": self.old.status.value,
            "to": self.new.status.value,
            "from_state": self.old.value,
            "to_state": self.new.value,
            "reason": self.reason,
            "time": self.time,
        }


Callback = Callable[[ModelEvent], None]


class Subscription:
    """Events since subscribing, oldest first, at most `backlog` of them kept."""

    def __init__(self, bus: EventBus, backlog: int) -> None:
        self._bus = bus
        self._events: collections.deque[ModelEvent] = collections.deque(maxlen=backlog)
        self._wakeup = asyncio.Event()
        self.dropped = 0  # events lost to a full backlog

    def _put(self, event: ModelEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)
        self._wakeup.set()

    async def get(self) -> ModelEvent:
        while not self._events:
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._events.popleft()

    def pending(self) -> Iterator[ModelEvent]:
        """The events already here, without waiting."""
        while self._events:
            yield self._events.popleft()

    async def wait_for(
        self, condition: Callable[[ModelEvent], bool], timeout_s: float
    ) -> ModelEvent:
        """The first event that meets `condition`; asyncio.TimeoutError after `timeout_s`."""

        async def scan() -> ModelEvent:
            while True:
                event = await self.get()
                if condition(event):
                    return event

        return await bounded(scan(), timeout_s)

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._callbacks: list[Callback] = []
        self._subscriptions: list[Subscription] = []

    def on_event(self, callback: Callback) -> Callable[[], None]:
        """Call `callback` with every event from now on; returns the unsubscribe call
        (which may be called more than once: an app cleaned up twice, say)."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def subscribe(self, backlog: int = DEFAULT_BACKLOG) -> Subscription:
        sub = Subscription(self, backlog)
        self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)

    def publish(self, event: ModelEvent) -> None:
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # one broken subscriber must not stop a transition
                log.exception("event subscriber %r failed on %s", callback, event)
        for sub in self._subscriptions:
            sub._put(event)
