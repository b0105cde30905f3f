"""Fault injection with real processes: crashes, restarts, orphans, shutdown, races."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.errors import LoadError
from neuronctl.states import ModelStatus, WorkerState
from neuronctl.supervisor.registry import Conflict
from neuronctl.supervisor.statefile import StateFile

from ..fakes import FAKE_WORKER, FakeHarness
from ..helpers import (
    NEURONCTL,
    MakeRegistry,
    clean_env,
    fast_restarts,
    free_port,
    kill_quietly,
    llama_required,
    pid_alive,
    poll_until,
)

ROOT = Path(__file__).resolve().parents[2]


def fake(model_id: str, *args: str, **kw: Any) -> ModelSpec:
    return ModelSpec(model_id, harness="fake", args=tuple(args), **kw)


def fake_worker_pids() -> list[int]:
    """Fake workers that are children of this test process."""
    me = psutil.Process()
    return [p.pid for p in me.children(recursive=True)
            if any(str(FAKE_WORKER) == part for part in _cmdline(p))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


async def wait_for(condition: Any, timeout: float = 15) -> Any:
    return await asyncio.to_thread(poll_until, condition, timeout)


async def test_kill_9_of_a_ready_worker_restarts_it_and_keeps_its_log(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    config = fast_restarts(node_config)
    registry = make_registry(config, state=StateFile(config.state_dir))
    record = await registry.load(fake("org/m"))
    first = record.worker.pid if record.worker else None
    assert first is not None
    os.kill(first, signal.SIGKILL)
    # Noticed at once: the exit, not a poll, moves it to `restarting`.
    await wait_for(lambda: record.status is ModelStatus.RESTARTING, 5)
    assert record.to_json()["last_exit_code"] == -signal.SIGKILL
    await wait_for(lambda: record.status is ModelStatus.LOADED)
    second = record.worker.pid if record.worker else None
    assert second not in (None, first) and pid_alive(second)  # type: ignore[arg-type]
    shown = record.to_json()
    assert shown["restarts"] == 1 and shown["last_exit_code"] == -signal.SIGKILL
    assert "SIGKILL" in shown["last_error"] and shown["error"] is None
    # The log of the crashed start survives as .log.1; the new start has its own.
    previous = record.log_path.parent / "org--m.log.1"
    assert f"=== worker pid {first}" in previous.read_text()
    assert f"=== worker pid {second}" in record.log_path.read_text()
    # The state file follows: only the live worker is recorded.
    recorded = [e.pid for e in StateFile(config.state_dir).read()]
    assert recorded == [second]
    await registry.shutdown()
    assert StateFile(config.state_dir).read() == []


async def test_a_worker_that_crashes_on_every_restart_ends_failed(
    node_config: NeuronConfig, make_registry: MakeRegistry, tmp_path: Path
) -> None:
    config = fast_restarts(node_config, max_restarts=2, restart_delay_s=0.05)
    marker = tmp_path / "started-once"

    registry = make_registry(config)
    spec = fake("m", "--crash-if-exists", str(marker), "--code", "9")
    record = await registry.load(spec)
    assert record.worker is not None and record.worker.pid is not None
    os.kill(record.worker.pid, signal.SIGKILL)
    await wait_for(lambda: record.status is ModelStatus.FAILED)
    shown = record.to_json()
    assert shown["restarts"] == 2  # the limit, then no more
    assert shown["exit_code"] == 9  # the last attempt's exit code
    assert "crashing on restart" in shown["error"]
    assert fake_worker_pids() == []
    # Failed stays down until it is loaded again.
    marker.unlink()
    again = await registry.load(spec)
    assert again.status is ModelStatus.LOADED and again.restarts == 0


async def test_restart_never_and_a_clean_exit_under_on_failure(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    registry = make_registry(fast_restarts(node_config, restart="never"))
    record = await registry.load(fake("m"))
    assert record.worker is not None and record.worker.pid is not None
    os.kill(record.worker.pid, signal.SIGTERM)  # exits 143-ish: a failure
    await wait_for(lambda: record.status is ModelStatus.FAILED)
    assert record.restarts == 0
    # Per-model policy overrides the node's.
    other = await registry.load(fake("n", restart="always"))
    assert other.worker is not None and other.worker.pid is not None
    os.kill(other.worker.pid, signal.SIGKILL)
    await wait_for(lambda: other.status is ModelStatus.LOADED and other.restarts == 1)


async def test_unload_during_load_cancels_it_and_kills_the_process(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    loading = asyncio.create_task(registry.load(fake("m", "--mode", "hang")))

    def spawned() -> int | None:
        record = registry.get("m")
        return record.worker.pid if record and record.worker else None

    pid = await wait_for(spawned)
    await registry.unload("m")
    with pytest.raises(LoadError, match="load cancelled"):
        await loading
    assert not pid_alive(pid)
    assert registry.get("m") is None


async def test_unload_during_backoff_stops_the_restarts(
    node_config: NeuronConfig, make_registry: MakeRegistry, fake_harness: FakeHarness
) -> None:
    config = fast_restarts(node_config, restart_delay_s=2.0, restart_delay_max_s=2.0)
    registry = make_registry(config)
    record = await registry.load(fake("m"))
    assert record.worker is not None and record.worker.pid is not None
    os.kill(record.worker.pid, signal.SIGKILL)
    await wait_for(lambda: record.state is WorkerState.BACKOFF, 5)
    await registry.unload("m")
    assert registry.get("m") is None and record.state is WorkerState.STOPPED
    # Only the model's own task restarts a worker, and it is over.
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "model m"]
    assert fake_worker_pids() == [] and fake_harness.planned == ["m"]


async def test_twenty_concurrent_http_loads_make_one_worker(
    make_registry: MakeRegistry, fake_harness: FakeHarness
) -> None:
    registry = make_registry()
    async with TestClient(TestServer(create_app(registry))) as client:
        body = {"model_id": "m", "harness": "fake", "args": ["--delay", "0.3"]}

        async def load() -> int:
            async with client.post("/models/load", json=body) as resp:
                return resp.status

        statuses = await asyncio.gather(*(load() for _ in range(20)))
        assert statuses == [200] * 20
        assert len(fake_worker_pids()) == 1
        assert fake_harness.planned == ["m"]


def run_daemon_script(tmp_path: Path, models: list[dict[str, Any]], port: int) -> str:
    """A `neuronctl start` equivalent whose harness is the fake worker."""
    return textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from neuronctl.node import daemon
        from neuronctl.config import config_from_mapping
        from neuronctl.node.logsetup import setup_logging
        from tests.fakes import FakeHarness
        config = config_from_mapping({{
            "host": "127.0.0.1", "port": {port}, "stop_timeout_s": 1.0,
            "log_dir": "{tmp_path}/log", "state_dir": "{tmp_path}/state",
            "default_models": {models!r},
        }})
        setup_logging("INFO")
        sock = daemon.bind_listener(config.host, config.port)
        sys.exit(asyncio.run(daemon.serve(config, {{"fake": FakeHarness()}}, sock)))
    """)


