"""`GET /models/events`: every model state change, as server-sent events.

A stream opens with a `snapshot` (what `GET /models` lists, and the pulls), then sends
each `ModelEvent` as a `state` event, a `progress` event about once a second for each
model downloading, a `pull` event for each state a download without a load
(models/pulls.py) enters, as it enters it (told by `Pulls.watch`: a pull that starts and
ends between two ticks still shows both), and about once a second while its bytes move,
and a `: keep-alive` comment after a quiet `keepalive_s`, so proxies keep the connection
open.
With `?traffic_s=S` it also sends a `traffic` event every S seconds (0.1 to 10): each
model's requests in flight, waiting and its worker's slots, the router's counts now. A
gateway's routing hook reads it (fleet/warm_first.py) and takes a silent stream for a
stale one: the event is the stream's heartbeat as well as its news.
It reads a bounded `Subscription`: a client too slow to keep up loses events there, and
is told so (`resync`, then a fresh snapshot) instead of seeing a silent gap.

At most `MAX_STREAMS` at once; a stream looks for its client on every wake-up (at least
once per `progress_s`) and ends itself when it has gone, and every stream ends at
shutdown (streams.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .. import errors
from ..events import ModelEvent, Subscription
from ..models.pulls import DOWNLOADING, Pull
from ..states import WorkerState
from ..supervisor.registry import ModelRegistry
from .streams import Stream, Streams

log = logging.getLogger(__name__)

# Each stream holds a connection and a subscription for as long as its client stays.
MAX_STREAMS = 64
KEEPALIVE_S = 15.0
PROGRESS_S = 1.0
# Events a stream may fall behind by before it resyncs; a load makes about five.
BACKLOG = 256
# Bytes a stream may leave unsent (written, not taken by its client) for longer than
# BACKLOG_GRACE_S; past that the stream ends: a client that stops reading must not pin a
# snapshot per stream (about 4 MB for 8,000 catalogue models).
BACKLOG_BYTES = 4 * 1024 * 1024
BACKLOG_GRACE_S = 1.0
# `traffic_s`: often enough for a gateway to trust what it knows for about a second,
# rarely enough that a stream per gateway costs the node nothing it notices.
TRAFFIC_S_RANGE = (0.1, 10.0)
# The router's counts now, by model: {"in_flight", "queued", "slots"} (RouterStats.traffic).
Traffic = Callable[[], dict[str, dict[str, int]]]

HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on as it comes
}


def state_json(event: ModelEvent) -> dict[str, Any]:
    return {
        "model": event.model,
        "from": event.old.value,
        "to": event.new.value,
        "status": event.new.status.value,
        "reason": event.reason,
        "time": event.time,
        "ready_s": event.ready_s,
    }


def frame(event: str, data: Any) -> bytes:
    # json.dumps escapes newlines, so the data is always one `data:` line.
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class _EventStream(Stream):
    """One client's event stream: its writes, bounded in what its client leaves unsent."""

    def __init__(self, request: web.Request, response: web.StreamResponse,
                 backlog_bytes: int = BACKLOG_BYTES,
                 grace_s: float = BACKLOG_GRACE_S, backlog: int = BACKLOG) -> None:
        super().__init__(request, response)
        self.backlog_bytes = backlog_bytes
        self.grace_s = grace_s
        self.last_write = asyncio.get_running_loop().time()
        # Each pull's (state, bytes) as last sent: a progress `pull` event only when it moved.
        self.pulls_sent: dict[str, tuple[str, int]] = {}
        # The pulls' state changes not yet sent, each as it was when it changed; bounded
        # as the subscription is (a reader that falls behind resyncs).
        self.pull_changes: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=backlog)
        self.pulls_dropped = 0
        self.pull_changed = asyncio.Event()

    def on_pull(self, pull: Pull) -> None:
        """Pulls.watch's call: the pull's state now, kept to be sent."""
        if len(self.pull_changes) == self.pull_changes.maxlen:
            self.pulls_dropped += 1
        self.pull_changes.append(pull.as_json())
        self.pull_changed.set()

    @property
    def unsent(self) -> int:
        transport = self.request.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def write(self, data: bytes) -> None:
        """Write `data`, waiting while the client's buffers are full; a client that leaves
        over `backlog_bytes` unsent for `grace_s` has its connection aborted here
        (ConnectionResetError)."""
        self.writing = True
        written = asyncio.ensure_future(self.response.write(data))
        try:
            while not (await asyncio.wait({written}, timeout=self.grace_s))[0]:
                if self.unsent > self.backlog_bytes:
                    log.info("an event stream to %s left %d bytes unsent for %g s (over "
                             "%d); closing it", self.request.remote, self.unsent,
                             self.grace_s, self.backlog_bytes)
                    self.abort()
                    await asyncio.wait({written})
                    raise ConnectionResetError("the client stopped reading")
            written.result()
        finally:
            self.writing = False
            if not written.done():  # this task was cancelled
                written.cancel()
            elif not written.cancelled():
                written.exception()  # retrieved: an abort may leave one
        self.last_write = asyncio.get_running_loop().time()

    async def send(self, event: str, data: Any) -> None:
        await self.write(frame(event, data))


