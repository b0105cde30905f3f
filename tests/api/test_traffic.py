"""Real traffic: per-model queues, parallel slots, requests that wait for a model on its
way, and liveness. The queue's rules are unit-tested first; then real llama-cpp-python
workers on the tiny GGUF take many concurrent clients."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from neuronctl import errors
from neuronctl.api.app import create_app
from neuronctl.api.metrics import merge_worker_metrics
from neuronctl.api.traffic import ModelQueue
from neuronctl.api.v1 import HANG_UP_CHECK_S, Router
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.states import WorkerState
from neuronctl.supervisor.harness import (
    LLAMA_CPP_PYTHON,
    LLAMA_SERVER,
    Harness,
    LlamaCppPythonHarness,
    LlamaServerHarness,
)
from neuronctl.supervisor.registry import ModelRegistry

from ..fakes import FAKE_LLAMA_SERVER
from ..gpu_fakes import wrapper
from ..helpers import (
    MakeRegistry,
    free_port,
    llama_required,
    pid_alive,
    poll_until_async,
    poll_until_awaited,
)

# --- the queue's rules ------------------------------------------------------------------


def queue(slots: int = 1, serving: bool = True) -> ModelQueue:
    q = ModelQueue("m", time.monotonic)
    if serving:
        q.ready(slots)
    return q


async def turns(n: int = 20) -> None:
    """Let the other tasks run: the queue is pure asyncio, so loop turns, not time."""
    for _ in range(n):
        await asyncio.sleep(0)


async def hold(q: ModelQueue, order: list[int], i: int, release: asyncio.Event,
               max_queue: int = 10, timeout_s: float = 5.0) -> None:
    async with q.admit(max_queue, timeout_s):
        order.append(i)
        await release.wait()


async def test_requests_beyond_the_slots_wait_in_order() -> None:
    q = queue(slots=2)
    order: list[int] = []
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(q, order, i, release)) for i in range(5)]
    await turns()
    assert order == [0, 1] and q.in_flight == 2 and q.queued == 3
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert q.in_flight == 0 and q.queued == 0


async def test_a_full_queue_refuses_with_retry_after() -> None:
    q = queue()
    release = asyncio.Event()
    order: list[int] = []
    tasks = [asyncio.create_task(hold(q, order, i, release, max_queue=2)) for i in range(3)]
    await turns()
    with pytest.raises(errors.QueueFull) as refused:
        async with q.admit(2, 5.0):
            pass
    assert refused.value.status == 429 and "Retry-After" in refused.value.headers
    release.set()
    await asyncio.gather(*tasks)


async def test_one_key_flooding_a_model_cannot_starve_another() -> None:
    """A key with 50 requests waiting and another sending one at a time (a client each
    second, say): the queue takes turns between keys, so each of the second key's
    requests is served next but one, while the first key's keep their own order."""
    q = queue()
    served: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    async def request(key: str, name: str) -> None:
        async with q.admit(100, 30.0, key=key):
            served.append(name)
            gate = gates[name] = asyncio.Event()
            await gate.wait()

    async def finish_current() -> None:
        gates[served[-1]].set()
        await turns()

    flood = [asyncio.create_task(request("flood", f"f{i}")) for i in range(50)]
    await turns()
    assert served == ["f0"] and q.queued == 49
    positions = []
    for n in range(5):
        trickle = asyncio.create_task(request("trickle", f"t{n}"))
        await turns()
        before = len(served)
        while f"t{n}" not in served:
            await finish_current()
        positions.append(len(served) - before)  # requests served before it, itself included
        await finish_current()
        await trickle
    assert positions == [2] * 5, served  # the flood's head, then it: never behind the flood
    while len(served) < 55:
        await finish_current()
    await finish_current()
    await asyncio.gather(*flood)
    flood_order = [name for name in served if name.startswith("f")]
    assert flood_order == [f"f{i}" for i in range(50)]  # a key's own order is kept
    assert q.queued == 0 and q.in_flight == 0


