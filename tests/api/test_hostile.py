"""Hostile input to the API and the worker's start: each is refused with a reason, or
survived, and the node goes on serving another model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shlex
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.config import ConfigError, HarnessConfig, NeuronConfig, load_config
from neuronctl.errors import WorkerExited
from neuronctl.supervisor import portowner
from neuronctl.supervisor.harness import (
    LlamaCppPythonHarness,
    LlamaServerHarness,
    WorkerPlan,
    build_harnesses,
)
from neuronctl.supervisor.reload import Reloader
from neuronctl.supervisor.worker import Worker

from ..fakes import FAKE_WORKER, FakeHarness
from ..helpers import MakeRegistry, free_port

Scenario = Callable[[TestClient[Any, Any]], Awaitable[None]]
FAKE = {"model_id": "good", "harness": "fake"}


async def serve(make_registry: MakeRegistry, config: NeuronConfig, fake: FakeHarness,
                scenario: Scenario) -> None:
    harnesses = {"fake": fake, "llama-cpp-python": LlamaCppPythonHarness(HarnessConfig()),
                 "llama-server": LlamaServerHarness(HarnessConfig())}
    registry = make_registry(config, harnesses)
    async with TestClient(TestServer(create_app(registry))) as client:
        await scenario(client)


async def still_serves(client: TestClient[Any, Any]) -> None:
    """Another model loads and answers after whatever the test threw at the node."""
    async with client.post("/models/load", json=FAKE) as resp:
        assert resp.status == 200, await resp.text()
    async with client.get("/models/good/endpoint") as resp:
        assert resp.status == 200


async def post(client: TestClient[Any, Any], path: str, body: Any) -> tuple[int, Any]:
    async with client.post(path, json=body) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(("harness", "args", "named"), [
    ("llama-cpp-python", ["--host", "0.0.0.0"], "--host"),
    ("llama-cpp-python", ["--port=1"], "--port"),
    ("llama-cpp-python", ["--n_threads", "2", "--model_alias", "x"], "--model_alias"),
    ("llama-cpp-python", ["--model-alias", "x"], "--model-alias"),
    ("llama-server", ["-np", "64"], "-np"),
    ("llama-server", ["--alias", "other"], "--alias"),
    ("llama-server", ["-hf", "org/repo"], "-hf"),
    ("llama-server", ["--path", "/"], "--path"),
])
async def test_args_cannot_rebind_a_worker(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    tmp_path: Path, harness: str, args: list[str], named: str,
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        body = {"model_id": "m", "harness": harness, "path": str(tmp_path / "m.gguf"),
                "args": args}
        code, answer = await post(client, "/models/load", body)
        assert code == 400
        assert named in answer["error"] and "args[" in answer["error"]
        assert answer["code"] == "arg_not_allowed"  # not on the API's list, whatever else
        async with client.get("/models") as resp:
            assert [m["id"] for m in await resp.json()] == []  # nothing listed, nothing run
        await still_serves(client)

    await serve(make_registry, node_config, fake_harness, scenario)


def test_config_args_that_rebind_a_worker_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text('[[default_models]]\nmodel_id = "a"\npath = "a.gguf"\n'
                    'args = ["--n_ctx", "64", "--host=0.0.0.0"]\n')
    with pytest.raises(ConfigError, match=r"default_models\[0\]\.args\[2\]: --host cannot"):
        build_harnesses(load_config(path, {}))
    path.write_text('[harness.llama-server]\nargs = ["--port", "80"]\n')
    with pytest.raises(ConfigError, match=r"harness\.llama-server\.args\[0\]: --port"):
        build_harnesses(load_config(path, {}))


@pytest.mark.parametrize(("key", "value"), [
    ("ready_timeout_s", 1e9), ("queue_timeout_s", 86400 * 30), ("ttl_s", 1e12),
    ("max_queue", 10**9),
])
async def test_times_and_sizes_from_a_client_have_ceilings(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    key: str, value: Any,
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        code, answer = await post(client, "/models/load", {**FAKE, key: value})
        assert code == 400 and key in answer["error"]
        assert "at most" in answer["error"] or "between" in answer["error"]
        await still_serves(client)

    await serve(make_registry, node_config, fake_harness, scenario)


@pytest.mark.parametrize(("kind", "reason"), [
    ("dev-zero", "not a regular file"), ("directory", "is a directory"),
    ("fifo", "not a regular file"), ("text", "not a GGUF file"), ("missing", "not found"),
])
async def test_a_model_path_that_is_no_gguf_file_says_what_it_is(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    tmp_path: Path, kind: str, reason: str,
) -> None:
    path = {"dev-zero": Path("/dev/zero"), "directory": tmp_path}.get(kind, tmp_path / kind)
    if kind == "fifo":
        os.mkfifo(path)  # a blocking open or read here would hang the load for ever
    elif kind == "text":
        path.write_text("hello\n")

    async def scenario(client: TestClient[Any, Any]) -> None:
        body = {"model_id": "m", "harness": "llama-cpp-python", "path": str(path)}
        code, answer = await asyncio.wait_for(post(client, "/models/load", body), 10)
        assert code == 400 and reason in answer["error"], answer
        await still_serves(client)

    await serve(make_registry, node_config, fake_harness, scenario)


async def test_deep_json_and_toml_are_refused_not_500(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "neuron.toml"
    config_path.write_text(f'log_dir = "{node_config.log_dir}"\n')
    deep = "[" * 100_000 + "]" * 100_000
    registry = make_registry(node_config, {"fake": fake_harness})
    app = create_app(registry, reloader=Reloader(registry, config_path))
    async with TestClient(TestServer(app)) as client:
        for route in ("/models/load", "/models/unload", "/v1/chat/completions"):
            async with client.post(route, data=deep,
                                   headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400, route
                assert "error" in await resp.json()
        config_path.write_text(f"x = {deep}\n")
        async with client.post("/reload") as resp:
            assert resp.status == 400
            assert "nested too deeply" in (await resp.json())["error"]
        await still_serves(client)


def test_deep_toml_at_start_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path, {})


async def raw_post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """A request with the path exactly as written: HTTP clients resolve dot segments
    before sending, a hostile client does not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Content-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


