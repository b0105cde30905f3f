"""The model store over HTTP: `POST /models/pull` (download without loading, progress on
`/models/events`), `GET /models/pulls`, `GET /models/store` (what the caches hold) and
`GET /models/{id}/show` (header facts and the fit per GPU).

The work is the models layer's (models/pulls.py, store.py, facts.py); this module checks
what a client asks for, runs the blocking parts in threads and answers JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import errors
from ..config import ModelSpec, model_id_problem
from ..identity import is_loopback
from ..models import facts, store
from ..models.gguf import BadHeader, CannotEstimate
from ..models.hub import ResolveError, from_hub
from ..models.pulls import FAILED
from ..supervisor.registry import ModelRegistry

ReadJson = Callable[[web.Request], Awaitable[dict[str, Any]]]


def _name(body: dict[str, Any], key: str = "model_id") -> str:
    name = body.get(key)
    if not isinstance(name, str):
        raise errors.InvalidValue(f"{key}: required, a model id or ORG/REPO[:QUANT]",
                                  param=key)
    problem = model_id_problem(name.partition(":")[0])
    if problem is not None:
        raise errors.InvalidValue(f"{key}: {problem}", param=key)
    return name


def _spec(registry: ModelRegistry, name: str) -> ModelSpec:
    try:
        return store.spec_of(registry.config, name)
    except ValueError as exc:
        raise errors.InvalidValue(str(exc), param="model_id") from None


class StoreRoutes:
    """The handlers, over the node's registry; `read_json` reads a control body as every
    control route does (app.py: bounded, counted against max_queued_bytes)."""

    def __init__(self, registry: ModelRegistry, read_json: ReadJson) -> None:
        self.registry = registry
        self.read_json = read_json

    def routes(self) -> list[web.RouteDef]:
        """Before app.py's greedy `/models/{model_id:.+}/...` routes: fixed paths first."""
        return [
            web.post("/models/pull", self.pull),
            web.get("/models/pulls", self.pulls),
            web.get("/models/store", self.cached),
            web.get("/models/{model_id:.+}/show", self.show),
        ]

    async def pull(self, request: web.Request) -> web.Response:
        return await pull(self.registry, request, await self.read_json(request))

    async def pulls(self, request: web.Request) -> web.Response:
        return web.json_response([p.as_json() for p in self.registry.pulls.all()])

    async def cached(self, request: web.Request) -> web.Response:
        """`neuronctl models --json`'s answer, as the daemon's user sees its caches."""
        registry = self.registry
        loaded = [m.model_id for m in registry.models() if m.serving_worker is not None]
        listing = await asyncio.to_thread(store.listing, registry.config, loaded)
        return web.json_response(listing)

    async def show(self, request: web.Request) -> web.Response:
        return await show(self.registry, request.match_info["model_id"])


async def pull(registry: ModelRegistry, request: web.Request,
               body: dict[str, Any]) -> web.Response:
    """Queue a download; with `"wait": true`, answer when it is over (its error, if it
    failed: 507 for a full disk, 502 for the Hub)."""
    name = _name(body)
    wait = body.get("wait", False)
    if not isinstance(wait, bool):
        raise errors.InvalidValue("wait: must be true or false", param="wait")
    if (name not in registry.catalogue and not registry.config.allow_remote_loads
            and not is_loopback(request.remote)):
        raise errors.RemoteLoadRefused(
            "pulls from other hosts may name a catalogue model only, not a Hugging Face "
            "repo; pull it on the node itself or set allow_remote_loads = true")
    spec = _spec(registry, name)
    if not from_hub(spec):
        raise errors.InvalidValue(f"{name} has a local path; there is nothing to pull",
                                  param="model_id")
    entry = registry.pulls.request(spec, "client")
    if not wait:
        return web.json_response({"status": entry.state, "pull": entry.as_json()}, status=202)
    await entry.done.wait()
    if entry.state == FAILED:
        failure = entry.failure or errors.DownloadError(entry.error or "pull failed")
        return web.json_response(failure.control_body(pull=entry.as_json()),
                                 status=failure.status)
    return web.json_response({"status": entry.state, "pull": entry.as_json()})


async def show(registry: ModelRegistry, model_id: str) -> web.Response:
    """A catalogue model, or one loaded: the file it loads (from its `path`, or the cache:
    nothing is downloaded), its header and its fit on each GPU."""
    loaded = registry.get(model_id)
    spec = registry.catalogue.get(model_id) or (loaded.spec if loaded is not None else None)
    if spec is None:
        raise errors.ModelNotFound(f"no such model in the catalogue or loaded: {model_id}")
    try:
        parts = await asyncio.to_thread(facts.local_parts, registry.config, spec)
    except ResolveError as exc:
        raise errors.ModelNotFound(
            f"{exc.message}; download it first (neuronctl pull {model_id})") from None
    gpus = await registry.discovery.gpus()
    try:
        answer = await facts.show(registry.config, spec, parts, gpus)
    except (BadHeader, CannotEstimate) as exc:
        raise errors.ModelFileError(f"{model_id}: cannot read its GGUF header: {exc}") from None
    answer["loaded"] = loaded is not None and loaded.serving_worker is not None
    return web.json_response(answer)