async def test_keys_take_turns_and_a_key_leaving_gives_up_its_turn() -> None:
    q = queue()
    order: list[int] = []
    release = asyncio.Event()

    async def hold_as(key: str, i: int) -> None:
        async with q.admit(10, 5.0, key=key):
            order.append(i)
            await release.wait()

    first = asyncio.create_task(hold_as("a", 0))
    await turns()
    tasks = [asyncio.create_task(hold_as(k, i)) for i, k in
             enumerate(["a", "a", "a", "b", "c", "c"], start=1)]
    await turns()
    assert q.queued == 6 and q.queued_for("a") == 3 and q.queued_for("c") == 2
    tasks[3].cancel()  # b's only request leaves: its turn goes with it
    await turns()
    assert q.queued_for("b") == 0
    release.set()
    await asyncio.gather(first, *tasks, return_exceptions=True)
    assert order == [0, 1, 5, 2, 6, 3]  # a, c, a, c, a: round-robin over who waits


async def test_a_request_that_waits_too_long_gets_a_503_and_leaves() -> None:
    q = queue()
    release = asyncio.Event()
    holder = asyncio.create_task(hold(q, [], 0, release))
    await turns()
    with pytest.raises(errors.QueueTimeout, match="slots stayed busy"):
        async with q.admit(5, 0.05):
            pass
    assert q.queued == 0
    release.set()
    await holder


async def test_a_cancelled_waiter_leaves_at_once_and_a_slot_granted_to_it_passes_on() -> None:
    q = queue()
    release = asyncio.Event()
    order: list[int] = []
    first = asyncio.create_task(hold(q, order, 0, release))
    await turns()
    gone = asyncio.create_task(hold(q, order, 1, release))
    after = asyncio.create_task(hold(q, order, 2, release))
    await turns()
    assert q.queued == 2
    gone.cancel()  # the client hung up while queued
    await asyncio.sleep(0)
    assert q.queued == 1
    release.set()
    await asyncio.gather(first, after)
    assert order == [0, 2] and q.in_flight == 0
    # Granted and cancelled in the same turn: the slot is not lost.
    hold_again = asyncio.Event()
    busy = asyncio.create_task(hold(q, order, 3, hold_again))
    await turns()
    racer = asyncio.create_task(hold(q, order, 4, hold_again))
    await turns()
    hold_again.set()
    await asyncio.sleep(0)  # `busy` releases: the slot is granted to `racer`...
    racer.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(busy, racer, return_exceptions=True)
    assert q.in_flight == 0


async def test_requests_wait_for_a_model_that_is_not_ready_and_hear_if_it_fails() -> None:
    q = queue(serving=False)
    order: list[int] = []
    release = asyncio.Event()
    release.set()
    waiting = asyncio.create_task(hold(q, order, 0, release))
    await turns()
    assert order == [] and q.queued == 1
    q.ready(1)
    await waiting
    assert order == [0]
    q.not_ready()  # restarting
    doomed = [asyncio.create_task(hold(q, order, i, release)) for i in (1, 2)]
    await turns()
    q.fail(errors.ModelFailed("model 'm' failed: CUDA out of memory"))
    for task in doomed:
        with pytest.raises(errors.ModelFailed, match="CUDA out of memory"):
            await task
    assert q.queued == 0 and order == [0]


def test_worker_metrics_are_merged_with_a_model_label_and_only_llamacpp_families() -> None:
    text = ("# HELP llamacpp:requests_processing Number of requests processing.\n"
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
            "# TYPE neuron_uptime_seconds gauge\nneuron_uptime_seconds 1e9\n")
    merged = merge_worker_metrics([("a", text), ("b/c", text.replace(" 2\n", " 0\n")),
                                   ("broken", "this is { not metrics")]).decode()
    assert 'llamacpp:requests_processing{model="a"} 2.0' in merged
    assert 'llamacpp:requests_processing{model="b/c"} 0.0' in merged
    assert merged.count("# TYPE llamacpp:requests_processing gauge") == 1
    assert "neuron_uptime_seconds" not in merged


