"""The registry with real (fake-worker) processes: single-flight, serialization, crashes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from neuronctl.config import ModelSpec
from neuronctl.errors import Conflict, LoadError, ModelNotFound
from neuronctl.states import ModelStatus
from neuronctl.supervisor.worker import Worker

from ..fakes import FakeHarness
from ..helpers import MakeRegistry, pid_alive, poll_until


def fake(model_id: str, *args: str, **kw: Any) -> ModelSpec:
    return ModelSpec(model_id, harness="fake", args=tuple(args), **kw)


async def test_concurrent_loads_of_one_model_start_one_process(
    make_registry: MakeRegistry, fake_harness: FakeHarness
) -> None:
    registry = make_registry()
    spec = fake("org/m", "--delay", "0.3")
    records = await asyncio.gather(*(registry.load(spec) for _ in range(20)))
    assert len({id(r) for r in records}) == 1
    assert fake_harness.planned == ["org/m"]  # one plan, one process
    assert records[0].status is ModelStatus.LOADED
    # Loading it again once loaded is a no-op.
    assert await registry.load(spec) is records[0]
    assert fake_harness.planned == ["org/m"]
    with pytest.raises(Conflict, match="different settings") as conflict:
        await registry.load(fake("org/m", "--delay", "0.1"))
    # It says which (only the args differ here), as the config writes them: no reprs.
    assert conflict.value.message == (
        "org/m is loaded with different settings (args [--delay, 0.3] → [--delay, 0.1]); "
        "unload it first")
    with pytest.raises(Conflict) as other_path:
        await registry.load(dataclasses.replace(spec, path=Path("/m/tiny.gguf"), n_ctx=None))
    assert "path unset → /m/tiny.gguf" in other_path.value.message
    assert "PosixPath" not in other_path.value.message


async def test_loads_of_different_models_are_serialized(make_registry: MakeRegistry) -> None:
    events: list[str] = []

    class RecordingWorker(Worker):
        async def start(self) -> None:
            events.append(f"start {self.model_id}")
            await super().start()
            events.append(f"ready {self.model_id}")

    registry = make_registry(worker_factory=RecordingWorker)
    await asyncio.gather(
        registry.load(fake("a", "--delay", "0.3")),
        registry.load(fake("b", "--delay", "0.1")),
    )
    assert events == ["start a", "ready a", "start b", "ready b"]


async def test_a_crash_after_ready_is_noticed_and_listed_failed(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    record = await registry.load(fake("m", restart="never"))
    assert record.worker is not None and record.worker.pid is not None
    os.kill(record.worker.pid, signal.SIGKILL)
    await asyncio.to_thread(poll_until, lambda: record.status is ModelStatus.FAILED, 10)
    assert record.last_exit_code == -signal.SIGKILL
    assert record.last_error is not None and "SIGKILL" in record.last_error
    shown = record.to_json()
    assert shown["pid"] is None and shown["exit_code"] == -signal.SIGKILL
    # Loading it again replaces the failed entry.
    again = await registry.load(fake("m", restart="never"))
    assert again.status is ModelStatus.LOADED and again is not record


async def test_failed_load_stays_listed_until_unloaded(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    with pytest.raises(LoadError):
        await registry.load(fake("m", "--mode", "crash"))
    [record] = registry.models()
    assert record.status is ModelStatus.FAILED and record.last_exit_code == 3
    await registry.unload("m")
    assert registry.models() == []
    with pytest.raises(ModelNotFound):
        await registry.unload("m")


async def test_unload_stops_the_worker(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    record = await registry.load(fake("m"))
    pid = record.worker.pid if record.worker else None
    assert pid is not None
    await registry.unload("m")
    assert not pid_alive(pid)
    assert registry.get("m") is None


async def test_shutdown_cancels_loads_in_flight_and_kills_their_processes(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    ready = await registry.load(fake("ready"))
    pending = asyncio.create_task(registry.load(fake("hanging", "--mode", "hang")))

    def hanging_pid() -> int | None:
        record = registry.get("hanging")
        return record.worker.pid if record and record.worker else None

    hang_pid = await asyncio.to_thread(poll_until, hanging_pid, 10)
    await registry.shutdown()
    with pytest.raises(LoadError, match="load cancelled"):
        await pending
    assert ready.worker is not None and ready.worker.pid is not None
    for pid in (ready.worker.pid, hang_pid):
        assert not pid_alive(pid)


async def test_the_logs_of_unloaded_models_outside_the_catalogue_are_bounded(
    make_registry: MakeRegistry, node_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuronctl.supervisor import registry as registry_module

    monkeypatch.setattr(registry_module, "MAX_AD_HOC_LOGS", 2)
    config = dataclasses.replace(node_config, models=(fake("cat"),))
    registry = make_registry(config)
    await registry.load(fake("cat"))
    await registry.unload("cat")  # a catalogue model's log stays, whatever happens
    for n in range(4):
        await registry.load(fake(f"adhoc{n}"))
        await registry.unload(f"adhoc{n}")
    logs = sorted(p.name for p in config.log_dir.glob("*.log"))
    # The two most recent ad-hoc models' logs are kept, for `neuronctl logs` after the fact.
    assert logs == ["adhoc2.log", "adhoc3.log", "cat.log"]


async def test_unloading_what_is_not_loaded_says_which_case_it_is(
    make_registry: MakeRegistry, node_config: Any
) -> None:
    registry = make_registry(dataclasses.replace(node_config, models=(fake("tiny"),)))
    with pytest.raises(ModelNotFound) as unloaded:
        await registry.unload("tiny")
    assert unloaded.value.message == "model not loaded: tiny (it is unloaded)"
    with pytest.raises(ModelNotFound) as typo:
        await registry.unload("tyni")
    assert typo.value.message == ("model not loaded: tyni: no model of that id on this node "
                                  "(did you mean tiny?)")
