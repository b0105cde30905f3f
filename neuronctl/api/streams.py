"""Long-lived responses (event streams, log followers): one client's, and the bounded set
of one kind in an app.

Each holds a connection for as long as its client stays, so there are at most `limit` of
a kind (one more is a 503 `too_many_streams`), and one key holds at most a quarter of
them (`per_key`; one more is its 429 `key_too_many_streams`), so a read-only key cannot
take every stream and leave none for the others. An admin key is not held to a share (it
may stop the node anyway), nor is anyone on a node without keys (all are one holder).
The daemon's server does not cancel a handler whose client hung up, so a handler looks at
`hung_up` on every wake-up and ends itself. On shutdown every one ends at once (`close`,
an on_shutdown hook): one idle in its wait sees `closing` and ends cleanly, one suspended
in a write to a client that stopped reading has its connection aborted, so none holds up
the daemon's shutdown grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Generic, TypeVar

from aiohttp import web

from .. import errors
from ..keys import ADMIN
from .auth import principal
from .ratelog import RateLimitedLog

log = logging.getLogger(__name__)

# One key may hold this fraction of a kind's streams (at least one): 16 of the 64 event
# streams, 8 of the 32 log followers.
KEY_SHARE = 4


def holder(request: web.Request) -> str | None:
    """Whose share a stream counts against: its key's name; None (no share) for an admin
    key and on a node without keys."""
    key = principal(request)
    return None if key.has(ADMIN) else key.name


class Stream:
    """One client's long-lived response, and whether it is suspended in a write."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.writing = False
        self.key = holder(request)

    @property
    def hung_up(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self.writing = True
        try:
            await self.response.write(data)  # waits while the client's buffers are full
        finally:
            self.writing = False

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()  # the pending write raises ConnectionResetError


S = TypeVar("S", bound=Stream)


class Streams(Generic[S]):
    """The open streams of one kind in one app: their bound and their shutdown. `what`
    names them in the refusal ("event streams"). `limit` is an attribute so a test can
    lower it before the app serves."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        self.closing = asyncio.Event()  # set once the app shuts down
        self._open: set[S] = set()
        # A key past its share, in the journal as auth.py's refusals are: by its name.
        self.refused = RateLimitedLog(log, f"{what} refused for their key's share")

    @property
    def open(self) -> int:
        return len(self._open)

    @property
    def stuck(self) -> int:
        """Streams suspended in a write: their clients stopped reading."""
        return sum(stream.writing for stream in self._open)

    @property
    def per_key(self) -> int:
        return max(1, self.limit // KEY_SHARE)

    def check_room(self, request: web.Request) -> None:
        """KeyStreamsLimited when `request`'s key holds its share, TooManyStreams when
        `limit` are open."""
        key = holder(request)
        if key is not None:
            held = sum(stream.key == key for stream in self._open)
            if held >= self.per_key:
                refusal = errors.KeyStreamsLimited(
                    f"key {key!r} holds {held} {self.what}, the most one key may hold (a "
                    f"quarter of the node's {self.limit}, so that no key can take them "
                    "all); close one and try again")
                # %r: a hostile path cannot forge a second journal line.
                self.refused.log("refused %s %r from %s for key %r: %s", request.method,
                                 request.path, request.remote or "?", key, refusal.message)
                raise refusal
        if self.open >= self.limit:
            raise errors.TooManyStreams(
                f"{self.open} {self.what} are open, the limit; close one and try again")

    @contextlib.contextmanager
    def holding(self, stream: S) -> Iterator[S]:
        """Count `stream` as open for the body of the `with`; enter it before any await,
        so the bound holds under a rush."""
        self._open.add(stream)
        try:
            yield stream
        finally:
            self._open.discard(stream)

    async def close(self, app: web.Application) -> None:
        """on_shutdown: end every stream now (the runner then waits for their handlers)."""
        self.closing.set()
        for stream in self._open:
            if stream.writing:  # suspended in a write: its client stopped reading
                stream.abort()
