"""Each failure answers with its own status and code, in the control API's shape and the
router's, both rendered from the one class in errors.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl import errors
from neuronctl.api.app import create_app
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.supervisor.harness import LLAMA_SERVER, Harness, LlamaServerHarness, WorkerPlan

from .fakes import FakeHarness
from .gpu_fakes import FakeSmi, gpu, install_fake_smi
from .helpers import MakeRegistry


class BuggyHarness(Harness):
    name = "buggy"

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        raise RuntimeError("plan bug")


def harnesses(fake: FakeHarness) -> dict[str, Any]:
    missing = LlamaServerHarness(HarnessConfig(binary="/nonexistent/llama-server"))
    return {"fake": fake, "buggy": BuggyHarness(), LLAMA_SERVER: missing}


async def load(make_registry: MakeRegistry, fake: FakeHarness, body: dict[str, Any],
               config: NeuronConfig | None = None) -> tuple[int, dict[str, Any]]:
    registry = make_registry(config, harnesses(fake))
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        resp = await client.post("/models/load", json=body)
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"harness": "fake"}, 400, "invalid_spec"),
    ({"model_id": "m", "harness": "nope"}, 400, "unknown_harness"),
    ({"model_id": "m", "harness": "fake", "args": ["--mode", "crash"]}, 502, "worker_exited"),
    ({"model_id": "m", "harness": "fake", "args": ["--mode", "hang"], "ready_timeout_s": 0.3},
     504, "worker_timeout"),
    ({"model_id": "m", "harness": "buggy"}, 500, "internal_error"),
])
async def test_load_failures_have_their_own_status(
    make_registry: MakeRegistry, fake_harness: FakeHarness,
    body: dict[str, Any], status: int, code: str,
) -> None:
    got_status, answer = await load(make_registry, fake_harness, body)
    assert (got_status, answer["code"]) == (status, code), answer
    assert answer["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert isinstance(answer["error"], str) and "\n" not in answer["error"]


async def test_a_missing_model_file_is_the_requests_fault(
    make_registry: MakeRegistry, fake_harness: FakeHarness, tmp_path: Path
) -> None:
    body = {"model_id": "m", "harness": LLAMA_SERVER, "path": str(tmp_path / "gone.gguf")}
    status, answer = await load(make_registry, fake_harness, body)
    assert (status, answer["code"]) == (400, "model_file_not_found")
    assert answer["error"] == f"model file not found or not readable: {tmp_path / 'gone.gguf'}"


async def test_a_harness_that_is_not_installed_is_the_nodes(
    make_registry: MakeRegistry, fake_harness: FakeHarness, tmp_path: Path
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    body = {"model_id": "m", "harness": LLAMA_SERVER, "path": str(model)}
    status, answer = await load(make_registry, fake_harness, body)
    assert (status, answer["code"]) == (503, "harness_unavailable")
    assert "llama-server not found" in answer["error"]


async def test_a_worker_that_exited_answers_with_its_reason_and_log_tail(
    make_registry: MakeRegistry, fake_harness: FakeHarness
) -> None:
    body = {"model_id": "m", "harness": "fake", "args": ["--mode", "crash", "--code", "7"]}
    status, answer = await load(make_registry, fake_harness, body)
    assert status == 502
    assert answer["error"] == ("worker exited with code 7 while starting: "
                               "fatal: simulated load failure")
    assert answer["detail"].startswith("last lines of ")
    assert answer["model"]["status"] == "failed" and answer["model"]["exit_code"] == 7
    assert answer["model"]["error_detail"] == answer["detail"]


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSmi:
    return install_fake_smi(tmp_path, monkeypatch)


async def test_not_enough_vram_is_a_503(
    make_registry: MakeRegistry, fake_harness: FakeHarness, fake_smi: FakeSmi, tiny_gguf: Path
) -> None:
    fake_smi.set(gpus=[gpu(0, 0)])  # an n_ctx over the model's own (256) is a 400 now
    body = {"model_id": "big", "harness": "fake", "path": str(tiny_gguf), "devices": [0],
            "n_ctx": 256}
    status, answer = await load(make_registry, fake_harness, body)
    assert (status, answer["code"]) == (503, "insufficient_vram")
    assert "not enough free VRAM" in answer["error"]
    assert fake_harness.planned == []


async def test_unload_refusals(make_registry: MakeRegistry, fake_harness: FakeHarness) -> None:
    registry = make_registry()
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        resp = await client.post("/models/unload", json={"model_id": "nobody"})
        assert resp.status == 404
        assert (await resp.json())["code"] == "model_not_found"
        resp = await client.post("/models/unload", json={})
        assert resp.status == 400
        assert (await resp.json())["code"] == "invalid_value"
        await registry.load(ModelSpec("m", harness="fake", args=("--mode", "ignore-term")))
        first, second = await asyncio.gather(
            client.post("/models/unload", json={"model_id": "m"}),
            client.post("/models/unload", json={"model_id": "m"}))
        statuses = sorted([first.status, second.status])
        assert statuses == [200, 409]
        conflict = first if first.status == 409 else second
        assert (await conflict.json())["code"] == "conflict"


async def test_control_and_router_shapes_come_from_one_error(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        control = await client.get("/models/ghost/endpoint")
        routed = await client.post("/v1/chat/completions", json={"model": "ghost"})
        assert control.status == routed.status == 404
        assert (await control.json())["code"] == "model_not_found"
        assert (await routed.json())["error"]["code"] == "model_not_found"
        assert (await routed.json())["error"]["type"] == "invalid_request_error"
        missing = await client.get("/no/such/route")
        assert missing.status == 404 and (await missing.json())["code"] == "not_found"


def test_every_client_error_class_has_a_4xx_or_5xx_status() -> None:
    def subclasses(cls: type[errors.NeuronError]) -> list[type[errors.NeuronError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    classes = subclasses(errors.NeuronError)
    assert len(classes) > 20
    for cls in classes:
        assert 400 <= cls.status < 600, cls
        assert cls.type == ("invalid_request_error" if cls.status < 500 else "server_error"), cls
    # Each class errors.py defines has a code of its own (the base is a plain internal
    # error, as InternalError is; resolve.ResolveError is a ModelFileError by another name).
    own = [c for c in classes if c.__module__ == errors.__name__ and c is not errors.NeuronError]
    codes = [c.code for c in own]
    assert len(codes) == len(set(codes)), codes
