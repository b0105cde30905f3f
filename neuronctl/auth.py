"""API keys: with `api_key` set, every route but `GET /health` and the dashboard's static
page needs the key.

Accepted as `Authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key: KEY`,
compared in constant time. Without a key configured this middleware is not installed.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from .errors import Unauthorized

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# One journal line per refusal would let any client fill the disk: the first refusal is
# logged, then at most one line per window with how many more there were.
REFUSAL_LOG_WINDOW_S = 60.0
# Liveness probes (load balancers, systemd watchdogs of other services) carry no secrets;
# nor do the dashboard's page and assets (dashboard.ASSETS): static files, no data, and the
# page asks for the key before it reads anything.
OPEN_ROUTES = frozenset((method, path) for method in ("GET", "HEAD")
                        for path in ("/health", "/", "/ui/app.js", "/ui/app.css"))


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


class RefusalLog:
    """Refused requests in the journal, bounded: who (the peer), what, and why."""

    def __init__(self, window_s: float = REFUSAL_LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._logged_at: float | None = None
        self._since_logged = 0

    def refused(self, request: web.Request, why: str) -> None:
        now = self._clock()
        self._since_logged += 1
        if self._logged_at is not None and now - self._logged_at < self.window_s:
            return
        more = self._since_logged - 1
        also = f" ({more} more refused since the last such line)" if more else ""
        # %r: a hostile path cannot forge a second journal line.
        log.warning("refused %s %r from %s: %s%s", request.method, request.path,
                    request.remote or "?", why, also)
        self._logged_at, self._since_logged = now, 0


def api_key_middleware(key: str) -> Middleware:
    expected = key.encode()
    refusals = RefusalLog()

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
        refusals.refused(request, message)
        message += ": send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        refusal = Unauthorized(message, headers={"WWW-Authenticate": 'Bearer realm="neuron"'})
        # OpenAI clients parse their own error shape.
        v1 = request.path.startswith("/v1/")
        body = refusal.openai_body() if v1 else refusal.control_body()
        return web.json_response(body, status=refusal.status, headers=refusal.headers)

    return require_key
