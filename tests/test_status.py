"""What operators look for in `neuronctl status`: the fields of GET /models behind it, the
table (at 80 columns, long ids included), and the commands against a real daemon."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api import create_app
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.router import ROUTER_STATS

from .helpers import MakeRegistry

# --- the API fields ---------------------------------------------------------------------------


async def test_models_lists_context_memory_ttl_and_traffic(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    config = dataclasses.replace(
        node_config, ttl_s=300.0,
        default_models=(ModelSpec("default", harness="fake"),),
        models=(ModelSpec("cat", harness="fake", n_ctx=512, pinned=True),),
        harness={"fake": HarnessConfig(n_ctx=1024)},
    )
    registry = make_registry(config)
    await registry.load(ModelSpec("default", harness="fake"))
    await registry.load(ModelSpec("by-hand", harness="fake", ttl_s=60.0))
    app = create_app(registry)
    async with TestClient(TestServer(app)) as client:
        async with client.get("/models") as resp:
            by_id = {m["id"]: m for m in await resp.json()}
        default, by_hand, cat = by_id["default"], by_id["by-hand"], by_id["cat"]
        # A default model idles out only by its own ttl_s; the others by theirs or the node's.
        assert (default["ttl_s"], by_hand["ttl_s"], cat["ttl_s"]) == (None, 60.0, 300.0)
        assert (default["pinned"], by_hand["pinned"], cat["pinned"]) == (True, False, True)
        # The spec's n_ctx, else the harness table's.
        assert (by_hand["n_ctx"], cat["n_ctx"]) == (1024, 512)
        assert by_hand["rss_bytes"] > 1_000_000 and cat["rss_bytes"] is None
        assert (by_hand["in_flight"], by_hand["queued"]) == (0, 0)
        assert cat["status"] == "unloaded" and cat["idle_until"] is None
        assert default["idle_until"] is None  # no TTL
        # Idle since it became loaded: unloaded ttl_s after that.
        assert abs(by_hand["idle_until"] - (by_hand["since"] + 60.0)) < 0.01

        stats = app[ROUTER_STATS].model("by-hand")
        stats.in_flight, stats.last_used = 2, time.monotonic()
        async with client.get("/models") as resp:
            busy = {m["id"]: m for m in await resp.json()}["by-hand"]
        assert (busy["in_flight"], busy["idle_until"]) == (2, None)  # no countdown while busy

        stats.in_flight = 0
        async with client.get("/models") as resp:
            idle: dict[str, Any] = {m["id"]: m for m in await resp.json()}["by-hand"]
        # The countdown runs from its last request.
        assert abs(idle["idle_until"] - (time.time() + 60.0)) < 5
        assert idle["idle_until"] > by_hand["idle_until"]
