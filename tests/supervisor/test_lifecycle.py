"""Bugs the load pipeline's reshaping exposed, each with the failure built in the test:
a worker left running behind a failed model, a supervisor task that dies, a reloaded
setting ignored, and the useful line of a failure dropped."""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from neuronctl import logfiles
from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.errors import Conflict, InternalError, LoadCancelled, WorkerExited
from neuronctl.states import ModelStatus, WorkerState
from neuronctl.supervisor.harness import Harness, WorkerPlan
from neuronctl.supervisor.lifecycle import ModelLifecycle
from neuronctl.supervisor.reload import Reloader
from neuronctl.supervisor.statefile import StateFile
from neuronctl.supervisor.worker import Worker

from ..helpers import MakeRegistry, llama_required, pid_alive, poll_until

FAKE = ModelSpec("m", harness="fake")


class PidRecordingWorker(Worker):
    """Remembers every pid it spawned, so a test can check none is left running."""

    pids: ClassVar[list[int]] = []

    async def start(self) -> None:
        spawn = self._spawn

        async def recording(*args: Any) -> asyncio.subprocess.Process:
            proc = await spawn(*args)
            PidRecordingWorker.pids.append(proc.pid)
            return proc

        self._spawn = recording
        await super().start()


@pytest.fixture(autouse=True)
def _fresh_pids() -> None:
    PidRecordingWorker.pids = []


async def assert_all_gone(pids: list[int]) -> None:
    assert pids, "no worker was spawned: the test did not reach the point it is about"
    await asyncio.to_thread(poll_until, lambda: not any(pid_alive(p) for p in pids), 5.0)


async def test_a_pid_line_that_cannot_be_written_costs_the_log_not_the_worker(
    make_registry: MakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, pid: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logfiles, "write_pid_line", disk_full)
    registry = make_registry(worker_factory=PidRecordingWorker)
    model = await registry.load(FAKE)  # a full log disk must not take the model down
    assert model.status is ModelStatus.LOADED
    assert "No space left on device" in (model.to_json()["warning"] or "")
    await registry.unload("m")
    await assert_all_gone(PidRecordingWorker.pids)


