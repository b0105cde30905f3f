"""sd_notify: the protocol itself, and what a real `neuronctl start` tells systemd."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuronctl.node.systemd import summary
from neuronctl.sdnotify import Notifier
from neuronctl.supervisor.activation import ActivationResult

from ..helpers import NEURONCTL, clean_env, free_port, kill_quietly, llama_required, poll_until


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()


def test_messages_reach_a_path_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.send("READY=1", "STATUS=2/3 models loaded")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2/3 models loaded"
    notifier.close()


def test_abstract_socket_address() -> None:
    name = f"neuron-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.status("loading 1/1: m")
        assert sock.recv(4096) == b"STATUS=loading 1/1: m"
        notifier.close()


def test_without_notify_socket_everything_is_a_silent_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.send("READY=1")  # no socket, no error
    notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert Notifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval_s == 30.0
    pid = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid}).watchdog_interval_s == 1.0
    # Meant for another process, or nonsense: no watchdog.
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


def test_summary_lines() -> None:
    ok = ActivationResult("a", 1.0)
    bad = ActivationResult("org/b", 0.5, "boom")
    assert summary([ok, ActivationResult("c", 1.0)]) == "2/2 models loaded"
    assert summary([ok, bad]) == "1/2 models loaded, 1 failed: org/b"
    assert summary([]) == "no default models"


@pytest.mark.llama
@llama_required
def test_a_real_start_tells_systemd_what_it_does(
    notify_socket: tuple[socket.socket, str], tmp_path: Path, tiny_gguf: Path
) -> None:
    sock, path = notify_socket
    port = free_port()
    url = f"http://127.0.0.1:{port}/models"
    config = tmp_path / "neuron.toml"
    (tmp_path / "broken.gguf").write_bytes(b"not a model")
    config.write_text(f"""
port = {port}
host = "127.0.0.1"
log_dir = "log"
state_dir = "state"
[[default_models]]
model_id = "good-a"
path = "{tiny_gguf}"
n_ctx = 128
[[default_models]]
model_id = "bad"
path = "broken.gguf"
[[default_models]]
model_id = "good-b"
path = "{tiny_gguf}"
n_ctx = 128
""")
    messages: list[str] = []
    answered_at_ready: list[bool] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            for line in data.split("\n"):
                if line == "READY=1":
                    # The moment systemd hears READY=1, the API must already answer.
                    with urllib.request.urlopen(url, timeout=5) as resp:
                        answered_at_ready.append(resp.status == 200 and bool(json.load(resp)))
                messages.append(line)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    env = {**clean_env(), "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    with (tmp_path / "daemon.log").open("wb") as log:
        proc = subprocess.Popen([NEURONCTL, "start", "--config", str(config)], env=env,
                                stdout=log, stderr=log)
    try:
        poll_until(lambda: "READY=1" in messages, timeout=120)
        ready = messages.index("READY=1")
        poll_until(lambda: messages[ready:].count("WATCHDOG=1") >= 2, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        poll_until(lambda: "STOPPING=1" in messages, timeout=5)
    finally:
        done.set()
        receiver.join(5)
        if proc.poll() is None:
            kill_quietly(proc.pid)
            proc.wait(10)

    statuses = [m for m in messages if m.startswith("STATUS=")]
    expected = [
        r"STATUS=loading 1/3: good-a",
        r"STATUS=loaded 1/3: good-a in \d+\.\ds",
        r"STATUS=loading 2/3: bad",
        r"STATUS=failed 2/3: bad",
        r"STATUS=loading 3/3: good-b",
        r"STATUS=loaded 3/3: good-b in \d+\.\ds",
    ]
    assert len(statuses) >= len(expected), statuses
    for pattern, status in zip(expected, statuses, strict=False):
        assert re.fullmatch(pattern, status), (pattern, statuses)
    # A start-timeout heartbeat while the first load was in progress, before READY=1.
    first_extend = next(i for i, m in enumerate(messages) if m.startswith("EXTEND_TIMEOUT_USEC="))
    assert messages.index("STATUS=loading 1/3: good-a") < first_extend < ready
    assert int(messages[first_extend].split("=")[1]) > 0
    assert answered_at_ready == [True]
    assert messages[ready + 1] == "STATUS=2/3 models loaded, 1 failed: bad"
    stopping = messages.index("STOPPING=1")
    assert stopping > ready
