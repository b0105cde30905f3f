"""`GET /`: the node dashboard, one static page served from package data (`neuronctl/api/ui/`).

The page and its two assets hold no data: they are open with an API key set (auth.py),
and the page asks for the key, keeps it in the tab's sessionStorage and sends it as a
header on every data request; the data routes need it as before. The model table follows
`GET /models/events` (read with fetch(), not EventSource, which cannot send a header);
only the charts' counters are sampled, from `GET /models/stats`. The assets are read and
gzipped once at start-up, answered with an ETag (304 on a match) and `no-cache`, so a
browser revalidates and an upgrade shows at once.

A strict Content-Security-Policy goes with every asset: scripts, styles and connections
from this origin only, no inline script or style, no frames, no forms posting anywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from .traffic import RouterStats

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Route -> file in neuronctl/api/ui and its type; auth.OPEN_ROUTES opens these routes.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str

    @classmethod
    def read(cls, name: str, content_type: str) -> Asset:
        body = resources.files("neuronctl.api.ui").joinpath(name).read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:20]
        return cls(body, gzip.compress(body, 9, mtime=0), content_type, f'"{digest}"')

    def answer(self, request: web.Request) -> web.Response:
        gz = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        etag = f'"{self.etag[1:-1]}-gz"' if gz else self.etag
        headers = {**SECURITY_HEADERS, "ETag": etag, "Cache-Control": "no-cache",
                   "Vary": "Accept-Encoding"}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = self.content_type
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=self.gzipped if gz else self.body, headers=headers)


def load_assets() -> dict[str, Asset]:
    return {route: Asset.read(name, kind) for route, (name, kind) in ASSETS.items()}


def asset_routes() -> list[web.RouteDef]:
    """`GET /` and its assets, each answered from memory."""
    routes = []
    for route, asset in load_assets().items():

        async def serve(request: web.Request, asset: Asset = asset) -> web.Response:
            return asset.answer(request)

        routes.append(web.get(route, serve))
    return routes


def model_stats(stats: RouterStats) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /models/stats`: the router's counters per model, for the dashboard's
    requests/s and tokens/s charts: the page samples them and plots the differences."""

    async def handle(request: web.Request) -> web.Response:
        models: dict[str, Any] = {
            model_id: {"requests": s.requests, "tokens": s.tokens, "in_flight": s.in_flight,
                       "queued": s.queue.queued}
            for model_id, s in sorted(stats.models.items())
        }
        return web.json_response({"time": round(time.time(), 3), "models": models})

    return handle