async def test_a_broken_state_file_write_kills_the_spawned_worker(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    class BrokenState(StateFile):
        async def add(self, model_id: str, pid: int, token: str = "") -> None:
            raise RuntimeError("state file bug")

    node_config.state_dir.mkdir(parents=True)
    registry = make_registry(worker_factory=PidRecordingWorker,
                             state=BrokenState(node_config.state_dir))
    with pytest.raises(InternalError, match="state file bug"):
        await registry.load(FAKE)
    model = registry.get("m")
    assert model is not None and model.status is ModelStatus.FAILED
    assert "state file bug" in (model.to_json()["error"] or "")
    await assert_all_gone(PidRecordingWorker.pids)


async def test_a_state_dir_that_cannot_be_written_only_warns(
    make_registry: MakeRegistry, node_config: NeuronConfig, caplog: pytest.LogCaptureFixture
) -> None:
    class FullDisk(StateFile):
        def record(self, model_id: str, pid: int, token: str = "") -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    node_config.state_dir.mkdir(parents=True)
    registry = make_registry(state=FullDisk(node_config.state_dir))
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        model = await registry.load(FAKE)
    assert model.status is ModelStatus.LOADED  # a worker with no record still serves
    assert any("No space left on device" in r.getMessage() for r in caplog.records)


async def test_a_supervisor_that_dies_of_a_bug_fails_the_model_and_kills_the_worker(
    make_registry: MakeRegistry,
) -> None:
    class BuggyWatch(PidRecordingWorker):
        async def wait_exit(self) -> int:
            await asyncio.sleep(0.05)  # the scenario: the watch dies a while after ready
            raise RuntimeError("watch bug")

    registry = make_registry(worker_factory=BuggyWatch)
    with registry.events.subscribe() as events:
        model = await registry.load(FAKE)
        failed = await events.wait_for(lambda e: e.new is WorkerState.FAILED, 5.0)
    assert failed.old is WorkerState.READY
    assert "watch bug" in failed.reason
    assert model.status is ModelStatus.FAILED
    assert model.to_json()["error"] == model.last_error
    assert model.last_error is not None and "RuntimeError('watch bug')" in model.last_error
    await assert_all_gone(PidRecordingWorker.pids)
    await registry.unload("m")  # and it can still be unloaded
    assert registry.get("m") is None


async def test_a_reloaded_gpu_poll_interval_applies(
    make_registry: MakeRegistry, tmp_path: Path
) -> None:
    config_file = tmp_path / "neuron.toml"
    dirs = f'log_dir = "{tmp_path}/log"\nstate_dir = "{tmp_path}/state"\n'
    config_file.write_text(dirs + "gpu_poll_interval_s = 5.0\n")
    registry = make_registry()
    reloader = Reloader(registry, config_file, build=lambda config: dict(registry.harnesses))
    await registry.discovery.refresh()  # the poller runs
    config_file.write_text(dirs + "gpu_poll_interval_s = 0.5\n")
    await reloader.reload()
    assert registry.config.gpu_poll_interval_s == 0.5
    assert registry.discovery.poll_interval_s == 0.5


class ArgparseHarness(Harness):
    """A worker that refuses its arguments the way llama-cpp-python's server does."""

    name = "argparse"
    script = ("import argparse, sys; print('loading', flush=True); "
              "p = argparse.ArgumentParser(prog='llama_cpp_server.py'); "
              "p.add_argument('--model'); p.parse_args(sys.argv[1:])")

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        command = (sys.executable, "-c", self.script, "--model", "x", *spec.args)
        return WorkerPlan(command, {}, "/health", 10.0)


async def test_the_line_that_says_why_reaches_the_error_the_api_and_the_journal(
    make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    registry = make_registry(harnesses={"argparse": ArgparseHarness()})
    spec = ModelSpec("m", harness="argparse", args=("--bogus",))
    with caplog.at_level(logging.INFO, logger="neuronctl"), \
            pytest.raises(WorkerExited) as raised:
        await registry.load(spec)
    why = "llama_cpp_server.py: error: unrecognized arguments: --bogus"
    assert raised.value.message == f"worker exited with code 2 while starting: {why}"
    assert raised.value.exit_code == 2
    assert raised.value.detail is not None and "usage: llama_cpp_server.py" in raised.value.detail
    listed = registry.models()[0].to_json()
    assert listed["error"] == raised.value.message  # one line, the useful one
    assert listed["exit_code"] == 2
    journal = [r.getMessage() for r in caplog.records if r.name == "neuronctl.models"]
    assert f"m: loading -> failed ({raised.value.message})" in journal


async def test_a_load_cancelled_before_its_task_ran_still_answers_its_waiters(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    model = ModelLifecycle(FAKE, registry.services)
    model.start()
    model.cancel_load()  # the same loop turn: the task is cancelled before its first step
    with pytest.raises(LoadCancelled):
        await asyncio.wait_for(model.wait_loaded(), 5)


async def test_loading_a_model_that_is_being_unloaded_is_a_conflict(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    # A worker that ignores SIGTERM: its unload takes the whole stop_timeout_s.
    spec = ModelSpec("m", harness="fake", args=("--mode", "ignore-term"))
    registry = make_registry(worker_factory=PidRecordingWorker)
    await registry.load(spec)
    unload = asyncio.create_task(registry.unload("m"))
    model = registry.get("m")
    await asyncio.to_thread(poll_until, lambda: model is not None and model.stopping, 5.0)
    with pytest.raises(Conflict, match="being unloaded"):
        await registry.load(spec)  # not 200 for a model about to be gone
    await unload
    assert registry.get("m") is None
    await registry.load(spec)  # once it is gone, a load starts it again
    await registry.unload("m")
    await assert_all_gone(PidRecordingWorker.pids)


@pytest.mark.llama
@llama_required
async def test_a_real_workers_log_has_no_health_probe_lines(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry
) -> None:
    """The supervisor's /health probes would write a line each (8,640 a day per model);
    requests that clients make are still logged. The log starts with its header."""
    import urllib.request

    from neuronctl.supervisor.harness import build_harnesses

    registry = make_registry(node_config, build_harnesses(node_config))
    model = await registry.load(ModelSpec("tiny", path=tiny_gguf, n_ctx=256))
    assert model.worker is not None
    for path in ("/health", "/health", "/v1/models"):
        await asyncio.to_thread(lambda p=path: urllib.request.urlopen(
            model.worker.endpoint + p, timeout=30).read())  # type: ignore[union-attr]
    await asyncio.to_thread(poll_until, lambda: '"GET /v1/models' in model.log_path.read_text(),
                            30)
    text = model.log_path.read_text()
    assert '"GET /health' not in text
    assert text.startswith("=== ")  # no empty first line
