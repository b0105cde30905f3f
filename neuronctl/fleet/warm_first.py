"""LiteLLM's routing hook for neuron nodes: send a request where its model is warm.

`neuronctl fleet litellm-config --out DIR/config.yaml` copies this file beside the config as
`neuron_routing.py` and names its instance (`litellm_settings: callbacks:
["neuron_routing.warm_first"]`); LiteLLM's proxy imports it from there. So it imports
nothing of neuronctl and nothing the proxy does not have: the standard library, and
LiteLLM's `CustomLogger`, whose `async_filter_deployments` the router awaits on every
routing decision, after cooldowns, before its strategy picks among what is left.

What it knows comes from each node's `GET /models/events?traffic_s=...` (one stream per
node, opened the first time a deployment on it is seen, reconnected with backoff): the
models' states, and every `TRAFFIC_S` their requests in flight and waiting, which is also
the stream's heartbeat. Nothing is asked of a node per request.

The choice (`choose`, pure): of the deployments LiteLLM passes, keep the best group:
loaded with a free slot; else loaded, fewest waiting; else those it knows nothing fresh
of; else those that would load the model (loading already, then unloaded with autoload).
A node that cannot be reached, or where the model is failed, restarting, or not served,
drops out. Knowledge older than `MAX_AGE_S` is not trusted (the node counts as unknown);
when nothing is known, or everything would drop out, LiteLLM's own list is returned as is:
the hook never makes a request fail that LiteLLM would have sent somewhere.

No `from __future__ import annotations`: LiteLLM imports this file without entering it in
`sys.modules`, where `dataclasses` looks string annotations up.
"""

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    class _Base:
        pass
else:
    try:  # inside LiteLLM's proxy: the router calls hooks that are CustomLoggers only
        from litellm.integrations.custom_logger import CustomLogger as _Base
    except ImportError:  # neuronctl's own environment: the pure parts are tested there
        _Base = object

log = logging.getLogger("neuron_routing")

MODULE = "neuron_routing"  # the file name beside the config, and the callback's module
INSTANCE = "warm_first"
# Every TRAFFIC_S the node sends its counts; knowledge older than MAX_AGE_S (a few missed
# heartbeats) counts as none.
TRAFFIC_S = 0.25
MAX_AGE_S = 1.0
# A node that refused or dropped the stream is out for as long as that news is fresh: the
# next attempt comes within BACKOFF_MAX_S, so a node that comes back is seen again soon.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
DOWN_TRUST_S = BACKOFF_MAX_S + MAX_AGE_S
CONNECT_TIMEOUT_S = 2.0
# Silence this long on an open stream (heartbeats every TRAFFIC_S) ends it: reconnect.
READ_TIMEOUT_S = 3.0
LINE_LIMIT = 16 * 1024 * 1024  # a snapshot of a large catalogue is one line

# The groups, best first; a deployment in none of them drops out.
FREE, QUEUED, UNKNOWN, COLD = 0, 1, 2, 3
LOADED = "loaded"
LOADING = "loading"
# A request sent to a model in these waits for it, or loads it (with autoload).
COLD_STATUSES = {LOADING: 0, "unloaded": 1, "unloading": 2}


@dataclass
class ModelState:
    status: str
    autoload: bool = False
    in_flight: int = 0
    queued: int = 0
    slots: int = 1


@dataclass
class NodeView:
    """What one node's event stream said, and when it last said anything."""

    heard_at: float | None = None  # the last frame (or comment) read, on the hook's clock
    down_at: float | None = None  # the last failed attempt, while the node is out
    models: dict[str, ModelState] = field(default_factory=dict)

    def heard(self, now: float) -> None:
        self.heard_at = now
        self.down_at = None

    def lost(self, now: float) -> None:
        self.down_at = now
        self.heard_at = None
        self.models.clear()

    def apply(self, event: str, data: Any, now: float) -> None:
        """One server-sent event of `/models/events` (docs/api.md); others are ignored."""
        self.heard(now)
        if not isinstance(data, dict):
            return
        if event == "snapshot" and isinstance(data.get("models"), list):
            slots = {k: m.slots for k, m in self.models.items()}
            self.models = {m["id"]: ModelState(str(m.get("status")), m.get("autoload") is True,
                                               _count(m.get("in_flight")),
                                               _count(m.get("queued")), slots.get(m["id"], 1))
                           for m in data["models"]
                           if isinstance(m, dict) and isinstance(m.get("id"), str)}
        elif event == "state" and isinstance(data.get("model"), str):
            model = self.models.setdefault(data["model"], ModelState(""))
            model.status = str(data.get("status"))
        elif event == "traffic" and isinstance(data.get("models"), dict):
            counts = data["models"]
            for model_id, model in self.models.items():
                got = counts.get(model_id)
                got = got if isinstance(got, dict) else {}
                model.in_flight = _count(got.get("in_flight"))
                model.queued = _count(got.get("queued"))
                model.slots = max(1, _count(got.get("slots"), 1))


