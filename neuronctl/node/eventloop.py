"""The daemon's event loop: uvloop where it is installed, asyncio's own otherwise.

Every request through the node is accepted, parsed, forwarded and answered in Python;
what the loop itself costs is a large part of it. On uvloop (libuv's loop, as uvicorn
uses when it can) a small request forwarded to a worker cost the daemon about a fifth
less CPU than on asyncio's selector loop (perf stat over 1,000 requests, two nodes side
by side: docs/performance.md). The daemon's code is the same on both: workers are
watched through pidfds (supervisor/childproc.py), not through either loop's own
subprocess machinery.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    import uvloop


class LoopUnavailable(Exception):
    """`event_loop = "uvloop"` on a host without it."""


def runner(choice: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """How to run the daemon on the config's `event_loop`:
    "auto" (uvloop if it imports), "uvloop" (LoopUnavailable without it), "asyncio"."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise LoopUnavailable(
                    f'"uvloop", but uvloop cannot be imported ({exc}); install it '
                    '(pip install uvloop) or set event_loop = "auto"') from None
        else:
            return functools.partial(uvloop.run, loop_factory=_numeric_connect_loop(uvloop.Loop))
    return asyncio.run


def _numeric_connect_loop(base: type[uvloop.Loop]) -> type[uvloop.Loop]:
    """uvloop's loop whose `sock_connect` to a numeric address connects at once. uvloop's
    own resolves every address first, numeric or not, in libuv's thread pool (it asks
    getaddrinfo with no socket type, which its fast path for numeric hosts does not take):
    a round trip through a thread for every new connection to a worker, which aiohttp
    opens with sock_connect (the first request after each load among them)."""

    class Loop(base):  # type: ignore[valid-type,misc]  # a class made at run time
        async def sock_connect(self, sock: socket.socket, address: Any) -> None:
            if not _numeric(sock, address):
                return await super().sock_connect(sock, address)
            error = sock.connect_ex(address)
            if error in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
                # The descriptor as it is now: a socket closed while it connects answers
                # -1, and its writer must still be removed.
                fd = sock.fileno()
                connected: asyncio.Future[None] = self.create_future()
                self.add_writer(fd, _settle, connected)
                try:
                    await connected
                finally:
                    self.remove_writer(fd)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, f"Connect call failed {address}: {os.strerror(error)}")
            return None

    return Loop


def _numeric(sock: socket.socket, address: Any) -> bool:
    """An (IP literal, port[, ...]) for an IPv4 or IPv6 socket: nothing to resolve."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return False
    if len(address) < 2 or not isinstance(address[0], str) or not isinstance(address[1], int):
        return False
    try:
        socket.inet_pton(sock.family, address[0])
    except OSError:
        return False
    return True


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def name() -> str:
    """The running loop's name, for the daemon's first line."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"
