"""One `/models` entry shape: a live model and a catalogue model without a lifecycle list
the same keys, in the same order (docs/api.md documents them)."""

from __future__ import annotations

import dataclasses

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.supervisor import listing
from neuronctl.supervisor.eviction import IDLE

from ..helpers import MakeRegistry

KEYS = ["id", "harness", "status", "devices", "vram_used_mb", "pid", "port", "endpoint",
        "load_ms", "restarts", "error", "error_detail", "exit_code", "last_error",
        "last_exit_code", "log_path", "warning", "pinned", "n_ctx", "slots", "rss_bytes", "ttl_s",
        "download", "since", "uptime_s"]


async def test_a_live_and_an_unloaded_model_list_the_same_keys(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    config = dataclasses.replace(node_config, models=[ModelSpec("cat", harness="fake")])
    registry = make_registry(config)
    model = await registry.load(ModelSpec("m", harness="fake"))
    live = model.to_json()
    assert list(live) == KEYS
    assert live["status"] == "loaded" and live["pid"] == model.worker.pid  # type: ignore[union-attr]
    unloaded = listing.of_spec(ModelSpec("cat", harness="fake"), config).as_json()
    assert list(unloaded) == KEYS
    assert unloaded == {**dict.fromkeys(KEYS), "id": "cat", "harness": "fake",
                        "status": "unloaded", "devices": [], "restarts": 0,
                        "pinned": False, "n_ctx": None, "ttl_s": config.ttl_s}
    listed = {entry["id"]: entry for entry in registry.listing()}
    assert list(listed["cat"]) == [*KEYS, "in_flight", "queued", "idle_until", "autoload",
                                   "prompt_cache", "prompt_cache_bytes", "catalogue", "default",
                                   "pull"]
    # The fake harness keeps no prompt cache; none is saved either.
    assert listed["cat"] == {**listing.with_traffic(unloaded, IDLE), "autoload": True,
                             "prompt_cache": False, "prompt_cache_bytes": 0,
                             "catalogue": True, "default": False, "pull": None}


async def test_rows_keep_the_config_order_as_models_load(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    """`status --watch` and the dashboard must not jump: a catalogue model keeps its place
    when it loads; models outside the catalogue follow, in the order they were loaded."""
    config = dataclasses.replace(node_config, models=(
        ModelSpec("a", harness="fake"), ModelSpec("b", harness="fake")))
    registry = make_registry(config)
    assert [m["id"] for m in registry.listing()] == ["a", "b"]
    await registry.load(ModelSpec("own", harness="fake"))
    await registry.load(config.models[1])
    assert [m["id"] for m in registry.listing()] == ["a", "b", "own"]

