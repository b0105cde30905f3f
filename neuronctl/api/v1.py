"""The OpenAI-compatible router: one `/v1` base URL for every model on the node.

A request's `model` field picks the worker; the request goes there byte for byte and the
worker's answer comes back unchanged, server-sent events passed through as they arrive.
The router answers by itself only when it cannot forward, and then in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), never the control API's.

Its handlers return every error rather than raise it, so the control API's error
middleware never sees one to rewrite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import unquote

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
from prometheus_client import CollectorRegistry

from .. import errors
from ..errors import NeuronError
from ..events import ModelEvent
from ..states import ModelStatus, WorkerState
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.registry import ModelRegistry
from ..supervisor.worker import Worker, describe_exit
from .requestbody import read_limited, routing
from .routerstats import ModelStats, RouterStats, unloaded_for_good
from .traffic import ModelQueue

log = logging.getLogger(__name__)

# Seconds a client is told to wait (Retry-After) for a model that is not ready yet.
RETRY_AFTER_S = 5
# Below uvicorn's 5 s keep-alive (the llama-cpp-python server), so the router drops an idle
# connection before the worker does and never sends a request into one being closed.
UPSTREAM_KEEPALIVE_S = 4.0
# A worker on 127.0.0.1 accepts at once; only reading has no bound (a long prompt can take
# minutes to its first token).
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
# How often requests waiting on a worker check that their clients are still there.
HANG_UP_CHECK_S = 0.25

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
# ClientOSError too, hence the explicit check in _exchange.
_STALE_CONNECTION = (ServerDisconnectedError, ClientOSError)
STALE_RETRIES = 2
# A non-streamed answer up to this size is read whole (its usage counted, and a worker that
# breaks it off is a clean 502); a longer one is passed on as it comes.
_USAGE_SCAN_BYTES = 4 * 1024 * 1024


ROUTER_STATS = web.AppKey("router_stats", RouterStats)


def openai_error(error: NeuronError) -> web.Response:
    """An error in OpenAI's shape, with its own status (and headers, e.g. Retry-After)."""
    return web.json_response(error.openai_body(), status=error.status, headers=error.headers)


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


def _completion_tokens(upstream: ClientResponse, answer: bytes) -> int:
    if upstream.status != 200 or "json" not in upstream.headers.get("Content-Type", "") \
            or len(answer) > _USAGE_SCAN_BYTES:
        return 0
    try:
        tokens = json.loads(answer).get("usage", {}).get("completion_tokens", 0)
    except (ValueError, RecursionError, AttributeError):
        return 0
    return tokens if isinstance(tokens, int) and 0 <= tokens < 2**31 else 0


