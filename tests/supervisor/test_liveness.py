"""Liveness with the default settings: a hung worker is killed at once (SIGKILL to its
group) and replaced, a busy one is left alone.

The probe schedule is tested with the clock and the worker swapped out; then a real
`llama-server` on the tiny GGUF is stopped with SIGSTOP (replaced) and kept busy with long
generations in every slot (not restarted), under the node's default liveness settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from neuronctl.api.app import create_app
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.events import ModelEvent
from neuronctl.states import WorkerState
from neuronctl.supervisor import liveness
from neuronctl.supervisor.harness import LLAMA_SERVER, LlamaServerHarness
from neuronctl.supervisor.worker import Worker

from ..helpers import MakeRegistry, pid_alive, poll_until_async


class ProbedWorker:
    """What `liveness.watch` uses of a Worker: its answers, scripted, and its kill."""

    pid = 4242

    def __init__(self, answers: list[bool]) -> None:
        self._answers = answers
        self.killed = False

    async def answers(self, timeout_s: float) -> bool:
        return self._answers.pop(0) if self._answers else False

    async def kill(self) -> None:
        self.killed = True

    async def stop(self) -> None:  # pragma: no cover - a hung worker is never asked
        raise AssertionError("a hung worker is killed, not stopped politely")


async def test_a_hung_worker_is_killed_after_two_failed_probes_the_second_sooner(
    tmp_path: Path,
) -> None:
    config = NeuronConfig()  # the defaults
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    worker = ProbedWorker([True, True, False, False])
    hung: list[str] = []
    await liveness.watch("m", worker, lambda: config, sleep,  # type: ignore[arg-type]
                         tmp_path / "m.log", hung)
    assert worker.killed
    assert hung == ["stopped answering health checks (2 probes in a row failed or took "
                    "over 3 s)"]
    # Two good probes and the first failure at the interval; the second failure's probe
    # came RETRY_AFTER_FAILURE_S later, not a whole interval.
    assert slept == [2.0, 2.0, 2.0, liveness.RETRY_AFTER_FAILURE_S]
    # Worst case from the hang to the kill: an interval, a probe's timeout, the retry and
    # its timeout.
    worst = (config.liveness_interval_s + config.liveness_timeout_s
             + liveness.RETRY_AFTER_FAILURE_S + config.liveness_timeout_s)
    assert worst + config.restart_delay_s < 15


async def test_a_probe_that_answers_again_resets_the_count(tmp_path: Path) -> None:
    config = NeuronConfig()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    worker = ProbedWorker([False, True, False, True, False, False])
    await liveness.watch("m", worker, lambda: config, sleep,  # type: ignore[arg-type]
                         tmp_path / "m.log", [])
    assert worker.killed
    assert slept == [2.0, 0.5, 2.0, 0.5, 2.0, 0.5]  # killed only by two failures in a row


# --- a real llama-server ------------------------------------------------------------------


def real_llama_server() -> str | None:
    configured = os.environ.get("NEURON_HARNESS__LLAMA_SERVER__BINARY")
    return shutil.which(configured or "llama-server")


NO_BINARY = "no llama-server binary on PATH (bash .ci/llama-server.sh builds one)"


def tiny_server(model_id: str, path: Path, *args: str, n_ctx: int = 256) -> ModelSpec:
    return ModelSpec(model_id, harness=LLAMA_SERVER, path=path, n_ctx=n_ctx,
                     ready_timeout_s=120.0, args=args)


@pytest.fixture
def registry_with_llama_server(make_registry: MakeRegistry,
                               node_config: NeuronConfig) -> Any:
    binary = real_llama_server()
    assert binary is not None
    # The node's default liveness settings: node_config leaves them alone.
    assert node_config.liveness_interval_s == NeuronConfig().liveness_interval_s
    return make_registry(node_config,
                         {LLAMA_SERVER: LlamaServerHarness(HarnessConfig(binary=binary))})


@pytest.mark.llama_server
@pytest.mark.skipif(real_llama_server() is None, reason=NO_BINARY)
async def test_a_stopped_llama_server_is_killed_at_once_and_replaced(
    registry_with_llama_server: Any, tiny_gguf: Path
) -> None:
    registry = registry_with_llama_server
    model = await registry.load(tiny_server("hung", tiny_gguf))
    worker = model.worker
    assert worker is not None and worker.pid is not None
    stopped = worker.pid
    seen: list[ModelEvent] = []
    with registry.events.subscribe() as events:
        os.kill(stopped, signal.SIGSTOP)
        # Bounded, generously: the defaults replace it in about 10 s on an idle machine.
        await events.wait_for(lambda e: bool(seen.append(e)) or e.new is WorkerState.READY,
                              timeout_s=60)
    backoff = next(e for e in seen if e.new is WorkerState.BACKOFF)
    assert "stopped answering health checks (2 probes in a row" in backoff.reason
    assert not pid_alive(stopped)
    assert model.worker is not None and model.worker.pid != stopped
    previous = model.log_path.with_name(model.log_path.name + ".1").read_text()
    # Killed outright: a stopped process would never act on SIGTERM.
    assert f"worker pid {stopped} was killed by SIGKILL (neuronctl sent SIGKILL)" in previous
    assert await model.worker.answers(10)


@pytest.mark.llama_server
@pytest.mark.skipif(real_llama_server() is None, reason=NO_BINARY)
async def test_a_llama_server_busy_in_every_slot_is_not_restarted(
    registry_with_llama_server: Any, tiny_gguf: Path
) -> None:
    registry = registry_with_llama_server
    # --context-shift: the tiny model's 256-token context does not end a generation; the
    # slots share one cache of n_ctx, which holds all four at their longest.
    model = await registry.load(tiny_server("busy", tiny_gguf, "--context-shift",
                                            n_ctx=4 * 256))
    worker: Worker | None = model.worker
    assert worker is not None and model.slots == 4
    answered: list[bool] = []
    real_answers = worker.answers

    async def counted(timeout_s: float) -> bool:
        ok = await real_answers(timeout_s)
        answered.append(ok)
        return ok

    worker.answers = counted  # type: ignore[method-assign]
    server = TestServer(create_app(registry), host="127.0.0.1")
    await server.start_server()
    tokens = [0, 0, 0, 0]

    async def generate(session: aiohttp.ClientSession, i: int) -> None:
        # </s> (token 2) banned: the random model would stop at a random length.
        body = {"model": "busy", "prompt": "x", "max_tokens": 100_000, "stream": True,
                "logit_bias": {"2": -100}}
        async with session.post(server.make_url("/v1/completions"), json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    json.loads(line[6:])
                    tokens[i] += 1

    try:
        with registry.events.subscribe() as events:
            async with aiohttp.ClientSession() as session:
                streams = [asyncio.create_task(generate(session, i)) for i in range(4)]
                try:
                    # Every slot generating while the default liveness probes three times
                    # (six seconds and more): each must have been answered.
                    await poll_until_async(
                        lambda: len(answered) >= 3 or any(s.done() for s in streams),
                        timeout=120, interval=0.1)
                    assert not any(s.done() for s in streams), [s for s in streams if s.done()]
                    assert all(tokens), tokens  # every stream was generating
                finally:
                    for stream in streams:
                        stream.cancel()
                    await asyncio.gather(*streams, return_exceptions=True)
            assert list(events.pending()) == []  # no crash, no restart
    finally:
        await server.close()
    assert answered[:3] == [True, True, True]
    assert model.worker is worker and worker.returncode is None and model.restarts == 0
