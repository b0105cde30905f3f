"""Ollama's routes on the app with fake workers (no llama.cpp): what the node answers by
itself: bodies, names, the listing, the load and unload idioms, the refused routes.
The answers of real workers are tests/api/test_ollama.py's."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.api.v1 import ROUTER_STATS
from neuronctl.config import ModelSpec, NeuronConfig

from ..helpers import MakeRegistry, poll_until

JSON = {"Content-Type": "application/json"}


async def error_of(client: TestClient[Any, Any], path: str, data: bytes, status: int) -> str:
    async with client.post(path, data=io.BytesIO(data), headers=JSON) as resp:
        assert resp.status == status, await resp.text()
        body = await resp.json()
    # Ollama's `error` string (what its clients read), with the node's machine fields.
    assert set(body) == {"error", "type", "code"} and isinstance(body["error"], str), body
    return str(body["error"])


async def test_what_the_node_answers_itself(node_config: NeuronConfig,
                                            make_registry: MakeRegistry) -> None:
    spec = ModelSpec("m", harness="fake")
    registry = make_registry(dataclasses.replace(node_config, models=(spec,)))
    await registry.load(spec)
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        async with client.get("/api/version") as resp:
            assert resp.status == 200 and "version" in await resp.json()
        async with client.get("/api/tags") as resp:
            (entry,) = (await resp.json())["models"]
        assert entry["name"] == entry["model"] == "m:latest"
        assert entry["details"]["format"] == "gguf" and entry["size"] == 0  # no file
        async with client.post("/api/show", json={"model": "m:latest"}) as resp:
            assert resp.status == 200 and "model_info" in await resp.json()
        assert "'nope' not found" in await error_of(client, "/api/show",
                                                    b'{"model": "nope"}', 404)

        # A 2 MiB body of a few long strings is a request; 2 MiB of tiny values is not
        # parsed at all (it would be hundreds of MiB of objects).
        long = b'{"model": "nope", "prompt": "' + b"x" * (2 << 20) + b'"}'
        assert "not found" in await error_of(client, "/api/generate", long, 404)
        many = b'{"model": "m", "prompt": [' + b"1," * (1 << 20) + b'1]}'
        assert "JSON values" in await error_of(client, "/api/generate", many, 413)

        assert "dimensions" in await error_of(
            client, "/api/embed", b'{"model": "m", "input": "a", "dimensions": 8}', 400)
        for path in ("/api/create", "/api/copy", "/api/delete", "/api/push"):
            message = await error_of(client, path, b"{}", 400)
            assert message.startswith(path)
        async with client.delete("/api/delete", json={"model": "m"}) as resp:
            assert resp.status == 400 and "/models/unload" in (await resp.json())["error"]

        # Ollama's idioms: no prompt loads (here: it is loaded), keep_alive 0 unloads.
        async with client.post("/api/generate", json={"model": "m:latest"}) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["done"] is True and answer["done_reason"] == "load"
        pinned = ModelSpec("pinned", harness="fake", pinned=True)
        await registry.load(pinned)
        async with client.post("/api/chat", json={"model": "pinned", "keep_alive": 0}) as resp:
            assert resp.status == 200 and "pinned" in resp.headers["X-Neuron-Ignored-Options"]
            assert (await resp.json())["done_reason"] == "load"  # not unloaded: it says so
        assert registry.get("pinned") is not None  # the operator's to keep
        await registry.unload("pinned")
        async with client.post("/api/chat", json={"model": "m", "keep_alive": 0}) as resp:
            assert resp.status == 200 and (await resp.json())["done_reason"] == "unload"
        await asyncio.to_thread(poll_until, lambda: registry.get("m") is None, 10)
        async with client.get("/api/ps") as resp:
            assert (await resp.json())["models"] == []
        # The keep_alive ended with the model: loaded again, it has no idle deadline.
        async with client.post("/models/load", json={"model_id": "m"}) as resp:
            assert resp.status == 200
        assert client.app[ROUTER_STATS].models["m"].keep_alive_s is None