def _count(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and value >= 0 else default


# --- the choice, pure --------------------------------------------------------------------


def rank(view: NodeView | None, model_id: str, now: float,
         max_age_s: float = MAX_AGE_S) -> tuple[int, ...] | None:
    """Where a deployment of `model_id` on the node seen as `view` stands: a key, smaller
    is better (equal keys are equally good), or None: it drops out."""
    if view is None:
        return (UNKNOWN,)
    if view.down_at is not None:
        return None if now - view.down_at <= DOWN_TRUST_S else (UNKNOWN,)
    if view.heard_at is None or now - view.heard_at > max_age_s:
        return (UNKNOWN,)
    model = view.models.get(model_id)
    if model is None:
        return None  # not on that node any more: it would answer 404
    if model.status == LOADED:
        if model.in_flight < model.slots and model.queued == 0:
            return (FREE,)
        return (QUEUED, model.queued, model.in_flight)
    cold = COLD_STATUSES.get(model.status)
    if cold is None or (cold > 0 and not model.autoload):
        return None  # failed, restarting, or unloaded where a request does not load it
    return (COLD, cold, model.queued)


def target(deployment: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """(node base URL, the node's model id, its key) of a deployment the generator wrote;
    None for one it did not (no `openai/` model or no `/v1` api_base)."""
    params = deployment.get("litellm_params")
    if not isinstance(params, Mapping):
        return None
    model, base, key = params.get("model"), params.get("api_base"), params.get("api_key")
    if not isinstance(model, str) or not isinstance(base, str) or not model.startswith("openai/"):
        return None
    base = base.rstrip("/")
    if not base.endswith("/v1"):
        return None
    return base.removesuffix("/v1"), model.removeprefix("openai/"), \
        key if isinstance(key, str) and key != "none" else None


def choose(deployments: list[Any], views: Mapping[str, NodeView], now: float,
           max_age_s: float = MAX_AGE_S) -> list[Any]:
    """The best group of `deployments` (in LiteLLM's order, for its strategy to pick from),
    or `deployments` itself when nothing is known of any or all of them would drop out."""
    ranked: list[tuple[tuple[int, ...], Any]] = []
    known = False
    for deployment in deployments:
        where = target(deployment) if isinstance(deployment, Mapping) else None
        if where is None:
            key: tuple[int, ...] | None = (UNKNOWN,)
        else:
            key = rank(views.get(where[0]), where[1], now, max_age_s)
        known = known or key != (UNKNOWN,)
        if key is not None:
            ranked.append((key, deployment))
    if not known or not ranked:
        return deployments
    best = min(key for key, _ in ranked)
    return [d for key, d in ranked if key == best]


# --- following the nodes -----------------------------------------------------------------


class StreamError(Exception):
    pass


async def _line(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.readline(), timeout_s)
    except ValueError as exc:  # longer than LINE_LIMIT
        raise StreamError(str(exc)) from exc


async def _body_lines(reader: asyncio.StreamReader, chunked: bool,
                      timeout_s: float) -> AsyncIterator[bytes]:
    """The body's lines, read through chunked transfer coding where the node uses it."""
    if not chunked:
        while line := await _line(reader, timeout_s):
            yield line
        return
    pending = b""
    while True:
        size_line = await _line(reader, timeout_s)
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError as exc:
            raise StreamError(f"bad chunk size {size_line[:40]!r}") from exc
        if size == 0:
            return
        if len(pending) + size > LINE_LIMIT:
            raise StreamError("a line over the limit")
        pending += await asyncio.wait_for(reader.readexactly(size), timeout_s)
        await asyncio.wait_for(reader.readexactly(2), timeout_s)  # the chunk's CRLF
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"


async def events(base: str, key: str | None, traffic_s: float = TRAFFIC_S,
                 read_timeout_s: float = READ_TIMEOUT_S) -> AsyncIterator[tuple[str, Any]]:
    """The node's `/models/events` as (event, data) pairs, comments as (":", None); raises
    OSError, TimeoutError or StreamError when it cannot be read. Plain asyncio streams: the
    proxy's environment has no HTTP client neuronctl could count on."""
    url = urllib.parse.urlsplit(base)
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(url.hostname, port, ssl=tls or None, limit=LINE_LIMIT),
        CONNECT_TIMEOUT_S)
    try:
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        writer.write((f"GET {url.path}/models/events?traffic_s={traffic_s:g} HTTP/1.1\r\n"
                      f"Host: {url.netloc}\r\nAccept: text/event-stream\r\n{auth}"
                      "Connection: close\r\n\r\n").encode())
        await writer.drain()
        status = (await _line(reader, CONNECT_TIMEOUT_S)).split()
        if len(status) < 2 or status[1] != b"200":
            raise StreamError(f"GET /models/events answered {b' '.join(status[1:])[:80]!r}")
        chunked = False
        while (header := await _line(reader, CONNECT_TIMEOUT_S)) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding":
                chunked = "chunked" in value.lower()
        event, data = "message", list[str]()
        async for raw in _body_lines(reader, chunked, read_timeout_s):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(":"):
                yield ":", None
            elif not line:
                parsed = _json("\n".join(data)) if data else None
                if parsed is not None:
                    yield event, parsed
                event, data = "message", []
            else:
                name, _, value = line.partition(":")
                if name == "event":
                    event = value.removeprefix(" ")
                elif name == "data":
                    data.append(value.removeprefix(" "))
        raise StreamError("the node ended the stream")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None  # not an event of ours: skipped


async def follow(base: str, key: str | None, view: NodeView,
                 clock: Callable[[], float] = time.monotonic,
                 traffic_s: float = TRAFFIC_S) -> None:
    """Keep `view` up to date from the node at `base`, forever (until cancelled)."""
    backoff = BACKOFF_MIN_S
    was_down = False
    while True:
        try:
            async for event, data in events(base, key, traffic_s):
                if was_down:
                    log.warning("neuron routing: %s answers again", base)
                    was_down = False
                view.apply(event, data, clock())
                backoff = BACKOFF_MIN_S
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, StreamError) as exc:
            if not was_down:
                log.warning("neuron routing: %s is out of the choice: %s", base,
                            exc or type(exc).__name__)
            was_down = True
        view.lost(clock())
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX_S)


