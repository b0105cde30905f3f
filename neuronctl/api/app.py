"""The node's aiohttp app: its route table, the control routes' handlers, and the JSON
error middleware.

Every route the node serves is listed in `routes()`. The control routes answer JSON,
errors included (`{"error": "...", "type": ..., "code": ...}`): one middleware turns
whatever went wrong into that shape, with the status errors.py gives it, so no client ever
sees an HTML page or a traceback. `/v1` answers errors in OpenAI's shape itself (v1.py),
`/api` in Ollama's (ollama.py), `/v1/messages` in Anthropic's (messages.py); the dashboard's
page and assets, `/metrics` and a model's logs are not JSON, and a client that left before
its answer gets an empty 400 nobody reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from .. import __version__, errors
from ..config import (
    ConfigError,
    ModelSpec,
    model_id_problem,
    model_spec_from_mapping,
    same_worker,
)
from ..errors import NeuronError
from ..identity import INCARNATION_HEADER, NODE_HEADER, NodeIdentity, is_loopback
from ..models.discovery import Discovery
from ..states import ModelStatus
from ..supervisor.harness import check_args_from_api, unavailable
from ..supervisor.registry import ModelRegistry
from ..supervisor.reload import Reloader
from . import dashboard
from .auth import KeyCheck, principal
from .crosssite import same_site_middleware
from .events_sse import STREAMS, EventStreams
from .idle import IdleReaper
from .logstream import FOLLOWERS, LogFollowers
from .messages import Messages
from .metrics import Metrics
from .ollama import OllamaApi
from .ratelog import RateLimitedLog
from .requestbody import read_limited
from .store import StoreRoutes
from .traffic import RouterStats
from .v1 import ROUTER_STATS, Router

log = logging.getLogger(__name__)

REGISTRY = web.AppKey("registry", ModelRegistry)
DISCOVERY = web.AppKey("discovery", Discovery)
STARTED_AT = web.AppKey("started_at", float)
RELOADER = web.AppKey("reloader", Reloader)
RELOAD_REFUSALS = web.AppKey("reload_refusals", RateLimitedLog)
IDENTITY = web.AppKey("identity", NodeIdentity)
KEYS = web.AppKey("keys", KeyCheck)
MAX_BODY_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: NeuronError, **extra: Any) -> web.Response:
    return web.json_response(exc.control_body(**extra), status=exc.status, headers=exc.headers)


# aiohttp's own refusals (no such route, a body over the limit), in our shape.
_HTTP_ERRORS: dict[int, type[NeuronError]] = {
    404: errors.NotFound, 405: errors.MethodNotAllowed, 413: errors.PayloadTooLarge,
}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NeuronError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason
        if exc.status == 413:
            message = f"request body too large (limit {MAX_BODY_BYTES} bytes)"
        elif exc.status == 404 and request.match_info.route.resource is None:
            message = f"no such route: {request.method} {request.path}"
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            message = f"method {request.method} not allowed on {request.path} (allowed: {allowed})"
        kind = _HTTP_ERRORS.get(exc.status, errors.BadRequest)
        refusal = kind(message)
        response = web.json_response(refusal.control_body(), status=exc.status)
        if "Allow" in exc.headers:  # RFC 9110: a 405 names the methods that would work
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionError:  # the client left, or its body stalled (guard.BodyTimeout)
        return web.Response(status=400)  # nobody will read it
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(NeuronError("internal error; see the neuron service log"))


async def _json_object(request: web.Request) -> dict[str, Any]:
    # Read as /v1 bodies are: what has arrived counts against the node's max_queued_bytes,
    # so connections trickling 1 MiB bodies cannot pile memory up (requestbody.py).
    budget = request.app[ROUTER_STATS].queued_bytes
    max_bytes = request.app[REGISTRY].config.max_queued_bytes
    raw = await read_limited(request.content, request.content_length, MAX_BODY_BYTES,
                             budget, max_bytes)  # QueueBytesFull past the budget
    if raw is None:
        raise errors.PayloadTooLarge(f"request body too large (limit {MAX_BODY_BYTES} bytes)")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise errors.InvalidJson("request body is not valid JSON") from None
    except RecursionError:
        raise errors.InvalidJson("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise errors.InvalidJson("request body must be a JSON object")
    return body


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(request.app[REGISTRY].listing())


def checked_spec(request: web.Request, body: dict[str, Any]) -> ModelSpec:
    """The spec a load request's body means, with every check a client's load passes
    (`POST /models/load`, Ollama's `/api/pull`): the body, remote loads, `args`."""
    try:
        spec = model_spec_from_mapping(body)
    except ConfigError as exc:
        raise errors.InvalidSpec(str(exc), param=exc.key or None) from None
    if spec.path is not None and not spec.path.is_absolute():
        # Relative to what? The daemon's working directory is / under systemd.
        raise errors.InvalidSpec(f"path: must be absolute, got {errors.clip(spec.path)!r}",
                                 param="path")
    registry = request.app[REGISTRY]
    _check_remote_load(request, registry, spec, body.keys())
    spec = registry.spec_for(spec, body.keys())  # a catalogue id alone: its entry
    if "args" in body:  # against the harness that will run it (a catalogue entry's)
        _check_args(registry, spec)
    return spec


async def load_model(request: web.Request) -> web.Response:
    body = await _json_object(request)
    spec = checked_spec(request, body)
    registry = request.app[REGISTRY]
    before = registry.get(spec.model_id)
    already = before is not None and before.status is ModelStatus.LOADED \
        and same_worker(before.spec, spec)
    try:
        model = await registry.load(spec, by_client=True)
    except errors.LoadError as exc:
        failed = registry.get(spec.model_id)
        return error_response(exc, model=failed.to_json() if failed else None)
    # `already_loaded`: nothing was started; `evicted`: what was unloaded to make room.
    return web.json_response({"status": "loaded", "model": model.to_json(),
                              "already_loaded": already, "evicted": list(model.evicted)})


# What a client on another host may set when it loads a catalogue model: an allow-list,
# as for `args`. Everything else is the operator's: a file, a repo, flags, but also `force`
# (past the memory checks), `chat_format` (every user's prompts), `pinned`, the queue.
REMOTE_LOAD_KEYS = frozenset({"model_id", "n_ctx", "ttl_s"})


def _check_remote_load(request: web.Request, registry: ModelRegistry, spec: ModelSpec,
                       keys: Collection[str]) -> None:
    """A client on another host loads catalogue models by id, with its own `n_ctx` and
    `ttl_s` at most, unless the operator opted in (docs/security.md)."""
    if registry.config.allow_remote_loads or is_loopback(request.remote):
        return
    refused = sorted(set(keys) - REMOTE_LOAD_KEYS)
    if not refused and spec.model_id in registry.catalogue:
        return
    what = (", ".join(refused) if refused else
            f"a model that is not in the catalogue ({spec.model_id!r} would be a Hugging "
            "Face repo)")
    raise errors.RemoteLoadRefused(
        f"loads from other hosts may name a catalogue model with its n_ctx and ttl_s only, "
        f"not {what}; load it on the node itself, add it to the catalogue, or set "
        "allow_remote_loads = true")


def _check_args(registry: ModelRegistry, spec: ModelSpec) -> None:
    harness = registry.harnesses.get(spec.harness)
    if harness is None:
        return  # refused as an unknown harness by the load itself
    widened = registry.config.harness_config(spec.harness).api_args
    try:
        check_args_from_api(harness, spec.args, widened)
    except ConfigError as exc:
        raise errors.ArgNotAllowed(str(exc), param=exc.key or None) from None


async def unload_model(request: web.Request) -> web.Response:
    body = await _json_object(request)
    model_id = body.get("model_id")
    if model_id is None:
        raise errors.InvalidValue("model_id: required, a string", param="model_id")
    problem = model_id_problem(model_id)
    if problem is not None:
        raise errors.InvalidValue(f"model_id: {problem}", param="model_id")
    await request.app[REGISTRY].unload(model_id)  # ModelNotFound, Conflict
    return web.json_response({"status": "unloaded", "model_id": model_id})


async def model_endpoint(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    model = request.app[REGISTRY].get(model_id)
    if model is None:
        raise errors.ModelNotFound(f"model not loaded: {model_id}")
    worker = model.serving_worker
    if worker is None:
        raise errors.ModelNotFound(f"model {model_id} is {model.status.value}, not loaded")
    return web.json_response({"url": worker.endpoint})


async def health(request: web.Request) -> web.Response:
    app = request.app
    counts: dict[str, int] = {s.value: 0 for s in ModelStatus}
    registry = app[REGISTRY]
    # From the states alone: /health is what monitors poll, and listing() measures memory.
    models = registry.models()
    for model in models:
        counts[model.status.value] += 1
    listed = {m.model_id for m in models}
    counts[ModelStatus.UNLOADED.value] += sum(m not in listed for m in registry.catalogue)
    gpus = await app[DISCOVERY].gpus()
    return web.json_response({
        "status": "ok",
        **app[IDENTITY].to_json(),
        "version": __version__,
        "uptime_s": round(time.monotonic() - app[STARTED_AT], 3),
        "models": counts,
        "gpus": [asdict(g) for g in gpus],
    })


async def discovery(request: web.Request) -> web.Response:
    app = request.app
    why_not = {name: unavailable(h) for name, h in app[REGISTRY].harnesses.items()}
    body = await app[DISCOVERY].host(sorted(n for n, why in why_not.items() if why is None))
    # Configured, or built in, but not runnable here (llama-server not installed, say).
    body["harnesses_unavailable"] = {n: why for n, why in sorted(why_not.items()) if why}
    body.update(app[IDENTITY].to_json())
    return web.json_response(body)


async def reload_config(request: web.Request) -> web.Response:
    reloader = request.app.get(RELOADER)
    if reloader is None:
        raise errors.NotFound("this server was started without a config file to reload")
    dry_run = request.query.get("dry_run", "").lower() in ("1", "true", "yes")
    try:
        result = await reloader.reload(dry_run=dry_run)
    except ConfigError as exc:
        # SIGHUP's refusals reach the journal too: whoever reads it later sees both.
        request.app[RELOAD_REFUSALS].log(
            "reload (POST /reload from %s) refused, nothing changed: %s",
            request.remote or "?", exc, key=str(exc))
        raise errors.InvalidConfig(f"reload refused, nothing changed: {exc}") from None
    return web.json_response(result.to_json())


async def _identity_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer names the node and its incarnation, so a client that reads `/models`
    (a list) knows whose list it is without a second request."""
    identity = request.app[IDENTITY]
    response.headers[NODE_HEADER] = identity.node_id
    response.headers[INCARNATION_HEADER] = identity.incarnation


async def key_self(request: web.Request) -> web.Response:
    """Who the key that asked is: its name and roles (the dashboard hides what it may not
    do), never the key."""
    key = principal(request)
    return web.json_response({"name": key.name, "roles": sorted(key.roles),
                              "models": list(key.models), "rpm": key.rpm,
                              "max_concurrent": key.max_concurrent})


def key_usage(metrics: Metrics) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response(metrics.key_usage.to_json())

    return handle


def routes(router: Router, streams: EventStreams, followers: LogFollowers,
           metrics: Metrics, stats: RouterStats, ollama: OllamaApi,
           store: StoreRoutes | None = None) -> list[web.RouteDef]:
    """Every route the node serves. Model ids hold slashes (`Qwen/Qwen3-0.6B-GGUF`), hence
    the greedy patterns; `/v1/models` and Anthropic's `/v1/messages` come before the `/v1`
    catch-all that forwards."""
    messages = Messages(router)
    return [
        *dashboard.asset_routes(),  # GET /, /ui/app.js, /ui/app.css: open (auth.py)
        web.get("/health", health),
        web.get("/discovery", discovery),
        web.get("/models", list_models),
        web.post("/models/load", load_model),
        web.post("/models/unload", unload_model),
        web.get("/models/events", streams.handle),
        web.get("/models/stats", dashboard.model_stats(stats)),
        # pull, pulls, store and {id}/show: store.py (the fixed paths before the greedy ones)
        *(store.routes() if store is not None else []),
        web.get("/models/{model_id:.+}/endpoint", model_endpoint),
        web.get("/models/{model_id:.+}/logs", followers.handle),
        web.post("/reload", reload_config),
        web.get("/metrics", metrics.handle),
        web.get("/keys/usage", key_usage(metrics)),
        web.get("/keys/self", key_self),
        web.get("/v1/models", router.list_models),
        web.get("/v1/models/{model_id:.+}", router.get_model),
        web.route("*", "/v1/messages", messages.handle),
        web.route("*", "/v1/messages/count_tokens", messages.handle),
        web.route("*", "/v1/{path:.*}", router.forward),
        *ollama.routes(),  # /api/...: Ollama's API, through the same router (ollama.py)
    ]


def create_app(
    registry: ModelRegistry,
    started_at: float | None = None,
    reloader: Reloader | None = None,
    metrics: Metrics | None = None,
    identity: NodeIdentity | None = None,
    stats: RouterStats | None = None,
) -> web.Application:
    """The node's HTTP API. `stats`: the router's counters, made by whoever made
    `registry` and given to it as its `activity` (the daemon); a fresh set otherwise, for
    tests that build an app alone (their registry then sees every model idle unless it was
    made with the same). `metrics` is made before activation by the daemon, over the same
    `stats`, so the default models' loads are counted; tests may leave it out.
    `identity`: a new incarnation unless given (one app per supervisor start)."""
    if stats is None:
        stats = metrics.stats if metrics is not None else RouterStats()
    started_at = time.monotonic() if started_at is None else started_at
    metrics = metrics or Metrics(registry, stats, started_at)
    keys = KeyCheck(lambda: registry.config, metrics.key_usage)
    middlewares: list[Middleware] = [
        # Outermost: a cross-site or rebound request is refused whatever key it carries.
        same_site_middleware(lambda: registry.config),
        # Early, so nothing (not even an error page) is served to a caller without a key
        # that may ask for it; read per request, so a reload rotates keys.
        keys.middleware,
        json_errors,
    ]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[REGISTRY] = registry
    app[DISCOVERY] = registry.discovery  # one poller for the API and VRAM admission
    app[STARTED_AT] = started_at
    app[IDENTITY] = identity or NodeIdentity.new(registry.config)
    app[KEYS] = keys
    if reloader is not None:
        app[RELOADER] = reloader
        app[RELOAD_REFUSALS] = RateLimitedLog(log, "reloads refused", level=logging.ERROR)
    if metrics.stats is not stats:
        raise ValueError("metrics made over other router counters than the app's")
    router = Router(registry, stats, metrics.requests)
    streams = EventStreams(registry, traffic=stats.traffic)
    followers = LogFollowers(registry)
    app[ROUTER_STATS] = stats
    app[STREAMS] = streams
    app[FOLLOWERS] = followers
    store = StoreRoutes(registry, _json_object)
    ollama = OllamaApi(registry, router, checked_spec)
    app.router.add_routes(routes(router, streams, followers, metrics, stats, ollama, store))
    app.on_response_prepare.append(_identity_headers)
    app.cleanup_ctx.extend([
        router.upstream.client_session,  # one pooled client for every worker
        router.following,  # the queues follow the models' events
        IdleReaper(registry, stats.activity).running,  # ttl_s: unload idle models
    ])
    # Long-lived answers end, and waiting /v1 requests answer 503, as the node stops.
    app.on_shutdown.extend([router.shutting_down, streams.close, followers.close])

    async def stop_metrics(app: web.Application) -> None:
        metrics.unsubscribe()

    app.on_cleanup.extend([followers.release, stop_metrics])
    return app
