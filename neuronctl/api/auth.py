"""Keys: who sent a request, and whether its key may do what it asks.

A key is sent as `Authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key:
KEY` (Anthropic's clients), and matched against the config's `api_key` (an admin key) and
`[[keys]]` in constant time (keys.KeyRing). The role a route needs is api/roles.py's one
table. No key configured: every route is open, as before keys existed.

Refusals: 401 for a missing or unknown key, 403 for a key without the route's role, 429
for a key past its `rpm` or `max_concurrent` (model-serving routes only, checked before
the request reads its body or waits in a queue), each in the shape the route's clients
parse (`/v1`: OpenAI's, `/v1/messages`: Anthropic's), and at most one journal line a
minute of each kind (ratelog.py) naming the key by its name. The key itself is never in
an answer or a log.

The config is read per request, so a reload that adds, removes or rotates keys applies
from the next request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import errors
from ..config import NeuronConfig
from ..errors import NeuronError
from ..keys import ANY_KEY, INFERENCE, UNRESTRICTED, KeyRing, Principal
from . import anthropic
from .keylimits import KeyLimits
from .keyusage import MODEL_LABEL, REQUEST_TOKENS, KeyUsage, RequestTokens
from .ratelog import RateLimitedLog
from .roles import LISTINGS, OPEN, role_for, route_path

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRINCIPAL = web.RequestKey("principal", Principal)
# What a request is counted as when its client left before the answer (nginx's code).
CLIENT_CLOSED = 499


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def principal(request: web.Request) -> Principal:
    """Who sent `request` (UNRESTRICTED when the node has no keys, or for an open route)."""
    return request.get(PRINCIPAL, UNRESTRICTED)


def check_scope(request: web.Request, model_id: str) -> None:
    """Refuse a model outside the key's `models` (403): before anything is loaded for it."""
    key = principal(request)
    if not key.may_use(model_id):
        raise errors.ModelOutOfScope(
            f"key {key.name!r} may not use model {errors.clip(model_id)!r} (its models: "
            f"{', '.join(key.models)})", param="model")


def refusal_response(request: web.Request, refusal: NeuronError) -> web.Response:
    # OpenAI's and Anthropic's clients parse their own error shapes.
    if request.path.startswith("/v1/messages"):
        body = anthropic.error_body(refusal)
    elif request.path.startswith("/v1/"):
        body = refusal.openai_body()
    else:
        body = refusal.control_body()
    return web.json_response(body, status=refusal.status, headers=refusal.headers)


class KeyCheck:
    """The middleware's state: the key ring of the config in force (made again when a
    reload replaced it), the limits and the usage counters."""

    def __init__(self, config: Callable[[], NeuronConfig], usage: KeyUsage,
                 limits: KeyLimits | None = None) -> None:
        self._config = config
        self.usage = usage
        self.limits = limits or KeyLimits()
        self._ring_of: NeuronConfig | None = None
        self._ring = KeyRing(config())
        self.unknown = RateLimitedLog(log, "requests refused for their API key")
        self.refused = RateLimitedLog(log, "requests refused for their key's role, scope "
                                      "or limits")

    def ring(self) -> KeyRing:
        config = self._config()
        if config is not self._ring_of:
            self._ring, self._ring_of = KeyRing(config), config
            self.limits.keep_only(set(self._ring.names()))
        return self._ring

    def refuse(self, request: web.Request, key: Principal, refusal: NeuronError
               ) -> web.Response:
        # %r: a hostile path cannot forge a second journal line.
        self.refused.log("refused %s %r from %s for key %r: %s", request.method,
                         request.path, request.remote or "?", key.name, refusal.message)
        return refusal_response(request, refusal)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        role = role_for(request)
        if role is OPEN:
            return await handler(request)
        ring = self.ring()
        if ring.open:
            return await handler(request)
        given = presented_key(request)
        key = ring.identify(given)
        if key is None:
            message = "invalid API key" if given else "API key required"
            self.unknown.log("refused %s %r from %s: %s", request.method, request.path,
                             request.remote or "?", message)
            message += ": send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
            return refusal_response(request, errors.Unauthorized(
                message, headers={"WWW-Authenticate": 'Bearer realm="neuron"'}))
        if not key.has(role):
            assert role is not ANY_KEY
            self.usage_of(key, role, request, 403)
            return self.refuse(request, key, errors.RoleForbidden(
                f"key {key.name!r} lacks the {role!r} role that {request.method} "
                f"{errors.clip(request.path)} needs (it has: {', '.join(sorted(key.roles))})"))
        request[PRINCIPAL] = key
        if role != INFERENCE or route_path(request) in LISTINGS:
            return await handler(request)
        return await self._serve(request, handler, key)

    async def _serve(self, request: web.Request, handler: Handler, key: Principal
                     ) -> web.StreamResponse:
        """A model-serving request: within the key's limits, counted per key."""
        try:
            release = self.limits.take(key)
        except NeuronError as refusal:
            self.usage.record(key.name, "", refusal.status, None)
            return self.refuse(request, key, refusal)
        tokens = request[REQUEST_TOKENS] = RequestTokens()
        status = CLIENT_CLOSED  # unless an answer comes
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            release()
            model = request.get(MODEL_LABEL, "")
            self.usage.record(key.name, model, status, tokens)
            if status == errors.ModelOutOfScope.status:  # the router's scope check
                self.refused.log("refused %s %r from %s for key %r: model %r is outside "
                                 "its scope", request.method, request.path,
                                 request.remote or "?", key.name, model or "(not known)")

    def usage_of(self, key: Principal, role: str | None, request: web.Request,
                 status: int) -> None:
        if role == INFERENCE:
            self.usage.record(key.name, "", status, None)