class WarmFirst(_Base):
    """The callback LiteLLM's proxy loads (`neuron_routing.warm_first`)."""

    def __init__(self, max_age_s: float = MAX_AGE_S, traffic_s: float = TRAFFIC_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.max_age_s = max_age_s
        self.traffic_s = traffic_s
        self.clock = clock
        self.views: dict[str, NodeView] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}

    def watch(self, deployments: Iterable[Any]) -> None:
        """A follower for every node of `deployments` that has none running."""
        for deployment in deployments:
            where = target(deployment) if isinstance(deployment, Mapping) else None
            if where is None:
                continue
            base, _, key = where
            task = self._followers.get(base)
            if task is None or task.done():
                view = self.views.setdefault(base, NodeView())
                self._followers[base] = asyncio.get_running_loop().create_task(
                    follow(base, key, view, self.clock, self.traffic_s),
                    name=f"neuron routing {base}")

    async def async_filter_deployments(self, model: str, healthy_deployments: list[Any],
                                       messages: Any = None, request_kwargs: Any = None,
                                       parent_otel_span: Any = None) -> list[Any]:
        if not isinstance(healthy_deployments, list):
            return healthy_deployments
        try:
            self.watch(healthy_deployments)
            return choose(healthy_deployments, self.views, self.clock(), self.max_age_s)
        except Exception:  # a bug here must not fail the request: LiteLLM's own choice
            log.exception("neuron routing: the choice failed; LiteLLM's stands")
            return healthy_deployments

    async def close(self) -> None:
        # Cancelled again until done: before Python 3.12, asyncio.wait_for swallows a
        # cancel that comes as the read it waits on completes, and the follower then
        # reads on (seen once in the suite: a close that never ended).
        while pending := [t for t in self._followers.values() if not t.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
        for task in self._followers.values():
            if not task.cancelled():
                task.exception()  # retrieved: a follower's bug is not logged again at exit
        self._followers.clear()


warm_first = WarmFirst()
