"""The router's exchange with a model's worker: one request forwarded, its answer passed on.

The request goes to the worker byte for byte, less the headers that are the hop's or the
node's own (hop-by-hop ones, the node's API key); the answer comes back unchanged, less
the headers the daemon's server stamps itself. A pooled keep-alive connection the worker
had closed is retried on another (nothing reached the worker). A stream is passed through
chunk by chunk, and so is a non-streamed answer past `USAGE_SCAN_BYTES`; a smaller one is
read whole, so its usage is counted and a worker that breaks it off is a clean 502. A
worker that stops sending mid-answer for `upstream_idle_timeout_s` is cut off and its
slot freed. Once a status has gone out, a failure can only cut the connection (a stream
first gets one last event in its API's error shape: a `Dialect`'s). A stream of a route
whose end is known (`[DONE]`, `message_stop`) that ends without it was broken off by its
worker, however cleanly its connection closed: it ends the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from aiohttp import (
    ClientConnectorError,
    ClientError,
    ClientOSError,
    ClientResponse,
    ClientResponseError,
    ClientSession,
    ClientTimeout,
    DummyCookieJar,
    ServerDisconnectedError,
    StreamReader,
    TCPConnector,
    web,
)

from .. import errors
from ..errors import NeuronError
from ..supervisor.policy import describe_exit
from ..supervisor.registry import ModelRegistry
from ..supervisor.worker import Worker
from .keyusage import REQUEST_TOKENS, RequestTokens
from .traffic import ModelStats

log = logging.getLogger(__name__)

# Below uvicorn's 5 s keep-alive (the llama-cpp-python server), so the router drops an idle
# connection before the worker does and never sends a request into one being closed.
UPSTREAM_KEEPALIVE_S = 4.0
# A worker on 127.0.0.1 accepts at once; only reading has no bound (a long prompt can take
# minutes to its first token).
UPSTREAM_CONNECT_TIMEOUT_S = 10.0

# Hop-by-hop headers (RFC 9110 7.6.1) and those the router recomputes itself.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Host names the router, the body is re-sent with its own length, and the router has already
# read the body, so an Expect: 100-continue would only cost the worker a round trip.
# The node's API key authenticates the client to the node; the worker has no use for it and
# must not see it (nor log it).
_DROP_FROM_REQUEST = _HOP_BY_HOP | {"host", "content-length", "expect", "authorization",
                                    "x-api-key"}
# aiohttp's server stamps its own Date and Server; the length follows the body it sends.
_DROP_FROM_RESPONSE = _HOP_BY_HOP | {"content-length", "date", "server"}
_UPSTREAM_ERRORS = (ClientError, OSError, asyncio.TimeoutError)
# The pooled connection broke before any answer came: a keep-alive connection the worker
# closed. Not ClientConnectorError (nothing listens: the worker is gone), which is a
# ClientOSError too, hence the explicit check in exchange().
_STALE_CONNECTION = (ServerDisconnectedError, ClientOSError)
STALE_RETRIES = 2
# A non-streamed answer up to this size is read whole (its usage counted, and a worker that
# breaks it off is a clean 502); a longer one is passed on as it comes.
USAGE_SCAN_BYTES = 4 * 1024 * 1024


def openai_error(error: NeuronError) -> web.Response:
    """An error in OpenAI's shape, with its own status (and headers, e.g. Retry-After)."""
    return web.json_response(error.openai_body(), status=error.status, headers=error.headers)


def _openai_event(error: NeuronError) -> bytes:
    return b"\n\ndata: " + json.dumps(error.openai_body()).encode() + b"\n\n"


@dataclass(frozen=True)
class Dialect:
    """How one API says an error: as a whole answer, and as the last event of a stream
    that cannot go on. `worker_errors`: a worker's own (non-streamed) error answer said
    again in this shape, or None to pass it on as the worker wrote it (so is every one
    without it). `first_event`: the event a stream must begin with, and how to make it for
    a model when a worker's does not."""

    answer: Callable[[NeuronError], web.Response]
    event: Callable[[NeuronError], bytes]
    worker_errors: Callable[[int, bytes], NeuronError | None] | None = None
    first_event: tuple[bytes, Callable[[str], bytes]] | None = None


