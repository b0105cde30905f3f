"""Ollama's API (`/api/...`) on the node's port, for the clients that speak only it.

Nothing here reaches a worker by a path of its own: a chat, generate or embed request is
translated (ollama_convert.py) into the OpenAI-style body the worker already serves and
goes through `v1.Router.serve`, so it is queued, loaded on demand, counted and timed
exactly as a `/v1` request is; only the exchange differs: the worker's answer is turned
back into Ollama's JSON, or its server-sent chunks into Ollama's NDJSON lines. Errors are
Ollama's shape, `{"error": "..."}`, with its statuses (404 for an unknown model, 400 for a
bad request), plus the `type` and `code` every other refusal of the node carries (the key
middleware's 401 and 403 on these routes among them: one shape for the same refusal,
whichever layer refuses; Ollama's clients read only `error`); a stream the worker breaks
off ends with such an `{"error": ...}` line before the connection is cut, as Ollama's
clients raise that.

What is said about models (`/api/tags`, `/api/ps`, `/api/show`) and `/api/pull` are
ollama_models.py's; what the node does not do (create, copy, delete, push models) answers
a 400 that says what to do instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import ClientError, ClientResponse, web

from .. import errors
from ..errors import NeuronError
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.registry import ModelRegistry
from ..supervisor.worker import Worker
from . import ollama_convert as convert
from . import workererrors
from .keyusage import REQUEST_TOKENS
from .ollama_models import CheckLoad, OllamaModels
from .requestbody import read_limited
from .traffic import ModelStats
from .v1 import Router

log = logging.getLogger(__name__)

# Where a request's options the node does not apply per request are named.
IGNORED_HEADER = "X-Neuron-Ignored-Options"
# A non-streamed answer is read whole to be translated; past this it is refused.
ANSWER_LIMIT = 16 * 1024 * 1024
# Bodies past this many bytes are parsed only when they hold few JSON values (see _body).
MAX_PARSED_BYTES = 1024 * 1024
MAX_ITEMS = 100_000

_REFUSED = {
    "/api/create": "models are not created on this node: add a [[models]] entry (a GGUF "
                   "`path`, or a Hugging Face `repo` and `quant`) to the node's config, or "
                   "load one with POST /models/load",
    "/api/copy": "model ids are the node config's: add another [[models]] entry with the "
                 "same file under the new id",
    "/api/delete": "models are not deleted through this node: unload one with "
                   "POST /models/unload (or keep_alive 0) and remove it from the node's "
                   "config; downloaded files stay in the Hugging Face cache",
    "/api/push": "this node does not push models to a registry",
}


def ollama_error(exc: NeuronError, status: int | None = None) -> web.Response:
    """`exc` in Ollama's shape (`error`, the message, a string), with the node's `type` and
    `code` beside it, as auth.py's refusals on these routes have them; its status (or
    `status`) and headers (Retry-After)."""
    return web.json_response(exc.control_body(), status=status or exc.status,
                             headers=exc.headers)


class OllamaApi:
    """The `/api` routes. `router`: the /v1 router whose queues and counters every request
    goes through; `check_load`: the checks of a client's load (app.checked_spec)."""

    def __init__(self, registry: ModelRegistry, router: Router, check_load: CheckLoad
                 ) -> None:
        self.registry = registry
        self.router = router
        self.models = OllamaModels(registry, router, check_load)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/version", self.models.version),
            web.get("/api/tags", self.models.tags),
            web.get("/api/ps", self.models.ps),
            web.post("/api/show", self.handler(self.models.show)),
            web.post("/api/chat", self.handler(self.chat)),
            web.post("/api/generate", self.handler(self.generate)),
            web.post("/api/embed", self.handler(self.embed)),
            web.post("/api/embeddings", self.handler(self.embeddings)),
            web.post("/api/pull", self.handler(self.models.pull)),
            *(web.route("*", path, self.refuse) for path in _REFUSED),
        ]

    def handler(self, handle: Callable[[web.Request, dict[str, Any]], Any]
                ) -> Callable[[web.Request], Any]:
        """A POST route: its body read and parsed (bounded, as /v1's), every refusal
        answered in Ollama's shape."""
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                body = await self._body(request)
                response: web.StreamResponse = await handle(request, body)
                return response
            except NeuronError as exc:
                return ollama_error(exc)
            except ConnectionError:  # the client left while its body was being read
                return web.Response(status=400)  # nobody will read it
        return run

    async def _body(self, request: web.Request) -> dict[str, Any]:
        config = self.registry.config
        limit = config.max_request_bytes
        raw = await read_limited(request.content, request.content_length, limit,
                                 self.router.stats.queued_bytes, config.max_queued_bytes)
        if raw is None:
            raise errors.PayloadTooLarge(
                f"request body too large (limit {limit} bytes; max_request_bytes in the "
                "node config)")
        if len(raw) > MAX_PARSED_BYTES and sum(raw.count(c) for c in b"{[,") > MAX_ITEMS:
            # Parsed, 16 MiB of `[{},{},...]` would be hundreds of MiB of objects; a large
            # body that is a real request is a few long strings (base64 images, prompts).
            raise errors.PayloadTooLarge(
                f"request body has more than {MAX_ITEMS} JSON values; send fewer, longer ones")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise errors.InvalidJson("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise errors.InvalidJson("request body must be a JSON object")
        return body

    async def refuse(self, request: web.Request) -> web.Response:
        message = _REFUSED[request.path]
        return ollama_error(errors.BadRequest(f"{request.path}: {message}"))

    # --- answers ---------------------------------------------------------------------------

    async def chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await self._answer(request, body, "chat")

    async def generate(self, request: web.Request, body: dict[str, Any]
                       ) -> web.StreamResponse:
        return await self._answer(request, body, "generate")

    async def _answer(self, request: web.Request, body: dict[str, Any], kind: str
                      ) -> web.StreamResponse:
        model_id, name = self.models.model_id(body)
        # Before anything else is said or done about it (its n_ctx, a load, an unload).
        self.router.check_scope(request, model_id)
        n_ctx = self.models.n_ctx(self.models.spec(model_id))
        translate = convert.chat_request if kind == "chat" else convert.generate_request
        asked = translate(body, model_id, n_ctx)
        spec = self.models.spec(model_id)
        if asked.keep_alive_s is not None and spec is not None \
                and self.registry.config.pinned(spec):
            asked.ignored.append("keep_alive (the model is pinned: it stays loaded)")
        headers = _ignored_header(asked.ignored)
        if asked.empty:
            return await self._load_or_unload(request, model_id, name, kind, asked, headers)
        payload = json.dumps(asked.body).encode()
        # Only the bytes wait in the queue (and count against max_queued_bytes), never the
        # parsed objects: the handler's frames keep the dicts, not what was in them.
        body.clear()
        asked.body.clear()
        tally = convert.Tally(started=time.monotonic(),
                              loaded_for_it=not self._serving(model_id))

        async def exchange(_: ModelLifecycle, worker: Worker, stats: ModelStats
                           ) -> web.StreamResponse:
            tally.admitted = time.monotonic()
            try:
                upstream = await self.router.upstream.post(worker, asked.path, payload,
                                                           model_id, stats)
            except NeuronError as exc:  # counted as /v1 counts its 502s
                return ollama_error(exc)
            try:
                if upstream.status != 200:
                    return await self._refused_by_worker(upstream, stats, model_id, worker)
                chunks = self._chunks(upstream, model_id, worker, stats, tally)
                if asked.stream:
                    return await self._stream(request, chunks, kind, name, tally, stats,
                                              headers)
                return await self._single(chunks, kind, name, tally, stats, headers)
            except errors.WorkerUnavailable as exc:  # an answer, not the router's refusal
                stats.count(exc.status)
                return ollama_error(exc)
            finally:
                upstream.close()
                _count_for_key(request, tally)

        try:  # the worker is always asked for a stream: its first token is timed
            return await self.router.serve(request, model_id, len(payload), True,
                                           exchange, asked.keep_alive_s)
        except NeuronError as exc:
            raise self._named(exc, model_id, name) from None

    def _serving(self, model_id: str) -> bool:
        model = self.registry.get(model_id)
        return model is not None and model.serving_worker is not None

    @staticmethod
    def _named(exc: NeuronError, model_id: str, name: str) -> NeuronError:
        """Ollama's words for a model it does not have; every other refusal as it is."""
        if isinstance(exc, errors.ModelNotFound):
            return errors.ModelNotFound(f"model '{name}' not found; this node serves what "
                                        "GET /api/tags lists")
        return exc

    async def _load_or_unload(self, request: web.Request, model_id: str, name: str,
                              kind: str, asked: convert.Translated, headers: dict[str, str]
                              ) -> web.StreamResponse:
        """Ollama's idiom: no messages (or prompt) loads the model; with keep_alive 0 it
        unloads it. A load waits in the model's queue like any request."""
        if asked.keep_alive_s == 0:
            model = self.registry.get(model_id)
            if model is None and self.models.spec(model_id) is None:
                raise self._named(errors.ModelNotFound(""), model_id, name)
            kept = model is not None and self.registry.config.pinned(model.spec)
            if model is not None and not kept:
                stats = self.router.stats.model(model_id)
                stats.keep_alive_s = 0.0  # busy now: the idle unloader's, once it is idle
                if not self.router.stats.activity(model_id).busy:
                    await self.registry.unload(model_id)
            answer = convert.line(kind, name, time.time(), "", True)
            # A pinned model stays (X-Neuron-Ignored-Options says why): it is loaded still.
            return web.json_response({**answer, "done_reason": "load" if kept else "unload"},
                                     headers=headers)

        async def loaded(_: ModelLifecycle, __: Worker, stats: ModelStats
                         ) -> web.StreamResponse:
            stats.count(200)
            answer = convert.line(kind, name, time.time(), "", True)
            return web.json_response({**answer, "done_reason": "load"}, headers=headers)

        try:
            return await self.router.serve(request, model_id, 0, False, loaded,
                                           asked.keep_alive_s)
        except NeuronError as exc:
            raise self._named(exc, model_id, name) from None

    async def _refused_by_worker(self, upstream: ClientResponse, stats: ModelStats,
                                 model_id: str, worker: Worker,
                                 embedding: tuple[str, str] | None = None) -> web.Response:
        """The worker refused the translated request: its reason, Ollama's shape; a 4xx
        stays a 400 (the request), anything else is a 500 (the worker's). An embeddings
        request (`embedding`: the name asked for, the model's harness) to a worker started
        without embeddings is the request's 400, saying what to set."""
        body = await self._whole(upstream, model_id, worker, stats)
        message = workererrors.worker_error(upstream.status, body)
        if embedding is not None and workererrors.embeddings_off(upstream.status, message):
            refusal: NeuronError = errors.EmbeddingsNotEnabled(
                workererrors.embeddings_hint(*embedding, message), param="model")
            stats.count(refusal.status)
            return ollama_error(refusal)
        status = 400 if 400 <= upstream.status < 500 else 500
        stats.count(status)
        refusal = errors.BadRequest(message) if status == 400 else \
            errors.WorkerUnavailable(message)
        return ollama_error(refusal, status)

    async def _whole(self, upstream: ClientResponse, model_id: str, worker: Worker,
                     stats: ModelStats) -> bytes:
        idle_s = self.registry.config.upstream_idle_timeout_s
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await asyncio.wait_for(upstream.content.readany(), idle_s):
                size += len(chunk)
                if size > ANSWER_LIMIT:
                    raise errors.WorkerUnavailable(
                        f"the worker's answer for {model_id!r} is over {ANSWER_LIMIT} bytes; "
                        "ask for it streamed")
                chunks.append(chunk)
        except (asyncio.TimeoutError, ClientError, OSError) as exc:
            raise errors.WorkerUnavailable(
                self.router.upstream.broken_off(model_id, worker, stats, exc)) from None
        return b"".join(chunks)

    async def _chunks(self, upstream: ClientResponse, model_id: str, worker: Worker,
                      stats: ModelStats, tally: convert.Tally) -> AsyncIterator[str]:
        """The text of the worker's stream, piece by piece, its counts, finish reason and
        tool calls gathered in `tally`; `_BrokenOff` when the worker breaks off (an error
        event, a dropped connection, silence past upstream_idle_timeout_s, or an end
        with no finish)."""
        idle_s = self.registry.config.upstream_idle_timeout_s
        pending = b""
        while True:
            try:
                chunk = await asyncio.wait_for(upstream.content.readany(), idle_s)
            except (asyncio.TimeoutError, ClientError, OSError) as exc:
                raise _BrokenOff(self.router.upstream.broken_off(model_id, worker, stats,
                                                                 exc)) from None
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for data in _events(lines):
                if data == b"[DONE]":
                    return
                answer = _json_or_none(data)
                if answer is None:
                    continue
                if "error" in answer:  # the worker's own error event
                    stats.worker_errors += 1
                    raise _BrokenOff(workererrors.worker_error(500, data))
                tally.take(answer)
                text, tools = convert.text_of(answer, delta=True)
                convert.merge_tool_deltas(tally.tool_calls, tools)
                if text:
                    tally.first_token = tally.first_token or time.monotonic()
                    yield text
        if tally.finish_reason is None:
            raise _BrokenOff(self.router.upstream.broken_off(
                model_id, worker, stats, ConnectionError("its stream ended early")))

    def _last(self, kind: str, name: str, tally: convert.Tally, stats: ModelStats,
              text: str = "") -> dict[str, Any]:
        """The `done` object: the answer's end, its counts and timings."""
        final = tally.final(time.monotonic())
        stats.tokens += final["eval_count"]
        calls = convert.tool_calls_back(tally.tool_calls) if kind == "chat" else None
        last = convert.line(kind, name, time.time(), text, True, calls)
        return {**last, "done_reason": convert.done_reason(tally.finish_reason), **final}

    async def _single(self, chunks: AsyncIterator[str], kind: str, name: str,
                      tally: convert.Tally, stats: ModelStats, headers: dict[str, str]
                      ) -> web.Response:
        """`"stream": false`: the whole answer in one object."""
        try:
            text = "".join([piece async for piece in chunks])
        except _BrokenOff as exc:
            raise errors.WorkerUnavailable(str(exc)) from None
        stats.count(200)
        return web.json_response(self._last(kind, name, tally, stats, text), headers=headers)

    async def _stream(self, request: web.Request, chunks: AsyncIterator[str], kind: str,
                      name: str, tally: convert.Tally, stats: ModelStats,
                      headers: dict[str, str]) -> web.StreamResponse:
        """Ollama's NDJSON: a line per piece of text, then the `done` line; an
        `{"error": ...}` line when the worker breaks off."""
        response = web.StreamResponse(headers={"Content-Type": convert.NDJSON, **headers})
        try:
            await response.prepare(request)
            stats.count(200)
            try:
                async for text in chunks:
                    await response.write(convert.ndjson(convert.line(kind, name, time.time(), text,
                                                            False)))
            except _BrokenOff as exc:
                await self._cut(request, response, str(exc))
                return response
            await response.write(convert.ndjson(self._last(kind, name, tally, stats)))
            await response.write_eof()
        except ConnectionError:
            stats.client_disconnects += 1
        return response

    @staticmethod
    async def _cut(request: web.Request, response: web.StreamResponse, message: str) -> None:
        """An `{"error": ...}` line (Ollama's clients raise it), then the connection cut, so
        even a client that ignores the line sees a broken transfer."""
        try:
            await response.write(convert.ndjson(
                errors.WorkerUnavailable(message).control_body()))
        except ConnectionError:
            return
        if request.transport is not None:
            request.transport.close()

    # --- embeddings ------------------------------------------------------------------------

    async def embed(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await self._embed(request, body, "input", legacy=False)

    async def embeddings(self, request: web.Request, body: dict[str, Any]
                         ) -> web.StreamResponse:
        return await self._embed(request, body, "prompt", legacy=True)

    async def _embed(self, request: web.Request, body: dict[str, Any], key: str,
                     legacy: bool) -> web.StreamResponse:
        model_id, name = self.models.model_id(body)
        self.router.check_scope(request, model_id)
        texts = convert.embed_inputs(body, key)
        alive = convert.keep_alive_s(body.get("keep_alive"))
        # Checked as chat's are; an embedding has no sampling to apply them to.
        convert.options(body.get("options"), self.models.n_ctx(self.models.spec(model_id)))
        if body.get("truncate") is not None and not isinstance(body["truncate"], bool):
            raise errors.BadRequest("truncate: expected a boolean")
        if body.get("dimensions") is not None:  # silently longer vectors would mislead
            raise errors.BadRequest("dimensions: not supported; the node answers the "
                                    "model's own embedding size")
        payload = json.dumps({"model": model_id, "input": texts}).encode()
        preload = not texts or (legacy and texts == [""])  # Ollama's load idiom
        body.clear()  # only the bytes wait in the queue
        del texts
        tally = convert.Tally(started=time.monotonic(),
                              loaded_for_it=not self._serving(model_id))

        async def exchange(model: ModelLifecycle, worker: Worker, stats: ModelStats
                           ) -> web.StreamResponse:
            tally.admitted = time.monotonic()
            if preload:
                stats.count(200)
                return web.json_response({"embedding": []} if legacy else
                                         {"model": name, "embeddings": []})
            try:
                upstream = await self.router.upstream.post(worker, "/v1/embeddings", payload,
                                                           model_id, stats)
            except NeuronError as exc:  # counted as /v1 counts its 502s
                return ollama_error(exc)
            try:
                if upstream.status != 200:
                    return await self._refused_by_worker(upstream, stats, model_id, worker,
                                                         (name, model.spec.harness))
                raw = await self._whole(upstream, model_id, worker, stats)
                vectors = _vectors(_json_or_none(raw))
            except errors.WorkerUnavailable as exc:  # an answer, not the router's refusal
                stats.count(exc.status)
                return ollama_error(exc)
            finally:
                upstream.close()
            stats.count(200)
            if legacy:
                return web.json_response({"embedding": vectors[0] if vectors else []})
            answer = _json_or_none(raw) or {}
            tally.take(answer)
            final = tally.final(time.monotonic())
            _count_for_key(request, tally)
            return web.json_response({
                "model": name, "embeddings": [convert.normalized(v) for v in vectors],
                "total_duration": final["total_duration"],
                "load_duration": final["load_duration"],
                "prompt_eval_count": final["prompt_eval_count"]})

        try:
            return await self.router.serve(request, model_id, len(payload), False, exchange,
                                           alive)
        except NeuronError as exc:
            raise self._named(exc, model_id, name) from None

def _count_for_key(request: web.Request, tally: convert.Tally) -> None:
    """The answer's tokens, for its key's counters (api/keyusage.py), as /v1 counts them."""
    tokens = request.get(REQUEST_TOKENS)
    if tokens is not None:
        final = tally.final(time.monotonic())
        tokens.prompt += final["prompt_eval_count"]
        tokens.completion += final["eval_count"]


def _ignored_header(ignored: list[str]) -> dict[str, str]:
    """The options not applied, for the answer's header: printable ASCII only (the keys
    are the client's), bounded. A header, not a journal line: any client can cause it."""
    if not ignored:
        return {}
    text = re.sub(r"[^\x20-\x7e]", "?", "; ".join(ignored))
    return {IGNORED_HEADER: text[:1000]}


class _BrokenOff(Exception):
    """The worker's stream ended before its answer did; the message says how."""


def _events(lines: list[bytes]) -> Iterable[bytes]:
    """The data of server-sent event lines."""
    for raw in lines:
        raw = raw.strip()
        if raw.startswith(b"data:"):
            yield raw[5:].strip()


def _json_or_none(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _vectors(answer: dict[str, Any] | None) -> list[list[float]]:
    """The worker's embeddings in input order (OpenAI's `data[i].embedding`)."""
    data = answer.get("data") if answer else None
    if not isinstance(data, list):
        raise errors.WorkerUnavailable("the worker's embeddings answer has no data")
    out = []
    for item in sorted((d for d in data if isinstance(d, dict)),
                       key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int)
                       else 0):
        vector = item.get("embedding")
        if isinstance(vector, list) and vector and isinstance(vector[0], list):
            vector = vector[0]  # a worker without pooling: one vector per token; the first
        if not isinstance(vector, list) or not all(
                isinstance(v, int | float) and math.isfinite(v) for v in vector):
            raise errors.WorkerUnavailable("the worker's embedding is not a list of numbers")
        out.append([float(v) for v in vector])
    return out
