"""End to end on real llama.cpp: `neuronctl start` as a subprocess, the API, the CLI, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    LLAMA_MISSING,
    NEURONCTL,
    clean_env,
    free_port,
    kill_quietly,
    pid_alive,
    poll_until,
)

pytestmark = [pytest.mark.llama, LLAMA_MISSING]


def http(method: str, url: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def first_answer(url: str) -> list[dict[str, Any]] | None:
    try:
        return http("GET", url + "/models", timeout=5)[1]  # type: ignore[no-any-return]
    except (urllib.error.URLError, ConnectionError):
        return None  # refused: still activating


@pytest.fixture
def daemon(tmp_path: Path, tiny_gguf: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really" * 50)
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(f"""
port = {port}
host = "127.0.0.1"
log_dir = "log"
state_dir = "state"
stop_timeout_s = 5.0

[[default_models]]
model_id = "tiny/good"
path = "{tiny_gguf}"
n_ctx = 128

[[default_models]]
model_id = "broken"
path = "broken.gguf"
""")
    with (tmp_path / "daemon.log").open("wb") as daemon_log:
        proc = subprocess.Popen([NEURONCTL, "start", "--config", str(config)], env=clean_env(),
                                stdout=subprocess.DEVNULL, stderr=daemon_log)
    try:
        yield proc, f"http://127.0.0.1:{port}", config
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                kill_quietly(proc.pid)
                proc.wait(10)


def test_start_load_chat_unload_stop(
    daemon: tuple[subprocess.Popen[bytes], str, Path], tiny_gguf: Path, tmp_path: Path
) -> None:
    proc, url, config = daemon
    models = poll_until(lambda: first_answer(url), timeout=120)
    by_id = {m["id"]: m for m in models}
    # The very first answer already reflects activation: good loaded, broken failed.
    assert by_id["tiny/good"]["status"] == "loaded"
    assert by_id["tiny/good"]["endpoint"].startswith("http://127.0.0.1:")
    assert by_id["broken"]["status"] == "failed"
    assert by_id["broken"]["exit_code"] not in (None, 0)
    assert "broken.gguf" in by_id["broken"]["error"]
    log = Path(by_id["tiny/good"]["log_path"])
    assert log == tmp_path / "log" / "tiny--good.log" and "neuronctl starting:" in log.read_text()

    # A second model over HTTP; the call answers once it is ready.
    status, body = http("POST", url + "/models/load",
                        {"model_id": "second", "path": str(tiny_gguf), "n_ctx": 64})
    assert (status, body["status"]) == (200, "loaded")
    # A third with the CLI, which finds the daemon through the config's port.
    cli = subprocess.run(
        [NEURONCTL, "load", "third", "--path", str(tiny_gguf), "--n-ctx", "64",
         "--config", str(config)],
        env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert "third loaded" in cli.stdout

    status, endpoint = http("GET", url + "/models/third/endpoint")
    assert status == 200
    status, answer = http("POST", endpoint["url"] + "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"

    table = subprocess.run([NEURONCTL, "status", "--url", url], env=clean_env(),
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0
    for name in ("tiny/good", "second", "third", "broken"):
        assert name in table.stdout

    pids = [m["pid"] for m in http("GET", url + "/models")[1] if m["pid"]]
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)

    cli = subprocess.run([NEURONCTL, "unload", "second", "--url", url], env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    ids = {m["id"] for m in http("GET", url + "/models")[1]}
    assert ids == {"tiny/good", "third", "broken"}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    for pid in pids:
        poll_until(lambda pid=pid: not pid_alive(pid), timeout=10)