OPENAI = Dialect(openai_error, _openai_event)

# How a complete stream of each route ends; one that ends otherwise was broken off.
STREAM_ENDS = {"/v1/chat/completions": b"data: [DONE]", "/v1/completions": b"data: [DONE]",
               "/v1/messages": b"event: message_stop"}
_END_TAIL = 64  # bytes of a stream kept to find its end marker across chunks


def _without(headers: Mapping[str, str], drop: frozenset[str]) -> list[tuple[str, str]]:
    named = headers.get("Connection")
    if named:  # headers that a Connection header names are hop-by-hop too
        drop = drop | {token.strip().lower() for token in named.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def _request_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    # The router has parsed the body as JSON, so it says so: `curl -d` sends a form type,
    # which the worker would refuse (422) for the very body the router accepted.
    if "json" in headers.get("Content-Type", "").lower():
        return _without(headers, _DROP_FROM_REQUEST)
    forwarded = _without(headers, _DROP_FROM_REQUEST | {"content-type"})
    forwarded.append(("Content-Type", "application/json"))
    return forwarded


def completion_tokens(upstream: ClientResponse, answer: bytes) -> int:
    """A JSON answer's `usage.completion_tokens` (0 when it has none that is sane)."""
    return usage_tokens(upstream, answer)[1]


def usage_tokens(upstream: ClientResponse, answer: bytes) -> tuple[int, int]:
    """A JSON answer's `usage`: (prompt_tokens, completion_tokens), 0 for what it lacks."""
    if upstream.status != 200 or "json" not in upstream.headers.get("Content-Type", "") \
            or len(answer) > USAGE_SCAN_BYTES:
        return 0, 0
    try:
        usage = json.loads(answer).get("usage", {})
        counts = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    except (ValueError, RecursionError, AttributeError):
        return 0, 0
    prompt, completion = (n if isinstance(n, int) and 0 <= n < 2**31 else 0 for n in counts)
    return prompt, completion


# A stream's usage (llama-server's last chunks, and the node's llama-cpp-python worker's:
# workers/llama_cpp_server.py): the prompt's tokens and the generated ones, for the per-key
# counters. llama-server's `timings.prompt_n` counts only what its cache lacked: never used.
_STREAM_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,9})')
_STREAM_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,9})')


def _tally(request: web.Request) -> RequestTokens:
    """The request's token tally for its key (api/auth.py sets it; a throwaway without)."""
    return request.get(REQUEST_TOKENS) or RequestTokens()


def exit_note(worker: Worker) -> str:
    """How the worker ended, for a message about its answer ("" while it runs)."""
    code = worker.returncode
    return f"; it {describe_exit(code)}" if code is not None else ""


class _Unreached(Exception):
    """The request did not reach the worker, or its answer's head was unreadable."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(what)
        self.what = what
        self.cause = cause


class AnswerStopped(Exception):
    """A worker's non-streamed answer stopped before its end; `what` says how."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(why)
        self.what = what


async def next_chunk(content: StreamReader, idle_s: float) -> bytes:
    """The next bytes of an answer (b"" at its end), within `idle_s`."""
    try:
        return await asyncio.wait_for(content.readany(), idle_s)
    except asyncio.TimeoutError:  # ours: the session itself has no read timeout
        raise AnswerStopped(f"stalled mid-answer (no byte for {idle_s:g} s; "
                             "upstream_idle_timeout_s)", "idle") from None
    except _UPSTREAM_ERRORS as exc:
        raise AnswerStopped("broke off its answer", str(exc) or type(exc).__name__) from exc


