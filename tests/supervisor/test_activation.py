"""load_default_models: sequential, continues past failures, silent on an empty list."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any, ClassVar

import pytest

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.errors import LoadError
from neuronctl.states import ModelStatus
from neuronctl.supervisor.activation import ActivationResult, load_default_models
from neuronctl.supervisor.harness import Harness, WorkerPlan
from neuronctl.supervisor.registry import ModelRegistry

from ..helpers import MakeRegistry


class ScriptedWorker:
    """A worker without a process: start() succeeds or fails as the test says, and
    records when it ran so overlapping loads would show."""

    timeline: ClassVar[list[tuple[str, str]]] = []
    failing: ClassVar[set[str]] = set()

    def __init__(self, model_id: str, plan: WorkerPlan, port: int, log_path: Path,
                 stop_timeout_s: float, **options: Any) -> None:
        self.model_id = model_id
        self.port = port
        self.pid = 4242
        self.returncode: int | None = None
        self.endpoint = f"http://127.0.0.1:{port}"
        self.stopped = False
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        self.timeline.append(("start", self.model_id))
        await asyncio.sleep(0.01)  # a yield, not a poll: a concurrent load could interleave
        self.timeline.append(("end", self.model_id))
        if self.model_id in self.failing:
            raise LoadError("worker exited with code 3 while starting", exit_code=3)

    async def wait_exit(self) -> int:
        return await self._exit

    async def stop(self) -> None:
        self.stopped = True
        if not self._exit.done():
            self._exit.set_result(0)

    async def kill(self) -> None:
        await self.stop()

    async def answers(self, timeout_s: float) -> bool:
        return True


class PlanOnlyHarness(Harness):
    name = "scripted"

    def slots(self, spec: ModelSpec) -> int:
        return 1

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        return WorkerPlan(("true",), {}, "/health", 5.0)


@pytest.fixture
def registry(make_registry: MakeRegistry, node_config: NeuronConfig) -> ModelRegistry:
    ScriptedWorker.timeline = []
    ScriptedWorker.failing = set()
    return make_registry(
        node_config, {"scripted": PlanOnlyHarness()}, worker_factory=ScriptedWorker
    )


async def test_unknown_harness_entries_fail_fast_without_spawning_or_network(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("activation touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    specs = [ModelSpec("org/first", harness="no-such-a"), ModelSpec("second", harness="no-such-b")]

    with caplog.at_level(logging.INFO, logger="neuronctl"):
        results = await asyncio.wait_for(load_default_models(registry, specs), 5)

    assert [r.model_id for r in results] == ["org/first", "second"]  # the second was still tried
    errors = [r.error for r in results]
    assert errors == ["unknown harness: no-such-a", "unknown harness: no-such-b"]
    assert ScriptedWorker.timeline == []  # nothing was spawned
    assert registry.models() == []  # an unknown harness is never listed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "org/first" in warnings[0].getMessage() and "no-such-a" in warnings[0].getMessage()
    assert "second" in warnings[1].getMessage()


async def test_empty_list_is_a_silent_no_op(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        results = await load_default_models(registry, [])
    assert results == []
    # asyncio itself says which selector it uses at DEBUG; nothing else may speak.
    assert [r.getMessage() for r in caplog.records if r.name != "asyncio"] == []


async def test_loads_one_at_a_time_and_continues_past_a_failure(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    specs = [ModelSpec(m, harness="scripted") for m in ("a", "b", "c")]
    ScriptedWorker.failing = {"b"}

    with caplog.at_level(logging.INFO, logger="neuronctl.supervisor.activation"):
        results = await load_default_models(registry, specs)
    status = {r.spec.model_id: r.status for r in registry.models()}

    # Strictly sequential: each load ends before the next one starts.
    assert ScriptedWorker.timeline == [
        ("start", "a"), ("end", "a"), ("start", "b"), ("end", "b"), ("start", "c"), ("end", "c"),
    ]
    assert [r.ok for r in results] == [True, False, True]
    # Each load waited out its worker's start, which sleeps 0.01 s, failing or not.
    assert all(r.elapsed_s >= 0.01 for r in results), results
    assert status == {"a": ModelStatus.LOADED, "b": ModelStatus.FAILED, "c": ModelStatus.LOADED}
    mine = [r for r in caplog.records if r.name == "neuronctl.supervisor.activation"]
    infos = [r.getMessage() for r in mine if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in mine if r.levelno == logging.WARNING]
    assert any(m.startswith("loaded default model a in ") and m.endswith(" s") for m in infos)
    assert any(m.startswith("loaded default model c in ") for m in infos)
    assert len(warnings) == 1 and "b" in warnings[0] and "code 3" in warnings[0]


async def test_observer_sees_each_entry_in_order(registry: ModelRegistry) -> None:
    events: list[str] = []

    class Observer:
        def before(self, index: int, total: int, spec: ModelSpec) -> None:
            events.append(f"before {index}/{total} {spec.model_id}")

        def after(self, index: int, total: int, result: ActivationResult) -> None:
            events.append(f"after {index}/{total} {result.model_id} ok={result.ok}")

    specs = [ModelSpec("a", harness="scripted"), ModelSpec("b", harness="missing")]

    await load_default_models(registry, specs, Observer())
    assert events == [
        "before 1/2 a", "after 1/2 a ok=True", "before 2/2 b", "after 2/2 b ok=False",
    ]
