"""API keys on every route, and hostile input over HTTP and the CLI."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.config import ConfigError, NeuronConfig, load_config

from ..helpers import NEURONCTL, MakeRegistry, clean_env, free_port, poll_until

KEY = "s3cret-key"
# Every route and a body that gets past the key check; what matters is 401 or not.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/models", None),
    ("POST", "/models/load", {"model_id": "m", "harness": "nope"}),
    ("POST", "/models/unload", {"model_id": "m"}),
    ("GET", "/models/m/endpoint", None),
    ("GET", "/discovery", None),
    ("POST", "/reload", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
    ("GET", "/no/such/route", None),
]

Scenario = Callable[[TestClient[Any, Any]], Awaitable[None]]


async def run_app(make_registry: MakeRegistry, config: NeuronConfig, scenario: Scenario) -> None:
    registry = make_registry(config)
    async with TestClient(TestServer(create_app(registry))) as client:
        await scenario(client)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_but_health_needs_the_key(
    node_config: NeuronConfig, method: str, path: str, body: Any, make_registry: MakeRegistry
) -> None:
    config = dataclasses.replace(node_config, api_key=KEY)

    async def scenario(client: TestClient[Any, Any]) -> None:
        async def status(headers: dict[str, str]) -> tuple[int, Any]:
            async with client.request(method, path, json=body, headers=headers) as resp:
                # Only refusals are sure to be JSON (/metrics answers in Prometheus text).
                return resp.status, await resp.json() if resp.status == 401 else None

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                        {"Authorization": f"Basic {KEY}"}):
            code, answer = await status(headers)
            assert code == 401, headers
            error = answer["error"]
            message = error["message"] if isinstance(error, dict) else error
            assert "API key" in message
            if path.startswith("/v1/"):  # OpenAI's error shape for OpenAI clients
                assert error["code"] == "invalid_api_key"
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
            code, _ = await status(headers)
            assert code != 401, headers

    await run_app(make_registry, config, scenario)


async def test_health_is_open_and_no_key_means_no_check(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    def expect(models_status: int) -> Scenario:
        async def scenario(client: TestClient[Any, Any]) -> None:
            async with client.get("/health") as resp:
                assert resp.status == 200
            async with client.get("/models") as resp:
                assert resp.status == models_status

        return scenario

    await run_app(make_registry, dataclasses.replace(node_config, api_key=KEY), expect(401))
    await run_app(make_registry, node_config, expect(200))  # without api_key everything is open


def test_key_file_must_not_be_world_readable(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(f"{KEY}\n")
    config = tmp_path / "neuron.toml"
    config.write_text(f'api_key_file = "{key_file}"\n')
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"api_key_file: .* readable by every user"):
        load_config(config, {})
    key_file.chmod(0o640)
    assert load_config(config, {}).api_key == KEY
    assert KEY not in repr(load_config(config, {}))  # secrets stay out of logs


# Valid ids (what a Hugging Face repo or an alias can be) whose log files must still stay in
# log_dir: the longest, and every punctuation the id rule allows.
ODD_VALID_IDS = ["x" * 256, "org/name:tag", "a+b@c=d", "q.w_e-r/t.y"]


@pytest.mark.parametrize("model_id", ODD_VALID_IDS)
async def test_odd_valid_ids_over_http_stay_inside_log_dir(
    node_config: NeuronConfig, model_id: str, tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        body = {"model_id": model_id, "harness": "fake", "args": ["--mode", "crash"]}
        async with client.post("/models/load", json=body) as resp:
            assert resp.status == 502  # the fake worker crashes (worker_exited); never a 500
            answer = await resp.json()
        log_path = Path(answer["model"]["log_path"])
        assert log_path.parent == node_config.log_dir and log_path.exists()
        async with client.post("/models/unload", json={"model_id": model_id}) as resp:
            assert resp.status == 200

    await run_app(make_registry, node_config, scenario)
    outside = [p for p in tmp_path.rglob("*") if node_config.log_dir not in p.parents
               and p != node_config.log_dir and not p.is_relative_to(node_config.state_dir)]
    assert outside == []


@pytest.mark.parametrize(
    ("model_id", "error"),
    [("a\x00b", "NUL character"), ("a\x01b", "U+0001"),
     ("x" * 300, "longer than 256"), ("", "must not be empty"), ("   ", "must not be empty"),
     (17, "expected a string"),
     # Paths out of log_dir or the API's routes, and characters that mislead a reader.
     ("../../etc/passwd", "'..'"), ("/abs/path", "empty"), ("..", "'..'"),
     ("a/../../b", "'..'"), ("a/./b", "'.'"), ("a//b", "empty"), ("a/", "empty"),
     ("-rf", "must start with a letter or a digit"), ("模型/量子化", "ASCII"),
     ("a\u0085b", "U+0085"), ("evil\u202ecod.exe", "U+202E"), ("a\ud800", "U+D800"),
     ("a b", "U+0020")],
)
async def test_invalid_ids_over_http_are_400(
    node_config: NeuronConfig, model_id: Any, error: str, make_registry: MakeRegistry
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        async with client.post("/models/load", json={"model_id": model_id}) as resp:
            assert resp.status == 400
            assert error in (await resp.json())["error"]

    await run_app(make_registry, node_config, scenario)


async def test_encoded_traversal_in_the_endpoint_route_is_a_json_404(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        for path in ("/models/..%2F..%2Fetc%2Fpasswd/endpoint", "/models/%00/endpoint"):
            async with client.get(path) as resp:
                assert resp.status == 404
                assert "error" in await resp.json()

    await run_app(make_registry, node_config, scenario)


def test_hostile_ids_over_the_cli(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    env = clean_env()
    for model_id in ("../../etc/passwd", "/etc/passwd"):
        shown = subprocess.run([NEURONCTL, "logs", model_id, "--log-dir", str(log_dir)],
                               capture_output=True, text=True, timeout=30, env=env)
        assert shown.returncode == 1 and "root:" not in shown.stdout
        assert f"at {log_dir}/" in shown.stderr  # it looked inside log_dir, nowhere else


def test_cli_sends_the_key_from_the_config_or_the_environment(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\nlog_dir = "log"\nstate_dir = "state"\n'
                      f'api_key = "{KEY}"\n')
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "daemon.log").open("wb") as out:
        daemon = subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                  env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: b"listening" in (tmp_path / "daemon.log").read_bytes(), 30)

        def status(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([NEURONCTL, "status", *args], capture_output=True, text=True,
                                  timeout=30, env={**clean_env(), **env})

        assert status("--config", str(config)).returncode == 0  # key from the config
        assert status("--url", url, NEURON_API_KEY=KEY).returncode == 0
        missing = status("--url", url)
        assert missing.returncode == 1
        assert "API key required" in missing.stderr and "NEURON_API_KEY" in missing.stderr
        wrong = status("--url", url, NEURON_API_KEY="nope")
        assert wrong.returncode == 1
        # Said as a CLI user needs it: which key was wrong, not how HTTP sends one.
        assert wrong.stderr == ("neuronctl: the node refused the API key from $NEURON_API_KEY "
                                "(it overrides the config's key)\n")

        # A hostile id through the CLI: a clean error naming the rule, and no log anywhere.
        load = subprocess.run(
            [NEURONCTL, "load", "../../evil", "--path", str(tmp_path / "none.gguf"),
             "--config", str(config)],
            capture_output=True, text=True, timeout=60, env=clean_env())
        assert load.returncode == 1 and "'..' path segments" in load.stderr
        assert not (tmp_path.parent / "evil.log").exists()
        bad = subprocess.run([NEURONCTL, "load", "a\x01b", "--config", str(config)],
                             capture_output=True, text=True, timeout=60, env=clean_env())
        assert bad.returncode == 1 and "U+0001" in bad.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert os.path.exists(tmp_path / "log")


async def test_bad_input_that_once_broke_things_is_a_clean_4xx(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    config = dataclasses.replace(node_config, api_key=KEY)

    async def scenario(client: TestClient[Any, Any]) -> None:
        auth = {"Authorization": f"Bearer {KEY}"}
        # A header that is not UTF-8 is a wrong key, not a 500.
        async with client.get("/models", headers={"x-api-key": "s\udcffe"}) as resp:
            assert resp.status == 401 and "error" in await resp.json()
        # A NUL in an argument can reach no command line: refused before anything is listed.
        body = {"model_id": "m", "harness": "fake", "args": ["a\x00b"]}
        async with client.post("/models/load", json=body, headers=auth) as resp:
            assert resp.status == 400
            assert "args[0]: contains a NUL character" in (await resp.json())["error"]
        # A relative path would be relative to the daemon's working directory (/ in systemd).
        body = {"model_id": "m", "path": "models/x.gguf"}
        async with client.post("/models/load", json=body, headers=auth) as resp:
            assert resp.status == 400 and "must be absolute" in (await resp.json())["error"]
        async with client.get("/models", headers=auth) as resp:
            assert await resp.json() == []

    await run_app(make_registry, config, scenario)