class EventStreams(Streams[_EventStream]):
    """The open event streams of one app: their bound, their settings, their shutdown.

    The settings are attributes so a test can shorten them before the app serves."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        limit: int = MAX_STREAMS,
        keepalive_s: float = KEEPALIVE_S,
        progress_s: float = PROGRESS_S,
        backlog: int = BACKLOG,
        backlog_bytes: int = BACKLOG_BYTES,
        traffic: Traffic | None = None,
    ) -> None:
        super().__init__("event streams", limit)
        self.registry = registry
        self.traffic = traffic
        self.keepalive_s = keepalive_s
        self.progress_s = progress_s
        self.backlog = backlog
        self.backlog_bytes = backlog_bytes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            # The headers alone: a snapshot sent to a HEAD would be read by a kept-alive
            # connection as the next answer, and the stream would never end.
            return web.Response(headers=HEADERS)
        traffic_s = self._traffic_s(request)
        self.check_room(request)
        response = web.StreamResponse(headers=HEADERS)
        # Subscribed before the snapshot is taken, in the same turn of the loop: every event
        # after the snapshot is in the subscription, none before it.
        with self.holding(_EventStream(request, response, self.backlog_bytes,
                                       backlog=self.backlog)) as stream, \
                self.registry.events.subscribe(self.backlog) as events:
            unwatch = self.registry.pulls.watch(stream.on_pull)
            try:
                snapshot = self.registry.listing()
                pulls = self._pulls(stream)
                await response.prepare(request)
                await stream.send("snapshot", {"models": snapshot, "pulls": pulls})
                await self._follow(stream, events, traffic_s)
            except ConnectionError:
                pass  # the client left during a write
            finally:
                unwatch()
        return response

    def _traffic_s(self, request: web.Request) -> float | None:
        raw = request.query.get("traffic_s")
        if raw is None or self.traffic is None:
            return None
        low, high = TRAFFIC_S_RANGE
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # NaN fails too
            raise errors.InvalidValue(f"traffic_s: expected seconds from {low:g} to {high:g}, "
                                      f"got {raw[:40]!r}", param="traffic_s")
        return value

    async def _follow(self, stream: _EventStream, events: Subscription,
                      traffic_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        closing = asyncio.ensure_future(self.closing.wait())
        arrived = asyncio.ensure_future(events.get())
        pulled = asyncio.ensure_future(stream.pull_changed.wait())
        dropped = events.dropped
        pulls_dropped = stream.pulls_dropped
        next_progress = loop.time() + self.progress_s
        next_traffic = loop.time() if traffic_s is not None else math.inf
        try:
            while not closing.done():
                wake_at = min(next_progress, next_traffic, stream.last_write + self.keepalive_s)
                await asyncio.wait({closing, arrived, pulled},
                                   timeout=max(0.0, wake_at - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if closing.done() or stream.hung_up:
                    return
                batch: list[ModelEvent] = []
                if arrived.done():
                    batch = [arrived.result(), *events.pending()]
                    arrived = asyncio.ensure_future(events.get())
                if pulled.done():
                    stream.pull_changed.clear()
                    pulled = asyncio.ensure_future(stream.pull_changed.wait())
                changes = list(stream.pull_changes)  # taken with the batch, in one turn
                stream.pull_changes.clear()
                lost = events.dropped - dropped + stream.pulls_dropped - pulls_dropped
                if lost:
                    dropped, pulls_dropped = events.dropped, stream.pulls_dropped
                    snapshot = self.registry.listing()  # now, before any await
                    pulls = self._pulls(stream)
                    await stream.send("resync", {"dropped": lost})
                    await stream.send("snapshot", {"models": snapshot, "pulls": pulls})
                else:
                    for event in batch:
                        await stream.send("state", state_json(event))
                    for change in changes:
                        stream.pulls_sent[change["model"]] = (change["state"],
                                                              change["done_bytes"])
                        await stream.send("pull", change)
                if loop.time() >= next_progress:
                    await self._send_progress(stream)
                    next_progress = loop.time() + self.progress_s
                if traffic_s is not None and self.traffic is not None \
                        and loop.time() >= next_traffic:
                    await stream.send("traffic", {"time": time.time(),
                                                  "models": self.traffic()})
                    next_traffic = loop.time() + traffic_s
                if loop.time() - stream.last_write >= self.keepalive_s:
                    await stream.write(b": keep-alive\n\n")
        finally:
            closing.cancel()
            arrived.cancel()
            pulled.cancel()

    def _pulls(self, stream: _EventStream) -> list[dict[str, Any]]:
        """Every pull the registry keeps, noted as sent to `stream`."""
        answers = [p.as_json() for p in self.registry.pulls.all()]
        stream.pulls_sent = {a["model"]: (a["state"], a["done_bytes"]) for a in answers}
        return answers

    async def _send_progress(self, stream: _EventStream) -> None:
        # Downloads without a load, running: a `pull` event for each whose bytes moved
        # since the last (their changes of state are sent as they happen: on_pull).
        for pull in self.registry.pulls.all():
            if pull.state != DOWNLOADING:
                continue
            answer = pull.as_json()
            seen = (answer["state"], answer["done_bytes"])
            if stream.pulls_sent.get(pull.model_id) != seen:
                stream.pulls_sent[pull.model_id] = seen
                await stream.send("pull", answer)
        for model in self.registry.models():
            if model.state is not WorkerState.DOWNLOADING:
                continue
            download = model.to_json()["download"]
            if download is not None:
                await stream.send("progress", {"model": model.model_id, "download": download})


STREAMS = web.AppKey("event_streams", EventStreams)

