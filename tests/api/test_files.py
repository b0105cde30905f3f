"""Issue 27, the files: a log path, a HEAD or a model path nobody can use against the node.

A FIFO at a log path held by many followers never holds up a load, a restart or a stop; a
symlink planted in `log_dir` is neither written through nor served; HEAD on the streaming
routes sends headers only, so a pipelined request behind it gets its own answer; a task
`aio.bounded` gives up on never logs "Task exception was never retrieved"; a refused model
file is never quoted back. Real daemons and raw sockets where the finding was made so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuronctl import aio, logfiles
from neuronctl.config import ModelSpec, NeuronConfig

from ..helpers import NEURONCTL, Daemon, MakeRegistry, clean_env, poll_until, start_daemon


def model(model_id: str, gguf: Path, *, default: bool = False) -> str:
    table = "[[default_models]]" if default else "[[models]]"
    return (f'{table}\nmodel_id = "{model_id}"\nharness = "llama-server"\n'
            f'path = "{gguf}"\n\n')


def port_of(daemon: Daemon) -> int:
    return int(daemon.url.rsplit(":", 1)[1])


def send(port: int, raw: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(raw)
    return conn


def get(path: str, close: bool = True) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"{'Connection: close' if close else ''}\r\n\r\n").encode()


def read_all(conn: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server closes; fails past `timeout` (a stream that never ends)."""
    deadline = time.monotonic() + timeout
    seen = b""
    with conn:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no end within {timeout} s; got {seen[-300:]!r}"
            conn.settimeout(left)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return seen
            seen += chunk


def read_until(conn: socket.socket, needle: bytes, timeout: float = 10.0) -> bytes:
    """What the server sent until `needle`, leaving the connection open."""
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} within {timeout} s; got {seen[-300:]!r}"
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        assert chunk, f"closed before {needle!r}; got {seen[-300:]!r}"
        seen += chunk
    return seen


# --- #5: a FIFO at a log path and its followers -----------------------------------------------


