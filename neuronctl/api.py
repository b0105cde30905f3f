"""The control API: an aiohttp app over the model registry.

Every answer is JSON, errors included (`{"error": "..."}`): one middleware turns whatever
went wrong into that shape, so no client ever sees an HTML page or a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import __version__, router
from .auth import api_key_middleware
from .config import ConfigError, model_spec_from_mapping
from .discovery import Discovery
from .harness import LoadError
from .idle import idle_unload_ctx
from .metrics import Metrics
from .registry import Conflict, ModelRegistry, NotFound
from .reload import Reloader
from .states import ModelStatus

log = logging.getLogger(__name__)

REGISTRY = web.AppKey("registry", ModelRegistry)
DISCOVERY = web.AppKey("discovery", Discovery)
STARTED_AT = web.AppKey("started_at", float)
RELOADER = web.AppKey("reloader", Reloader)
MAX_BODY_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
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
        response = error(exc.status, message)
        if "Allow" in exc.headers:  # RFC 9110: a 405 names the methods that would work
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error(500, "internal error; see the neuron service log")


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(reason="request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="request body must be a JSON object")
    return body


async def list_models(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.json_response([r.to_json() for r in registry.models()])


async def load_model(request: web.Request) -> web.Response:
    body = await _json_object(request)
    try:
        spec = model_spec_from_mapping(body)
    except ConfigError as exc:
        return error(400, str(exc))
    if spec.path is not None and not spec.path.is_absolute():
        # Relative to what? The daemon's working directory is / under systemd.
        return error(400, f"path: must be absolute, got {str(spec.path)!r}")
    registry = request.app[REGISTRY]
    try:
        record = await registry.load(spec)
    except Conflict as exc:
        return error(409, str(exc))
    except LoadError as exc:
        record_ = registry.get(spec.model_id)
        return error(400, exc.message, model=record_.to_json() if record_ else None)
    return web.json_response({"status": "loaded", "model": record.to_json()})


async def unload_model(request: web.Request) -> web.Response:
    body = await _json_object(request)
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        return error(400, "model_id: required, a string")
    try:
        await request.app[REGISTRY].unload(model_id)
    except NotFound as exc:
        return error(404, str(exc))
    except Conflict as exc:
        return error(409, str(exc))
    return web.json_response({"status": "unloaded", "model_id": model_id})


async def model_endpoint(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    record = request.app[REGISTRY].get(model_id)
    if record is None:
        return error(404, f"model not loaded: {model_id}")
    if record.status is not ModelStatus.LOADED or record.worker is None:
        return error(404, f"model {model_id} is {record.status.value}, not loaded")
    return web.json_response({"url": record.worker.endpoint})


async def health(request: web.Request) -> web.Response:
    app = request.app
    counts: dict[str, int] = {s.value: 0 for s in ModelStatus}
    for record in app[REGISTRY].models():
        counts[record.status.value] += 1
    gpus = await app[DISCOVERY].gpus()
    return web.json_response({
        "status": "ok",
        "version": __version__,
        "uptime_s": round(time.monotonic() - app[STARTED_AT], 3),
        "models": counts,
        "gpus": [asdict(g) for g in gpus],
    })


async def discovery(request: web.Request) -> web.Response:
    app = request.app
    harnesses = sorted(app[REGISTRY].harnesses)
    return web.json_response(await app[DISCOVERY].host(harnesses))


async def reload_config(request: web.Request) -> web.Response:
    reloader = request.app.get(RELOADER)
    if reloader is None:
        return error(404, "this server was started without a config file to reload")
    try:
        result = await reloader.reload()
    except ConfigError as exc:
        return error(400, f"reload refused, nothing changed: {exc}")
    return web.json_response(result.to_json())


def create_app(
    registry: ModelRegistry,
    started_at: float | None = None,
    reloader: Reloader | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The node's HTTP API. `metrics` is made before activation by the daemon, so the default
    models' loads are counted; tests may leave it out."""
    middlewares: list[Middleware] = [json_errors]
    if registry.config.api_key is not None:
        # First, so nothing (not even an error page) is served to a caller without the key.
        middlewares.insert(0, api_key_middleware(registry.config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[REGISTRY] = registry
    app[DISCOVERY] = registry.discovery  # one poller for the API and VRAM admission
    app[STARTED_AT] = time.monotonic() if started_at is None else started_at
    app.router.add_get("/models", list_models)
    app.router.add_post("/models/load", load_model)
    app.router.add_post("/models/unload", unload_model)
    # Model ids hold slashes (`Qwen/Qwen3-0.6B-GGUF`), hence the greedy pattern.
    app.router.add_get("/models/{model_id:.+}/endpoint", model_endpoint)
    app.router.add_get("/health", health)
    app.router.add_get("/discovery", discovery)
    app.router.add_post("/reload", reload_config)
    if reloader is not None:
        app[RELOADER] = reloader
    routes = router.setup(app, registry)  # the OpenAI-compatible /v1 routes
    app.cleanup_ctx.append(idle_unload_ctx(registry))  # ttl_s: unload idle models
    metrics = metrics or Metrics(registry, app[STARTED_AT])
    metrics.attach(routes.stats)
    app.router.add_get("/metrics", metrics.handle)
    return app
