"""The OpenAI-compatible router (/v1).

Real tiny-GGUF workers show that answers through the router are the worker's own; stand-in
workers (aiohttp apps inside the test, built by the registry's worker factory) produce on cue
what a real one cannot be made to do reliably: stall between two events, die mid-answer, or
report the moment the router hangs up on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from neuronctl.api.app import create_app
from neuronctl.api.traffic import RouterStats
from neuronctl.api.v1 import ROUTER_STATS
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.supervisor.harness import Harness, LlamaCppPythonHarness, LoadError, WorkerPlan
from neuronctl.supervisor.registry import ModelRegistry
from neuronctl.supervisor.worker import Worker

from ..helpers import MakeRegistry, llama_required, pid_alive, poll_until
from ..tiny_gguf import write_tiny_gguf

Client = aiohttp.ClientSession
Scenario = Callable[[Client, ModelRegistry, RouterStats], Awaitable[None]]
UpstreamHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

JSON = {"Content-Type": "application/json"}


# --- stand-in workers -------------------------------------------------------------------------


@dataclasses.dataclass
class StandIn:
    """What one stand-in worker does: how its load goes, and how it answers."""

    handler: UpstreamHandler | None = None
    load: str = "ok"  # "ok" | "fail" | "hang"
    runner: web.AppRunner | None = None


class StandInWorker:
    """Quacks like neuronctl.supervisor.worker.Worker, but serves an aiohttp app in this process."""

    def __init__(self, stand_in: StandIn, model_id: str, port: int) -> None:
        self.stand_in = stand_in
        self.model_id = model_id
        self.port = port
        self.pid: int | None = None
        self.returncode: int | None = None
        self.log_problem: str | None = None
        self._stopped = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self.stand_in.load == "fail":
            raise LoadError("worker exited with code 1 while starting; CUDA out of memory", 1)
        if self.stand_in.load == "hang":
            await asyncio.Event().wait()  # until the load is cancelled
        assert self.stand_in.handler is not None
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.stand_in.handler)
        # Like uvicorn under a streamed answer, a stand-in notices when the router hangs up.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.stand_in.runner = runner

    async def wait_exit(self) -> int:
        await self._stopped.wait()
        return 0

    async def stop(self) -> None:
        if self.stand_in.runner is not None:
            await self.stand_in.runner.cleanup()
        self._stopped.set()

    async def kill(self) -> None:
        await self.stop()

    async def answers(self, timeout_s: float) -> bool:
        return True

    def log_excerpt(self, fallback: bool = True) -> tuple[str | None, str]:
        return None, ""

    def progress_token(self) -> tuple[int, float, int]:
        return (0, 0.0, 0)


class StandIns(Harness):
    """The registry's worker factory and harness for models named in `self.models`."""

    name = "stand-in"

    def __init__(self, **models: StandIn) -> None:
        self.models = models

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        return WorkerPlan(("stand-in",), {}, "/", 5.0)

    def __call__(
        self, model_id: str, plan: WorkerPlan, port: int, *_: Any, **__: Any
    ) -> StandInWorker:
        return StandInWorker(self.models[model_id], model_id, port)

    async def load_all(self, registry: ModelRegistry) -> None:
        for model_id, stand_in in self.models.items():
            if stand_in.load == "ok":
                await registry.load(ModelSpec(model_id, harness=self.name))


def stand_in_spec(model_id: str) -> ModelSpec:
    return ModelSpec(model_id, harness=StandIns.name)


# --- running the router -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(
    registry: ModelRegistry, cancel_on_disconnect: bool = False
) -> AsyncIterator[tuple[str, RouterStats]]:
    """The control API on 127.0.0.1, run as the daemon runs it: a client that disconnects
    does not cancel its handler, unless asked (aiohttp's TestServer asks)."""
    app = create_app(registry)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=cancel_on_disconnect)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[ROUTER_STATS]
    finally:
        await runner.cleanup()


