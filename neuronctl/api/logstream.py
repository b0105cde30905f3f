"""`GET /models/{id}/logs`: a model's log file over HTTP, its tail and, with `follow=1`,
what the worker appends to it, like `neuronctl logs -f`.

The file is the one the node writes for that model (the model's own `log_path`, or the
catalogue's name for it under `log_dir`): a request names a model id, never a path.
Everything is bounded: the lines of the tail (`MAX_LINES`), the bytes read per wake-up
(`READ_BYTES`), the followers at once (`MAX_FOLLOWERS`). A client that stops reading
holds its follower's one pending write and nothing more (aiohttp waits for the socket
to drain). A follower ends when its client hangs up (looked at every `poll_s`) and at
shutdown, a stuck one by having its connection aborted, as event streams do.

When a restart rotates the log (`<model>.log` to `.1`), the follower finishes the old
file and goes on with the new one from its start; a truncated file is read again from
its start. `previous=1` reads the log of the start before (`.1`), which does not grow.

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
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

from aiohttp import web

from .. import errors, logfiles
from ..config import model_id_problem
from ..supervisor.registry import ModelRegistry

MAX_LINES = 5000
DEFAULT_LINES = 100
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


class _File:
    """The followed file, `tail -F` style; every call is blocking I/O (run in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: BinaryIO | None = None

    def start(self, n: int) -> list[str]:
        """Open the file; its last `n` lines up to where following begins, so nothing is
        lost or sent twice between the tail and what follows (as logfiles.tail_lines)."""
        try:
            self.fh = os.fdopen(logfiles.open_log(self.path), "rb")
        except FileNotFoundError:
            return []  # not written yet: read() opens it when it appears
        size = os.fstat(self.fh.fileno()).st_size
        window = max(TAIL_BYTES, n * 512)
        self.fh.seek(max(0, size - window))
        lines = self.fh.read(size - self.fh.tell()).decode("utf-8", "replace").splitlines()
        if size > window and len(lines) > 1:
            lines = lines[1:]  # the first line is probably cut in the middle
        return lines[-n:] if n > 0 else []

    def read(self) -> bytes:
        """What was appended since the last read, at most READ_BYTES of it. Raises
        logfiles.UnsafeLog when what appeared at the path is no regular file."""
        if self.fh is None:
            try:  # it appeared: read it from its start
                self.fh = os.fdopen(logfiles.open_log(self.path), "rb")
            except FileNotFoundError:
                return b""
        chunk = self.fh.read(READ_BYTES)
        if chunk:
            return chunk
        try:
            current = self.path.lstat()
        except FileNotFoundError:  # between a rotation and the new file
            return b""
        if current.st_ino != os.fstat(self.fh.fileno()).st_ino:
            self.close()  # rotated away (and read to its end): the new file next time
        elif current.st_size < self.fh.tell():
            self.fh.seek(0)  # truncated
        return b""

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class _Follower:
    """One client's stream, and whether it is suspended in a write (its client not reading)."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.writing = False

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
        if self.request.transport is not None:
            self.request.transport.abort()  # the pending write raises ConnectionResetError


class LogFollowers:
    """The open log streams of one app: their bound and their shutdown."""

    def __init__(self, registry: ModelRegistry, *, limit: int = MAX_FOLLOWERS,
                 poll_s: float = POLL_S) -> None:
        self.registry = registry
        self.limit = limit
        self.poll_s = poll_s
        self._followers: set[_Follower] = set()
        self._closing = asyncio.Event()
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="log-follow")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    @property
    def open(self) -> int:
        return len(self._followers)

    @property
    def stuck(self) -> int:
        """Followers suspended in a write: their clients stopped reading."""
        return sum(f.writing for f in self._followers)

    async def close(self, app: web.Application) -> None:
        """on_shutdown: end every follower now (the runner then waits for their handlers)."""
        self._closing.set()
        for follower in self._followers:
            if follower.writing:
                follower.abort()

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
        if self.open >= self.limit:
            raise errors.TooManyStreams(
                f"{self.open} log streams are open, the limit; close one and try again")
        response = web.StreamResponse(headers=HEADERS)
        follower = _Follower(request, response)
        self._followers.add(follower)  # before any await: the bound holds under a rush
        followed = _File(path)
        try:
            try:
                tail = await self._run(functools.partial(followed.start, lines))
            except logfiles.UnsafeLog as exc:
                raise _refused(model_id, exc) from None
            await response.prepare(request)
            await follower.write(_text(tail))
            await self._follow(follower, followed)
        except ConnectionError:
            pass  # the client left during a write
        except logfiles.UnsafeLog as exc:  # what appeared at the path later: said, and ended
            with contextlib.suppress(ConnectionError):
                await follower.write(f"\n=== neuronctl: the log {exc.strerror}; "
                                     "no longer followed\n".encode())
        finally:
            self._followers.discard(follower)
            followed.close()  # a read-only regular file: closing never blocks
        return response

    async def _follow(self, follower: _Follower, followed: _File) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while not self._closing.is_set():
            if follower.hung_up:
                return
            chunk = await self._run(followed.read)
            if self._closing.is_set():
                return  # close() aborted the writers of that moment; this one writes no more
            if chunk:
                await follower.write(decoder.decode(chunk).encode())
                continue  # more may be waiting
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.poll_s)


FOLLOWERS = web.AppKey("log_followers", LogFollowers)


def setup(app: web.Application, registry: ModelRegistry) -> LogFollowers:
    """Add `GET /models/{id}/logs` to `app`; its followers end when the app shuts down."""
    followers = LogFollowers(registry)
    app[FOLLOWERS] = followers
    # Model ids hold slashes (`Qwen/Qwen3-0.6B-GGUF`), hence the greedy pattern.
    app.router.add_get("/models/{model_id:.+}/logs", followers.handle)
    app.on_shutdown.append(followers.close)
    app.on_cleanup.append(followers.release)
    return followers
