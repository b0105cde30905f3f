"""Workers run as llama.cpp's router runs its children (routerchild.py): the binary check,
readiness from the child's own line, the exit command, and death with the supervisor by the
end of its stdin. A stand-in child in Python, and the real llama-server where there is one."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neuronctl.config import HarnessConfig, ModelSpec
from neuronctl.errors import LoadError
from neuronctl.supervisor import routerchild
from neuronctl.supervisor.harness import LlamaServerHarness, WorkerPlan
from neuronctl.supervisor.worker import Worker, free_port

from ..fakes import FAKE_WORKER
from ..helpers import kill_parent_of_worker, pid_alive, poll_until

# A router child in miniature: its port opens at once, "ready" on the reserved stdout after
# a short load, its own output on stderr, and what llama-server does with its stdin: the
# exit command ends it with 0, its end with 1. Like llama-server it does not end on SIGTERM
# once ready (it would wait for its stdin), so a stop that relied on SIGTERM would hang.
CHILD = textwrap.dedent("""
    import ctypes, json, os, signal, socket, sys, threading, time
    assert os.environ["LLAMA_SERVER_ROUTER_PORT"]
    pdeathsig = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(2, ctypes.byref(pdeathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
    print("parent-death signal", pdeathsig.value, file=sys.stderr, flush=True)
    listener = socket.socket()
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen()
    time.sleep(float(sys.argv[2]))
    if sys.argv[4] == "swallow":  # llama-server when the command beats its main loop:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # only SIGTERM ends it
    else:
        signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM", file=sys.stderr, flush=True))
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for _ in range(int(sys.argv[3])):  # lines of no state, each over the reader's limit,
        out.write("x" * 100_000 + "\\n")  # and one nested past any JSON parser's limit
        out.write("cmd_child_to_router:state:" + "[" * 50_000 + "\\n")
    if sys.argv[4] == "grandchild":  # holds the stdout pipe, and lives on
        import subprocess
        grandchild = subprocess.Popen(["sleep", "60"], stdout=out)
        print("grandchild", grandchild.pid, file=sys.stderr, flush=True)
    out.write("cmd_child_to_router:state:" + json.dumps({"state": "ready"}) + "\\n")
    out.flush()
    for line in sys.stdin:
        if "cmd_router_to_child:exit" in line and sys.argv[4] == "swallow":
            print("exit command lost", file=sys.stderr, flush=True)
        elif "cmd_router_to_child:exit" in line:
            print("exit command", file=sys.stderr, flush=True)
            sys.exit(0)
    print("EOF on stdin", file=sys.stderr, flush=True)
    sys.exit(1)
""")


def child_plan(port: int, load_s: float = 0.2, noise: int = 0, then: str = "-") -> WorkerPlan:
    return WorkerPlan((sys.executable, "-c", CHILD, str(port), str(load_s), str(noise), then),
                      {routerchild.ENV: str(port)}, "/health", 20.0, router_child=True)


def test_a_binary_speaks_the_protocol_when_both_messages_are_in_it(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"\x7fELF..." + routerchild.STATE_PREFIX + b"...\0"
                       + routerchild.EXIT_COMMAND.rstrip() + b"\0...")
    assert routerchild.speaks(binary)
    # Another build at the same path is another file: read again.
    binary.write_bytes(b"\x7fELF... an older llama-server ... cmd_child_to_router:state:")
    os.utime(binary, ns=(1, 1))
    assert not routerchild.speaks(binary)
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text('#!/bin/sh\nexec llama-server "$@"\n')
    assert not routerchild.speaks(wrapper)
    assert not routerchild.speaks(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert not routerchild.speaks(empty)


def test_only_a_state_line_reports_a_state() -> None:
    assert routerchild.state_of(b'cmd_child_to_router:state:{"state":"ready"}\n') == "ready"
    assert routerchild.state_of(b'cmd_child_to_router:state:{"state":"loading",'
                                b'"payload":{"value":0.5}}\n') == "loading"
    assert routerchild.state_of(b"srv  llama_server: model loaded\n") is None
    assert routerchild.state_of(b"cmd_child_to_router:state:{not json\n") is None
    assert routerchild.state_of(b'cmd_child_to_router:state:["ready"]\n') is None


async def test_ready_when_it_says_so_without_a_poll_and_stopped_by_its_exit_command(
    tmp_path: Path,
) -> None:
    polled: list[str] = []

    async def status_probe(port: int, path: str) -> int | None:
        polled.append(path)
        return None

    port = free_port()
    # Before its word, more than a pipe holds of lines that are none: read and dropped.
    worker = Worker("m", child_plan(port, noise=3), port, tmp_path / "m.log", 5.0,
                    status_probe=status_probe)
    try:
        started = time.monotonic()
        await asyncio.wait_for(worker.start(), 20)
        assert time.monotonic() - started >= 0.2  # not before it said so
        assert polled == []  # its word, not polls
        pid = worker.pid
        assert pid is not None
        stopping = time.monotonic()
        await worker.stop()
        assert time.monotonic() - stopping < 4.0  # the command, not the SIGKILL after 5 s
    finally:
        await worker.kill()
    assert worker.returncode == 0
    log = (tmp_path / "m.log").read_text()
    said = log.splitlines()  # what it printed, each a line of its own (not the command)
    assert "parent-death signal 0" in said  # spawned without a preexec_fn
    assert "exit command" in said and "SIGTERM" not in said
    assert log.rstrip().endswith(
        f"worker pid {pid} exited with code 0 (neuronctl sent its exit command)")


async def test_a_grandchild_holding_its_stdout_delays_neither_the_stop_nor_the_exit(
    tmp_path: Path,
) -> None:
    port = free_port()
    worker = Worker("m", child_plan(port, then="grandchild"), port, tmp_path / "m.log", 5.0)
    await asyncio.wait_for(worker.start(), 20)
    assert worker.pid is not None
    try:
        await asyncio.wait_for(worker.stop(), 4)  # the exit command; no wait on the pipe
    finally:
        await asyncio.wait_for(worker.kill(), 10)
    assert worker.returncode == 0
    # Its group went with it (the grandchild too: it is the worker's session's).
    said = (tmp_path / "m.log").read_text().splitlines()
    grandchild = int(next(line for line in said if line.startswith("grandchild "))
                     .split()[1])
    poll_until(lambda: not pid_alive(grandchild), 10)


async def test_a_child_that_never_says_ready_is_taken_at_its_health_s_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    plan = WorkerPlan((sys.executable, str(FAKE_WORKER), "--port", str(port)),
                      {routerchild.ENV: str(port)}, "/health", 20.0, router_child=True)
    worker = Worker("m", plan, port, tmp_path / "m.log", 2.0)
    try:
        with caplog.at_level(logging.WARNING):
            await asyncio.wait_for(worker.start(), 20)
    finally:
        await worker.kill()
    assert any("did not say it was ready" in r.getMessage() for r in caplog.records)


def test_a_llama_server_plan_is_a_router_child_only_where_the_binary_speaks_it(
    tmp_path: Path, tiny_gguf: Path,
) -> None:
    speaking = tmp_path / "llama-server"
    speaking.write_bytes(b"\x7fELF" + routerchild.STATE_PREFIX + b"\0"
                         + routerchild.EXIT_COMMAND + b"\0")
    speaking.chmod(0o755)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text('#!/bin/sh\nexec llama-server "$@"\n')
    wrapper.chmod(0o755)
    spec = ModelSpec("m", harness="llama-server", path=tiny_gguf)
    harness = LlamaServerHarness(HarnessConfig(binary=str(speaking)))
    harness.prepare()  # at start-up: the binary read, not at the first load
    assert any(key[1] == speaking.stat().st_ino for key in routerchild._verdicts)
    plan = harness.plan(spec, 4242)
    assert plan.router_child and plan.env[routerchild.ENV] == "4242"
    plain = LlamaServerHarness(HarnessConfig(binary=str(wrapper))).plan(spec, 4242)
    assert not plain.router_child and routerchild.ENV not in plain.env


async def test_an_exit_command_that_is_lost_is_followed_by_sigterm(tmp_path: Path) -> None:
    """llama-server's main loop starts after it says it is ready, and sets its running flag
    again as it does: a command read before that is lost. SIGTERM then ends it."""
    port = free_port()
    worker = Worker("m", child_plan(port, then="swallow"), port, tmp_path / "m.log", 5.0)
    try:
        await asyncio.wait_for(worker.start(), 20)
        stopping = time.monotonic()
        await worker.stop()
        assert time.monotonic() - stopping < 4.0  # not the SIGKILL at 5 s
    finally:
        await worker.kill()
    assert worker.returncode == 0
    log = (tmp_path / "m.log").read_text()
    assert "exit command lost" in log.splitlines()
    assert log.rstrip().endswith(
        "exited with code 0 (neuronctl sent its exit command and SIGTERM)")


async def test_a_child_that_exits_before_it_is_ready_fails_the_start_at_once(
    tmp_path: Path,
) -> None:
    port = free_port()
    plan = WorkerPlan((sys.executable, "-c", "import sys; print('no model'); sys.exit(3)"),
                      {routerchild.ENV: str(port)}, "/health", 60.0, router_child=True)
    worker = Worker("m", plan, port, tmp_path / "m.log", 2.0)
    started = time.monotonic()
    with pytest.raises(LoadError, match="exited with code 3 while starting"):
        await worker.start()
    assert time.monotonic() - started < 30


async def test_a_child_stopped_while_it_loads_gets_sigterm(tmp_path: Path) -> None:
    port = free_port()
    worker = Worker("m", child_plan(port, load_s=30), port, tmp_path / "m.log", 5.0)
    starting = asyncio.ensure_future(worker.start())
    try:
        await asyncio.sleep(0.5)  # spawned, loading (its stand-in load lasts 30 s)
        assert worker.pid is not None and not starting.done()
        await worker.stop()  # no SIGTERM handler yet while it loads: the signal ends it
        assert worker.returncode == -signal.SIGTERM
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await worker.kill()


def test_a_child_dies_with_its_supervisor_by_the_end_of_its_stdin(tmp_path: Path) -> None:
    port = free_port()
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from neuronctl.supervisor.harness import WorkerPlan
        from neuronctl.supervisor.worker import Worker
        plan = WorkerPlan({child_plan(port).command!r}, {{"LLAMA_SERVER_ROUTER_PORT": "1"}},
                          "/health", 20.0, router_child=True)
        async def main():
            worker = Worker("m", plan, {port}, Path({str(tmp_path / "m.log")!r}), 1.0)
            await worker.start()
            print(worker.pid, flush=True)
            await asyncio.sleep(60)  # until the test kills this parent
        asyncio.run(main())
    """)
    kill_parent_of_worker(script)
    said = (tmp_path / "m.log").read_text().splitlines()
    assert "parent-death signal 0" in said and "EOF on stdin" in said


def _real_llama_server() -> str | None:
    found = shutil.which(os.environ.get("NEURON_HARNESS__LLAMA_SERVER__BINARY")
                         or "llama-server")
    return found if found and routerchild.speaks(Path(found)) else None


@pytest.mark.llama_server
@pytest.mark.skipif(_real_llama_server() is None,
                    reason="no llama-server with a router (child mode) on PATH")
def test_a_real_llama_server_child_is_ready_stops_cleanly_and_dies_with_its_supervisor(
    tmp_path: Path, tiny_gguf: Path,
) -> None:
    binary = _real_llama_server()
    assert binary is not None
    port = free_port()
    command = (binary, "-m", str(tiny_gguf), "--host", "127.0.0.1", "--port", str(port),
               "-c", "128")
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from neuronctl.supervisor.harness import WorkerPlan
        from neuronctl.supervisor.worker import Worker, free_port, probe_http
        def worker(port, name):
            plan = WorkerPlan({command[:-4]!r} + ("--port", str(port), "-c", "128"),
                              {{"LLAMA_SERVER_ROUTER_PORT": str(port)}}, "/health", 120.0,
                              router_child=True)
            return Worker("tiny", plan, port, Path({str(tmp_path)!r}) / name, 10.0)
        async def main():
            first = worker(free_port(), "first.log")
            await first.start()
            assert await probe_http(first.port, "/health")
            await first.stop()
            print(first.returncode, flush=True)
            second = worker(free_port(), "second.log")
            await second.start()
            print(second.pid, flush=True)
            await asyncio.sleep(120)  # until the test kills this parent
        asyncio.run(main())
    """)
    said = kill_parent_of_worker(script, before=1, timeout=30)
    assert said == ["0"]  # the first worker: the exit command, a clean exit
    first_log = (tmp_path / "first.log").read_text()
    assert first_log.rstrip().endswith("exited with code 0 (neuronctl sent its exit command)"
                                       ) or first_log.rstrip().endswith(
        "exited with code 0 (neuronctl sent its exit command and SIGTERM)")
    # The second's death is its own (its `EOF on stdin` line may not reach the log: its
    # logger writes from a thread that exit() does not wait for).