def test_fifo_log_followers_never_hold_up_a_load_a_restart_or_a_stop(
    tmp_path: Path, tiny_gguf: Path,
) -> None:
    """32 followers (the bound, and more than the default executor's threads on any host
    up to 28 cores) of FIFO logs: 8 waiting for a log that then appears as a FIFO, 24 of one
    that is a FIFO already. Before, each held a thread in open() for good, and the readiness
    check waited behind them: loads hung, restarts never came, SIGTERM never finished."""
    node_dir = tmp_path / "node"
    log_dir = node_dir / "log"
    log_dir.mkdir(parents=True)
    os.mkfifo(log_dir / "cat1.log")
    daemon = start_daemon(node_dir, model("tiny", tiny_gguf, default=True)
                          + model("cat1", tiny_gguf) + model("cat2", tiny_gguf))
    port = port_of(daemon)
    conns: list[socket.socket] = []
    try:
        poll_until(lambda: daemon.model("tiny")["status"] == "loaded", 20)
        waiting = [send(port, get("/models/cat2/logs?follow=1")) for _ in range(8)]
        conns += waiting
        for conn in waiting:  # each stream has begun: it waits for the file to appear
            assert read_until(conn, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        os.mkfifo(log_dir / "cat2.log")
        refused = [send(port, get("/models/cat1/logs?follow=1")) for _ in range(24)]
        conns += refused
        for conn in refused:
            answer = read_all(conn)
            assert answer.startswith(b"HTTP/1.1 404"), answer[:300]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert "is a FIFO, not a regular file" in body["error"], body
        for conn in waiting:  # told in the stream, which then ends
            assert b"is a FIFO, not a regular file" in read_all(conn)

        started = time.monotonic()
        status, answer = daemon.request("POST", "/models/load", {
            "model_id": "x1", "harness": "llama-server", "path": str(tiny_gguf)}, timeout=20)
        assert status == 200, answer
        assert time.monotonic() - started < 15

        os.kill(daemon.model("tiny")["pid"], signal.SIGKILL)  # a crash: restarted
        poll_until(lambda: daemon.model("tiny")["restarts"] == 1
                   and daemon.model("tiny")["status"] == "loaded", 20, interval=0.1)

        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        for conn in conns:
            conn.close()
        daemon.stop()


def test_a_fifo_at_a_log_that_is_never_rotated_is_refused_without_waiting(
    tmp_path: Path,
) -> None:
    """`log_keep = 0` opens the log where it is: a FIFO there used to block the event loop
    in open() until something read it."""
    fifo = tmp_path / "m.log"
    os.mkfifo(fifo)
    outcome: list[BaseException | int] = []

    def start() -> None:
        try:
            outcome.append(logfiles.open_for_worker(fifo, ["worker"], keep=0))
        except BaseException as exc:
            outcome.append(exc)

    opener = threading.Thread(target=start, daemon=True)
    opener.start()
    opener.join(5)
    if opener.is_alive():  # the old blocking open: release it, then fail
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        opener.join(5)
    assert outcome and isinstance(outcome[0], logfiles.UnsafeLog), outcome
    assert "FIFO" in str(outcome[0])


# --- #10: symlinks in log_dir -----------------------------------------------------------------


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("VICTIM ORIGINAL\n")
    path.chmod(0o600)
    return path


def test_a_worker_log_is_never_written_through_a_symlink(tmp_path: Path, victim: Path) -> None:
    log = tmp_path / "log" / "m.log"
    log.parent.mkdir()
    log.symlink_to(victim)
    with pytest.raises(logfiles.UnsafeLog, match="is a symlink"):
        logfiles.open_for_worker(log, ["worker"], keep=0)
    logfiles.write_end_line(log, "worker pid 1 exited with code 0")
    logfiles.append_line(log, "download 50%", create=True)
    assert victim.read_text() == "VICTIM ORIGINAL\n"
    assert log.is_symlink()  # left for whoever investigates
    # With rotation the link is moved to `.1` like a file, and a fresh log is written.
    os.close(logfiles.open_for_worker(log, ["worker"], keep=2))
    assert victim.read_text() == "VICTIM ORIGINAL\n"
    assert not log.is_symlink() and "neuronctl starting: worker" in log.read_text()
    assert logfiles.previous_path(log).is_symlink()


async def test_a_model_whose_log_is_a_symlink_serves_and_the_link_is_untouched(
    node_config: NeuronConfig, make_registry: MakeRegistry, victim: Path,
) -> None:
    config = dataclasses.replace(node_config, log_keep=0)
    config.log_dir.mkdir(parents=True)
    (config.log_dir / "m.log").symlink_to(victim)
    registry = make_registry(config)
    model = await registry.load(ModelSpec("m", harness="fake"))
    warning = model.to_json()["warning"]
    assert "cannot write the log" in warning and "is a symlink" in warning
    await registry.unload("m")
    assert victim.read_text() == "VICTIM ORIGINAL\n"  # the fake worker printed to the journal


def test_a_symlink_in_log_dir_is_not_served_over_http_nor_by_the_cli(
    tmp_path: Path, tiny_gguf: Path, victim: Path,
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:SECRET-HASH-LINE:19000\n")
    node_dir = tmp_path / "node"
    log_dir = node_dir / "log"
    log_dir.mkdir(parents=True)
    (log_dir / "tiny.log").symlink_to(victim)
    (log_dir / "cat1.log").symlink_to(secret)
    daemon = start_daemon(node_dir, model("tiny", tiny_gguf, default=True)
                          + model("cat1", tiny_gguf))
    try:
        poll_until(lambda: daemon.model("tiny")["status"] == "loaded", 20)
        assert victim.read_text() == "VICTIM ORIGINAL\n"
        for path in ("/models/cat1/logs?lines=5", "/models/cat1/logs?follow=1",
                     "/models/tiny/logs?previous=1"):  # tiny.log.1: the link, rotated
            answer = read_all(send(port_of(daemon), get(path)))
            assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:300])
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert "is a symlink, not a regular file" in body["error"], body
            assert {"error", "type", "code"} <= body.keys()
            assert b"SECRET" not in answer and b"VICTIM" not in answer
        for follow in ([], ["-f"]):
            cli = subprocess.run(
                [str(NEURONCTL), "logs", "cat1", "--log-dir", str(log_dir), *follow],
                capture_output=True, text=True, timeout=30, env=clean_env())
            assert cli.returncode == 1, cli
            assert "is a symlink" in cli.stderr and "SECRET" not in cli.stdout + cli.stderr
    finally:
        daemon.stop()


