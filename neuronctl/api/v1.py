"""The OpenAI-compatible router: one `/v1` base URL for every model on the node.

A request's `model` field picks the worker; the request goes there byte for byte and the
worker's answer comes back unchanged, server-sent events passed through as they arrive
(the exchange is upstream.py's). This module is the intake: method and path checks, the
bounded body, the model it names (loaded on demand from the catalogue), the model's queue,
clients that hang up, and the `/v1/models` view. The router answers by itself only when it
cannot forward, and then in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), never the control API's.

Its handlers return every error rather than raise it, so the control API's error
middleware never sees one to rewrite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from .. import errors
from ..errors import NeuronError
from ..events import ModelEvent
from ..states import ModelStatus, WorkerState
from ..suggest import did_you_mean
from ..supervisor.harness import Harness
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.registry import ModelRegistry
from ..supervisor.worker import Worker
from . import workererrors
from .auth import check_scope, principal
from .keyusage import MODEL_LABEL
from .metrics import RequestTimes
from .requestbody import read_limited, routing
from .traffic import ModelQueue, ModelStats, RouterStats, unloaded_for_good
from .upstream import OPENAI, Dialect, Upstream

log = logging.getLogger(__name__)

# Seconds a client is told to wait (Retry-After) for a model that is not ready yet.
NOT_READY_RETRY_S = 5
# How often requests waiting on a worker check that their clients are still there.
HANG_UP_CHECK_S = 0.25

# The router's counters, on the app for whoever reads them there (tests); the app's own
# handlers are given them where they are made.
ROUTER_STATS = web.AppKey("router_stats", RouterStats)


# What a request does once the model's worker has a slot for it: the exchange with the
# worker (given the model, the worker, the model's counters) and the answer to the client.
Exchange = Callable[[ModelLifecycle, Worker, ModelStats], Awaitable[web.StreamResponse]]
# The same for a whole route (`Router.route`): the request and the body it read come first.
RouteExchange = Callable[[web.Request, bytes, ModelLifecycle, Worker, ModelStats],
                         Awaitable[web.StreamResponse]]
# A route's own check of a body it has read (the router's `model` and `stream` aside),
# before any model is found or loaded for it: raises a NeuronError (a 400).
BodyCheck = Callable[[bytes], None]


def _model_entry(model: ModelLifecycle) -> dict[str, Any]:
    return {
        "id": model.spec.model_id,
        "object": "model",
        "created": int(model.since),
        "owned_by": "neuron",
        "status": model.status.value,
    }


def finishes_abandoned_answers(harness: Harness | None) -> bool:
    """Whether a worker of `harness` runs a non-streamed answer to its end even when its
    client has gone (see harness.py): the one place that asks, by getattr until the
    harness protocol declares it."""
    return bool(getattr(harness, "finishes_abandoned_answers", False))


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
    """`/v1`: intake (method, path, body, the model it names, an on-demand load), the
    model's queue, clients that hang up, and the `/v1/models` view; the exchange with the
    worker is `upstream.Upstream`'s."""

    def __init__(self, registry: ModelRegistry, stats: RouterStats, times: RequestTimes
                 ) -> None:
        self.registry = registry
        self.stats = stats
        self.times = times
        self.upstream = Upstream(registry)
        # Handlers waiting on a worker, checked for a client that hung up; see _check_clients.
        self._waiting: dict[asyncio.Task[Any], web.Request] = {}
        self._check_handle: asyncio.TimerHandle | None = None
        self._stopping: NeuronError | None = None  # set once the node begins to stop

    async def following(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the queues follow the models' events while the app serves."""
        unsubscribe = self.registry.events.on_event(self.on_event)
        try:
            yield
        finally:
            unsubscribe()
            if self._check_handle is not None:
                self._check_handle.cancel()
                self._check_handle = None

    async def shutting_down(self, app: web.Application) -> None:
        """on_shutdown, which runs after the listener closed and before in-flight handlers
        are waited for (and, past shutdown_timeout, cancelled): `stop_admitting`."""
        self.stop_admitting()

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

    def servable(self) -> dict[str, dict[str, Any]]:
        """What a request may name: loaded models, and catalogue models that a request
        would load (autoload), as `unloaded`."""
        entries = {m.model_id: _model_entry(m) for m in self.registry.models()
                   if m.serving_worker is not None}
        config = self.registry.config
        for model_id, spec in self.registry.catalogue.items():
            if model_id not in entries and config.autoloads(spec) \
                    and self.registry.get(model_id) is None:
                entries[model_id] = {"id": model_id, "object": "model", "created": 0,
                                     "owned_by": "neuron", "status": "unloaded"}
        return entries

    async def list_models(self, request: web.Request) -> web.Response:
        # A key sees the models its scope holds, no others (api/auth.py).
        key = principal(request)
        data = [e for model_id, e in self.servable().items() if key.may_use(model_id)]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        key = principal(request)
        if not key.may_use(model_id) or not self._known(model_id):
            # Outside the key's scope, word for word as an id the node never heard of:
            # nothing here may tell the key that the model exists (as /api/show).
            known = [other for other in self._ids() if key.may_use(other)]
            return OPENAI.answer(errors.ModelNotFound(
                f"model {model_id!r} not found{did_you_mean(model_id, known)}; "
                "GET /v1/models lists the models this node serves", param="model"))
        entry = self.servable().get(model_id)
        if entry is None:  # known to the key, but not servable now (loading, failed, ...)
            return OPENAI.answer(self._unknown_model(request, model_id))
        return web.json_response(entry)

    def _ids(self) -> list[str]:
        """Every model id the node knows: the catalogue's and those of its models."""
        return [*self.registry.catalogue, *(model.model_id for model in self.registry.models())]

    def _known(self, model_id: str) -> bool:
        return model_id in self.registry.catalogue or self.registry.get(model_id) is not None

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """The `/v1` catch-all: the request goes to its model's worker as it came."""
        return await self.route(request, self._pass_through)

    async def _pass_through(self, request: web.Request, body: bytes, model: ModelLifecycle,
                            worker: Worker, stats: ModelStats) -> web.StreamResponse:
        dialect = (_embeddings(model.model_id, model.spec.harness)
                   if request.path == "/v1/embeddings" else OPENAI)
        return await self.upstream.exchange(request, body, model.model_id, worker, stats,
                                            dialect)

    async def route(self, request: web.Request, exchange: RouteExchange,
                    dialect: Dialect = OPENAI, check: BodyCheck | None = None
                    ) -> web.StreamResponse:
        """A `/v1` route (the catch-all, Anthropic's `/v1/messages`): intake (method, path,
        the bounded body, `check` of it), then `serve`; the router's own refusals answered
        in `dialect`'s shape."""
        try:
            if request.method != "POST":
                raise errors.MethodNotAllowed(
                    f"{request.method} is not allowed on {request.path}; POST a JSON body "
                    "that names a model", headers={"Allow": "POST"})
            _check_target(request)
            _check_path(request)
            return await self._forward(request, exchange, check)
        except NeuronError as exc:
            return dialect.answer(exc)
        except ConnectionError:  # the client left while its body was being read
            return web.Response(status=400)  # nobody will read it
        except Exception:
            log.exception("router: unhandled error in %s %s", request.method, request.path)
            return dialect.answer(NeuronError("internal error; see the neuron service log"))

    async def _forward(self, request: web.Request, exchange: RouteExchange,
                       check: BodyCheck | None) -> web.StreamResponse:
        # Read per request, so a config reload that changes it applies at once.
        config = self.registry.config
        limit = config.max_request_bytes
        body = await read_limited(request.content, request.content_length, limit,
                                  self.stats.queued_bytes, config.max_queued_bytes)
        if body is None:
            raise errors.PayloadTooLarge(
                f"request body too large (limit {limit} bytes; max_request_bytes in "
                "the node config)")
        # Only the bytes wait in the queue, never the parsed JSON (see requestbody.py).
        model_id, stream = (fields := routing(body)).model, fields.stream
        if check is not None:
            check(body)
        if model_id is None:
            raise errors.ModelNotFound(
                f"request names no model; models on this node: {self._loaded_ids(request)}",
                param="model")

        async def with_body(model: ModelLifecycle, worker: Worker, stats: ModelStats
                            ) -> web.StreamResponse:
            return await exchange(request, body, model, worker, stats)

        return await self.serve(request, model_id, len(body), stream, with_body)

    def check_scope(self, request: web.Request, model_id: str) -> None:
        """Refuse (403) a model outside the request's key's scope; either way the key's
        usage is counted under the model when the node knows it (a bounded label)."""
        if model_id in self.registry.catalogue or self.registry.get(model_id) is not None:
            request[MODEL_LABEL] = model_id
        check_scope(request, model_id)

    async def serve(self, request: web.Request, model_id: str, size: int, stream: bool,
                    exchange: Exchange, keep_alive_s: float | None = None
                    ) -> web.StreamResponse:
        """One request for `model_id` through the node's machinery, whichever API it came
        in by: the model found (loaded on demand), counted, queued (`size`: the bytes that
        wait), a client that hangs up noticed, then `exchange` with the worker. `stream`:
        whether the worker is asked for a stream (a non-streamed answer of a harness that
        finishes abandoned answers keeps its slot to the end). `keep_alive_s`: the idle
        time the request asked for (Ollama's keep_alive; None: the config's ttl_s).
        Refusals are raised, for the caller to answer in its API's shape."""
        if self._stopping is not None:
            raise self._stopping
        self.check_scope(request, model_id)  # before anything is loaded for it
        model = self.registry.get(model_id)
        if model is None or model.stopping:
            # Not loaded (or being unloaded): a catalogue model with autoload is loaded for
            # it, and the request waits in its queue like any other.
            model = await self.registry.demand(model_id)
        if model is None:
            raise self._unknown_model(request, model_id)
        if model.stopping:  # being unloaded, and not loaded again on demand
            raise errors.ModelNotReady(f"model {model_id!r} is being unloaded", param="model")
        stats = self._stats_for(model)
        stats.requests += 1
        stats.last_used = time.monotonic()
        # Each request says how long the model stays (Ollama's rule): none, the config's.
        # A pinned model is the operator's to keep.
        stats.keep_alive_s = None if self.registry.config.pinned(model.spec) else keep_alive_s
        task = self._watch_client(request)  # a client that hangs up leaves the queue too
        # A worker that cannot stop an answer its client no longer waits for (see
        # harness.py) keeps its slot until it is done: the request is not cancelled once
        # it is forwarded, or the next one would reach a worker still busy.
        finishes = not stream and finishes_abandoned_answers(
            self.registry.harnesses.get(model.spec.harness))

        def admitted() -> None:
            if finishes:
                del self._waiting[task]  # no longer cancelled when its client hangs up

        try:
            # The queue takes turns between keys (api/auth.py says whose request it is).
            return await self._admitted(size, model, stats, admitted, exchange,
                                        principal(request).name)
        except NeuronError as refusal:
            stats.reject(refusal)
            raise
        finally:
            self._waiting.pop(task, None)

    async def _admitted(self, size: int, model: ModelLifecycle, stats: ModelStats,
                        on_admitted: Callable[[], None], exchange: Exchange, key: str
                        ) -> web.StreamResponse:
        """Wait for a slot of the model's worker (it may still be loading), then forward."""
        model_id = model.model_id
        if model.status is ModelStatus.FAILED:
            raise self._not_ready(model)
        max_queue, timeout_s = model.queue_limits()
        max_bytes = self.registry.config.max_queued_bytes
        if stats.queue.serving and stats.queue.slots != max(1, model.slots):
            # Its worker said how many slots it serves after it was ready (lifecycle.py
            # reads them beside the first requests): the queue follows from this one on.
            stats.queue.ready(model.slots)
        async with stats.queue.admit(max_queue, timeout_s, size, max_bytes, key) as waited:
            if self.stats.keeps(model_id, stats):
                self.times.queue_wait.labels(model_id).observe(waited)
            current = self.registry.get(model_id)  # a reload may have replaced it
            worker = current.serving_worker if current is not None else None
            if worker is None:
                raise self._not_ready(current or model)
            on_admitted()
            stats.in_flight += 1
            started = time.monotonic()
            try:
                return await exchange(current or model, worker, stats)
            except asyncio.CancelledError:  # the client left (or the node is shutting down)
                stats.client_disconnects += 1
                raise
            finally:
                stats.in_flight -= 1
                stats.last_used = time.monotonic()
                self.registry.request_ended()  # a load waiting for room may go on
                if self.stats.keeps(model_id, stats):  # to the last byte, streams included
                    self.times.latency.labels(model_id).observe(time.monotonic() - started)

    def _stats_for(self, model: ModelLifecycle) -> ModelStats:
        fresh = model.model_id not in self.stats.models
        stats = self.stats.model(model.model_id)
        if fresh:  # a queue made now starts from the model's state; events keep it so
            self._follow(stats.queue, model)
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
            stats.keep_alive_s = None  # a keep_alive lasts while the model does
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

    def _not_ready(self, model: ModelLifecycle) -> NeuronError:
        model_id = model.model_id
        if model.status is ModelStatus.FAILED:
            return errors.ModelFailed(
                f"model {model_id!r} failed: {model.last_error or 'no reason given'}",
                param="model")
        return errors.ModelNotReady(
            f"model {model_id!r} is {model.status.value}, not ready yet; retry in a few "
            "seconds", param="model", headers={"Retry-After": str(NOT_READY_RETRY_S)})

    def _unknown_model(self, request: web.Request, model_id: str) -> NeuronError:
        # A typo gets the nearest id the node knows; a catalogue model that does not load
        # on demand, how to load it. Only ids the request's key may use are named.
        key = principal(request)
        known = [other for other in self._ids() if key.may_use(other)]
        why = " (it loads on `neuronctl load` only: autoload is off)" \
            if model_id in known else did_you_mean(model_id, known)
        return errors.ModelNotFound(
            f"model {model_id!r} is not loaded on this node{why}; loaded: "
            f"{self._loaded_ids(request)}", param="model")

    def _loaded_ids(self, request: web.Request) -> str:
        key = principal(request)
        ids = [m.model_id for m in self.registry.models()
               if m.serving_worker is not None and key.may_use(m.model_id)]
        return ", ".join(ids) if ids else "none"


def _embeddings(model_id: str, harness: str) -> Dialect:
    """OpenAI's dialect, but a worker started without embeddings (its 500 or 501) is the
    request's 400 `embeddings_not_enabled` saying what to set; other refusals pass on."""

    def embeddings_off(status: int, body: bytes) -> NeuronError | None:
        said = workererrors.worker_error(status, body)
        if not workererrors.embeddings_off(status, said):
            return None
        return errors.EmbeddingsNotEnabled(
            workererrors.embeddings_hint(model_id, harness, said), param="model")

    return dataclasses.replace(OPENAI, worker_errors=embeddings_off)