class _AnswerStopped(Exception):
    """A worker's non-streamed answer stopped before its end; `what` says how."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(why)
        self.what = what


async def _next_chunk(content: StreamReader, idle_s: float) -> bytes:
    """The next bytes of an answer (b"" at its end), within `idle_s`."""
    try:
        return await asyncio.wait_for(content.readany(), idle_s)
    except asyncio.TimeoutError:  # ours: the session itself has no read timeout
        raise _AnswerStopped(f"stalled mid-answer (no byte for {idle_s:g} s; "
                             "upstream_idle_timeout_s)", "idle") from None
    except _UPSTREAM_ERRORS as exc:
        raise _AnswerStopped("broke off its answer", str(exc) or type(exc).__name__) from exc


def _model_entry(record: ModelLifecycle) -> dict[str, Any]:
    return {
        "id": record.spec.model_id,
        "object": "model",
        "created": int(record.since),
        "owned_by": "neuron",
        "status": record.status.value,
    }


def _worker_gone(worker: Worker) -> str:
    code = worker.returncode
    return f"; it {describe_exit(code)}" if code is not None else ""


def _check_target(request: web.Request) -> None:
    """Refuse an absolute-form target (`POST http://host/v1/...`): the router forwards the
    path as sent, which must be a path, and a 400 says so where a 502 would blame the
    worker."""
    if not request.raw_path.startswith("/"):
        raise errors.BadRequest(
            f"request target {request.raw_path[:200]!r} is not a path; send "
            "'POST /v1/...' with a Host header (absolute-form targets are not accepted)")


def _check_path(request: web.Request) -> None:
    """Refuse a path a worker would resolve outside /v1 (`/v1/../props`, with `..` in any
    spelling): the router forwards the raw path, so it must stay under /v1 as written."""
    raw = request.raw_path.split("?", 1)[0]
    segments = unquote(raw).replace("\\", "/").split("/")
    if "." in segments or ".." in segments:
        raise errors.BadRequest(f"path {raw[:200]!r} has '.' or '..' segments")


class Router:
    def __init__(self, registry: ModelRegistry, metrics: CollectorRegistry | None = None) -> None:
        self.registry = registry
        self.stats = RouterStats(metrics)
        self._session: ClientSession | None = None
        # Handlers waiting on a worker, checked for a client that hung up; see _check_clients.
        self._waiting: dict[asyncio.Task[Any], web.Request] = {}
        self._check_handle: asyncio.TimerHandle | None = None
        self._stopping: NeuronError | None = None  # set once the node begins to stop

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
            if self._check_handle is not None:
                self._check_handle.cancel()
                self._check_handle = None
            await self._session.close()
            self._session = None

    def _watch_client(self, request: web.Request) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = request
        if self._check_handle is None:
            loop = asyncio.get_running_loop()
            self._check_handle = loop.call_later(HANG_UP_CHECK_S, self._check_clients)
        return task

    def _check_clients(self) -> None:
        """Cancel the handlers whose clients have hung up.

        The daemon's aiohttp server does not cancel a handler when its client disconnects
        (its default), so a router waiting on a worker would notice only at its next write:
        after a long prompt's first token, or never for an answer read in full, while the
        worker went on generating for nobody. One timer for all requests, and only while
        there are any: nothing per chunk, next to nothing per request.
        """
        self._check_handle = None
        for task, request in list(self._waiting.items()):
            transport = request.transport
            if transport is None or transport.is_closing():
                task.cancel()  # unwinds through _exchange, which drops the upstream request
        if self._waiting:
            loop = asyncio.get_running_loop()
            self._check_handle = loop.call_later(HANG_UP_CHECK_S, self._check_clients)

    def _servable(self) -> dict[str, dict[str, Any]]:
        """What a request may name: loaded models, and catalogue models that a request
        would load (autoload), as `unloaded`."""
        entries = {r.model_id: _model_entry(r) for r in self.registry.models()
                   if r.serving_worker is not None}
        config = self.registry.config
        for model_id, spec in self.registry.catalogue.items():
            if model_id not in entries and config.autoloads(spec) \
                    and self.registry.get(model_id) is None:
                entries[model_id] = {"id": model_id, "object": "model", "created": 0,
                                     "owned_by": "neuron", "status": "unloaded"}
        return entries

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": list(self._servable().values())})

    async def get_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        entry = self._servable().get(model_id)
        if entry is None:
            return openai_error(self._unknown_model(model_id))
        return web.json_response(entry)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.method != "POST":
                raise errors.MethodNotAllowed(
                    f"{request.method} is not allowed on {request.path}; POST a JSON body "
                    "that names a model", headers={"Allow": "POST"})
            _check_target(request)
            _check_path(request)
            return await self._forward(request)
        except NeuronError as exc:
            return openai_error(exc)
        except ConnectionError:  # the client left while its body was being read
            return web.Response(status=400)  # nobody will read it
        except Exception:
            log.exception("router: unhandled error in %s %s", request.method, request.path)
            return openai_error(NeuronError("internal error; see the neuron service log"))

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        # Read per request, so a config reload that changes it applies at once.
        limit = self.registry.config.max_request_bytes
        body = await read_limited(request.content, request.content_length, limit)
        if body is None:
            raise errors.PayloadTooLarge(
                f"request body too large (limit {limit} bytes; max_request_bytes in "
                "the node config)")
        # Only the bytes wait in the queue, never the parsed JSON (see requestbody.py).
        model_id, stream = (fields := routing(body)).model, fields.stream
        if model_id is None:
            raise errors.ModelNotFound(
                f"request names no model; models on this node: {self._loaded_ids()}",
                param="model")
        if self._stopping is not None:
            raise self._stopping
        record = self.registry.get(model_id)
        if record is None or record.stopping:
            # Not loaded (or being unloaded): a catalogue model with autoload is loaded for
            # it, and the request waits in its queue like any other.
            record = await self.registry.demand(model_id)
        if record is None:
            raise self._unknown_model(model_id)
        if record.stopping:  # being unloaded, and not loaded again on demand
            raise errors.ModelNotReady(f"model {model_id!r} is being unloaded", param="model")
        stats = self._stats_for(record)
        stats.requests += 1
        stats.last_used = time.monotonic()
        task = self._watch_client(request)  # a client that hangs up leaves the queue too
        # A worker that cannot stop an answer its client no longer waits for (see
        # harness.py) keeps its slot until it is done: the request is not cancelled once
        # it is forwarded, or the next one would reach a worker still busy.
        finishes = (not stream
                    and getattr(self.registry.harnesses.get(record.spec.harness),
                                "finishes_abandoned_answers", False))

        def admitted() -> None:
            if finishes:
                del self._waiting[task]  # no longer cancelled when its client hangs up

        try:
            return await self._admitted(request, body, record, stats, admitted)
        except NeuronError as refusal:
            stats.reject(refusal)
            raise
        finally:
            self._waiting.pop(task, None)

    async def _admitted(self, request: web.Request, body: bytes, record: ModelLifecycle,
                        stats: ModelStats, on_admitted: Callable[[], None]
                        ) -> web.StreamResponse:
        """Wait for a slot of the model's worker (it may still be loading), then forward."""
        model_id = record.model_id
        if record.status is ModelStatus.FAILED:
            raise self._not_ready(record)
        max_queue, timeout_s = record.queue_limits()
        max_bytes = self.registry.config.max_queued_bytes
        async with stats.queue.admit(max_queue, timeout_s, len(body), max_bytes) as waited:
            self.stats.observe(self.stats.queue_wait, model_id, stats, waited)
            current = self.registry.get(model_id)  # a reload may have replaced it
            worker = current.serving_worker if current is not None else None
            if worker is None:
                raise self._not_ready(current or record)
            on_admitted()
            stats.in_flight += 1
            started = time.monotonic()
            try:
                return await self._exchange(request, body, model_id, worker, stats)
            except asyncio.CancelledError:  # the client left (or the node is shutting down)
                stats.client_disconnects += 1
                raise
            finally:
                stats.in_flight -= 1
                stats.last_used = time.monotonic()
                # To the last byte, streams included.
                self.stats.observe(self.stats.latency, model_id, stats,
                                   time.monotonic() - started)

    def _stats_for(self, record: ModelLifecycle) -> ModelStats:
        fresh = record.model_id not in self.stats.models
        stats = self.stats.model(record.model_id)
        if fresh:  # a queue made now starts from the model's state; events keep it so
            self._follow(stats.queue, record)
        return stats

    def stop_admitting(self) -> None:
        """The node is stopping: requests waiting in a queue answer 503 now, while their
        connections are still open (the listener's shutdown would otherwise cancel them
        into a reset); requests already at a worker finish."""
        self._stopping = errors.ModelNotReady("the node is stopping; retry on another node")
        for stats in self.stats.models.values():
            stats.queue.fail(self._stopping)

    def on_event(self, event: ModelEvent) -> None:
        """Keep the model's queue in step with its state (an EventBus callback)."""
        stats = self.stats.models.get(event.model)
        model = self.registry.get(event.model)
        if stats is None:
            return
        if model is not None and model.state is not event.new:
            # An event of an earlier lifecycle of this id (an evicted worker's STOPPED
            # after its next load began): the queue follows the current one.
            self._follow(stats.queue, model)
        elif event.new in (WorkerState.STOPPING, WorkerState.STOPPED) or model is None:
            stats.queue.fail(errors.ModelNotReady(
                f"model {event.model!r} was unloaded while this request waited",
                param="model"))
        else:
            self._follow(stats.queue, model)
        if unloaded_for_good(self.registry, event):
            self.stats.forget(event.model)

    def _follow(self, queue: ModelQueue, model: ModelLifecycle) -> None:
        if model.serving_worker is not None:
            queue.ready(model.slots)
        elif model.status is ModelStatus.FAILED:
            queue.fail(self._not_ready(model))
        else:
            queue.not_ready()  # loading or restarting: requests wait for it

    async def _exchange(
        self, request: web.Request, body: bytes, model_id: str, worker: Worker,
        stats: ModelStats,
    ) -> web.StreamResponse:
        assert self._session is not None, "router used outside its app's lifetime"
        headers = _request_headers(request.headers)
        for attempt in range(1, STALE_RETRIES + 2):
            try:
                upstream = await self._session.post(
                    worker.endpoint + request.raw_path, data=body, headers=headers,
                    allow_redirects=False,
                )
                break
            except ClientConnectorError as exc:
                return self._bad_gateway(model_id, worker, stats, "could not be reached", exc)
            except ClientResponseError as exc:  # reached, but its answer's head is unreadable
                what = f"sent an answer the router cannot read ({str(exc.message)[:200]})"
                return self._bad_gateway(model_id, worker, stats, what, exc)
            except _STALE_CONNECTION as exc:
                # A pooled connection the worker had closed (llama-server's HTTP server
                # drops keep-alive connections on its own): nothing reached the worker, so
                # it is sent again on another connection.
                if attempt > STALE_RETRIES or worker.returncode is not None:
                    return self._bad_gateway(model_id, worker, stats, "could not be reached",
                                             exc)
                log.debug("router: %s: stale connection (%s); sending again", model_id, exc)
            except _UPSTREAM_ERRORS as exc:
                return self._bad_gateway(model_id, worker, stats, "could not be reached", exc)
        try:
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._stream(request, upstream, model_id, worker, stats)
            return await self._relay(request, upstream, model_id, worker, stats)
        finally:
            # A no-op once the answer was read in full (the connection went back to the
            # pool); otherwise it drops the connection, which is how the worker learns to
            # stop generating for a client that has gone.
            upstream.close()

    async def _relay(
        self, request: web.Request, upstream: ClientResponse, model_id: str, worker: Worker,
        stats: ModelStats,
    ) -> web.StreamResponse:
        """A non-streamed answer: read whole when it is small (its usage counted), else
        passed on as it comes, so the node never holds more than `_USAGE_SCAN_BYTES` of
        it. Either way a worker that stops sending mid-answer for upstream_idle_timeout_s
        is cut off and its slot freed (a liveness probe may still pass)."""
        idle_s = self.registry.config.upstream_idle_timeout_s
        length = upstream.content_length
        head: list[bytes] = []
        size = 0
        try:
            while (length is None or length <= _USAGE_SCAN_BYTES) and size <= _USAGE_SCAN_BYTES:
                chunk = await _next_chunk(upstream.content, idle_s)
                if not chunk:
                    answer = b"".join(head)
                    stats.count(upstream.status)
                    stats.tokens += _completion_tokens(upstream, answer)
                    return web.Response(
                        body=answer, status=upstream.status, reason=upstream.reason,
                        headers=_without(upstream.headers, _DROP_FROM_RESPONSE))
                head.append(chunk)
                size += len(chunk)
        except _AnswerStopped as exc:
            return self._bad_gateway(model_id, worker, stats, exc.what, exc)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason,
            headers=_without(upstream.headers, _DROP_FROM_RESPONSE))
        if length is not None:
            response.content_length = length  # the worker's own framing, kept
        try:
            await response.prepare(request)
            stats.count(upstream.status)
            for part in head:
                await response.write(part)
            head.clear()
            while chunk := await _next_chunk(upstream.content, idle_s):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the client's side
            stats.client_disconnects += 1
        except _AnswerStopped as exc:  # the status is out: only a cut is left
            stats.worker_errors += 1
            message, level = self._cut_by_unload(
                model_id, f"the worker for model {model_id!r} {exc.what}{_worker_gone(worker)}")
            log.log(level, "router: %s; the answer was cut: %s", message, exc)
            if request.transport is not None:
                request.transport.close()
        return response

    async def _stream(
        self, request: web.Request, upstream: ClientResponse, model_id: str, worker: Worker,
        stats: ModelStats,
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
            while True:
                try:
                    chunk = await content.readany()
                except _UPSTREAM_ERRORS as exc:
                    await self._abort_stream(request, response, model_id, worker, stats, exc)
                    return response
                if not chunk:
                    break
                stats.tokens += chunk.count(b"data: {")
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

    async def _abort_stream(
        self, request: web.Request, response: web.StreamResponse, model_id: str,
        worker: Worker, stats: ModelStats, exc: BaseException,
    ) -> None:
        """The worker died mid-stream, after a 200 went out. Send one last event in OpenAI's
        error shape (OpenAI's client libraries raise it), then cut the connection without
        the final chunk, so even a client that ignores the event sees a broken transfer."""
        stats.worker_errors += 1
        message = f"the worker for model {model_id!r} broke off its answer{_worker_gone(worker)}"
        message, level = self._cut_by_unload(model_id, message)
        log.log(level, "router: %s: %s", message, exc)
        body = errors.WorkerUnavailable(message).openai_body()
        event = b"\n\ndata: " + json.dumps(body).encode() + b"\n\n"
        try:
            await response.write(event)
        except ConnectionError:
            return
        if request.transport is not None:
            request.transport.close()

    def _bad_gateway(
        self, model_id: str, worker: Worker, stats: ModelStats, what: str, exc: BaseException
    ) -> web.Response:
        stats.worker_errors += 1
        stats.count(502)
        message = f"the worker for model {model_id!r} {what}{_worker_gone(worker)}"
        message, level = self._cut_by_unload(model_id, message)
        log.log(level, "router: %s: %s", message, str(exc) or type(exc).__name__)
        return openai_error(errors.WorkerUnavailable(message))

    def _cut_by_unload(self, model_id: str, message: str) -> tuple[str, int]:
        """An answer cut because an operator unloaded the model (or the node stops) is what
        they asked for, not a worker failing: said so, at info."""
        record = self.registry.get(model_id)
        if record is None or record.stopping:
            return f"{message} (the model was being unloaded)", logging.INFO
        return message, logging.WARNING

    def _not_ready(self, record: ModelLifecycle) -> NeuronError:
        model_id = record.model_id
        if record.status is ModelStatus.FAILED:
            return errors.ModelFailed(
                f"model {model_id!r} failed: {record.last_error or 'no reason given'}",
                param="model")
        return errors.ModelNotReady(
            f"model {model_id!r} is {record.status.value}, not ready yet; retry in a few "
            "seconds", param="model", headers={"Retry-After": str(RETRY_AFTER_S)})

    def _unknown_model(self, model_id: str) -> NeuronError:
        return errors.ModelNotFound(
            f"model {model_id!r} is not loaded on this node; loaded: {self._loaded_ids()}",
            param="model")

    def _loaded_ids(self) -> str:
        ids = [r.model_id for r in self.registry.models() if r.serving_worker is not None]
        return ", ".join(ids) if ids else "none"


def setup(app: web.Application, registry: ModelRegistry,
          metrics: CollectorRegistry | None = None) -> Router:
    """Serve the `/v1` routes on `app`; the body limit is the node's `max_request_bytes`.
    The router's histograms are registered in `metrics`."""
    router = Router(registry, metrics)
    app[ROUTER_STATS] = router.stats
    registry.activity = router.stats.activity  # eviction takes only idle models
    app.cleanup_ctx.append(router.client_session)
    unsubscribe = registry.events.on_event(router.on_event)

    async def stop_following(app: web.Application) -> None:
        unsubscribe()

    app.on_cleanup.append(stop_following)

    async def stop_admitting(app: web.Application) -> None:
        router.stop_admitting()

    # on_shutdown runs after the listener closed and before in-flight handlers are waited
    # for (and, past shutdown_timeout, cancelled).
    app.on_shutdown.append(stop_admitting)
    app.router.add_get("/v1/models", router.list_models)
    # Model ids hold slashes (`Qwen/Qwen3-0.6B-GGUF`), hence the greedy pattern.
    app.router.add_get("/v1/models/{model_id:.+}", router.get_model)
    app.router.add_route("*", "/v1/{path:.*}", router.forward)
    return router