class Upstream:
    """The pooled client to every worker, and the exchange of one request with one."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._session: ClientSession | None = None

    async def client_session(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: one pooled, keep-alive client for every worker, for the app's life."""
        connector = TCPConnector(
            limit=0,  # the workers queue requests themselves; a cap here would hide a queue
            use_dns_cache=False,  # workers are addressed as 127.0.0.1: nothing to resolve
            keepalive_timeout=UPSTREAM_KEEPALIVE_S,
        )
        self._session = ClientSession(
            connector=connector,
            timeout=ClientTimeout(total=None, sock_connect=UPSTREAM_CONNECT_TIMEOUT_S),
            # Shared by every client: it must never keep a cookie one client was sent.
            cookie_jar=DummyCookieJar(),
            auto_decompress=False,  # bytes pass through as the worker encoded them
            # Unasked, aiohttp would offer gzip on the client's behalf; the client would
            # then get an encoding it never accepted.
            skip_auto_headers=("Accept-Encoding",),
        )
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    async def exchange(
        self, request: web.Request, body: bytes, model_id: str, worker: Worker,
        stats: ModelStats, dialect: Dialect = OPENAI,
    ) -> web.StreamResponse:
        """Send `body` to `worker` and pass its answer on to `request`'s client."""
        upstream = await self.open(request, request.raw_path, body, model_id, worker, stats,
                                   dialect)
        if isinstance(upstream, web.Response):
            return upstream
        watch = self._restore_watch(model_id, worker)
        try:
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._stream(request, upstream, model_id, worker, stats, dialect,
                                          watch)
            return await self._relay(request, upstream, model_id, worker, stats, dialect,
                                     watch)
        finally:
            # A no-op once the answer was read in full (the connection went back to the
            # pool); otherwise it drops the connection, which is how the worker learns to
            # stop generating for a client that has gone.
            upstream.close()

    def _restore_watch(self, model_id: str, worker: Worker) -> Callable[[bytes], None] | None:
        """Where the first answer after a prompt cache restore goes, to be judged by its
        `timings.cache_n` (supervisor/promptcache.py); None for every other answer."""
        model = self.registry.get(model_id)
        cache = model.prompt_cache if model is not None and model.worker is worker else None
        return cache.observe if cache is not None and cache.expecting_answer else None

    async def post(self, worker: Worker, path: str, body: bytes, model_id: str,
                   stats: ModelStats) -> ClientResponse:
        """`body` (JSON) posted to `worker`'s `path`, for a caller that translates the
        answer itself (ollama.py); the caller closes the response. Raises
        WorkerUnavailable (counted as /v1 counts it) when the worker cannot be reached."""
        try:
            return await self._send(worker, path, body,
                                    [("Content-Type", "application/json")])
        except _Unreached as exc:
            raise self._gateway_error(model_id, worker, stats, exc.what, exc.cause) from None

    async def _send(self, worker: Worker, path: str, body: bytes,
                    headers: list[tuple[str, str]]) -> ClientResponse:
        assert self._session is not None, "router used outside its app's lifetime"
        for attempt in range(1, STALE_RETRIES + 2):
            try:
                return await self._session.post(
                    worker.endpoint + path, data=body, headers=headers,
                    allow_redirects=False,
                )
            except ClientConnectorError as exc:
                raise _Unreached("could not be reached", exc) from exc
            except ClientResponseError as exc:  # reached, but its answer's head is unreadable
                what = f"sent an answer the router cannot read ({str(exc.message)[:200]})"
                raise _Unreached(what, exc) from exc
            except _STALE_CONNECTION as exc:
                # A pooled connection the worker had closed (llama-server's HTTP server
                # drops keep-alive connections on its own): nothing reached the worker, so
                # it is sent again on another connection.
                if attempt > STALE_RETRIES or worker.returncode is not None:
                    raise _Unreached("could not be reached", exc) from exc
                log.debug("router: %s: stale connection (%s); sending again", path, exc)
            except _UPSTREAM_ERRORS as exc:
                raise _Unreached("could not be reached", exc) from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    async def open(
        self, request: web.Request, path: str, body: bytes, model_id: str, worker: Worker,
        stats: ModelStats, dialect: Dialect = OPENAI,
    ) -> ClientResponse | web.Response:
        """POST `body` to `path` of `worker`, with `request`'s headers (less the hop's and
        the node's): the worker's answer, its head read, or a 502 in `dialect`'s shape.
        The caller closes the answer."""
        try:
            return await self._send(worker, path, body, _request_headers(request.headers))
        except _Unreached as exc:
            return self.bad_gateway(model_id, worker, stats, exc.what, exc.cause, dialect)

    async def _relay(
        self, request: web.Request, upstream: ClientResponse, model_id: str, worker: Worker,
        stats: ModelStats, dialect: Dialect, watch: Callable[[bytes], None] | None = None,
    ) -> web.StreamResponse:
        """A non-streamed answer: read whole when it is small (its usage counted), else
        passed on as it comes, so the node never holds more than `USAGE_SCAN_BYTES` of
        it. Either way a worker that stops sending mid-answer for upstream_idle_timeout_s
        is cut off and its slot freed (a liveness probe may still pass)."""
        idle_s = self.registry.config.upstream_idle_timeout_s
        length = upstream.content_length
        head: list[bytes] = []
        size = 0
        try:
            while (length is None or length <= USAGE_SCAN_BYTES) and size <= USAGE_SCAN_BYTES:
                chunk = await next_chunk(upstream.content, idle_s)
                if not chunk:
                    answer = b"".join(head)
                    if watch is not None:
                        watch(answer)
                    stats.count(upstream.status)
                    prompt, completion = usage_tokens(upstream, answer)
                    stats.tokens += completion
                    tally = _tally(request)
                    tally.prompt += prompt
                    tally.completion += completion
                    said = (dialect.worker_errors(upstream.status, answer)
                            if upstream.status >= 400 and dialect.worker_errors is not None
                            else None)
                    if said is not None:
                        return dialect.answer(said)
                    return web.Response(
                        body=answer, status=upstream.status, reason=upstream.reason,
                        headers=_without(upstream.headers, _DROP_FROM_RESPONSE))
                head.append(chunk)
                size += len(chunk)
        except AnswerStopped as exc:
            return self.bad_gateway(model_id, worker, stats, exc.what, exc, dialect)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason,
            headers=_without(upstream.headers, _DROP_FROM_RESPONSE))
        if length is not None:
            response.content_length = length  # the worker's own framing, kept
        try:
            await response.prepare(request)
            stats.count(upstream.status)
            for part in head:
                if watch is not None:
                    watch(part)
                await response.write(part)
            head.clear()
            while chunk := await next_chunk(upstream.content, idle_s):
                if watch is not None:
                    watch(chunk)
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the client's side
            stats.client_disconnects += 1
        except AnswerStopped as exc:  # the status is out: only a cut is left
            stats.worker_errors += 1
            message, level = self.cut_by_unload(
                model_id, f"the worker for model {model_id!r} {exc.what}{exit_note(worker)}")
            log.log(level, "router: %s; the answer was cut: %s", message, exc)
            if request.transport is not None:
                request.transport.close()
        return response

    async def _stream(
        self, request: web.Request, upstream: ClientResponse, model_id: str, worker: Worker,
        stats: ModelStats, dialect: Dialect, watch: Callable[[bytes], None] | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason,
            headers=_without(upstream.headers, _DROP_FROM_RESPONSE),
        )
        try:
            try:
                await response.prepare(request)
            except ConnectionError:
                stats.client_disconnects += 1
                return response
            stats.count(upstream.status)
            content = upstream.content
            end = STREAM_ENDS.get(request.path) if upstream.status == 200 else None
            tail = b""
            first = dialect.first_event if upstream.status == 200 else None
            tally = _tally(request)
            counted = 0  # this stream's generated tokens, so far
            while True:
                try:
                    chunk = await content.readany()
                except _UPSTREAM_ERRORS as exc:
                    await self.abort_stream(request, response, model_id, worker, stats, exc,
                                            dialect)
                    return response
                if not chunk:
                    if end is not None and end not in tail:
                        # A worker that failed mid-answer and closed its stream cleanly
                        # (llama-cpp-python does): as broken as a cut connection.
                        stopped = AnswerStopped("broke off its answer",
                                                "its stream ended before its last event")
                        await self.abort_stream(request, response, model_id, worker, stats,
                                                stopped, dialect)
                        return response
                    break
                tail = (tail + chunk)[-_END_TAIL:]
                if first is not None:
                    head, make = first
                    if not (chunk.lstrip().startswith(head) or head.startswith(chunk.lstrip())):
                        # llama-server (b7000s) leaves out its message_start now and then
                        # (1 stream in 5 here); Anthropic's clients cannot read on without.
                        chunk = make(model_id) + chunk
                    first = None
                # llama.cpp's servers send about one token per chunk: the count until
                # the stream's usage says the real one.
                generated = chunk.count(b"data: {")
                if (found := _STREAM_COMPLETION.search(chunk)) is not None:
                    generated = int(found.group(1)) - counted
                counted += generated
                stats.tokens += generated
                tally.completion += generated
                if (found := _STREAM_PROMPT.search(chunk)) is not None:
                    tally.prompt = int(found.group(1))
                if watch is not None:
                    watch(chunk)
                try:
                    await response.write(chunk)
                except ConnectionError:
                    stats.client_disconnects += 1
                    return response
            try:
                await response.write_eof()
            except ConnectionError:
                stats.client_disconnects += 1
            return response
        except Exception:  # headers are out: no error answer is possible, only a cut
            log.exception("router: unhandled error streaming %s for %s", request.path, model_id)
            if request.transport is not None:
                request.transport.close()
            return response

    async def abort_stream(
        self, request: web.Request, response: web.StreamResponse, model_id: str,
        worker: Worker, stats: ModelStats, exc: BaseException, dialect: Dialect = OPENAI,
    ) -> None:
        """The worker died mid-stream, after a 200 went out. Send one last event in the
        API's error shape (its client libraries raise it), then cut the connection without
        the final chunk, so even a client that ignores the event sees a broken transfer."""
        message = self.broken_off(model_id, worker, stats, exc)
        event = dialect.event(errors.WorkerUnavailable(message))
        try:
            await response.write(event)
        except ConnectionError:
            return
        if request.transport is not None:
            request.transport.close()

    def broken_off(self, model_id: str, worker: Worker, stats: ModelStats,
                   exc: BaseException) -> str:
        """A stream the worker broke off after the 200 went out: counted, logged, and
        the message its client gets in its API's last event."""
        stats.worker_errors += 1
        message = f"the worker for model {model_id!r} broke off its answer{exit_note(worker)}"
        message, level = self.cut_by_unload(model_id, message)
        log.log(level, "router: %s: %s", message, str(exc) or type(exc).__name__)
        return message

    def bad_gateway(
        self, model_id: str, worker: Worker, stats: ModelStats, what: str, exc: BaseException,
        dialect: Dialect = OPENAI,
    ) -> web.Response:
        return dialect.answer(self._gateway_error(model_id, worker, stats, what, exc))

    def _gateway_error(
        self, model_id: str, worker: Worker, stats: ModelStats, what: str, exc: BaseException
    ) -> NeuronError:
        stats.worker_errors += 1
        stats.count(502)
        message = f"the worker for model {model_id!r} {what}{exit_note(worker)}"
        message, level = self.cut_by_unload(model_id, message)
        log.log(level, "router: %s: %s", message, str(exc) or type(exc).__name__)
        return errors.WorkerUnavailable(message)

    def cut_by_unload(self, model_id: str, message: str) -> tuple[str, int]:
        """An answer cut because an operator unloaded the model (or the node stops) is what
        they asked for, not a worker failing: said so, at info."""
        model = self.registry.get(model_id)
        if model is None or model.stopping:
            return f"{message} (the model was being unloaded)", logging.INFO
        return message, logging.WARNING
