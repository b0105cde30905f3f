"""One worker subprocess, for real, with the fake worker script standing in for llama.cpp."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from neuronctl.errors import LoadError
from neuronctl.supervisor.harness import WorkerPlan
from neuronctl.supervisor.worker import Worker, describe_exit, free_port

from ..fakes import FAKE_WORKER
from ..helpers import kill_parent_of_worker, pid_alive, poll_until


def make_worker(tmp_path: Path, *args: str, ready_timeout_s: float = 10.0,
                stop_timeout_s: float = 2.0, env: dict[str, str] | None = None) -> Worker:
    port = free_port()
    command = (sys.executable, str(FAKE_WORKER), "--port", str(port), *args)
    plan = WorkerPlan(command, env or {}, "/health", ready_timeout_s)
    return Worker("org/model", plan, port, tmp_path / "model.log", stop_timeout_s)


def test_ready_worker_starts_and_stops(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, "--delay", "0.2")

    async def scenario() -> int:
        await worker.start()
        pid = worker.pid
        assert pid is not None and pid_alive(pid)
        await worker.stop()
        return pid

    pid = asyncio.run(scenario())
    assert not pid_alive(pid)
    log = (tmp_path / "model.log").read_text()
    assert "neuronctl starting:" in log and str(FAKE_WORKER) in log
    assert f"=== worker pid {pid}" in log
    assert "ready" in log  # the worker's own output went to the same file


def test_exit_during_start_fails_at_once_with_code_and_log_tail(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, "--mode", "crash", "--code", "7", ready_timeout_s=60)

    async def scenario() -> LoadError:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LoadError) as info:
            await worker.start()
        # Noticed when the process exited, not at the 60 s ready timeout.
        assert loop.time() - started < 30
        return info.value

    error = asyncio.run(scenario())
    assert error.exit_code == 7
    assert "exited with code 7 while starting" in error.message
    assert "fatal: simulated load failure" in error.message
    assert str(tmp_path / "model.log") in (error.detail or "")  # its last lines


def test_never_ready_is_killed_at_the_timeout(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, "--mode", "hang", ready_timeout_s=0.5)

    async def scenario() -> None:
        with pytest.raises(LoadError, match=r"not ready after 0.5 s \(killed\)"):
            await worker.start()

    asyncio.run(scenario())
    assert worker.pid is not None and not pid_alive(worker.pid)
    assert worker.returncode == -signal.SIGKILL


def test_sigterm_ignored_is_killed_after_the_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(tmp_path, "--mode", "ignore-term", stop_timeout_s=0.5)

    async def scenario() -> None:
        await worker.start()
        await worker.stop()

    with caplog.at_level(logging.WARNING, logger="neuronctl"):
        asyncio.run(scenario())
    assert worker.pid is not None and not pid_alive(worker.pid)
    assert worker.returncode == -signal.SIGKILL
    assert any("ignored SIGTERM" in r.getMessage() for r in caplog.records)


def test_cancelled_start_kills_the_process(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, "--mode", "hang", ready_timeout_s=60)

    async def scenario() -> None:
        task = asyncio.create_task(worker.start())
        await asyncio.to_thread(poll_until, lambda: worker.pid and pid_alive(worker.pid), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert worker.pid is not None and not pid_alive(worker.pid)


def test_environment_reaches_the_worker_and_each_start_appends_a_header(tmp_path: Path) -> None:
    async def start_and_stop() -> None:
        worker = make_worker(tmp_path, "--mode", "env", env={"CUDA_VISIBLE_DEVICES": "1,3"})
        await worker.start()
        await worker.stop()

    asyncio.run(start_and_stop())
    asyncio.run(start_and_stop())
    log = (tmp_path / "model.log").read_text()
    assert "ENV CUDA_VISIBLE_DEVICES=1,3" in log
    assert log.count("neuronctl starting:") == 2  # appended, never truncated


def test_worker_dies_with_its_supervisor(tmp_path: Path) -> None:
    """The parent-death signal: SIGKILL the process that spawned the worker."""
    port = free_port()
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from neuronctl.supervisor.harness import WorkerPlan
        from neuronctl.supervisor.worker import Worker
        plan = WorkerPlan((sys.executable, {str(FAKE_WORKER)!r}, "--port", "{port}"), {{}},
                          "/health", 10.0)
        async def main():
            worker = Worker("m", plan, {port}, Path({str(tmp_path / "m.log")!r}), 1.0)
            await worker.start()
            print(worker.pid, flush=True)
            await asyncio.sleep(60)  # idle until the test kills this parent (no poll needed)
        asyncio.run(main())
    """)
    kill_parent_of_worker(script)


def test_describe_exit() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"


async def test_the_port_is_proven_ours_at_the_first_answer_not_after_the_load(
    tmp_path: Path,
) -> None:
    """llama-server answers 503 while it loads: the /proc walk that proves the port is the
    worker's runs then, once, and the 200 is taken at once."""
    statuses = [None, 503, 503, 200]
    asked: list[int | None] = []
    proofs: list[int] = []

    async def status_probe(port: int, path: str) -> int | None:
        status = statuses.pop(0) if statuses else 200
        asked.append(status)
        return status

    def owns_port(port: int, pgid: int) -> bool:
        proofs.append(len(asked))
        return True

    plan = WorkerPlan((sys.executable, "-c", "import time; time.sleep(60)"), {}, "/health",
                      30.0)
    worker = Worker("m", plan, free_port(), tmp_path / "m.log", 2.0,
                    status_probe=status_probe, owns_port=owns_port)
    try:
        await asyncio.wait_for(worker.start(), 30)
    finally:
        await worker.kill()
    assert asked == [None, 503, 503, 200]
    assert proofs == [2]  # at the first 503, never again