async def run(
    make_registry: MakeRegistry,
    config: NeuronConfig,
    scenario: Scenario,
    stand_ins: StandIns | None = None,
    *,
    cancel_on_disconnect: bool = False,
) -> None:
    """Serve the router over a registry (real workers, or `stand_ins`) and run `scenario`
    against it; the fixture stops every worker afterwards."""
    harnesses: dict[str, Any] = {
        "llama-cpp-python": LlamaCppPythonHarness(HarnessConfig()),
    }
    if stand_ins is not None:
        harnesses[StandIns.name] = stand_ins
    registry = make_registry(config, harnesses, worker_factory=stand_ins or Worker)
    async with (
        serve(registry, cancel_on_disconnect) as (url, stats),
        aiohttp.ClientSession(url) as client,
    ):
        if stand_ins is not None:
            await stand_ins.load_all(registry)
        await scenario(client, registry, stats)


async def eventually(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """poll_until, off the event loop so the servers under test keep running."""
    await asyncio.to_thread(poll_until, condition, timeout)


async def error_of(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of `resp`, checked to be one."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error  # type: ignore[no-any-return]


def sse_data(raw: bytes) -> list[str]:
    return [ln[len("data: "):] for ln in raw.decode().splitlines() if ln.startswith("data: ")]


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


async def echo(request: web.Request) -> web.Response:
    """A stand-in answer: what the worker was sent."""
    body = await request.read()
    answer = {
        "model": json.loads(body)["model"], "path": request.path_qs,
        "headers": dict(request.headers), "body": body.decode(),
    }
    return web.json_response(answer, headers={"X-Request-Id": "req-1"})


# --- real llama.cpp workers -------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
# Streamed, this takes the tiny model ~3 s (llama-cpp-python's streaming slows down as the
# text grows): long enough that a hang-up lands mid-generation. EOS banned so it does.
LONG_CHAT = {**CHAT, "max_tokens": 300, "logit_bias": {"2": -100}, "stream": True}


def real_spec(model_id: str, path: Path) -> ModelSpec:
    return ModelSpec(model_id, path=path, n_ctx=1024, args=("--embedding", "true"))


async def both_ways(
    client: Client, worker_url: str, path: str, body: dict[str, Any]
) -> tuple[tuple[int, str, bytes], tuple[int, str, bytes]]:
    """POST `body` to the worker directly and through the router."""
    answers = []
    for url in (worker_url + path, path):
        async with client.post(url, json=body) as resp:
            answers.append((resp.status, resp.content_type, await resp.read()))
    return answers[0], answers[1]


@pytest.mark.llama
@llama_required
async def test_answers_through_the_router_are_the_workers(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        record = await registry.load(real_spec("tiny/alpha", tiny_gguf))
        assert record.worker is not None
        worker_url = record.worker.endpoint
        requests = [
            ("/v1/chat/completions", {"model": "tiny/alpha", **CHAT}),
            ("/v1/completions",
             {"model": "tiny/alpha", "prompt": "hello", "max_tokens": 4, "temperature": 0}),
            ("/v1/embeddings", {"model": "tiny/alpha", "input": "hello"}),
        ]
        for path, body in requests:
            direct, routed = await both_ways(client, worker_url, path, body)
            assert direct[:2] == routed[:2] == (200, "application/json"), (path, routed)
            direct_body, routed_body = json.loads(direct[2]), json.loads(routed[2])
            assert shape(routed_body) == shape(direct_body), path
            if "choices" in direct_body:  # greedy: the same text both ways
                assert routed_body["choices"] == direct_body["choices"]
        assert stats.models["tiny/alpha"].requests == 3
        assert stats.models["tiny/alpha"].responses == {200: 3}
        assert stats.models["tiny/alpha"].in_flight == 0

        async with client.get("/v1/models") as resp:
            assert resp.status == 200
            listing = await resp.json()
        assert listing["object"] == "list"
        (entry,) = listing["data"]
        assert entry["id"] == "tiny/alpha"
        assert entry["object"] == "model"
        assert entry["owned_by"] == "neuron"
        assert entry["status"] == "loaded"
        assert isinstance(entry["created"], int)
        async with client.get(worker_url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny/alpha"]

    await run(make_registry, node_config, scenario)


@pytest.mark.llama
@llama_required
async def test_streaming_through_the_router_is_the_workers(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        record = await registry.load(real_spec("alpha", tiny_gguf))
        assert record.worker is not None
        body = {"model": "alpha", **CHAT, "max_tokens": 8, "stream": True}
        answers = []
        for url in (record.worker.endpoint + "/v1/chat/completions", "/v1/chat/completions"):
            async with client.post(url, json=body) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                assert resp.headers.get("X-Accel-Buffering") == "no"
                assert "Content-Length" not in resp.headers
                answers.append(sse_data(await resp.read()))
        direct, routed = answers
        assert direct[-1] == routed[-1] == "[DONE]"
        assert len(routed) == len(direct) > 2
        chunks = [json.loads(d) for d in routed[:-1]]
        assert [shape(c) for c in chunks] == [shape(json.loads(d)) for d in direct[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert [c["choices"] for c in chunks] == [json.loads(d)["choices"] for d in direct[:-1]]
        assert stats.models["alpha"].responses == {200: 1}

    await run(make_registry, node_config, scenario)


@pytest.mark.llama
@llama_required
async def test_two_models_each_request_reaches_its_own(
    node_config: NeuronConfig, tiny_gguf: Path, tmp_path: Path, make_registry: MakeRegistry
) -> None:
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)  # other weights, other text

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        workers = {}
        for model_id, path in (("alpha", tiny_gguf), ("beta", other)):
            record = await registry.load(real_spec(model_id, path))
            assert record.worker is not None
            workers[model_id] = record.worker.endpoint
        body = {"prompt": "hello", "max_tokens": 12, "temperature": 0}
        texts = {}
        for model_id, worker_url in workers.items():
            direct, routed = await both_ways(
                client, worker_url, "/v1/completions", {**body, "model": model_id}
            )
            texts[model_id] = json.loads(direct[2])["choices"][0]["text"]
            assert json.loads(routed[2])["choices"][0]["text"] == texts[model_id]
        assert texts["alpha"] != texts["beta"]  # else this test could not tell them apart
        assert {m: s.requests for m, s in stats.models.items()} == {"alpha": 1, "beta": 1}

        # Either worker would answer for any name; the router does not let it.
        async with client.post("/v1/completions", json={**body, "model": "gamma"}) as resp:
            error = await error_of(resp, 404)
        assert error["code"] == "model_not_found"
        assert "gamma" in error["message"]
        assert "alpha, beta" in error["message"]
        assert set(stats.models) == {"alpha", "beta"}

    await run(make_registry, node_config, scenario)


@pytest.mark.llama
@llama_required
async def test_client_disconnect_mid_stream_stops_generation_and_worker_stays_healthy(
    node_config: NeuronConfig, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch,
    make_registry: MakeRegistry,
) -> None:
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # the worker's "Disconnected" line, at once

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        record = await registry.load(real_spec("alpha", tiny_gguf))
        assert record.worker is not None
        pid = record.worker.pid
        assert pid is not None
        resp = await client.post("/v1/chat/completions", json={"model": "alpha", **LONG_CHAT})
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        resp.close()  # hang up mid-stream

        # The worker was still generating when the first chunk came through, and stopped.
        await eventually(lambda: "Disconnected from client" in record.log_path.read_text())
        await eventually(lambda: stats.models["alpha"].in_flight == 0)
        assert stats.models["alpha"].client_disconnects == 1
        assert pid_alive(pid)
        assert record.status.value == "loaded"
        async with client.post("/v1/chat/completions", json={"model": "alpha", **CHAT}) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["role"] == "assistant"

    await run(make_registry, node_config, scenario)


@pytest.mark.llama
@llama_required
async def test_worker_killed_mid_stream_breaks_the_stream(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        record = await registry.load(real_spec("alpha", tiny_gguf))
        assert record.worker is not None
        pid = record.worker.pid
        assert pid is not None
        async with client.post(
            "/v1/chat/completions", json={"model": "alpha", **LONG_CHAT}
        ) as resp:
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"data: ")
            os.kill(pid, signal.SIGKILL)
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        last = json.loads(sse_data(received)[-1])
        assert last["error"]["code"] == "worker_unavailable"
        assert "alpha" in last["error"]["message"]
        assert stats.models["alpha"].worker_errors == 1

        # Afterwards the next request waits in the queue while the worker restarts, and is
        # answered by the new one.
        await eventually(lambda: record.status.value != "loaded")
        async with client.post("/v1/chat/completions", json={"model": "alpha", **CHAT}) as r:
            assert r.status == 200, await r.text()
        assert record.restarts == 1 and record.worker is not None
        assert record.worker.pid != pid

    await run(make_registry, node_config, scenario)


# --- stand-in workers: routing rules and failures -----------------------------------------------


async def test_models_lists_only_loaded_models(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    stand_ins = StandIns(
        ready=StandIn(echo), **{"org/ready-too": StandIn(echo)},
        starting=StandIn(load="hang"), broken=StandIn(load="fail"),
    )

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        loading = asyncio.create_task(registry.load(stand_in_spec("starting")))
        with pytest.raises(LoadError):
            await registry.load(stand_in_spec("broken"))
        await eventually(lambda: registry.get("starting") is not None)
        async with client.get("/v1/models") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["ready", "org/ready-too"]
        for entry in body["data"]:
            assert set(entry) == {"id", "object", "created", "owned_by", "status"}
            assert (entry["object"], entry["status"]) == ("model", "loaded")
        async with client.get("/v1/models/org/ready-too") as resp:
            assert (await resp.json())["id"] == "org/ready-too"
        for model_id in ("starting", "broken", "ghost"):
            async with client.get(f"/v1/models/{model_id}") as resp:
                assert (await error_of(resp, 404))["code"] == "model_not_found"
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError, LoadError):
            await loading

    await run(make_registry, node_config, scenario, stand_ins)


async def test_requests_and_answers_pass_unchanged(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    seen: list[bytes] = []

    async def worker(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(
            status=422, body=b'{"detail": [1, 2]}\n', content_type="application/json",
            headers={"X-Request-Id": "req-7", "Openai-Processing-Ms": "3"},
        )

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        raw = b'{"model":  "m",\n "messages": [], "extra": {"k": [1, 2.50]}}'
        async with client.post("/v1/chat/completions?x=1", data=raw,
                               headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 422
            assert await resp.read() == b'{"detail": [1, 2]}\n'
            assert resp.headers["X-Request-Id"] == "req-7"
            assert resp.headers["Openai-Processing-Ms"] == "3"
            assert resp.content_type == "application/json"
        assert seen == [raw]  # byte for byte, not re-serialized
        assert stats.models["m"].responses == {422: 1}

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(worker)))


async def test_request_headers_forwarded_without_hop_by_hop(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        headers = {
            "Authorization": "Bearer k", "x-api-key": "k", "X-Custom": "1",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "drop me", "Keep-Alive": "timeout=5", "Content-Type": "application/json",
        }
        async with client.post("/v1/embeddings?a=b", data=b'{"model": "m"}',
                               headers=headers) as resp:
            assert resp.status == 200
            answer = await resp.json()
            assert resp.headers["X-Request-Id"] == "req-1"
        assert answer["path"] == "/v1/embeddings?a=b"
        sent = {k.lower(): v for k, v in answer["headers"].items()}
        assert "authorization" not in sent and "x-api-key" not in sent  # the node's key
        assert sent["x-custom"] == "1"
        assert "x-hop" not in sent
        assert "keep-alive" not in sent
        assert sent["host"] != "" and sent["content-type"] == "application/json"

        # `curl -d` without a JSON content type: what a cross-site form sends, so a 415
        # (crosssite.py), never forwarded.
        async with client.post("/v1/completions", data=b'{"model": "m"}', headers={
            "Content-Type": "application/x-www-form-urlencoded"
        }) as resp:
            assert resp.status == 415
            assert (await resp.json())["error"]["code"] == "unsupported_media_type"

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(echo)))


async def test_unknown_or_missing_model_is_404_and_reaches_no_worker(
    node_config: NeuronConfig,
    make_registry: MakeRegistry,
) -> None:
    calls: list[str] = []

    async def worker(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.json_response({})

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        for body in ({"model": "ghost", "messages": []}, {"messages": []}):
            async with client.post("/v1/chat/completions", json=body) as resp:
                error = await error_of(resp, 404)
            assert error["code"] == "model_not_found"
            assert error["param"] == "model"
            assert "loaded: m" in error["message"] or "this node: m" in error["message"]
        async with client.post("/v1/chat/completions", json={"model": 7}) as resp:
            assert (await error_of(resp, 400))["param"] == "model"
        assert calls == []
        assert set(stats.models) == set()  # made-up names get no counters

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(worker)))


async def test_a_request_for_a_loading_model_waits_then_times_out_with_a_503(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        loading = asyncio.create_task(registry.load(stand_in_spec("slow")))
        await eventually(lambda: registry.get("slow") is not None)
        started = asyncio.get_running_loop().time()
        async with client.post("/v1/chat/completions", json={"model": "slow"}) as resp:
            error = await error_of(resp, 503)
        # It waited in the model's queue for the load, queue_timeout_s long.
        assert asyncio.get_running_loop().time() - started >= 0.3
        assert error["code"] == "queue_timeout"
        assert "not ready yet" in error["message"]
        assert stats.models["slow"].responses == {503: 1}
        assert stats.models["slow"].rejections == {"queue_timeout": 1}
        assert stats.models["slow"].queue.queued == 0
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError, LoadError):
            await loading

    config = dataclasses.replace(node_config, queue_timeout_s=0.3)
    await run(make_registry, config, scenario, StandIns(slow=StandIn(load="hang")))


async def test_failed_model_is_503_naming_the_failure(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        with pytest.raises(LoadError):
            await registry.load(stand_in_spec("broken"))
        async with client.post("/v1/completions", json={"model": "broken"}) as resp:
            error = await error_of(resp, 503)
            assert "Retry-After" not in resp.headers
        assert error["code"] == "model_failed"
        assert "CUDA out of memory" in error["message"]
        assert "broken" in error["message"]

    await run(make_registry, node_config, scenario, StandIns(broken=StandIn(load="fail")))


async def test_worker_dying_mid_request_is_502(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.close()  # gone before answering
        return web.Response()

    async def cut_short(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"choices": [')  # then the process "dies"
        assert request.transport is not None
        request.transport.close()
        return resp

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        for model_id in ("hangs-up", "cuts-short"):
            async with client.post("/v1/chat/completions", json={"model": model_id}) as resp:
                error = await error_of(resp, 502)
            assert error["code"] == "worker_unavailable"
            assert model_id in error["message"]
            assert stats.models[model_id].worker_errors == 1
            assert stats.models[model_id].responses == {502: 1}
            assert stats.models[model_id].in_flight == 0

    await run(make_registry, node_config, scenario,
        StandIns(**{"hangs-up": StandIn(hang_up), "cuts-short": StandIn(cut_short)}))


async def test_worker_dying_mid_stream_ends_with_an_error_event_and_a_cut(
    node_config: NeuronConfig,
    make_registry: MakeRegistry,
) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        assert request.transport is not None
        request.transport.close()
        return resp

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async with client.post("/v1/chat/completions",
                               json={"model": "m", "stream": True}) as resp:
            assert resp.status == 200
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        events = sse_data(received)
        assert events[0] == '{"n": 1}'
        error = json.loads(events[-1])["error"]
        assert (error["code"], error["type"]) == ("worker_unavailable", "server_error")
        assert stats.models["m"].worker_errors == 1

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(dies)))


async def test_events_pass_through_as_they_are_produced(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    """The stand-in sends its second event only after the client has the first: a router
    that buffered would deadlock here."""
    first_arrived = asyncio.Event()

    async def gated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        await asyncio.wait_for(first_arrived.wait(), 10)
        await resp.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        return resp

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async with client.post("/v1/chat/completions",
                               json={"model": "m", "stream": True}) as resp:
            assert resp.status == 200
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert first == b'data: {"n": 1}\n\n'
            first_arrived.set()
            rest = await asyncio.wait_for(resp.read(), 5)
        assert sse_data(rest) == ['{"n": 2}', "[DONE]"]

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(gated)))


@pytest.mark.parametrize("upstream", ["streaming", "silent-stream", "no-answer-yet"])
@pytest.mark.parametrize("cancel_on_disconnect", [False, True], ids=["daemon", "cancelling"])
async def test_client_disconnect_drops_the_upstream_request(
    node_config: NeuronConfig, cancel_on_disconnect: bool, upstream: str,
    make_registry: MakeRegistry,
) -> None:
    """Whatever the worker is doing when the client hangs up (sending tokens, thinking before
    the first one, or before any answer at all), the router hangs up on it too; "daemon"
    serves like `neuronctl start` does, without aiohttp's handler cancellation."""
    working = asyncio.Event()
    upstream_gone = asyncio.Event()

    async def worker(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            if upstream != "no-answer-yet":
                await resp.prepare(request)
                await resp.write(b'data: {"token": "x"}\n\n')
            working.set()
            while True:
                if upstream == "streaming":
                    await resp.write(b'data: {"token": "x"}\n\n')
                await asyncio.sleep(0.01)  # generation pace, not a poll for a condition
        except (ConnectionError, asyncio.CancelledError):
            upstream_gone.set()
            raise

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        request = asyncio.create_task(
            client.post("/v1/chat/completions", json={"model": "m", "stream": True})
        )
        await asyncio.wait_for(working.wait(), 10)
        if upstream == "no-answer-yet":
            request.cancel()  # gives up waiting: aiohttp closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await request
        else:
            resp = await request
            assert (await resp.content.readline()).startswith(b"data: ")
            resp.close()
        await asyncio.wait_for(upstream_gone.wait(), 10)
        await eventually(lambda: stats.models["m"].in_flight == 0)
        assert stats.models["m"].client_disconnects == 1
        assert stats.models["m"].worker_errors == 0

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(worker)),
        cancel_on_disconnect=cancel_on_disconnect)


async def test_malformed_bodies_are_400(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        for data, needle in (
            (b"{not json", "not valid JSON"), (b"", "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"), (b"[1, 2]", "JSON object"),
            (b"[" * 100_000, "not valid JSON"),
        ):
            async with client.post("/v1/chat/completions", data=data, headers=JSON) as resp:
                error = await error_of(resp, 400)
            assert needle in error["message"]
            assert error["code"] == "invalid_json"

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(echo)))


async def test_body_over_the_limit_is_413(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    config = dataclasses.replace(node_config, max_request_bytes=1000)
    padding = "x" * 1000

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to check up front
            yield b'{"model": "m", "prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        for data in (json.dumps({"model": "m", "prompt": padding}).encode(), chunked()):
            async with client.post("/v1/completions", data=data, headers=JSON) as resp:
                error = await error_of(resp, 413)
            assert error["code"] == "request_too_large"
            assert "1000 bytes" in error["message"]
        # Just under the limit is forwarded.
        body = json.dumps({"model": "m", "prompt": padding[:900]}).encode()
        async with client.post("/v1/completions", data=body, headers=JSON) as resp:
            assert resp.status == 200
        # The control API keeps its own answers and shape.
        async with client.post("/models/unload", data=b"{", headers=JSON) as resp:
            assert resp.status == 400
            assert isinstance((await resp.json())["error"], str)

    await run(make_registry, config, scenario, StandIns(m=StandIn(echo)))


async def test_only_post_is_routed(node_config: NeuronConfig, make_registry: MakeRegistry) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async with client.get("/v1/chat/completions") as resp:
            error = await error_of(resp, 405)
            assert resp.headers["Allow"] == "POST"
        assert error["code"] == "method_not_allowed"

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(echo)))


async def test_one_pooled_connection_per_worker_closed_with_the_app(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    peers: list[object] = []

    async def worker(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response({"ok": True})

    stand_in = StandIn(worker)
    registry = make_registry(node_config, {StandIns.name: StandIns(m=stand_in)},
                             worker_factory=StandIns(m=stand_in))
    await registry.load(stand_in_spec("m"))
    assert stand_in.runner is not None and stand_in.runner.server is not None
    upstream = stand_in.runner.server
    async with serve(registry) as (url, _):
        async with aiohttp.ClientSession(url) as client:
            for _ in range(5):
                async with client.post("/v1/completions", json={"model": "m"}) as r:
                    assert r.status == 200
        assert len(set(peers)) == 1  # keep-alive: one connection for all five
        assert len(upstream.connections) == 1
    # The router's client session closed with its app: the pooled connection too.
    await eventually(lambda: not upstream.connections)
