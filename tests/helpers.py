"""Shared test helpers: bounded polling, ports, process checks, the console script and its
environment, the registry factory's type, and a real daemon (`start_daemon`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import pytest

from neuronctl.config import NeuronConfig
from neuronctl.supervisor.harness import Harness
from neuronctl.supervisor.registry import ModelRegistry

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

NEURONCTL = Path(sys.executable).parent / "neuronctl"

# Checked without importing: llama_cpp opens files at import that it never closes.
LLAMA_MISSING = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="needs llama-cpp-python[server] (the `server` extra)",
)


def llama_required(test: Callable[P, R]) -> Callable[P, R]:
    """A test that starts real llama-cpp-python workers: marked `llama` (so `make check`
    and `-m "not llama"` leave it out) and skipped where llama-cpp-python is missing."""
    return pytest.mark.llama(LLAMA_MISSING(test))


class MakeRegistry(Protocol):
    """The `make_registry` fixture: a registry it shuts down when the test is over."""

    def __call__(
        self,
        config: NeuronConfig | None = None,
        harnesses: Mapping[str, Harness] | None = None,
        **kwargs: Any,
    ) -> ModelRegistry: ...


def poll_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


async def poll_until_async(condition: Callable[[], T], timeout: float = 10.0,
                           interval: float = 0.02) -> T:
    """`poll_until` for a test running in the event loop: it yields between looks."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        await asyncio.sleep(interval)


async def poll_until_awaited(condition: Callable[[], Awaitable[T]], timeout: float = 10.0,
                             interval: float = 0.02) -> T:
    """`poll_until_async` for a condition that must itself await (an HTTP request)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def kill_parent_of_worker(script: str, before: int = 0, timeout: float = 10.0) -> list[str]:
    """Run `script` (python -c), a supervisor in miniature that prints `before` lines and
    then the pid of the worker it started; SIGKILL it, and wait until the worker is gone too
    (it must not outlive its parent). The lines before the pid, for the caller to check."""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker_pid = 0
    try:
        said = [parent.stdout.readline().strip() for _ in range(before)]
        worker_pid = int(parent.stdout.readline())
        assert pid_alive(worker_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        poll_until(lambda: not pid_alive(worker_pid), timeout=timeout)
        return said
    finally:
        kill_quietly(parent.pid)
        parent.wait(10)
        parent.stdout.close()
        if worker_pid:
            kill_quietly(worker_pid)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without NEURON_* overrides or anything that widens Rich's
    console, plus `extra`: what systemd would give the CLI."""
    drop = {"COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_") and k not in drop}
    return {**env, **extra}


def fast_restarts(config: NeuronConfig, **overrides: Any) -> NeuronConfig:
    values: dict[str, Any] = {
        "restart_delay_s": 0.2, "restart_delay_max_s": 1.0, "restart_window_s": 60.0,
        **overrides,
    }
    return dataclasses.replace(config, **values)


# --- a fleet on loopback: nodes as `neuronctl start` and LiteLLM's proxy ------------------
# (tests/fleet/test_litellm.py and bench/fleet.py)

REPO = Path(__file__).resolve().parent.parent
# Where .ci/litellm.sh installs the proxy (its own venv); LITELLM_PROXY names another one.
LITELLM = Path(os.environ.get("LITELLM_PROXY", REPO / ".cache/litellm-venv/bin/litellm"))
# No cost map download, no telemetry: CI reaches nothing but the package registries.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY_DISABLED": "true",
               "LITELLM_LOG": "ERROR"}


def find_llama_server() -> str | None:
    import shutil

    found = shutil.which("llama-server")
    built = REPO / ".cache/llama-server/bin/llama-server"
    return found or (str(built) if built.is_file() else None)


def fleet_node_toml(port: int, node_id: str, model: Path, llama_server: str | None) -> str:
    """A node serving the tiny GGUF as `tiny`: with llama-server when there is one (ready in
    milliseconds), else llama-cpp-python. `autoload = false`: once unloaded, a request for
    it is a 404 there, which the gateway retries on another node."""
    harness = "llama-server" if llama_server else "llama-cpp-python"
    table = f'[harness.llama-server]\nbinary = "{llama_server}"\n' if llama_server else ""
    return (f'port = {port}\nhost = "127.0.0.1"\nnode_id = "{node_id}"\nlog_dir = "log"\n'
            f'state_dir = "state"\nautoload = false\n{table}'
            f'[[default_models]]\nmodel_id = "tiny"\nharness = "{harness}"\npath = "{model}"\n'
            'n_ctx = 256\n')


def spawn(command: list[str], log: Path, env: Mapping[str, str], cwd: Path | None = None
          ) -> subprocess.Popen[bytes]:
    """A process in a session of its own (so `stop_group` reaches its children), its
    output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
                                cwd=cwd, start_new_session=True)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM to the process's group, a bounded wait, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


def wait_http(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    """Until `url` answers 200; fail at once when `proc` exits, or after `timeout`."""
    def up() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise AssertionError(f"exited with {proc.returncode} before {url} answered:\n{tail}")
        return http_ok(url)

    poll_until(up, timeout, interval=0.1)
@dataclasses.dataclass
class Daemon:
    """A real `neuronctl start` on a free port of 127.0.0.1, workers being the fake
    llama-server (tests/fake_llama_server.py); see `start_daemon`."""

    process: subprocess.Popen[bytes]
    url: str
    directory: Path
    api_key: str | None = None

    def request(self, method: str, path: str, body: Any = None, key: str | None = None,
                timeout: float = 30.0) -> tuple[int, Any]:
        """(status, the JSON answer) with the daemon's key unless `key` says otherwise."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if (key or self.api_key) is not None:
            request.add_header("Authorization", f"Bearer {key or self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def model(self, model_id: str) -> dict[str, Any]:
        status, models = self.request("GET", "/models")
        assert status == 200, models
        return next(m for m in models if m["id"] == model_id)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                kill_quietly(self.process.pid)
                self.process.wait(5)


def start_daemon(directory: Path, models_toml: str, *, api_key: str | None = None,
                 timeout: float = 30.0, settings: str = "") -> Daemon:
    """`neuronctl start` with `models_toml` (`[[models]]` and `[[default_models]]` tables
    of the llama-server harness) appended to a config of its own in `directory`, and
    `settings` (top-level keys, one per line) in it; back once it serves. The caller stops
    it (`Daemon.stop`)."""
    from .fakes import FAKE_LLAMA_SERVER

    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "llama-server"
    binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_LLAMA_SERVER}" "$@"\n')
    binary.chmod(0o755)
    port = free_port()
    key = f'api_key = "{api_key}"\n' if api_key is not None else ""
    config = directory / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\nlog_dir = "{directory}/log"\n'
        f'state_dir = "{directory}/state"\nstop_timeout_s = 2.0\n{key}{settings}'
        f'[harness.llama-server]\nbinary = "{binary}"\n\n{models_toml}')
    log = (directory / "daemon.log").open("ab")
    process = subprocess.Popen([str(NEURONCTL), "start", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    log.close()
    daemon = Daemon(process, f"http://127.0.0.1:{port}", directory, api_key)

    def serving() -> bool:
        assert process.poll() is None, (directory / "daemon.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(daemon.url + "/health", timeout=1):
                return True
        except OSError:
            return False

    try:
        poll_until(serving, timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon
