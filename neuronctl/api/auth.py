"""API keys: with `api_key` set, every route but `GET /health` and the dashboard's static
page needs the key.

Accepted as `Authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key: KEY` (what
Anthropic's clients send), compared in constant time. Without a key configured this
middleware is not installed.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..errors import Unauthorized
from . import anthropic
from .dashboard import ASSETS
from .ratelog import RateLimitedLog

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Liveness probes (load balancers, systemd watchdogs of other services) carry no secrets;
# nor do the dashboard's page and assets (dashboard.ASSETS): static files, no data, and the
# page asks for the key before it reads anything.
OPEN_ROUTES = frozenset((method, path) for method in ("GET", "HEAD")
                        for path in ("/health", *ASSETS))


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def api_key_middleware(key: str) -> Middleware:
    expected = key.encode()
    refusals = RateLimitedLog(log, "requests refused for their API key")

    @web.middleware
    async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) in OPEN_ROUTES:
            return await handler(request)
        given = presented_key(request)
        # surrogateescape: a header with bytes that are not UTF-8 is a wrong key, not a 500.
        if given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected
        ):
            return await handler(request)
        message = "invalid API key" if given else "API key required"
        # %r: a hostile path cannot forge a second journal line.
        refusals.log("refused %s %r from %s: %s", request.method, request.path,
                     request.remote or "?", message)
        message += ": send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        refusal = Unauthorized(message, headers={"WWW-Authenticate": 'Bearer realm="neuron"'})
        # OpenAI's and Anthropic's clients parse their own error shapes.
        v1 = request.path.startswith("/v1/")
        if request.path.startswith("/v1/messages"):
            body = anthropic.error_body(refusal)
        else:
            body = refusal.openai_body() if v1 else refusal.control_body()
        return web.json_response(body, status=refusal.status, headers=refusal.headers)

    return require_key
