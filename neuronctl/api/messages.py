"""`POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API.

Routed by `model` like every `/v1` route (the router's intake, queues, on-demand loads
and counters: `Router.route`), with the router's refusals in Anthropic's error shape. A
worker that speaks the API itself (`Harness.serves_anthropic_messages`: llama-server) gets
the request as it came; any other gets it as a chat completion (anthropic.py translates
both ways) and its tokenizer counts tokens (llama-cpp-python's `/extras/tokenize/count`).
Every body is checked here first, so bad input is the same 400 whichever worker serves it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import ClientResponse, web

from .. import errors
from ..errors import NeuronError
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.worker import Worker
from . import anthropic
from .traffic import ModelStats
from .upstream import AnswerStopped, Dialect, next_chunk
from .v1 import Router

log = logging.getLogger(__name__)


def anthropic_error(error: NeuronError) -> web.Response:
    return web.json_response(anthropic.error_body(error), status=error.status,
                             headers=error.headers)


ANTHROPIC = Dialect(anthropic_error, anthropic.error_event, anthropic.chat_error,
                    (b"event: message_start", anthropic.message_start))
# A translated answer is read whole before it is translated; past this it is refused.
TRANSLATED_ANSWER_BYTES = 16 * 1024 * 1024
COUNT_PATH = "/v1/messages/count_tokens"


def _parsed(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # the router's own parse already passed it
        raise errors.InvalidJson("request body is not valid JSON") from None


class Messages:
    """The two routes, over the router's intake and the upstream's pooled client."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.upstream = router.upstream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        counting = request.path == COUNT_PATH

        def check(body: bytes) -> None:
            anthropic.check_request(_parsed(body), counting=counting)

        async def exchange(request: web.Request, body: bytes, model: ModelLifecycle,
                           worker: Worker, stats: ModelStats) -> web.StreamResponse:
            harness = self.router.registry.harnesses.get(model.spec.harness)
            if getattr(harness, "serves_anthropic_messages", False):
                return await self.upstream.exchange(request, body, model.model_id, worker,
                                                    stats, ANTHROPIC)
            chat = anthropic.check_request(_parsed(body), counting=counting)
            if counting:
                return await self._count(request, chat, model.model_id, worker, stats)
            return await self._translated(request, chat, model.model_id, worker, stats)

        return await self.router.route(request, exchange, ANTHROPIC, check)

    async def _count(self, request: web.Request, chat: dict[str, Any], model_id: str,
                     worker: Worker, stats: ModelStats) -> web.StreamResponse:
        body = json.dumps({"input": anthropic.counted_text(chat)}).encode()
        upstream = await self.upstream.open(request, "/extras/tokenize/count", body,
                                            model_id, worker, stats, ANTHROPIC)
        if isinstance(upstream, web.Response):
            return upstream
        try:
            status, answer = await self._read(upstream, model_id, worker, stats)
        finally:
            upstream.close()
        if isinstance(answer, web.Response):
            return answer
        stats.count(status)
        if status != 200:
            return anthropic_error(anthropic.chat_error(status, answer))
        count = json.loads(answer).get("count") if answer.startswith(b"{") else None
        if not isinstance(count, int):
            return self.upstream.bad_gateway(model_id, worker, stats,
                                             "sent no token count", ValueError(answer[:100]),
                                             ANTHROPIC)
        return web.json_response({"input_tokens": count})

    async def _translated(self, request: web.Request, chat: dict[str, Any], model_id: str,
                          worker: Worker, stats: ModelStats) -> web.StreamResponse:
        body = json.dumps(chat).encode()
        upstream = await self.upstream.open(request, "/v1/chat/completions", body, model_id,
                                            worker, stats, ANTHROPIC)
        if isinstance(upstream, web.Response):
            return upstream
        try:
            if upstream.status == 200 and upstream.headers.get(
                    "Content-Type", "").startswith("text/event-stream"):
                return await self._stream(request, upstream, model_id, worker, stats)
            status, answer = await self._read(upstream, model_id, worker, stats)
            if isinstance(answer, web.Response):
                return answer
            stats.count(status)
            if status != 200:
                return anthropic_error(anthropic.chat_error(status, answer))
            try:
                completion = json.loads(answer)
            except (ValueError, RecursionError) as exc:
                return self.upstream.bad_gateway(model_id, worker, stats,
                                                 "sent an answer that is not JSON", exc,
                                                 ANTHROPIC)
            message = anthropic.from_chat(completion, model_id)
            stats.tokens += message["usage"]["output_tokens"]
            return web.json_response(message)
        finally:
            upstream.close()

    async def _read(self, upstream: ClientResponse, model_id: str, worker: Worker,
                    stats: ModelStats) -> tuple[int, bytes | web.Response]:
        """A whole answer (within the idle timeout and TRANSLATED_ANSWER_BYTES), or the
        502 that says why not."""
        idle_s = self.router.registry.config.upstream_idle_timeout_s
        parts: list[bytes] = []
        size = 0
        try:
            while chunk := await next_chunk(upstream.content, idle_s):
                size += len(chunk)
                if size > TRANSLATED_ANSWER_BYTES:
                    raise AnswerStopped(
                        f"sent an answer over {TRANSLATED_ANSWER_BYTES} bytes", "too large")
                parts.append(chunk)
        except AnswerStopped as exc:
            return 502, self.upstream.bad_gateway(model_id, worker, stats, exc.what, exc,
                                                  ANTHROPIC)
        return upstream.status, b"".join(parts)

    async def _stream(self, request: web.Request, upstream: ClientResponse, model_id: str,
                      worker: Worker, stats: ModelStats) -> web.StreamResponse:
        """A chat-completions stream, passed on as Anthropic's events as it comes; one that
        breaks off (or ends before it says why) ends with an `error` event and a cut."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
        except ConnectionError:
            stats.client_disconnects += 1
            return response
        stats.count(200)
        events = anthropic.EventStream(model_id)
        idle_s = self.router.registry.config.upstream_idle_timeout_s
        pending = b""
        done = False
        try:
            await response.write(events.start())
            while not done:
                try:
                    chunk = await next_chunk(upstream.content, idle_s)
                except AnswerStopped as exc:
                    await self.upstream.abort_stream(request, response, model_id, worker,
                                                     stats, exc, ANTHROPIC)
                    return response
                if not chunk:
                    break
                pending += chunk
                lines = pending.split(b"\n")
                pending = lines.pop()
                out = b""
                for line in lines:
                    data = line.rstrip(b"\r")
                    if not data.startswith(b"data:"):
                        continue
                    payload = data[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    out += self._event(events, payload)
                await response.write(out)
            if not events.ended:
                stopped = AnswerStopped("broke off its answer",
                                        "its stream ended before its last event")
                await self.upstream.abort_stream(request, response, model_id, worker, stats,
                                                 stopped, ANTHROPIC)
                return response
            stats.tokens += events.output_tokens
            await response.write(events.finish())
            await response.write_eof()
        except ConnectionError:
            stats.client_disconnects += 1
        except _WorkerSaid as said:
            stats.worker_errors += 1
            log.warning("router: the worker for model %r failed mid-stream: %s", model_id,
                        said.error.message)
            try:
                await response.write(anthropic.error_event(said.error))
            except ConnectionError:
                return response
            if request.transport is not None:
                request.transport.close()
        return response

    @staticmethod
    def _event(events: anthropic.EventStream, payload: bytes) -> bytes:
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            raise _WorkerSaid(errors.WorkerUnavailable(
                "the worker sent a stream event that is not JSON")) from None
        if not isinstance(data, dict):
            return b""
        if "error" in data:  # a worker's own error event, mid-stream
            error = data["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise _WorkerSaid(errors.WorkerUnavailable(
                f"the worker failed mid-answer: {errors.clip(message)}"))
        return events.chunk(data)


class _WorkerSaid(Exception):
    """A worker's stream carried an error (or something unreadable) instead of a chunk."""

    def __init__(self, error: NeuronError) -> None:
        super().__init__(error.message)
        self.error = error