def test_sigterm_stops_every_worker_even_one_ignoring_it(tmp_path: Path) -> None:
    port = free_port()
    models = [{"model_id": m, "harness": "fake", "args": list(a)}
              for m, a in (("a", ()), ("b", ("--mode", "ignore-term")), ("c", ()))]
    script = run_daemon_script(tmp_path, models, port)
    with (tmp_path / "daemon.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=clean_env())
    try:
        def worker_pids() -> list[int]:
            kids = psutil.Process(proc.pid).children()
            return [p.pid for p in kids] if len(kids) == 3 else []

        pids = poll_until(worker_pids, timeout=30)
        poll_until(lambda: b"listening" in (tmp_path / "daemon.log").read_bytes(), 30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        # Bounded: stop_timeout_s (1 s) for the one ignoring SIGTERM, all in parallel.
        assert time.monotonic() - started < 10
        for pid in pids:
            assert not pid_alive(pid)
        log = (tmp_path / "daemon.log").read_text()
        assert "ignored SIGTERM" in log and "stopped" in log
    finally:
        kill_quietly(proc.pid)
        proc.wait(10)


def test_a_second_supervisor_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {free_port()}\nlog_dir = "log"\n'
                      'state_dir = "state"\n')
    with (tmp_path / "first.log").open("wb") as out:
        first = subprocess.Popen([NEURONCTL, "start", "--config", str(config)], env=clean_env(),
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: b"listening" in (tmp_path / "first.log").read_bytes(), 30)
        other = tmp_path / "other.toml"
        other.write_text(config.read_text().replace("port =", f"port = {free_port()} #"))
        second = subprocess.run([NEURONCTL, "start", "--config", str(other)], env=clean_env(),
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert f"another neuronctl start (pid {first.pid}) is running" in second.stderr
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0


def test_orphans_of_a_crashed_supervisor_are_stopped_and_strangers_left_alone(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # An orphan: a worker-like process in its own session, as a dead supervisor leaves it.
    orphan = subprocess.Popen([sys.executable, str(FAKE_WORKER), "--mode", "hang",
                               "--port", "1"], start_new_session=True)
    # A stranger whose pid the stale file lists, but with another start time: a recycled pid.
    stranger = subprocess.Popen([sys.executable, str(FAKE_WORKER), "--mode", "hang",
                                 "--port", "2"], start_new_session=True)
    # Reap the orphan the moment it dies, as init would for a real one.
    reaper = threading.Thread(target=orphan.wait, daemon=True)
    reaper.start()
    try:
        poll_until(lambda: len(psutil.Process(orphan.pid).cmdline()) > 2, 10)
        poll_until(lambda: len(psutil.Process(stranger.pid).cmdline()) > 2, 10)
        entries = []
        for proc, skew in ((orphan, 0.0), (stranger, -3600.0)):
            info = psutil.Process(proc.pid)
            entries.append({"model_id": "m", "pid": proc.pid, "cmdline": info.cmdline(),
                            "create_time": info.create_time() + skew})
        (state_dir / "workers.json").write_text(json.dumps({"workers": entries}))

        config = tmp_path / "neuron.toml"
        config.write_text(f'host = "127.0.0.1"\nport = {free_port()}\nlog_dir = "log"\n'
                          f'state_dir = "{state_dir}"\nstop_timeout_s = 2.0\n')
        with (tmp_path / "daemon.log").open("wb") as out:
            daemon = subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                      env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            poll_until(lambda: b"listening" in (tmp_path / "daemon.log").read_bytes(), 30)
            reaper.join(10)
            assert orphan.returncode is not None  # stopped
            assert stranger.poll() is None and pid_alive(stranger.pid)
            log = (tmp_path / "daemon.log").read_text()
            assert f"stopping orphaned worker pid {orphan.pid}" in log
            assert str(stranger.pid) not in log
            assert StateFile(state_dir).read() == []  # the stale list is gone
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    finally:
        for proc in (orphan, stranger):
            kill_quietly(proc.pid)
            proc.wait(10)


@pytest.mark.llama
@llama_required
def test_kill_9_of_the_supervisor_takes_every_worker_with_it(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\nlog_dir = "log"\nstate_dir = "state"\n'
        + "".join(f'[[default_models]]\nmodel_id = "m{i}"\npath = "{tiny_gguf}"\nn_ctx = 64\n'
                  for i in range(2))
    )
    with (tmp_path / "daemon.log").open("wb") as out:
        proc = subprocess.Popen([NEURONCTL, "start", "--config", str(config)], env=clean_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: b"listening" in (tmp_path / "daemon.log").read_bytes(), 60)
        pids = [p.pid for p in psutil.Process(proc.pid).children()]
        assert len(pids) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for pid in pids:
            poll_until(lambda pid=pid: not pid_alive(pid), timeout=10)
    finally:
        kill_quietly(proc.pid)
        proc.wait(10)


async def test_concurrent_unloads_stop_once_and_never_500(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    async with TestClient(TestServer(create_app(registry))) as client:
        async def load() -> None:
            body = {"model_id": "m", "harness": "fake"}
            async with client.post("/models/load", json=body) as resp:
                assert resp.status == 200

        async def unload() -> int:
            async with client.post("/models/unload", json={"model_id": "m"}) as resp:
                return resp.status

        await load()
        statuses = sorted(await asyncio.gather(*(unload() for _ in range(4))))
        assert statuses[0] == 200 and set(statuses[1:]) <= {404, 409}
        assert fake_worker_pids() == []
        # Two unloads in the same loop iteration: the second must not stop it again.
        await load()
        outcomes = await asyncio.gather(registry.unload("m"), registry.unload("m"),
                                        return_exceptions=True)
        assert outcomes[0] is None and isinstance(outcomes[1], Conflict), outcomes
        # And unloads racing a shutdown: each answers, none with a 500.
        await load()
        results = await asyncio.gather(*(unload() for _ in range(3)), registry.shutdown())
        assert set(results[:3]) <= {200, 404, 409}
        assert fake_worker_pids() == []


async def test_a_model_whose_file_is_gone_fails_at_once_with_its_cause(
    node_config: NeuronConfig, make_registry: MakeRegistry, tmp_path: Path, tiny_gguf: Path
) -> None:
    """A crash after the model file was deleted: no restart can bring it back, so it is
    failed at the first restart, not after max_restarts, and the journal's line keeps why."""
    from ..fakes import FileHarness

    config = fast_restarts(node_config, max_restarts=5, restart_delay_s=0.05)
    model_file = tmp_path / "victim.gguf"
    model_file.write_bytes(tiny_gguf.read_bytes())
    registry = make_registry(config, {"file": FileHarness()})
    reasons: list[str] = []
    registry.events.on_event(lambda e: reasons.append(e.reason))
    record = await registry.load(ModelSpec("victim", harness="file", path=model_file))
    assert record.worker is not None and record.worker.pid is not None
    model_file.unlink()
    os.kill(record.worker.pid, signal.SIGKILL)
    await wait_for(lambda: record.status is ModelStatus.FAILED, 10)
    shown = record.to_json()
    assert shown["restarts"] == 1  # one try, which found no file
    assert shown["error"].startswith(f"model file not found or not readable: {model_file}")
    assert reasons[-1] == (f"model file not found or not readable: {model_file}; "
                           "not restarted: a restart cannot fix it")
    assert fake_worker_pids() == []
