"""Requests a web page makes the node's API do: refused.

A browser sends some requests to any address without asking first (CORS "simple"
requests: a form post, a `text/plain` fetch), and it sends a page's requests to whatever
address its host name resolves to now (DNS rebinding: `evil.example` first resolves to
the attacker's server, then to 127.0.0.1 or the node). So a page anyone opens on the
node's network could load models, read answers and logs. Three checks close that, on
every route but `/health` (which carries nothing, and load balancers probe it with any
`Host`):

* `Host` must be a name the node answers to: `localhost`, an IP address (a page cannot
  rebind a literal address), this host's name, the configured `host` and `node_id`, and
  `allowed_hosts`. Otherwise 421: a rebinding page reads nothing.
* A request with an `Origin` other than the node's own, or `Sec-Fetch-Site: cross-site`,
  is refused (403). Only a top-level navigation to the dashboard's page is let through:
  a link to it from an intranet page is no attack, and the page holds no data.
* A POST with a body must say `Content-Type: application/json` (415 otherwise): a browser
  sends a JSON body to another origin only after a CORS preflight, which the node never
  grants.

Clients that are not browsers (curl, the CLI, OpenAI's and LiteLLM's clients) send no
`Origin` and are unaffected.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..config import NeuronConfig
from ..errors import CrossSiteRefused, MisdirectedRequest, NeuronError, UnsupportedMediaType

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes a check never applies to: liveness probes come with whatever Host a balancer uses.
UNCHECKED_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health")})
# The dashboard's page: a top-level navigation to it may come from another site's link.
NAVIGABLE = frozenset({"/"})
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def host_name(authority: str) -> str | None:
    """The host of a `Host` header or an origin's authority (`[::1]:13131` -> `::1`),
    lower-case, without a trailing dot; None when it is not one."""
    try:
        parsed = urlsplit("//" + authority)
        name = parsed.hostname
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return None
    return name.rstrip(".") if name else None


class HostNames:
    """The names the node answers to, for one config (a reload may change them)."""

    def __init__(self, config: NeuronConfig, this_host: str | None = None) -> None:
        names = {"localhost"}
        hostname = (this_host if this_host is not None else socket.gethostname()).lower()
        if hostname:
            names.update({hostname, hostname.split(".", 1)[0]})
        if config.host not in _WILDCARD_HOSTS:
            names.add(config.host.lower())
        if config.node_id:
            node_host = host_name(config.node_id)
            if node_host:
                names.add(node_host)
        self.suffixes = tuple(n.lower() for n in config.allowed_hosts if n.startswith("."))
        names.update(n.lower() for n in config.allowed_hosts if not n.startswith("."))
        self.names = frozenset(names)

    def allows(self, name: str) -> bool:
        if name in self.names or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return any(name.endswith(suffix) or name == suffix[1:] for suffix in self.suffixes)
        return True  # a literal address cannot be rebound


def _is_json(request: web.Request) -> bool:
    return request.content_type == "application/json"


def check(request: web.Request, hosts: HostNames) -> NeuronError | None:
    """Why this request is refused, or None."""
    host = request.headers.get("Host")
    if host is not None:
        name = host_name(host)
        if name is None or not hosts.allows(name):
            return MisdirectedRequest(
                f"this node does not answer to host {host[:100]!r}; add it to allowed_hosts "
                "in the node config if it is the node's own name")
    origin = request.headers.get("Origin")
    fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
    navigation = (request.method in ("GET", "HEAD") and request.path in NAVIGABLE
                  and request.headers.get("Sec-Fetch-Mode", "").lower() == "navigate")
    if not navigation:
        foreign = origin is not None and (
            host is None or urlsplit(origin).netloc.lower() != host.lower()
            or urlsplit(origin).scheme not in ("http", "https"))
        if foreign or fetch_site == "cross-site":
            return CrossSiteRefused(
                "cross-site request refused: the node's API serves no other site's pages "
                "(docs/security.md)")
    if request.method == "POST" and request.body_exists and not _is_json(request):
        return UnsupportedMediaType(
            f"POST bodies must be sent as Content-Type: application/json, not "
            f"{request.content_type!r}")
    return None


def same_site_middleware(config: Callable[[], NeuronConfig],
                         this_host: str | None = None) -> Middleware:
    """The checks above, as the API's outermost middleware. `config`: the node's current
    config (read per request, so a reload's `allowed_hosts` apply at once)."""
    cached: list[tuple[NeuronConfig, HostNames]] = []  # for the current config only

    def hosts() -> HostNames:
        current = config()
        if not cached or cached[0][0] is not current:
            cached[:] = [(current, HostNames(current, this_host))]
        return cached[0][1]

    @web.middleware
    async def same_site(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) in UNCHECKED_ROUTES:
            return await handler(request)
        refusal = check(request, hosts())
        if refusal is None:
            return await handler(request)
        # OpenAI clients parse their own error shape.
        v1 = request.path.startswith("/v1/")
        body = refusal.openai_body() if v1 else refusal.control_body()
        return web.json_response(body, status=refusal.status, headers=refusal.headers)

    return same_site