@pytest.mark.parametrize("path", [
    "/v1/../../props", "/v1/chat/../../slots", "/v1/%2e%2e/%2e%2e/x", "/v1/./models",
    "/v1/a/..%2f..%2fx", "/v1/chat/completions/..",
])
async def test_v1_paths_never_leave_v1(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    path: str,
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        await still_serves(client)
        assert client.port is not None
        code, payload = await raw_post(client.port, path, b'{"model": "good"}')
        assert code == 400, path  # never forwarded to the worker
        assert b"'..'" in payload
        code, _ = await raw_post(client.port, "/v1/chat/completions", b'{"model": "good"}')
        assert code != 400  # the same request on a clean path is forwarded

    await serve(make_registry, node_config, fake_harness, scenario)


# --- the worker's port ---------------------------------------------------------------------


async def squatter(port: int) -> web.AppRunner:
    """Another local process's server on the worker's port, answering every probe."""
    app = web.Application()
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def fake_plan(tmp_path: Path, port: int, *args: str, wrapper: bool = False) -> WorkerPlan:
    command: tuple[str, ...] = (sys.executable, str(FAKE_WORKER), "--port", str(port), *args)
    if wrapper:
        script = tmp_path / "wrapper.sh"
        # No `exec`: the shell stays the group leader and the server is its child.
        script.write_text("#!/bin/sh\n" + shlex.join(command) + "\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        command = (str(script),)
    return WorkerPlan(command, {}, "/health", 10.0)


async def test_a_port_taken_by_another_process_is_never_taken_for_the_worker(
    tmp_path: Path,
) -> None:
    port = free_port()
    runner = await squatter(port)
    try:
        worker = Worker("m", fake_plan(tmp_path, port, "--delay", "0.3"), port,
                        tmp_path / "m.log", 2.0)
        with pytest.raises(WorkerExited) as caught:
            await asyncio.wait_for(worker.start(), 15)
        # The squatter answered every probe; the worker itself could not bind and exited.
        assert f"port {port} was taken by pid {os.getpid()}" in str(caught.value)
    finally:
        await runner.cleanup()


async def test_a_wrapper_scripts_child_counts_as_the_worker(tmp_path: Path) -> None:
    port = free_port()
    worker = Worker("m", fake_plan(tmp_path, port, wrapper=True), port, tmp_path / "m.log", 2.0)
    try:
        await asyncio.wait_for(worker.start(), 15)
        assert worker.pid is not None
        assert portowner.owned_by_group(port, worker.pid) is True
        assert portowner.owned_by_group(port, os.getpgid(0)) is False
    finally:
        await worker.stop()


# --- log files that cannot be written ------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_full_disk_under_the_log_costs_the_log_not_the_model(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
) -> None:
    config = dataclasses.replace(node_config, log_keep=0)
    config.log_dir.mkdir(parents=True)
    # An unwritable log: a symlink to /dev/full is refused, never written through (it was
    # a real ENOSPC before links were refused); a full disk fails the same open-and-header
    # step with an OSError and takes the same way to the journal.
    (config.log_dir / "good.log").symlink_to("/dev/full")

    async def scenario(client: TestClient[Any, Any]) -> None:
        counts = []
        for _ in range(4):
            await still_serves(client)
            async with client.get("/models") as resp:
                (model,) = await resp.json()
            assert model["status"] == "loaded"
            assert "cannot write the log" in model["warning"]
            async with client.get("/metrics") as resp:
                assert 'neuron_model_log_unwritable{model="good"} 1.0' in await resp.text()
            code, _ = await post(client, "/models/unload", {"model_id": "good"})
            assert code == 200
            counts.append(open_fds())
        assert counts[-1] <= counts[1], counts  # no descriptor left behind per attempt

    await serve(make_registry, config, fake_harness, scenario)


async def test_a_log_dir_that_cannot_exist_costs_the_log_not_the_model(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = dataclasses.replace(node_config, log_dir=blocker / "log")  # ENOTDIR, even as root

    async def scenario(client: TestClient[Any, Any]) -> None:
        await still_serves(client)
        async with client.get("/models") as resp:
            (model,) = await resp.json()
        assert model["status"] == "loaded" and "cannot write the log" in model["warning"]

    await serve(make_registry, config, fake_harness, scenario)
