"""The API's listener in a hostile world: slow clients, too many clients, a second supervisor
on the port. Real sockets on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from neuronctl.api.app import create_app
from neuronctl.api.guard import BODY_PROGRESS_BYTES, ConnectionGuard, GuardedSockSite, Limits
from neuronctl.node import listener
from neuronctl.node.daemon import bind_listener
from neuronctl.supervisor.registry import ModelRegistry

from ..fakes import FAKE_LLAMA_SERVER
from ..gpu_fakes import wrapper
from ..helpers import (
    NEURONCTL,
    MakeRegistry,
    clean_env,
    free_port,
    kill_quietly,
    poll_until,
    poll_until_async,
)

ROOT = Path(__file__).resolve().parents[2]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def guarded_api(
    registry: ModelRegistry, **limits: Any
) -> AsyncIterator[tuple[int, ConnectionGuard]]:
    """The control API behind the guard, as the daemon serves it; its port and guard."""
    values: dict[str, Any] = {"header_timeout_s": 1.0, "body_timeout_s": 1.0,
                              "max_connections": 1000, **limits}
    guard = ConnectionGuard(Limits(**values))
    runner = web.AppRunner(create_app(registry), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = bind_listener("127.0.0.1", 0)
    try:
        await GuardedSockSite(runner, sock, guard).start()
        yield sock.getsockname()[1], guard
    finally:
        await runner.cleanup()
        listener.release(sock)


@contextlib.asynccontextmanager
async def connections(port: int, count: int) -> AsyncIterator[list[Streams]]:
    opened: list[Streams] = []
    try:
        for _ in range(count):
            opened.append(await asyncio.open_connection("127.0.0.1", port))
        yield opened
    finally:
        for _, writer in opened:
            writer.close()
        for _, writer in opened:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before it closed the connection (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        data = await asyncio.wait_for(reader.read(), timeout)
    return data


async def exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, Any]:
    """One request on a fresh connection (`Connection: close`): status and JSON body."""
    async with connections(port, 1) as [(reader, writer)]:
        writer.write(raw)
        response = await asyncio.wait_for(reader.read(), timeout)
    return parse(response)


def parse(response: bytes) -> tuple[int, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), response[:200]
    return int(head.split()[1]), json.loads(body) if body else None


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


GET_MODELS = b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def drip(writers: list[asyncio.StreamWriter], every_s: float) -> None:
    """A slowloris: one more header line on every connection now and then, never the end."""
    for writer in writers:
        writer.write(b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    while True:
        await asyncio.sleep(every_s)  # the slowloris's pace is the scenario
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"X-Slow: 1\r\n")


async def test_a_slowloris_cannot_stop_others_being_answered_and_is_closed_on_time(
    make_registry: MakeRegistry,
) -> None:
    async with guarded_api(make_registry(), header_timeout_s=1.0) as (port, guard), \
            connections(port, 200) as slow:
        opened = time.monotonic()
        writers = [writer for _, writer in slow]
        dripping = asyncio.create_task(drip(writers, 0.2))
        try:
            await poll_until_async(lambda: guard.open == 200)
            started = time.monotonic()
            status, models = await exchange(port, GET_MODELS, timeout=2.0)
            answered_in = time.monotonic() - started
            assert (status, models) == (200, [])
            assert answered_in < 0.5, answered_in
            remains = await asyncio.gather(*(until_closed(r, 5.0) for r, _ in slow))
            closed_after = time.monotonic() - opened
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
    assert all(r == b"" for r in remains)  # closed without an answer
    assert 0.9 <= closed_after < 3.0, closed_after
    assert guard.head_timeouts == 200 and guard.open == 0


async def test_a_stalled_or_trickling_body_is_closed_and_frees_its_slot(
    make_registry: MakeRegistry,
) -> None:
    async with guarded_api(make_registry(), body_timeout_s=1.0) as (port, guard), \
            connections(port, 2) as [(stalled, w1), (trickle, w2)]:
        started = time.monotonic()
        # Content-Length 1000, then nothing.
        w1.write(b"POST /models/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                 b"{\"model_id\": ")
        # One byte at a time: progress, but not BODY_PROGRESS_BYTES a window.
        w2.write(b"POST /models/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")

        async def trickling() -> None:
            while not w2.is_closing():
                w2.write(b" ")
                await asyncio.sleep(0.1)  # the trickle's pace is the scenario

        task = asyncio.create_task(trickling())
        try:
            remains = await asyncio.gather(until_closed(stalled, 5.0), until_closed(trickle, 5.0))
            closed_after = time.monotonic() - started
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert remains == [b"", b""]
        assert 0.9 <= closed_after < 3.5, closed_after
        await poll_until_async(lambda: guard.open == 0)
        assert guard.body_timeouts == 2
        assert (await exchange(port, GET_MODELS))[0] == 200


async def test_a_slow_body_that_makes_progress_is_read_to_the_end(
    make_registry: MakeRegistry,
) -> None:
    body = json.dumps({"model_id": "nobody"}).encode().ljust(6 * BODY_PROGRESS_BYTES)
    chunk = len(body) // 4
    async with guarded_api(make_registry(), body_timeout_s=1.0) as (port, guard), \
            connections(port, 1) as [(reader, writer)]:
        request = post("/models/unload", body)
        head = len(request) - len(body)
        writer.write(request[:head])
        started = time.monotonic()
        for i in range(0, len(body), chunk):
            writer.write(body[i:i + chunk])
            await asyncio.sleep(0.6)  # the pace is the scenario: progress, but slow
        took = time.monotonic() - started
        status, answer = parse(await asyncio.wait_for(reader.read(), 5.0))
    assert took > 2.0  # longer than body_timeout_s
    assert status == 404 and "nobody" in answer["error"]  # the whole body was read
    assert guard.body_timeouts == 0


async def test_beyond_max_connections_new_ones_are_refused_at_once(
    make_registry: MakeRegistry,
) -> None:
    async with guarded_api(make_registry(), max_connections=5,
                           body_timeout_s=30.0) as (port, guard):
        async with connections(port, 5) as busy:
            # Heads in, bodies pending: nothing to make room with.
            for _, writer in busy:
                writer.write(b"POST /models/unload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            await poll_until_async(lambda: guard.open == 5 and not guard._waiting)
            async with connections(port, 5) as extra:
                started = time.monotonic()
                answers = await asyncio.gather(*(until_closed(r, 2.0) for r, _ in extra))
                refused_in = time.monotonic() - started
            assert refused_in < 1.0, refused_in
            for answer in answers:
                status, body = parse(answer)
                assert status == 503 and body["code"] == "too_many_connections"
            assert guard.refused == 5 and guard.open == 5 and guard.evicted == 0
        await poll_until_async(lambda: guard.open == 0)
        assert await exchange(port, GET_MODELS) == (200, [])


async def test_at_the_cap_the_oldest_connection_without_a_request_head_makes_room(
    make_registry: MakeRegistry,
) -> None:
    async with guarded_api(make_registry(), max_connections=50,
                           header_timeout_s=30.0) as (port, guard), \
            connections(port, 100) as slow:
        writers = [writer for _, writer in slow]
        dripping = asyncio.create_task(drip(writers, 0.2))
        try:
            await poll_until_async(lambda: guard.evicted == 50)
            started = time.monotonic()
            assert await exchange(port, GET_MODELS, timeout=2.0) == (200, [])
            answered_in = time.monotonic() - started
            # The first 50 made room for the next 50, and the oldest of those for this one.
            oldest = await asyncio.gather(*(until_closed(r, 2.0) for r, _ in slow[:51]))
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
        assert oldest == [b""] * 51
        assert answered_in < 0.5, answered_in
        assert guard.evicted == 51 and guard.refused == 0  # 50, and one for the GET
        assert guard.open <= 50


async def test_long_requests_and_idle_kept_alive_connections_outlast_the_timeouts(
    make_registry: MakeRegistry,
) -> None:
    async with guarded_api(make_registry(), header_timeout_s=0.5, body_timeout_s=0.5) as (
            port, guard):
        # A load that takes 2 s: its head and body are in, its handler runs untimed.
        load = json.dumps({"model_id": "slow", "harness": "fake",
                           "args": ["--delay", "2"]}).encode()
        started = time.monotonic()
        status, answer = await exchange(port, post("/models/load", load))
        assert status == 200, answer
        assert time.monotonic() - started >= 2.0
        # Idle between requests for longer than header_timeout_s: keepalive_timeout applies.
        async with connections(port, 1) as [(reader, writer)]:
            writer.write(b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await asyncio.wait_for(reader.readexactly(length), 5.0)
            await asyncio.sleep(1.0)  # the idle time is the scenario
            writer.write(GET_MODELS)
            status, models = parse(await asyncio.wait_for(reader.read(), 5.0))
        assert status == 200 and models[0]["id"] == "slow"
        assert guard.head_timeouts == 0 and guard.body_timeouts == 0


def test_the_port_claim_refuses_a_second_holder_until_released() -> None:
    first = bind_listener("127.0.0.1", 0)
    port = first.getsockname()[1]
    try:
        with pytest.raises(OSError) as raised:
            listener.claim_port(port)
        assert raised.value.errno == errno.EADDRINUSE
        assert raised.value.strerror == (f"port {port} is in use (by another neuronctl start, "
                                         "which may still be loading its models)")
        first.close()  # the TCP socket only: the claim lasts until the daemon is done
        with pytest.raises(OSError, match="in use"):
            listener.claim_port(port)
    finally:
        listener.release(first)
    listener.claim_port(port).close()


def test_a_port_another_process_listens_on_is_refused_in_one_line() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError) as raised:
            bind_listener("127.0.0.1", port)
    assert raised.value.strerror == (f"port {port} is in use (another process listens on it: "
                                     f"ss -ltnp 'sport = :{port}')")


def test_the_soft_fd_limit_is_raised_to_the_hard_one() -> None:
    script = ("import resource; from neuronctl.node.listener import raise_fd_limit; "
              "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    out = subprocess.run([sys.executable, "-c", script], preexec_fn=lower, cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    expected = hard if hard != resource.RLIM_INFINITY else int(out.split()[0])
    assert out.split() == [str(expected), str(expected)]


def test_the_default_cap_leaves_descriptors_for_workers() -> None:
    assert listener.default_max_connections(1024) == (1024 - listener.FD_RESERVE) // 2
    assert listener.default_max_connections(1 << 20) == listener.DEFAULT_MAX_CONNECTIONS
    assert listener.default_max_connections(100) == 16
    assert listener.max_connections(50, 1024) == 50


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT)


def test_a_second_supervisor_on_the_port_fails_at_once_and_the_first_serves(
    tmp_path: Path, tiny_gguf: Path,
) -> None:
    port = free_port()
    binary = wrapper(tmp_path / "llama-server", FAKE_LLAMA_SERVER)
    common = (f'host = "127.0.0.1"\nport = {port}\nstop_timeout_s = 2.0\n'
              f'[harness.llama-server]\nbinary = "{binary}"\n')
    first_config = tmp_path / "first.toml"
    # A load that takes 4 s: the first supervisor is bound but not listening meanwhile.
    first_config.write_text(
        'log_dir = "log1"\nstate_dir = "state1"\n' + common
        + f'[[default_models]]\nmodel_id = "tiny"\nharness = "llama-server"\n'
        f'path = "{tiny_gguf}"\nargs = ["--fake-load-s", "4"]\n')
    second_config = tmp_path / "second.toml"
    second_config.write_text('log_dir = "log2"\nstate_dir = "state2"\n' + common)
    first = _start(first_config, tmp_path / "first.log")
    try:
        poll_until((tmp_path / "log1" / "tiny.log").exists, 30)  # loading
        for expected in ("by another neuronctl start", "another process listens on it"):
            started = time.monotonic()
            second = subprocess.run([NEURONCTL, "start", "--config", str(second_config)],
                                    env=clean_env(), capture_output=True, text=True, timeout=30)
            assert second.returncode == 1, second.stderr
            assert time.monotonic() - started < 5
            lines = second.stderr.splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
            assert f"port {port} is in use ({expected}" in lines[0], lines[0]
            assert not (tmp_path / "log2" / "tiny.log").exists()
            assert first.poll() is None
            if expected.startswith("by"):  # now let the first one finish activating
                poll_until(lambda: b"listening" in (tmp_path / "first.log").read_bytes(), 30)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(GET_MODELS)
            conn.settimeout(5)
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
        status, models = parse(response)
        assert status == 200 and models[0]["id"] == "tiny"
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            assert first.wait(30) == 0
        finally:
            kill_quietly(first.pid)
