"""Idle unload: ttl_s after the last /v1 request or the model's becoming loaded; a default
model idles out only by its own ttl_s. What the reaper unloads and what `/models` shows as
`idle_until` are one computation over the router's counters."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.api.idle import IdleReaper
from neuronctl.api.traffic import RouterStats
from neuronctl.config import ModelSpec, NeuronConfig

from ..helpers import MakeRegistry, poll_until


async def test_ttl_counts_from_the_last_request_and_spares_pinned_defaults(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    defaults = (ModelSpec("pinned", harness="fake"),
                ModelSpec("default-with-ttl", harness="fake", ttl_s=5.0))
    config = dataclasses.replace(node_config, ttl_s=5.0, default_models=defaults)
    stats = RouterStats()
    registry = make_registry(config, activity=stats.activity)
    for spec in (*defaults, ModelSpec("busy", harness="fake", ttl_s=5.0),
                 ModelSpec("by-hand", harness="fake")):
        await registry.load(spec)
    # The reaper's clock is the Unix time; t=0 is the latest of the loads.
    start = max(m.since for m in registry.models())
    now = [start]
    reaper = IdleReaper(registry, stats.activity, clock=lambda: now[0])

    def request_at(t: float) -> None:  # the router's clock is monotonic
        stats.model("busy").last_used = time.monotonic() - (time.time() - start) + t

    assert reaper.ttl_for(registry.get("pinned")) is None  # type: ignore[arg-type]
    await reaper.reap()
    now[0] = start + 4.0
    request_at(4.0)
    await reaper.reap()
    now[0] = start + 6.0
    await reaper.reap()
    # Past 5 s idle: the default with its own ttl_s and the by-hand model (the
    # node's ttl_s). The pinned default stays; "busy" was used 2 s ago.
    assert {r.model_id for r in registry.models()} == {"pinned", "busy"}
    # /models shows the same deadline the reaper goes by.
    listed = {m["id"]: m for m in registry.listing()}
    assert abs(listed["busy"]["idle_until"] - (start + 9.0)) < 0.01
    stats.model("busy").in_flight = 1  # a long request in flight is not idleness
    now[0] = start + 60.0
    await reaper.reap()
    assert registry.get("busy") is not None
    assert {m["id"]: m for m in registry.listing()}["busy"]["idle_until"] is None
    stats.model("busy").in_flight = 0
    request_at(60.0)  # the request's end is its last use
    await reaper.reap()  # idle from now on
    now[0] = start + 66.0
    await reaper.reap()
    assert {r.model_id for r in registry.models()} == {"pinned"}


async def test_the_app_unloads_an_idle_model(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    async with TestClient(TestServer(create_app(registry))) as client:
        body: dict[str, Any] = {"model_id": "m", "harness": "fake", "ttl_s": 0.2}
        async with client.post("/models/load", json=body) as resp:
            assert resp.status == 200
        await asyncio.to_thread(poll_until, lambda: registry.get("m") is None, 10)


async def test_a_requests_keep_alive_replaces_the_ttl_until_the_next(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    """Ollama's keep_alive (ModelStats.keep_alive_s): seconds in place of ttl_s, negative
    for never; what the reaper does and what /models shows agree."""
    config = dataclasses.replace(node_config, ttl_s=5.0)
    stats = RouterStats()
    registry = make_registry(config, activity=stats.activity)
    for model_id in ("short", "forever", "other"):
        await registry.load(ModelSpec(model_id, harness="fake"))
    start = max(m.since for m in registry.models())
    now = [start]
    reaper = IdleReaper(registry, stats.activity, clock=lambda: now[0])
    stats.model("short").keep_alive_s = 1.0
    stats.model("forever").keep_alive_s = -1.0
    listed = {m["id"]: m for m in registry.listing()}
    assert abs(listed["short"]["idle_until"] - (listed["short"]["since"] + 1.0)) < 0.01
    assert listed["forever"]["idle_until"] is None
    now[0] = start + 2.0
    await reaper.reap()
    assert {m.model_id for m in registry.models()} == {"forever", "other"}
    now[0] = start + 60.0
    await reaper.reap()  # past the node's ttl_s: only keep_alive -1 keeps a model
    assert {m.model_id for m in registry.models()} == {"forever"}
    stats.model("forever").keep_alive_s = None  # a request without keep_alive: ttl_s again
    await reaper.reap()
    assert registry.models() == []
