"""`GET /models/{id}/logs`: a model's log file over HTTP, its tail and, with `follow=1`,
what the worker appends to it, like `neuronctl logs -f`.

The file is the one the node writes for that model (the model's own `log_path`, or the
catalogue's name for it under `log_dir`): a request names a model id, never a path.
Everything is bounded: the lines of the tail (`MAX_LINES`), the bytes read per wake-up
(`READ_BYTES`), the followers at once (`MAX_FOLLOWERS`). A client that stops reading
holds its follower's one pending write and nothing more (aiohttp waits for the socket
to drain). A follower ends when its client hangs up (looked at every `poll_s`) and at
shutdown, a stuck one by having its connection aborted (streams.py, as event streams).

The file is followed as `neuronctl logs -f` follows it (`logfiles.FollowedLog`): when a
restart rotates the log (`<model>.log` to `.1`), the old file is finished and the new one
read from its start; a truncated file is read again from its start. `previous=1` reads
the log of the start before (`.1`), which does not grow.

Only a regular file is served, never through a symlink, and opened without blocking
(`logfiles.open_log`): a link planted in a shared `log_dir` would otherwise serve its
target, and a FIFO would hold a thread for good. The file I/O runs on a small executor of
the followers' own, so however many clients follow, the threads the supervisor needs
(readiness checks, `workers.json`) never wait behind them. `HEAD` answers with the
headers alone.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from .. import errors, logfiles
from ..config import model_id_problem
from ..supervisor.registry import ModelRegistry
from .streams import Stream, Streams

MAX_LINES = 5000
DEFAULT_LINES = logfiles.DEFAULT_TAIL_LINES
READ_BYTES = 64 * 1024
TAIL_BYTES = 64 * 1024  # read for a tail, or 512 per line asked for when that is more
MAX_FOLLOWERS = 32
POLL_S = 0.25
# Threads for all followers' file I/O: each read is non-blocking and at most READ_BYTES,
# so a few serve the 32; not the default executor, which the supervisor needs.
IO_THREADS = 4
HEADERS = {
    "Content-Type": "text/plain; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "X-Content-Type-Options": "nosniff",
}


def model_log_path(registry: ModelRegistry, model_id: str) -> Path:
    """The log file of a model the node knows (ModelNotFound otherwise)."""
    model = registry.get(model_id)
    if model is not None:
        return model.log_path
    if model_id in registry.catalogue:
        return logfiles.log_path(registry.config.log_dir, model_id)
    raise errors.ModelNotFound(f"no such model on this node: {model_id!r}")


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "0").lower()
    if value not in ("0", "1", "true", "false", ""):
        raise errors.InvalidValue(f"{name}: expected 1 or 0, got {value[:40]!r}", param=name)
    return value in ("1", "true", "")


def _lines(request: web.Request) -> int:
    raw = request.query.get("lines", str(DEFAULT_LINES))
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise errors.InvalidValue(f"lines: expected a whole number, got {raw[:40]!r}",
                                  param="lines")
    return min(int(raw), MAX_LINES)  # more is not an error: the most there is to show


T = TypeVar("T")


def _refused(model_id: str, exc: logfiles.UnsafeLog) -> errors.NotFound:
    return errors.NotFound(f"the log of {model_id} {exc.strerror}; it is not served")


def _text(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8", "replace")


class LogFollowers(Streams[Stream]):
    """The open log streams of one app: their bound, their shutdown, their I/O threads."""

    def __init__(self, registry: ModelRegistry, *, limit: int = MAX_FOLLOWERS,
                 poll_s: float = POLL_S) -> None:
        super().__init__("log streams", limit)
        self.registry = registry
        self.poll_s = poll_s
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="log-follow")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    async def release(self, app: web.Application) -> None:
        """on_cleanup, once every handler has returned: the I/O threads go."""
        self._io.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["model_id"]
        problem = model_id_problem(model_id)
        if problem is not None:
            raise errors.InvalidValue(f"model id: {problem}", param="model_id")
        lines, follow, previous = _lines(request), _flag(request, "follow"), \
            _flag(request, "previous")
        head = request.method == "HEAD"
        path = model_log_path(self.registry, model_id)
        if previous:
            path = logfiles.previous_path(path)
        follow = follow and not previous  # the previous start's log does not grow
        if not follow:
            try:
                tail = await self._run(functools.partial(logfiles.read_tail, path,
                                                         0 if head else lines))
            except FileNotFoundError:
                which = "previous log" if previous else "log"
                raise errors.NotFound(f"no {which} yet for {model_id}") from None
            except logfiles.UnsafeLog as exc:
                raise _refused(model_id, exc) from None
        if head:
            # The headers alone, and no framing: a body (or a stream) sent to a HEAD
            # would be read by a kept-alive connection as the next answer.
            return web.Response(headers=HEADERS)
        if not follow:
            response = web.StreamResponse(headers=HEADERS)
            await response.prepare(request)
            await response.write(_text(tail))
            await response.write_eof()
            return response
        self.check_room(request)
        response = web.StreamResponse(headers=HEADERS)
        followed = logfiles.FollowedLog(path)
        with self.holding(Stream(request, response)) as follower:
            try:
                try:
                    tail = await self._run(functools.partial(followed.tail, lines, TAIL_BYTES))
                except logfiles.UnsafeLog as exc:
                    raise _refused(model_id, exc) from None
                await response.prepare(request)
                await follower.write(_text(tail))
                await self._follow(follower, followed)
            except ConnectionError:
                pass  # the client left during a write
            except logfiles.UnsafeLog as exc:  # what appeared at the path later: said, ended
                with contextlib.suppress(ConnectionError):
                    await follower.write(f"\n=== neuronctl: the log {exc.strerror}; "
                                         "no longer followed\n".encode())
            finally:
                followed.close()  # a read-only regular file: closing never blocks
        return response

    async def _follow(self, follower: Stream, followed: logfiles.FollowedLog) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        read = functools.partial(followed.read, READ_BYTES)
        while not self.closing.is_set():
            if follower.hung_up:
                return
            chunk = await self._run(read)
            if self.closing.is_set():
                return  # close() aborted the writers of that moment; this one writes no more
            if chunk:
                await follower.write(decoder.decode(chunk).encode())
                continue  # more may be waiting
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self.poll_s)


FOLLOWERS = web.AppKey("log_followers", LogFollowers)

