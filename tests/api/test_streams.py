"""The bounded set of long-lived responses that event streams and log followers share."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp import web

from neuronctl.api.auth import PRINCIPAL
from neuronctl.api.streams import Stream, Streams
from neuronctl.errors import KeyStreamsLimited, TooManyStreams
from neuronctl.keys import ADMIN, READ, Principal


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class _Request(dict[Any, Any]):
    def __init__(self, key: Principal | None = None) -> None:
        super().__init__()
        self.transport: Any = _Transport()
        self.method, self.path, self.remote = "GET", "/models/x/logs", "10.0.0.7"
        if key is not None:
            self[PRINCIPAL] = key


def stream(key: Principal | None = None) -> Stream:
    return Stream(request(key), web.StreamResponse())


def request(key: Principal | None = None) -> web.Request:
    return cast(web.Request, _Request(key))


async def test_streams_are_bounded_and_a_stuck_writer_is_aborted_at_shutdown() -> None:
    streams: Streams[Stream] = Streams("log streams", limit=2)
    idle, stuck = stream(), stream()
    with streams.holding(idle), streams.holding(stuck):
        with pytest.raises(TooManyStreams, match=r"^2 log streams are open, the limit"):
            streams.check_room(request())
        stuck.writing = True  # suspended in a write: its client stopped reading
        assert streams.stuck == 1
        await streams.close(web.Application())
        assert streams.closing.is_set()  # the idle one sees it and ends itself
        assert stuck.hung_up and not idle.hung_up
    assert streams.open == 0
    streams.check_room(request())  # room again


def test_a_stream_without_a_transport_has_hung_up() -> None:
    gone = stream()
    gone.request.transport = None  # type: ignore[misc]
    assert gone.hung_up
    gone.abort()  # nothing to abort: no error


def test_a_key_holds_a_quarter_of_a_kind_an_admin_and_a_keyless_node_any(
        caplog: pytest.LogCaptureFixture) -> None:
    streams: Streams[Stream] = Streams("log streams", limit=9)
    assert streams.per_key == 2 and Streams("x", limit=3).per_key == 1
    watcher, other = Principal("watcher", frozenset({READ})), Principal("o", frozenset({READ}))
    with streams.holding(stream(watcher)), streams.holding(stream(watcher)):
        with pytest.raises(KeyStreamsLimited, match=r"key 'watcher' holds 2 log streams"):
            streams.check_room(request(watcher))
        streams.check_room(request(other))
        streams.check_room(request(Principal("root", frozenset({ADMIN}))))
        streams.check_room(request())  # no keys: one holder, no share
    assert "refused GET '/models/x/logs' from 10.0.0.7 for key 'watcher': key 'watcher' " \
        "holds 2 log streams" in caplog.text
