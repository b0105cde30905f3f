"""GET /metrics, parsed with prometheus-client's own parser after real loads and requests."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from neuronctl.api.app import create_app
from neuronctl.config import HarnessConfig, NeuronConfig
from neuronctl.states import ModelStatus
from neuronctl.supervisor.harness import build_harnesses

from ..helpers import (
    MakeRegistry,
    fast_restarts,
    find_llama_server,
    llama_required,
    poll_until,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def scrape(client: TestClient[Any, Any]) -> dict[Any, float]:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return samples(await resp.text())


async def test_names_follow_prometheus_conventions(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    async with TestClient(TestServer(create_app(registry))) as client:
        async with client.post("/models/load", json={"model_id": "m", "harness": "fake"}):
            pass
        # One request naming the model, so its latency histogram has samples to show.
        async with client.post("/v1/chat/completions", json={"model": "m", "messages": []}):
            pass
        async with client.get("/metrics") as resp:
            text = await resp.text()
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert all(n.startswith("neuron_") for n in names), names
    kinds = {f.name: f.type for f in families}
    assert kinds["neuron_model_restarts"] == "counter"  # exposed with the _total suffix
    assert kinds["neuron_model_load_duration_seconds"] == "histogram"
    assert kinds["neuron_request_duration_seconds"] == "histogram"
    assert kinds["neuron_worker_resident_memory_bytes"] == "gauge"
    found = samples(text)
    assert value(found, "neuron_model_restarts_total", model="m") == 0
    assert value(found, "neuron_request_duration_seconds_count", model="m") == 1
    assert value(found, "neuron_request_duration_seconds_bucket", model="m", le="+Inf") == 1


async def test_restarts_and_load_durations_after_a_crash(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    registry = make_registry(fast_restarts(node_config))
    before_app = time.monotonic()
    async with TestClient(TestServer(create_app(registry))) as client:
        after_app = time.monotonic()
        async with client.post("/models/load", json={"model_id": "m", "harness": "fake"}):
            pass
        record = registry.get("m")
        assert record is not None and record.worker is not None
        os.kill(record.worker.pid or 0, signal.SIGKILL)
        await asyncio.to_thread(
            poll_until, lambda: record.status is ModelStatus.LOADED and record.restarts, 15
        )
        before_scrape = time.monotonic()
        found = await scrape(client)
        after_scrape = time.monotonic()
    assert value(found, "neuron_model_restarts_total", model="m") == 1
    assert value(found, "neuron_model_load_duration_seconds_count", model="m") == 2
    assert value(found, "neuron_model_status", model="m", status="loaded") == 1
    assert value(found, "neuron_model_status", model="m", status="failed") == 0
    assert value(found, "neuron_worker_resident_memory_bytes", model="m") > 1_000_000
    # Counted from the app's creation, in seconds of the monotonic clock.
    uptime = value(found, "neuron_uptime_seconds")
    assert before_scrape - after_app <= uptime <= after_scrape - before_app


@pytest.mark.llama
@llama_required
async def test_requests_and_latency_through_the_router(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry(node_config, build_harnesses(node_config))
    async with TestClient(TestServer(create_app(registry))) as client:
        spec = {"model_id": "tiny", "path": str(tiny_gguf), "n_ctx": 64}
        async with client.post("/models/load", json=spec) as resp:
            assert resp.status == 200
        chat = {"model": "tiny", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(3):
            async with client.post("/v1/chat/completions", json=chat) as resp:
                assert resp.status == 200
        async with client.post("/v1/chat/completions", json={**chat, "model": "x"}):
            pass  # an unknown model is no model's request
        found = await scrape(client)
    assert value(found, "neuron_requests_total", model="tiny", code="200") == 3
    assert value(found, "neuron_request_duration_seconds_count", model="tiny") == 3
    assert value(found, "neuron_request_duration_seconds_bucket", model="tiny", le="+Inf") == 3
    assert value(found, "neuron_request_duration_seconds_sum", model="tiny") > 0
    assert value(found, "neuron_requests_in_flight", model="tiny") == 0
    assert value(found, "neuron_model_load_duration_seconds_count", model="tiny") == 1
    assert not any(labels and dict(labels).get("model") == "x" for _, labels in found)


@pytest.mark.llama_server
@pytest.mark.skipif(find_llama_server() is None, reason="no llama-server binary on PATH")
async def test_prompt_cache_counts_after_a_swap_through_the_router(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry,
) -> None:
    """Saved on unload, restored on load, and the first answer through the router after
    it (a stream) judged by its timings.cache_n: a hit, in /metrics and /models."""
    config = dataclasses.replace(node_config, harness={
        "llama-server": HarnessConfig(binary=find_llama_server())})
    registry = make_registry(config, build_harnesses(config))
    spec = {"model_id": "tiny", "harness": "llama-server", "path": str(tiny_gguf),
            "n_ctx": 256, "parallel": 1}
    ask = {"model": "tiny", "prompt": "A conversation that comes back after a swap. " * 3,
           "max_tokens": 2, "stream": True}
    async with TestClient(TestServer(create_app(registry))) as client:
        for _ in range(2):
            async with client.post("/models/load", json=spec) as resp:
                assert resp.status == 200, await resp.text()
            async with client.post("/v1/completions", json=ask) as resp:
                assert resp.status == 200
                answer = await resp.read()
            async with client.get("/models") as resp:
                (listed,) = [m for m in await resp.json() if m["id"] == "tiny"]
            async with client.post("/models/unload", json={"model_id": "tiny"}) as resp:
                assert resp.status == 200
        found = await scrape(client)
    assert b'"cache_n":' in answer and b'"cache_n":0' not in answer
    assert listed["prompt_cache"] is True and listed["prompt_cache_bytes"] > 0
    assert value(found, "neuron_prompt_cache_saves_total") == 2
    assert value(found, "neuron_prompt_cache_restores_total") == 1
    assert value(found, "neuron_prompt_cache_hits_total") == 1
    assert value(found, "neuron_prompt_cache_misses_total") == 0
    assert value(found, "neuron_prompt_cache_failures_total", operation="save") == 0
    assert value(found, "neuron_prompt_cache_bytes") > 0
