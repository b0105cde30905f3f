"""The connection guard: slow or idle clients cannot hold the API's connections, and with
them the node's file descriptors, forever.

aiohttp's server times out an idle connection between requests (keepalive_timeout) but not
a client that sends its request head, or its body, a byte now and then (a slowloris): each
such connection holds a descriptor, and with enough of them workers cannot start. So the
protocol the event loop gets is a `RequestHandler` with one timer, by phase:

* head: a new connection's request head must be complete `header_timeout_s` after the
  connection opened; on a kept-alive connection, `header_timeout_s` after the next
  request's first byte (until that byte it is idle, and keepalive_timeout applies);
* body: from the head until the body is complete, every window of `body_timeout_s` must
  bring BODY_PROGRESS_BYTES or the body's end. A window in which the server itself stopped
  reading (a handler not reading its body yet: flow control) does not count;
* then the request is complete and its handler runs untimed: /v1 streams and
  POST /models/load last minutes.

A connection that misses its deadline is closed. With `max_connections` open, a new one
closes the connection that has waited longest for its request head (a slowloris's, as a
real client sends its head at once) and takes its slot; with none waiting, the new one is
answered a 503 and closed at once. The kernel's listen backlog bounds what waits to be
accepted.

The guard reads two of RequestHandler's internals, `_request_count` and `_messages`, and
aiohttp's `Server._kwargs` (tests/node/test_listener.py pins them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .. import errors

log = logging.getLogger("neuronctl")

# A body must bring this much per body_timeout_s, or end: one byte a window is no upload.
BODY_PROGRESS_BYTES = 1024
# The journal gets at most one line per this many seconds about what the guard did.
REPORT_EVERY_S = 60.0

_HEAD, _BODY, _HANDLING = "head", "body", "handling"


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


class BodyTimeout(ConnectionResetError):
    """What a handler reading a stalled body gets: a client gone, as far as it can tell."""


def _raw_answer(error: errors.NeuronError) -> bytes:
    """`error` as a whole HTTP answer that closes the connection, written to the socket as
    it is: no request was read, so no handler (nor middleware) answers it."""
    payload = json.dumps(error.control_body()).encode()
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
            "Content-Type: application/json",
            *(f"{name}: {value}" for name, value in error.headers.items()),
            "Connection: close", f"Content-Length: {len(payload)}"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + payload


class ConnectionGuard:
    """The count of open connections, the cap, and what was refused or closed."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.evicted = 0
        self.head_timeouts = 0
        self.body_timeouts = 0
        self._clock = clock
        self._reported_at: float | None = None
        self._reported: dict[str, int] = {}
        # Connections waiting for a request head, oldest first. At the cap the oldest makes
        # room for the new one: a slowloris's connections are exactly those, while a real
        # client's head arrives in the same packet as its connection, or the next.
        self._waiting: dict[GuardedRequestHandler, None] = {}
        self.refusal = _raw_answer(errors.TooManyConnections(
            f"too many connections (max_connections = {limits.max_connections}); retry later",
            headers={"Retry-After": "1"}))

    def admit(self) -> bool:
        """Whether a new connection may have a slot; at the cap, one waiting for its request
        head the longest is closed to make room, and without one the answer is no."""
        if self.open >= self.limits.max_connections:
            if not self._waiting:
                self.refused += 1
                self._report()
                return False
            self.evicted += 1
            next(iter(self._waiting)).evict()
            self._report()
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def awaits_head(self, handler: GuardedRequestHandler) -> None:
        self._waiting.pop(handler, None)
        self._waiting[handler] = None

    def forget(self, handler: GuardedRequestHandler) -> None:
        self._waiting.pop(handler, None)

    def timed_out(self, phase: str, peer: Any) -> None:
        if phase == _HEAD:
            self.head_timeouts += 1
            why = f"no complete request head in {self.limits.header_timeout_s:g} s"
        else:
            self.body_timeouts += 1
            why = (f"request body stalled (under {BODY_PROGRESS_BYTES} bytes in "
                   f"{self.limits.body_timeout_s:g} s)")
        log.debug("closed the connection from %s: %s", peer, why)
        self._report()

    def _report(self) -> None:
        """One warning now and then, never one per connection: under attack that would be
        thousands of lines a second."""
        now = self._clock()
        if self._reported_at is not None and now - self._reported_at < REPORT_EVERY_S:
            return
        limits = self.limits
        totals = {
            f"closed without a complete request head in {limits.header_timeout_s:g} s":
                self.head_timeouts,
            "closed for room while still sending their head": self.evicted,
            f"refused (all max_connections = {limits.max_connections} busy)": self.refused,
            f"closed for a stalled body ({limits.body_timeout_s:g} s)": self.body_timeouts,
        }
        parts = [f"{count - self._reported.get(what, 0)} {what}"
                 for what, count in totals.items() if count != self._reported.get(what, 0)]
        since = "" if self._reported_at is None else f" in the last {now - self._reported_at:.0f} s"
        self._reported_at, self._reported = now, totals
        log.warning("slow or too many clients%s: connections %s; %d open", since,
                    ", ".join(parts), self.open)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol, with the guard's cap and deadlines (see the module's docstring)."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._refused = False
        self._holds_slot = False
        self._phase = _HEAD
        self._deadline: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._window_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit():
            self._refused = True
            # A stream transport, but not always an asyncio.Transport: uvloop's TCPTransport
            # derives from none of asyncio's classes (an isinstance check here failed every
            # refusal on uvloop: a reset and a traceback instead of the 503).
            cast(asyncio.WriteTransport, transport).write(self._guard.refusal)
            transport.close()
            return
        self._holds_slot = True
        super().connection_made(transport)
        self._await_head()  # from the connection's opening

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return  # aiohttp never knew of it
        self._give_up_slot()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Close this connection, its slot free at once: the cap is reached, and it is the
        one that has waited longest for its request head."""
        log.debug("closed the connection from %s to make room: no request head yet",
                  self.transport.get_extra_info("peername") if self.transport else None)
        self._give_up_slot()
        self.force_close()

    def _give_up_slot(self) -> None:
        self._disarm()
        self._guard.forget(self)
        if self._holds_slot:
            self._holds_slot = False
            self._guard.release()

    def data_received(self, data: bytes) -> None:
        requests = self._request_count
        super().data_received(data)
        if self._request_count != requests:
            # A request head is complete; its body may still be coming.
            self._guard.forget(self)
            body = self._messages[-1][1] if self._messages else None
            if isinstance(body, StreamReader) and not body.is_eof():
                self._phase, self._body, self._window_bytes = _BODY, body, 0
                self._arm(self._guard.limits.body_timeout_s)
            else:
                self._complete()
        elif self._phase == _BODY:
            assert self._body is not None
            if self._body.is_eof():
                self._complete()
            else:
                self._window_bytes += len(data)
        elif self._phase == _HANDLING and data and self.transport is not None:
            # The next request's first byte on a kept-alive connection.
            self._await_head()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # Called after every read of the body, paused or not.
        was_paused = self._reading_paused
        super().resume_reading(resume_parser)
        if was_paused and self._phase == _BODY:
            # The handler read what was buffered: the client gets a fresh window.
            self._window_bytes = 0
            self._arm(self._guard.limits.body_timeout_s)

    def _await_head(self) -> None:
        self._phase = _HEAD
        if not self._request_in_progress:  # a pipelined head must not cost that request
            self._guard.awaits_head(self)
        self._arm(self._guard.limits.header_timeout_s)

    def _complete(self) -> None:
        self._phase, self._body = _HANDLING, None
        self._disarm()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(delay, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport is None:
            return
        limits = self._guard.limits
        if self._phase == _HEAD and self._request_in_progress:
            # A pipelined head behind a request still being handled: that one is untimed.
            self._arm(limits.header_timeout_s)
            return
        if self._phase == _BODY and (self._reading_paused
                                     or self._window_bytes >= BODY_PROGRESS_BYTES):
            self._window_bytes = 0
            self._arm(limits.body_timeout_s)
            return
        if self._phase == _HANDLING:
            return
        self._guard.timed_out(self._phase, self.transport.get_extra_info("peername"))
        if self._body is not None:
            self._body.set_exception(BodyTimeout(
                f"request body stalled for {limits.body_timeout_s:g} s; connection closed"))
        self.force_close()


class GuardedSockSite(web.SockSite):
    """`web.SockSite` whose connections get a `GuardedRequestHandler`."""

    __slots__ = ("_guard",)

    def __init__(self, runner: web.BaseRunner, sock: Any, guard: ConnectionGuard,
                 **kwargs: Any) -> None:
        super().__init__(runner, sock, **kwargs)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None, "the runner is not set up"
        loop = asyncio.get_running_loop()
        options = server._kwargs  # what the runner was given for each RequestHandler
        guard = self._guard

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, guard, loop=loop, **options)

        self._server = await loop.create_server(protocol, sock=self._sock,
                                                backlog=self._backlog)
