"""The control API over a registry of fake workers (tests/fake_worker.py)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl import __version__
from neuronctl.api.app import MAX_BODY_BYTES, create_app
from neuronctl.config import NeuronConfig
from neuronctl.supervisor.registry import ModelRegistry

from ..fakes import FakeHarness
from ..helpers import MakeRegistry, pid_alive, poll_until

Scenario = Callable[[TestClient[Any, Any], ModelRegistry], Awaitable[None]]


async def run_api(make_registry: MakeRegistry, scenario: Scenario) -> list[int]:
    """Serve the app on 127.0.0.1, run `scenario` against it, stop every worker; return the
    pids of every worker that was started, all checked to be gone."""
    registry = make_registry()
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        await scenario(client, registry)
    pids = [r.worker.pid for r in registry.models() if r.worker and r.worker.pid]
    await registry.shutdown()
    await asyncio.to_thread(
        poll_until, lambda: not any(pid_alive(pid) for pid in pids), timeout=5
    )
    return pids


async def get_json(client: TestClient[Any, Any], path: str, status: int = 200) -> Any:
    resp = await client.get(path)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def post_json(
    client: TestClient[Any, Any], path: str, body: Any, status: int = 200
) -> Any:
    resp = await client.post(path, json=body)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


async def post_raw(
    client: TestClient[Any, Any], path: str, data: bytes | io.BytesIO, status: int
) -> dict[str, Any]:
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str)
    assert body["error"]
    return body


FAKE = {"model_id": "m", "harness": "fake"}


async def test_models_is_an_empty_list(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        assert await get_json(client, "/models") == []

    await run_api(make_registry, scenario)


async def test_load_fake_worker(node_config: NeuronConfig, make_registry: MakeRegistry) -> None:
    seen: dict[str, Any] = {}

    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        body = await post_json(client, "/models/load", FAKE)
        assert body["status"] == "loaded"
        assert body["model"]["id"] == "m"
        (model,) = await get_json(client, "/models")
        assert model["id"] == "m"
        assert model["harness"] == "fake"
        assert model["status"] == "loaded"
        assert model["devices"] == []
        assert model["error"] is None
        assert model["exit_code"] is None
        assert model["restarts"] == 0
        assert isinstance(model["load_ms"], int)
        assert isinstance(model["pid"], int)
        assert pid_alive(model["pid"])
        assert isinstance(model["port"], int)
        assert model["endpoint"] == f"http://127.0.0.1:{model['port']}"
        assert model["log_path"] == str(node_config.log_dir / "m.log")
        assert {"vram_used_mb", "since", "uptime_s"} <= set(model)
        endpoint = await get_json(client, "/models/m/endpoint")
        assert endpoint == {"url": model["endpoint"]}
        seen.update(model)

    pids = await run_api(make_registry, scenario)
    assert pids == [seen["pid"]]
    assert "neuronctl starting:" in Path(seen["log_path"]).read_text(encoding="utf-8")


async def test_endpoint_route_takes_ids_with_slashes(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        await post_json(client, "/models/load", {"model_id": "Org/Model-GGUF", "harness": "fake",
                                                  "repo": "Org/Model-GGUF"})
        (model,) = await get_json(client, "/models")
        endpoint = await get_json(client, "/models/Org/Model-GGUF/endpoint")
        assert endpoint == {"url": model["endpoint"]}
        missing = await get_json(client, "/models/Org/Other/endpoint", 404)
        assert "Org/Other" in missing["error"]

    await run_api(make_registry, scenario)


async def test_load_of_a_loaded_model_is_one_process(
    fake_harness: FakeHarness, make_registry: MakeRegistry
) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        first, second = await asyncio.gather(
            post_json(client, "/models/load", FAKE), post_json(client, "/models/load", FAKE)
        )
        third = await post_json(client, "/models/load", FAKE)
        assert first["model"]["pid"] == second["model"]["pid"] == third["model"]["pid"]
        other = await post_json(client, "/models/load", {**FAKE, "n_ctx": 8}, 409)
        assert "different settings" in other["error"]

    pids = await run_api(make_registry, scenario)
    assert fake_harness.planned == ["m"]
    assert len(pids) == 1


async def test_crashing_worker(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        spec = {**FAKE, "args": ["--mode", "crash", "--code", "7"]}
        body = await post_json(client, "/models/load", spec, 502)
        assert body["code"] == "worker_exited"
        assert "exited with code 7" in body["error"]
        assert "simulated load failure" in body["error"]  # the log's last lines
        (model,) = await get_json(client, "/models")
        assert model["status"] == "failed"
        assert model["exit_code"] == 7
        assert "exited with code 7" in model["error"]
        assert model["pid"] is None
        assert model["endpoint"] is None
        endpoint = await get_json(client, "/models/m/endpoint", 404)
        assert "failed" in endpoint["error"]

    await run_api(make_registry, scenario)


async def test_unknown_harness(fake_harness: FakeHarness, make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        body = await post_json(client, "/models/load", {"model_id": "m", "harness": "nope"}, 400)
        assert body["error"] == "unknown harness: nope"
        assert await get_json(client, "/models") == []

    await run_api(make_registry, scenario)
    assert fake_harness.planned == []


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"m"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"model_id": "m", "harness": "fake", "bogus": 1}', "bogus"),
        (b'{"harness": "fake"}', "model_id"),
        (b'{"model_id": "m", "harness": "fake", "n_ctx": "big"}', "n_ctx"),
        (b'{"model_id": "m", "harness": "fake", "devices": ["a"]}', "devices[0]"),
        (b'{"model_id": "", "harness": "fake"}', "model_id"),
        (b'{"model_id": "a\\u0000b", "harness": "fake"}', "model_id"),
    ],
    ids=lambda v: v.decode("latin-1") if isinstance(v, bytes) else None,
)
async def test_load_rejects_bad_bodies(
    fake_harness: FakeHarness, data: bytes, needle: str, make_registry: MakeRegistry
) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        body = await post_raw(client, "/models/load", data, 400)
        assert needle in body["error"]
        assert await get_json(client, "/models") == []

    await run_api(make_registry, scenario)
    assert fake_harness.planned == []


async def test_unload(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        loaded = await post_json(client, "/models/load", FAKE)
        pid = loaded["model"]["pid"]
        body = await post_json(client, "/models/unload", {"model_id": "m"})
        assert body["status"] == "unloaded"
        assert not pid_alive(pid)
        assert await get_json(client, "/models") == []
        await get_json(client, "/models/m/endpoint", 404)
        # Unloaded means gone: a second unload is a 404.
        again = await post_json(client, "/models/unload", {"model_id": "m"}, 404)
        assert "m" in again["error"]

    await run_api(make_registry, scenario)


async def test_unload_unknown_model_is_404(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        body = await post_json(client, "/models/unload", {"model_id": "ghost"}, 404)
        assert "ghost" in body["error"]

    await run_api(make_registry, scenario)


@pytest.mark.parametrize(
    "data", [b"{}", b'{"model_id": ""}', b'{"model_id": 5}', b"{nope", b"[]"]
)
async def test_unload_needs_a_model_id(data: bytes, make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        await post_raw(client, "/models/unload", data, 400)

    await run_api(make_registry, scenario)


async def test_unload_of_a_failed_model_removes_it(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        await post_json(client, "/models/load", {**FAKE, "args": ["--mode", "crash"]}, 502)
        (model,) = await get_json(client, "/models")
        assert model["status"] == "failed"
        body = await post_json(client, "/models/unload", {"model_id": "m"})
        assert body["status"] == "unloaded"
        assert await get_json(client, "/models") == []
        # Once removed it can be loaded afresh.
        await post_json(client, "/models/load", FAKE)
        (model,) = await get_json(client, "/models")
        assert model["status"] == "loaded"

    await run_api(make_registry, scenario)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/models/", 404),
        ("POST", "/nope", 404),
        ("GET", "/models/load", 405),
        ("DELETE", "/models", 405),
        ("POST", "/health", 405),
    ],
)
async def test_unknown_route_and_wrong_method_are_json(
    method: str, path: str, status: int, make_registry: MakeRegistry
) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        resp = await client.request(method, path)
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert isinstance(body["error"], str)
        assert body["error"]

    await run_api(make_registry, scenario)


async def test_body_over_1_mib_is_413(
    fake_harness: FakeHarness, make_registry: MakeRegistry
) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        data = b'{"model_id": "' + b"x" * (MAX_BODY_BYTES + 1) + b'", "harness": "fake"}'
        # BytesIO: aiohttp warns (an error here) about large raw-bytes bodies.
        body = await post_raw(client, "/models/load", io.BytesIO(data), 413)
        assert "too large" in body["error"]
        assert await get_json(client, "/models") == []

    await run_api(make_registry, scenario)
    assert fake_harness.planned == []


@pytest.fixture
def no_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH with nothing on it: discovery must treat that as a host without GPUs."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.usefixtures("no_nvidia_smi")
async def test_health(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        body = await get_json(client, "/health")
        assert body["status"] == "ok"
        assert body["version"] == __version__
        assert isinstance(body["uptime_s"], (int, float))
        started_up = body["uptime_s"]
        assert body["models"] == {
            "downloading": 0, "loading": 0, "loaded": 0, "restarting": 0, "unloading": 0,
            "failed": 0, "unloaded": 0,
        }
        assert body["gpus"] == []
        await post_json(client, "/models/load", FAKE)
        crash = {**FAKE, "model_id": "c", "args": ["--mode", "crash"]}
        await post_json(client, "/models/load", crash, 502)
        body = await get_json(client, "/health")
        assert body["models"] == {
            "downloading": 0, "loading": 0, "loaded": 1, "restarting": 0, "unloading": 0,
            "failed": 1, "unloaded": 0,
        }
        # Two worker starts later (each a Python process), the clock has moved on.
        assert body["uptime_s"] > started_up

    await run_api(make_registry, scenario)


@pytest.mark.usefixtures("no_nvidia_smi")
async def test_discovery(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        body = await get_json(client, "/discovery")
        assert {"hostname", "os", "kernel", "cuda_version", "driver_version"} <= set(body)
        assert isinstance(body["hostname"], str)
        assert body["hostname"]
        assert isinstance(body["os"], str)
        assert isinstance(body["kernel"], str)
        assert body["harnesses"] == ["fake"]
        assert body["devices"] == []
        assert body["cuda_version"] is None
        assert body["driver_version"] is None

    await run_api(make_registry, scenario)


async def test_wrong_method_keeps_allow_header(make_registry: MakeRegistry) -> None:
    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        resp = await client.get("/models/load")
        assert resp.status == 405
        assert resp.headers.get("Allow") == "POST"
        body = await resp.json()
        assert "no such route" not in body["error"]

    await run_api(make_registry, scenario)


async def test_discovery_lists_only_harnesses_that_run_here(
    make_registry: MakeRegistry, fake_harness: Any, tmp_path: Path,
) -> None:
    from neuronctl.config import HarnessConfig
    from neuronctl.supervisor.harness import LlamaServerHarness

    missing = LlamaServerHarness(HarnessConfig(binary=str(tmp_path / "no-llama-server")))
    registry = make_registry(harnesses={"fake": fake_harness, "llama-server": missing})
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        body = await get_json(client, "/discovery")
    assert body["harnesses"] == ["fake"]
    assert "llama-server not found" in body["harnesses_unavailable"]["llama-server"]


async def test_a_bare_id_outside_the_catalogue_is_refused_not_fetched(
    node_config: NeuronConfig, make_registry: MakeRegistry, tiny_gguf: Path
) -> None:
    """A typo (`tyni` for `tiny`) is a 404 at once with the nearest id, never a Hub fetch;
    a failed model loaded by path is loaded again from that path by its id alone, and
    can be removed."""
    from dataclasses import replace

    from neuronctl.config import ModelSpec

    from ..fakes import FileHarness

    fetched: list[str] = []

    def no_hub(spec: ModelSpec, *args: Any) -> Any:
        fetched.append(spec.model_id)
        raise AssertionError("nothing may be fetched")

    model_file = tiny_gguf
    config = replace(node_config, models=(ModelSpec("tiny", harness="file", path=model_file),))
    harness = FileHarness()

    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        body = await post_json(client, "/models/load", {"model_id": "tyni", "harness": "file"},
                               404)
        assert body["error"] == ("no model 'tyni' in the catalogue (did you mean tiny?); to "
                                 "fetch a Hugging Face repo give --repo/--quant/--file")
        assert body["code"] == "model_not_found"
        assert [m["id"] for m in await get_json(client, "/models")] == ["tiny"]  # no row
        # A model of its own, by path, that then fails: its id alone loads that path again.
        await post_json(client, "/models/load", {"model_id": "victim", "harness": "file",
                                                 "path": str(model_file),
                                                 "args": ["--mode", "crash"]}, 502)
        again = await client.post("/models/load", json={"model_id": "victim"})
        assert again.status == 502, await again.text()
        assert [s.path for s in harness.planned_specs if s.model_id == "victim"] == \
            [model_file, model_file]
        # And removed: its row goes.
        await post_json(client, "/models/unload", {"model_id": "victim"})
        assert [m["id"] for m in await get_json(client, "/models")] == ["tiny"]

    await run_api(lambda: make_registry(config, {"file": harness}, fetcher_factory=no_hub),
                  scenario)
    assert fetched == []


async def test_a_load_answer_says_already_loaded_and_what_it_evicted(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    from dataclasses import replace

    config = replace(node_config, max_loaded_models=1)

    async def scenario(client: TestClient[Any, Any], registry: ModelRegistry) -> None:
        first = await post_json(client, "/models/load", {**FAKE, "model_id": "a"})
        assert (first["already_loaded"], first["evicted"]) == (False, [])
        again = await post_json(client, "/models/load", {**FAKE, "model_id": "a"})
        assert (again["already_loaded"], again["evicted"]) == (True, [])
        other = await post_json(client, "/models/load", {**FAKE, "model_id": "b"})
        assert (other["already_loaded"], other["evicted"]) == (False, ["a"])
        (listed,) = await get_json(client, "/models")
        assert (listed["id"], listed["catalogue"], listed["default"]) == ("b", False, False)

    await run_api(lambda: make_registry(config), scenario)