# --- real workers -----------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    registry: ModelRegistry
    url: str
    session: aiohttp.ClientSession
    runner: web.AppRunner | None = None

    async def stream(self, model: str, max_tokens: int = 24) -> tuple[int, str | None]:
        """(status, finish_reason of a streamed chat completion, or the error code)."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": max_tokens, "stream": True}
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return resp.status, (await resp.json())["error"]["code"]
            finish = None
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    finish = choices[0].get("finish_reason") or finish
            return 200, finish

    async def complete(self, model: str, **body: Any) -> tuple[int, Any]:
        payload = {"model": model, "prompt": "x", "max_tokens": 8, **body}
        async with self.session.post(f"{self.url}/v1/completions", json=payload) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def node(make_registry: MakeRegistry, node_config: NeuronConfig) -> AsyncIterator[
        Any]:
    """`await node(**config)`: a registry with the real llama-cpp-python harness, served as
    the daemon serves it (aiohttp's TestServer cancels a handler whose client hangs up; the
    daemon's server does not, and the router handles hang-ups itself)."""
    made: list[tuple[web.AppRunner, aiohttp.ClientSession]] = []

    async def start(**config: Any) -> Node:
        cfg = dataclasses.replace(node_config, **config)
        registry = make_registry(cfg, {LLAMA_CPP_PYTHON: LlamaCppPythonHarness(HarnessConfig())})
        runner = web.AppRunner(create_app(registry), access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        session = aiohttp.ClientSession()
        made.append((runner, session))
        return Node(registry, f"http://127.0.0.1:{port}", session, runner)

    yield start
    for runner, session in made:
        await session.close()
        await runner.cleanup()


def tiny(model_id: str, path: Path, **kw: Any) -> ModelSpec:
    return ModelSpec(model_id, path=path, n_ctx=kw.pop("n_ctx", 512), **kw)


@llama_required
async def test_many_concurrent_streams_all_finish(node: Any, tiny_gguf: Path) -> None:
    n = await node()
    await n.registry.load(tiny("tiny", tiny_gguf))
    results = await asyncio.gather(*(n.stream("tiny") for _ in range(12)))
    assert all(status == 200 and finish in ("stop", "length") for status, finish in results), \
        results


@llama_required
async def test_an_overflowing_queue_answers_429_and_every_admitted_stream_finishes(
    node: Any, tiny_gguf: Path
) -> None:
    n = await node(max_queue=2)
    await n.registry.load(tiny("tiny", tiny_gguf))
    results = await asyncio.gather(*(n.stream("tiny", max_tokens=64) for _ in range(10)))
    refused = [r for r in results if r[0] == 429]
    admitted = [r for r in results if r[0] == 200]
    assert refused and all(code == "queue_full" for _, code in refused)
    assert len(admitted) + len(refused) == 10
    assert all(finish in ("stop", "length") for _, finish in admitted), admitted
    # Every slot and every place in the queue was given back.
    async with n.session.get(f"{n.url}/metrics") as resp:
        metrics = await resp.text()
    assert 'neuron_requests_queued{model="tiny"} 0.0' in metrics
    assert 'neuron_requests_in_flight{model="tiny"} 0.0' in metrics
    assert (f'neuron_requests_rejected_total{{model="tiny",reason="queue_full"}} '
            f'{float(len(refused))}') in metrics


@llama_required
async def test_a_request_for_a_model_that_is_loading_is_answered_once_it_is_ready(
    node: Any, tiny_gguf: Path
) -> None:
    n = await node()
    load = asyncio.create_task(n.registry.load(tiny("tiny", tiny_gguf)))
    await asyncio.sleep(0)  # listed as loading now
    model = n.registry.get("tiny")
    assert model is not None and model.serving_worker is None
    status, answer = await n.complete("tiny")
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    await load


@llama_required
async def test_waiters_hear_why_when_the_model_they_wait_for_fails(
    node: Any, tmp_path: Path
) -> None:
    n = await node()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    load = asyncio.create_task(n.registry.load(tiny("broken", broken)))
    await asyncio.sleep(0)
    status, answer = await n.complete("broken")
    assert status == 503
    assert answer["error"]["code"] == "model_failed"
    assert "worker exited with code" in answer["error"]["message"]
    with pytest.raises(errors.LoadError):
        await load


@llama_required
async def test_a_stopped_worker_is_replaced_and_the_other_model_serves_throughout(
    node: Any, tiny_gguf: Path
) -> None:
    n = await node(liveness_interval_s=0.2, liveness_timeout_s=0.5, liveness_failures=2,
                   restart_delay_s=0.1)
    hung = await n.registry.load(tiny("hung", tiny_gguf))
    await n.registry.load(tiny("fine", tiny_gguf))
    assert hung.worker is not None and hung.worker.pid is not None
    stopped = hung.worker.pid
    with n.registry.events.subscribe() as events:
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        served = 0
        while not any(e.model == "hung" and e.new is WorkerState.READY
                      for e in list(events._events)):
            status, _ = await n.complete("fine")
            assert status == 200
            served += 1
            assert time.monotonic() - started < 20, "not replaced within the liveness bounds"
        backoff = next(e for e in events.pending() if e.new is WorkerState.BACKOFF)
    assert "stopped answering health checks" in backoff.reason
    assert served > 0
    assert not pid_alive(stopped)
    assert hung.to_json()["last_error"].startswith("worker stopped answering health checks")
    assert "stopped answering health checks" in hung.log_path.with_name(
        hung.log_path.name + ".1").read_text()
    status, _ = await n.complete("hung")
    assert status == 200


@llama_required
async def test_a_long_generation_and_a_long_prompt_are_not_mistaken_for_a_hang(
    node: Any, tiny_gguf: Path
) -> None:
    n = await node(liveness_interval_s=0.05, liveness_timeout_s=0.5, liveness_failures=2)
    model = await n.registry.load(tiny("busy", tiny_gguf, n_ctx=4096))
    worker = model.worker
    assert worker is not None
    probes = {True: 0, False: 0}  # liveness probes answered, and not
    real_probe = worker._probe

    async def probe(port: int, path: str) -> bool:
        ok = False
        try:
            ok = await real_probe(port, path)
        finally:
            probes[ok] += 1  # one cut by its timeout failed
        return ok

    worker._probe = probe
    with n.registry.events.subscribe() as events:
        before = dict(probes)
        started = time.monotonic()
        # </s> (token 2) banned: the random model would stop at a random length.
        status, long_answer = await n.complete("busy", max_tokens=2000,
                                               logit_bias={"2": -100})
        generating_s = time.monotonic() - started
        assert status == 200, long_answer
        during = probes[True] - before[True]
        status, long_prompt = await n.complete("busy", prompt="ab " * 600, max_tokens=4)
        assert status == 200, long_prompt
        assert list(events.pending()) == []  # no crash, no restart
    assert long_answer["usage"]["completion_tokens"] == 2000
    assert long_prompt["usage"]["prompt_tokens"] > 1000
    assert model.restarts == 0 and model.worker is worker
    # The worker answered its probes while it generated (and never failed one).
    assert probes[False] == before[False]
    assert during >= min(5, int(generating_s / 0.05) // 2), (during, generating_s)


@llama_required
async def test_a_client_that_hangs_up_while_queued_frees_its_place(
    node: Any, tiny_gguf: Path
) -> None:
    n = await node(max_queue=1)
    await n.registry.load(tiny("tiny", tiny_gguf, n_ctx=4096))
    long = asyncio.create_task(n.complete("tiny", max_tokens=3000))
    await _wait_metric(n, 'neuron_requests_in_flight{model="tiny"} 1.0')
    queued = asyncio.create_task(n.complete("tiny"))
    await _wait_metric(n, 'neuron_requests_queued{model="tiny"} 1.0')
    queued.cancel()  # the client hangs up while waiting
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    await _wait_metric(n, 'neuron_requests_queued{model="tiny"} 0.0')
    status, _ = await n.complete("tiny")  # its place is free again
    assert status == 200
    assert (await long)[0] == 200


async def _wait_metric(n: Node, line: str, timeout_s: float = 5.0) -> None:
    async def shown() -> bool:
        async with n.session.get(f"{n.url}/metrics") as resp:
            return line in await resp.text()

    await poll_until_awaited(shown, timeout_s)



def real_llama_server() -> str | None:
    configured = os.environ.get("NEURON_HARNESS__LLAMA_SERVER__BINARY")
    return shutil.which(configured or "llama-server")


@pytest.mark.llama_server
@pytest.mark.skipif(real_llama_server() is None,
                    reason="no llama-server binary on PATH (bash .ci/llama-server.sh builds one)")
async def test_llama_server_slots_serve_in_parallel_and_its_metrics_reach_the_node(
    make_registry: MakeRegistry, node_config: NeuronConfig, tiny_gguf: Path
) -> None:
    binary = real_llama_server()
    assert binary is not None
    harness = LlamaServerHarness(HarnessConfig(binary=binary))
    registry = make_registry(node_config, {LLAMA_SERVER: harness})
    model = await registry.load(ModelSpec("tiny", harness=LLAMA_SERVER, path=tiny_gguf,
                                          n_ctx=256, parallel=3, ready_timeout_s=120.0))
    assert model.slots == 3
    assert model.worker is not None
    command = model.worker.plan.command
    assert command[command.index("--parallel") + 1] == "3"
    assert command[command.index("-c") + 1] == "768"  # each slot gets the whole n_ctx
    server = TestServer(create_app(registry), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            n = Node(registry, str(server.make_url("")).rstrip("/"), session)
            results = await asyncio.gather(*(n.stream("tiny", max_tokens=16) for _ in range(9)))
            assert all(status == 200 and finish for status, finish in results), results
            async with session.get(f"{n.url}/metrics") as resp:
                metrics = await resp.text()
    finally:
        await server.close()
    assert 'llamacpp:requests_processing{model="tiny"}' in metrics
    assert 'neuron_requests_queued{model="tiny"} 0.0' in metrics


@pytest.mark.llama_server
@pytest.mark.skipif(real_llama_server() is None,
                    reason="no llama-server binary on PATH (bash .ci/llama-server.sh builds one)")
async def test_llama_server_by_default_batches_the_slots_it_chooses_itself(
    make_registry: MakeRegistry, node_config: NeuronConfig, tiny_gguf: Path
) -> None:
    binary = real_llama_server()
    assert binary is not None
    harness = LlamaServerHarness(HarnessConfig(binary=binary))
    registry = make_registry(node_config, {LLAMA_SERVER: harness})
    model = await registry.load(ModelSpec("tiny", harness=LLAMA_SERVER, path=tiny_gguf,
                                          n_ctx=256, ready_timeout_s=120.0))
    assert model.worker is not None
    command = model.worker.plan.command
    assert "--parallel" not in command
    assert command[command.index("-c") + 1] == "256"  # one cache, shared by the slots
    await poll_until_async(lambda: model.served_n_ctx is not None)  # its GET /props said
    assert model.slots == 4
    assert "n_slots = 4" in model.log_path.read_text()
    server = TestServer(create_app(registry), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            n = Node(registry, str(server.make_url("")).rstrip("/"), session)
            results = await asyncio.gather(*(n.stream("tiny", max_tokens=16) for _ in range(8)))
            assert all(status == 200 and finish for status, finish in results), results
            async with session.get(f"{n.url}/models") as resp:
                listed = await resp.json()
    finally:
        await server.close()
    assert listed[0]["slots"] == 4


async def test_the_queue_follows_the_slots_a_worker_says_it_serves_after_it_is_ready(
    make_registry: MakeRegistry, node_config: NeuronConfig, tiny_gguf: Path, tmp_path: Path,
) -> None:
    """A model is ready with the slots its harness expects (4) and its worker's GET /props
    is read beside the first requests: a worker that serves 1 has the router send it one
    request at a time from then on, the others waiting in the node's queue."""
    binary = wrapper(tmp_path / "llama-server", FAKE_LLAMA_SERVER)
    harness = LlamaServerHarness(HarnessConfig(binary=str(binary)))
    registry = make_registry(node_config, {LLAMA_SERVER: harness})
    server = TestServer(create_app(registry), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            n = Node(registry, str(server.make_url("")).rstrip("/"), session)
            model = await registry.load(ModelSpec(
                "one", harness=LLAMA_SERVER, path=tiny_gguf,
                args=("--fake-slots", "1", "--fake-props-s", "1")))
            assert model.slots == 4
            assert (await n.complete("one"))[0] == 200  # its queue made, with 4 slots
            await poll_until_async(lambda: model.slots == 1)
            held = [asyncio.create_task(n.complete("one", hold_s=1.0)) for _ in range(3)]

            async def counts() -> tuple[int, int]:
                async with session.get(f"{n.url}/models/stats") as resp:
                    stats = (await resp.json())["models"].get("one", {})
                return stats.get("in_flight", 0), stats.get("queued", 0)

            async def one_sent_two_waiting() -> bool:
                return await counts() == (1, 2)

            await poll_until_awaited(one_sent_two_waiting, timeout=10)
            assert all(status == 200 for status, _ in await asyncio.gather(*held))
    finally:
        await server.close()


RUDE_WORKER = r"""
import socket, sys, threading
port = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(64)

def serve(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return conn.close()
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        rest += conn.recv(65536)
    body = b'{"ok": true}'
    # Promises keep-alive, answers one request, then drops the next unanswered: what a
    # pooled client meets as a stale connection.
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Connection: keep-alive\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    conn.settimeout(1.0)
    try:
        conn.recv(65536)
    except OSError:
        pass
    conn.close()

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class RudeHarness(Harness):
    name = "rude"

    def slots(self, spec: ModelSpec) -> int:
        return 1

    def plan(self, spec: ModelSpec, port: int) -> Any:
        from neuronctl.supervisor.harness import WorkerPlan

        return WorkerPlan((sys.executable, "-c", RUDE_WORKER, str(port)), {}, "/health", 10.0)


async def test_a_connection_the_worker_closed_behind_keep_alive_is_sent_again(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry(harnesses={"rude": RudeHarness()})
    await registry.load(ModelSpec("m", harness="rude"))
    server = TestServer(create_app(registry), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(6):  # each after the first goes out on a connection now closed
                async with session.post(server.make_url("/v1/completions"),
                                        json={"model": "m", "prompt": "x"}) as resp:
                    assert resp.status == 200, await resp.text()
                    assert await resp.json() == {"ok": True}
    finally:
        await server.close()


# The tiny model's random weights often end an answer early; without its end-of-text token
# (id 2) 3000 tokens take seconds here.
NO_EOS = {"2": -100}


@llama_required
async def test_a_non_streamed_answer_whose_client_left_keeps_its_slot_until_done(
    node: Any, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """llama-cpp-python finishes a non-streamed answer whatever the client does: its slot
    stays taken until then, so the next request waits in the queue, not inside a busy
    worker."""
    checks = [0]  # the router's looks for hung-up clients, counted instead of timed
    check_clients = Router._check_clients

    def counted(router: Router) -> None:
        checks[0] += 1
        check_clients(router)

    monkeypatch.setattr(Router, "_check_clients", counted)
    n = await node()
    await n.registry.load(tiny("tiny", tiny_gguf, n_ctx=4096))
    long = asyncio.create_task(n.complete("tiny", max_tokens=3000, logit_bias=NO_EOS))
    await _wait_metric(n, 'neuron_requests_in_flight{model="tiny"} 1.0')
    long.cancel()  # the client hangs up
    with contextlib.suppress(asyncio.CancelledError):
        await long
    queued = asyncio.create_task(n.complete("tiny"))
    await _wait_metric(n, 'neuron_requests_queued{model="tiny"} 1.0')
    # The router has looked for hang-ups (one whole look at least) since the client left:
    # a router that cancelled the abandoned answer would have freed its slot by now.
    seen = checks[0]
    await poll_until_async(lambda: checks[0] >= seen + 2, timeout=5 + 4 * HANG_UP_CHECK_S)
    await _wait_metric(n, 'neuron_requests_queued{model="tiny"} 1.0')
    await _wait_metric(n, 'neuron_requests_in_flight{model="tiny"} 1.0')
    status, _ = await asyncio.wait_for(queued, 60)  # served once the worker is free
    assert status == 200


@llama_required
async def test_requests_queued_when_the_node_stops_get_a_503_not_a_reset(
    node: Any, tiny_gguf: Path
) -> None:
    n = await node()
    await n.registry.load(tiny("tiny", tiny_gguf, n_ctx=4096))
    long = asyncio.create_task(n.complete("tiny", max_tokens=3000, logit_bias=NO_EOS))
    await _wait_metric(n, 'neuron_requests_in_flight{model="tiny"} 1.0')
    queued = asyncio.create_task(n.complete("tiny"))
    await _wait_metric(n, 'neuron_requests_queued{model="tiny"} 1.0')
    assert n.runner is not None
    stopping = asyncio.create_task(n.runner.cleanup())  # the daemon's shutdown of it
    status, answer = await asyncio.wait_for(queued, 10)
    assert status == 503 and answer["error"]["code"] == "model_not_ready"
    assert "node is stopping" in answer["error"]["message"]
    await stopping
    long.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await long