# --- #11: HEAD on the streaming routes ------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("head"), model("tiny", tiny_gguf,
                                                                  default=True))
    try:
        poll_until(lambda: daemon.model("tiny")["status"] == "loaded", 20)
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.parametrize("path", ["/models/events", "/models/tiny/logs?lines=3",
                                  "/models/tiny/logs?follow=1"])
def test_head_on_a_streaming_route_sends_headers_only(node: Daemon, path: str) -> None:
    raw = f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() + get("/health")
    answer = read_all(send(port_of(node), raw))
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/" in head  # the type a GET would have
    # The very next bytes are the pipelined request's own answer: no snapshot, no log text.
    assert rest.startswith(b"HTTP/1.1 200"), rest[:300]
    health = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert health["status"] == "ok", health
    assert b"snapshot" not in answer and b"neuronctl starting" not in answer


def test_head_on_a_log_says_what_get_would(node: Daemon) -> None:
    answer = read_all(send(port_of(node), b"HEAD /models/tiny/logs?previous=1 HTTP/1.1\r\n"
                                          b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 404"), answer  # no previous log yet
    assert answer.endswith(b"\r\n\r\n")


# --- #13: small items ---------------------------------------------------------------------------


def test_a_refused_model_file_is_never_quoted_back(node: Daemon, tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("ZQXJ:SECRET-HASH-LINE:19000:0:99999:7:::\n")  # as /etc/shadow's root:
    for path, said in ((secret, "not a GGUF file (no GGUF magic)"),
                       (tmp_path / "absent.gguf", "model file not found or not readable")):
        status, answer = node.request("POST", "/models/load", {
            "model_id": "peek", "harness": "llama-server", "path": str(path)})
        assert status == 400, answer
        assert said in answer["error"], answer
        text = json.dumps(answer)
        assert "ZQXJ" not in text and "SECRET" not in text and "b'" not in text


async def test_bounded_never_leaves_an_exception_unretrieved() -> None:
    """A reload cancels loads whose probe `bounded` awaits: the probe's task may already
    hold its ConnectionRefusedError, or get it after the cancel, and nobody asks for it."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))

    async def refused(after: int) -> None:
        for _ in range(after):
            await asyncio.sleep(0)
        raise ConnectionRefusedError("connect call failed")

    async def probe(after: int) -> None:
        await aio.bounded(refused(after), 5.0)

    async def stubborn() -> None:  # cancelled, it fails on its way out
        try:
            await asyncio.sleep(10)  # never done: cancelled by `bounded`, the scenario
        except asyncio.CancelledError:
            raise ConnectionResetError("closed while cancelling") from None

    try:
        for after in range(4):
            for turns in range(6):  # the caller cancelled at each point of the race
                caller = asyncio.ensure_future(probe(after))
                for _ in range(turns):
                    await asyncio.sleep(0)
                caller.cancel()
                with pytest.raises((asyncio.CancelledError, ConnectionRefusedError)):
                    await caller
        with pytest.raises(asyncio.TimeoutError):
            await aio.bounded(stubborn(), 0.01)  # timed out: cancelled and abandoned
        with pytest.raises(ConnectionRefusedError):
            await aio.bounded(refused(0), 5.0)  # the caller still gets what it awaited
        for _ in range(5):
            await asyncio.sleep(0)
        del caller
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not [m for m in reported if "never retrieved" in m], reported
