"""The role every route needs: the one table (docs/security.md prints it).

Keyed by the route's path as aiohttp's router spells it (`resource.canonical`: the
pattern without its regex, `/models/{model_id}/logs`), whatever the method: no path of the
node mixes roles across methods. `tests/api/test_roles.py` walks the app's own router, so a
route added without a line here fails it; at run time such a route needs `admin` (closed,
not open, by default).

`inference` is model-serving: its requests count against a key's `rpm` and
`max_concurrent` and are told apart per key in the metrics, whichever API they come by
(OpenAI's `/v1`, Anthropic's `/v1/messages`, Ollama's `/api/...`).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from ..keys import ADMIN, ANY_KEY, INFERENCE, READ
from .dashboard import ASSETS

OPEN = None  # no key needed

ROUTE_ROLES: Mapping[str, str | None] = {
    # Liveness probes carry no secrets; nor do the dashboard's page and assets (static
    # files; the page asks for a key before it reads anything).
    "/health": OPEN,
    **{path: OPEN for path in ASSETS},
    # What the node is and does, for monitoring and the dashboard.
    "/discovery": READ,
    "/models": READ,
    "/models/events": READ,
    "/models/stats": READ,
    "/models/{model_id}/logs": READ,
    "/models/pulls": READ,
    "/models/store": READ,
    "/models/{model_id}/show": READ,
    "/metrics": READ,
    # Changes what runs, or reaches a worker past the router's keys and limits.
    "/models/load": ADMIN,
    "/models/unload": ADMIN,
    "/models/pull": ADMIN,  # downloads into the node's cache
    "/models/{model_id}/endpoint": ADMIN,
    "/reload": ADMIN,
    "/keys/usage": ADMIN,
    "/keys/self": ANY_KEY,
    # OpenAI's API.
    "/v1/models": INFERENCE,
    "/v1/models/{model_id}": INFERENCE,
    "/v1/{path}": INFERENCE,
    # Anthropic's Messages API.
    "/v1/messages": INFERENCE,
    "/v1/messages/count_tokens": INFERENCE,
    # Ollama's API: serving and listing models is inference; what downloads, creates or
    # deletes models (`pull` loads what it fetched) is admin.
    "/api/version": INFERENCE,
    "/api/tags": INFERENCE,
    "/api/ps": INFERENCE,
    "/api/show": INFERENCE,
    "/api/chat": INFERENCE,
    "/api/generate": INFERENCE,
    "/api/embed": INFERENCE,
    "/api/embeddings": INFERENCE,
    "/api/pull": ADMIN,
    "/api/delete": ADMIN,
    "/api/create": ADMIN,
    "/api/copy": ADMIN,
    "/api/push": ADMIN,
}


# Routes of the inference role that serve no model, only say what the node has: a key's
# limits (rpm, max_concurrent) and its usage count requests of models, not these (clients
# poll them: Open WebUI asks /api/tags every few seconds).
LISTINGS = frozenset({"/v1/models", "/v1/models/{model_id}", "/api/version", "/api/tags",
                      "/api/ps", "/api/show"})


def route_path(request: web.Request) -> str | None:
    """The pattern of the route `request` matched; None when it matched none (a 404, a
    405: their answer needs a valid key, no role)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def role_for(request: web.Request) -> str | None:
    """The role `request` needs: a role, ANY_KEY, or OPEN (None)."""
    path = route_path(request)
    if path is None:
        return ANY_KEY
    return ROUTE_ROLES.get(path, ADMIN)
