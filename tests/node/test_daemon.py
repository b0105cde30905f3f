"""The daemon's life in named steps, in this process: a failing step still stops every
worker, and signals during orphan cleanup or activation are handled, never fatal."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.node import listener
from neuronctl.node.daemon import Daemon, bind_listener
from neuronctl.states import WorkerState
from neuronctl.supervisor.statefile import StateFile

from ..fakes import FAKE_WORKER, FakeHarness
from ..helpers import free_port, kill_quietly, pid_alive, poll_until


def config_with(node_config: NeuronConfig, *models: ModelSpec) -> NeuronConfig:
    node_config.log_dir.mkdir(parents=True, exist_ok=True)
    node_config.state_dir.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(node_config, port=free_port(), default_models=models)


def worker_pids(daemon: Daemon) -> list[int]:
    return [m.worker.pid for m in daemon.registry.models() if m.worker and m.worker.pid]


async def gone(pids: list[int]) -> None:
    await asyncio.to_thread(poll_until, lambda: not any(pid_alive(p) for p in pids), 10.0)


async def test_a_step_that_fails_after_a_worker_spawned_stops_it_and_exits_1(
    node_config: NeuronConfig, fake_harness: FakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_with(node_config, ModelSpec("m", harness="fake"))
    sock = bind_listener("127.0.0.1", config.port)
    sock.close()  # listening on it will fail, once the model is up
    daemon = Daemon(config, {"fake": fake_harness}, sock)
    with daemon.registry.events.subscribe() as events, \
            caplog.at_level(logging.INFO, logger="neuronctl"):
        code = await daemon.run()
        ready = [e for e in events.pending() if e.new is WorkerState.READY]
    assert code == 1
    assert len(ready) == 1  # a worker was up when the step failed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("neuronctl: starting the API failed: ")
    assert errors[0].exc_info is None  # one line, no traceback at the default level
    assert daemon.registry.models() == []
    assert fake_harness.planned == ["m"]


async def test_sighup_during_activation_is_ignored_and_the_node_comes_up(
    node_config: NeuronConfig, fake_harness: FakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_with(node_config, ModelSpec("m", harness="fake", args=("--delay", "0.5")))
    daemon = Daemon(config, {"fake": fake_harness}, bind_listener("127.0.0.1", config.port))
    loop = asyncio.get_running_loop()

    def on_event(event: object) -> None:
        if getattr(event, "new", None) is WorkerState.STARTING:
            os.kill(os.getpid(), signal.SIGHUP)  # mid-activation
        if getattr(event, "new", None) is WorkerState.READY:
            loop.call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)

    daemon.registry.events.on_event(on_event)
    with caplog.at_level(logging.INFO, logger="neuronctl"):
        code = await daemon.run()
    assert code == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "SIGHUP during activation ignored; reload once the node is up" in messages
    assert any(m.startswith("listening on http://") for m in messages)


async def test_sigterm_during_activation_stops_the_worker_and_exits_0(
    node_config: NeuronConfig, fake_harness: FakeHarness
) -> None:
    config = config_with(node_config, ModelSpec("m", harness="fake", args=("--delay", "30")),
                         ModelSpec("n", harness="fake"))
    daemon = Daemon(config, {"fake": fake_harness}, bind_listener("127.0.0.1", config.port))
    pids: list[int] = []

    def on_event(event: object) -> None:
        if getattr(event, "new", None) is WorkerState.STARTING:
            pids.extend(worker_pids(daemon))
            os.kill(os.getpid(), signal.SIGTERM)

    daemon.registry.events.on_event(on_event)
    assert await daemon.run() == 0
    await gone(pids)
    assert fake_harness.planned == ["m"]  # the second default model was never started


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
async def test_a_signal_during_orphan_cleanup_is_handled(
    node_config: NeuronConfig, fake_harness: FakeHarness, sig: signal.Signals
) -> None:
    config = config_with(node_config, ModelSpec("m", harness="fake"))
    config = dataclasses.replace(config, stop_timeout_s=1.5)
    # An orphan that ignores SIGTERM: cleanup waits stop_timeout_s before SIGKILL.
    orphan = subprocess.Popen([sys.executable, str(FAKE_WORKER), "--mode", "ignore-term",
                               "--port", str(free_port())], start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout is not None
        # "ready" comes after it began to ignore SIGTERM.
        while (line := await asyncio.to_thread(orphan.stdout.readline)) != "ready\n":
            assert line, "the orphan exited"
        info = psutil.Process(orphan.pid)
        entry = {"model_id": "m", "pid": orphan.pid, "cmdline": info.cmdline(),
                 "create_time": info.create_time()}
        (config.state_dir / "workers.json").write_text(json.dumps({"workers": [entry]}))
        state = StateFile(config.state_dir)
        daemon = Daemon(config, {"fake": fake_harness},
                        bind_listener("127.0.0.1", config.port), state)
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, os.kill, os.getpid(), sig)
        if sig is signal.SIGHUP:  # ignored: the node goes on, then is stopped
            daemon.registry.events.on_event(
                lambda e: e.new is WorkerState.READY
                and loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM))
        assert await daemon.run() == 0
        await asyncio.to_thread(orphan.wait, 10)
        assert fake_harness.planned == (["m"] if sig is signal.SIGHUP else [])
    finally:
        kill_quietly(orphan.pid)
        orphan.wait(10)
        orphan.stdout.close()


def test_the_daemon_module_uses_no_renice_on_the_shared_executor() -> None:
    # The API import runs at nice 19 on a thread of its own, not one of the default
    # executor's (which every later to_thread call would then inherit).
    source = Path(sys.modules["neuronctl.node.daemon"].__file__ or "").read_text()
    assert "run_in_executor" not in source


def test_the_router_counters_are_made_with_the_registry(
    node_config: NeuronConfig, fake_harness: FakeHarness
) -> None:
    """One composition root: the registry reads the counters the router will write (eviction
    and /models see a request in flight) from construction on, not once the API is up."""
    config = config_with(node_config)
    sock = bind_listener("127.0.0.1", config.port)
    try:
        daemon = Daemon(config, {"fake": fake_harness}, sock)
        assert not daemon.registry.activity("m").busy
        daemon.stats.model("m").in_flight = 1
        assert daemon.registry.activity("m").busy
    finally:
        listener.release(sock)


def test_the_counters_load_neither_aiohttp_nor_prometheus() -> None:
    # The daemon makes them before activation, on the start path (node/__init__.py).
    probe = ("import sys, neuronctl.node.daemon, neuronctl.api.traffic\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'aiohttp', 'prometheus_client'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"
