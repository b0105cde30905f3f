"""The daemon's event loop (node/eventloop.py): uvloop where it imports, as configured."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from neuronctl.errors import EX_CONFIG
from neuronctl.node import eventloop

from ..helpers import clean_env, free_port

NEURONCTL = str(Path(sys.executable).with_name("neuronctl"))


async def loop_name() -> str:
    return eventloop.name()


@pytest.mark.parametrize(("choice", "expected"),
                         [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_config_chooses_the_loop(choice: str, expected: str) -> None:
    assert eventloop.runner(choice)(loop_name()) == expected


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert eventloop.runner("auto") is asyncio.run
    with pytest.raises(eventloop.LoopUnavailable, match='"uvloop", but uvloop cannot be imported'):
        eventloop.runner("uvloop")
    monkeypatch.undo()
    assert eventloop.runner("auto")(loop_name()) == "uvloop"


async def connects(family: socket.AddressFamily, address: tuple[str, int]) -> str:
    """What a non-blocking socket's sock_connect to `address` comes to on the running loop:
    "connected" (the peer accepted it: its greeting read) or the error's class name."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            return type(exc).__name__
        return "connected" if await loop.sock_recv(sock, 5) == b"hello" else "no greeting"


def test_uvloops_connects_to_numeric_addresses_and_names_alike() -> None:
    """The loop's own sock_connect for numeric addresses (no getaddrinfo in libuv's thread
    pool): connects, refuses as uvloop's would, and a name still goes the resolving way."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        greeter = threading.Thread(target=greet, args=(server, 2), daemon=True)
        greeter.start()

        resolved: list[object] = []

        async def both() -> list[str]:
            assert eventloop.name() == "uvloop"
            loop = asyncio.get_running_loop()
            resolve = loop.getaddrinfo

            async def recorded(host: object, *args: Any, **kwargs: Any) -> Any:
                resolved.append(host)
                return await resolve(host, *args, **kwargs)

            loop.getaddrinfo = recorded  # type: ignore[method-assign]
            return [await connects(socket.AF_INET, ("127.0.0.1", port)),
                    await connects(socket.AF_INET, ("localhost", port)),
                    await connects(socket.AF_INET, ("127.0.0.1", free_port()))]

        assert eventloop.runner("uvloop")(both()) == [
            "connected", "connected", "ConnectionRefusedError"]
        assert resolved == ["localhost"]  # the numeric ones were not looked up
        greeter.join(10)


def greet(server: socket.socket, count: int) -> None:
    server.settimeout(10)
    for _ in range(count):
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"hello")


def test_start_refuses_uvloop_where_it_is_missing(tmp_path: Path) -> None:
    """A config error naming the key, before anything is bound or loaded."""
    hidden = tmp_path / "hide"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('not here')\n")
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {free_port()}\nlog_dir = "log"\n'
                      f'state_dir = "state"\nevent_loop = "uvloop"\n')
    done = subprocess.run([NEURONCTL, "start", "--config", str(config)],
                          env=clean_env(PYTHONPATH=str(hidden)), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == EX_CONFIG, done.stderr
    assert (f'config error: {config}: event_loop: "uvloop", but uvloop cannot be imported '
            "(not here)") in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()
