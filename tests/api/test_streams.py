"""The bounded set of long-lived responses that event streams and log followers share."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp import web

from neuronctl.api.streams import Stream, Streams
from neuronctl.errors import TooManyStreams


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class _Request:
    def __init__(self) -> None:
        self.transport: Any = _Transport()


def stream() -> Stream:
    return Stream(cast(web.Request, _Request()), web.StreamResponse())


async def test_streams_are_bounded_and_a_stuck_writer_is_aborted_at_shutdown() -> None:
    streams: Streams[Stream] = Streams("log streams", limit=2)
    idle, stuck = stream(), stream()
    with streams.holding(idle), streams.holding(stuck):
        with pytest.raises(TooManyStreams, match=r"^2 log streams are open, the limit"):
            streams.check_room()
        stuck.writing = True  # suspended in a write: its client stopped reading
        assert streams.stuck == 1
        await streams.close(web.Application())
        assert streams.closing.is_set()  # the idle one sees it and ends itself
        assert stuck.hung_up and not idle.hung_up
    assert streams.open == 0
    streams.check_room()  # room again


def test_a_stream_without_a_transport_has_hung_up() -> None:
    gone = stream()
    gone.request.transport = None  # type: ignore[misc]
    assert gone.hung_up
    gone.abort()  # nothing to abort: no error
