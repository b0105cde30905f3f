"""The warm-first routing hook (fleet/warm_first.py): the choice as pure functions over what
the nodes said, and its followers against nodes served in this event loop. The hook inside
the real LiteLLM proxy is tests/fleet/test_warm_first_litellm.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from neuronctl.api.app import create_app
from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.fleet import warm_first as hook
from neuronctl.fleet.warm_first import ModelState, NodeView

from ..helpers import MakeRegistry, free_port, poll_until_async


def deployment(node: str, model: str = "m", key: str = "none") -> dict[str, Any]:
    return {"model_name": model,
            "litellm_params": {"model": f"openai/{model}", "api_base": f"{node}/v1",
                               "api_key": key},
            "model_info": {"id": f"{node}@i/{model}"}}


def view(now: float = 100.0, **models: ModelState) -> NodeView:
    return NodeView(heard_at=now, models=dict(models))


def loaded(in_flight: int = 0, queued: int = 0, slots: int = 1) -> ModelState:
    return ModelState("loaded", True, in_flight, queued, slots)


A, B, C = "http://a:1", "http://b:1", "http://c:1"
NOW = 100.0


def picked(views: dict[str, NodeView], *nodes: str, now: float = NOW) -> list[str]:
    chosen = hook.choose([deployment(n) for n in nodes], views, now)
    return [d["litellm_params"]["api_base"].removesuffix("/v1") for d in chosen]


# --- the choice --------------------------------------------------------------------------


def test_a_warm_node_with_a_free_slot_beats_one_that_would_load() -> None:
    views = {A: view(m=ModelState("unloaded", autoload=True)), B: view(m=loaded())}
    assert picked(views, A, B) == [B]


def test_every_free_warm_node_stays_for_litellm_to_spread_over() -> None:
    views = {A: view(m=loaded()), B: view(m=loaded(in_flight=1, slots=4)), C: view(m=loaded(1))}
    assert picked(views, A, B, C) == [A, B]


def test_busy_warm_nodes_fewest_waiting_first() -> None:
    views = {A: view(m=loaded(1, queued=3)), B: view(m=loaded(1, queued=1)),
             C: view(m=ModelState("unloaded", autoload=True))}
    assert picked(views, A, B, C) == [B]
    # A queue is still better than a load: warm and queued beats cold.
    assert picked(views, A, C) == [A]


def test_a_model_already_loading_beats_one_that_would_start_loading() -> None:
    views = {A: view(m=ModelState("unloaded", autoload=True)), B: view(m=ModelState("loading"))}
    assert picked(views, A, B) == [B]


@pytest.mark.parametrize("status,autoload", [("failed", True), ("restarting", True),
                                             ("unloaded", False), ("unloading", False)])
def test_a_node_where_the_model_cannot_serve_drops_out(status: str, autoload: bool) -> None:
    views = {A: view(m=ModelState(status, autoload)), B: view(m=ModelState("unloaded", True))}
    assert picked(views, A, B) == [B]


def test_a_node_that_does_not_list_the_model_drops_out() -> None:
    assert picked({A: view(), B: view(m=loaded(1, queued=5))}, A, B) == [B]


def test_an_unreachable_node_drops_out_while_that_news_is_fresh() -> None:
    views = {A: NodeView(down_at=NOW - 1), B: view(m=ModelState("unloaded", True))}
    assert picked(views, A, B) == [B]
    # Old news of a failure is no news: it counts as unknown, ahead of a load.
    later = NOW - 1 + hook.DOWN_TRUST_S + 0.1
    views[B] = view(later, m=ModelState("unloaded", True))
    assert picked(views, A, B, now=later) == [A]


def test_stale_knowledge_is_not_trusted_beyond_its_age() -> None:
    # A said "warm" 1.5 s ago and has been silent since; B is warm now and has a queue.
    views = {A: view(NOW - 1.5, m=loaded()), B: view(m=loaded(1, queued=1)),
             C: view(m=ModelState("unloaded", True))}
    assert picked(views, A, B, C, now=NOW) == [B]
    assert picked({**views, A: view(NOW - 0.5, m=loaded())}, A, B, C, now=NOW) == [A]
    # Unknown ranks before a load (it may be warm) and after what is known warm.
    assert picked(views, A, C, now=NOW) == [A]


def test_nothing_known_leaves_litellms_choice_alone() -> None:
    deployments = [deployment(A), deployment(B)]
    assert hook.choose(deployments, {}, NOW) is deployments
    stale = {A: view(NOW - 5, m=loaded()), B: view(NOW - 5)}
    assert hook.choose(deployments, stale, NOW) is deployments


def test_never_an_empty_list() -> None:
    deployments = [deployment(A), deployment(B)]
    views = {A: NodeView(down_at=NOW), B: view(m=ModelState("failed"))}
    assert hook.choose(deployments, views, NOW) is deployments
    assert hook.choose([], views, NOW) == []


def test_deployments_it_did_not_write_count_as_unknown() -> None:
    foreign = {"model_name": "m", "litellm_params": {"model": "anthropic/claude"}}
    chosen = hook.choose([foreign, deployment(A)], {A: view(m=loaded())}, NOW)
    assert chosen == [deployment(A)]
    assert hook.target(foreign) is None
    assert hook.target(deployment(A, key="k")) == (A, "m", "k")
    assert hook.target(deployment(A)) == (A, "m", None)  # "none": the generator's no-key


# --- what the stream says ------------------------------------------------------------------


def test_a_view_follows_snapshot_state_and_traffic() -> None:
    seen = NodeView()
    seen.apply("snapshot", {"models": [
        {"id": "m", "status": "loaded", "autoload": True, "in_flight": 0, "queued": 0},
        {"id": "n", "status": "unloaded", "autoload": False}, {"bad": 1}, "junk"]}, 1.0)
    assert seen.models == {"m": ModelState("loaded", True), "n": ModelState("unloaded", False)}
    seen.apply("traffic", {"time": 0, "models": {"m": {"in_flight": 2, "queued": 1, "slots": 4},
                                                 "z": {"queued": 9}}}, 2.0)
    assert seen.models["m"] == ModelState("loaded", True, 2, 1, 4) and "z" not in seen.models
    seen.apply("state", {"model": "m", "to": "stopping", "status": "unloading"}, 3.0)
    assert seen.models["m"].status == "unloading" and seen.heard_at == 3.0
    seen.apply("traffic", {"models": {}}, 4.0)  # absent: nothing in flight, nothing waiting
    assert (seen.models["m"].in_flight, seen.models["m"].queued) == (0, 0)
    seen.apply("traffic", {"models": {"m": {"in_flight": -1, "slots": "x"}}}, 5.0)
    assert seen.models["m"] == ModelState("unloading", True, 0, 0, 1)
    seen.lost(6.0)
    assert seen.models == {} and seen.down_at == 6.0 and seen.heard_at is None


# --- the followers, against real node APIs --------------------------------------------------


@dataclasses.dataclass
class Node:
    url: str
    runner: web.AppRunner


@pytest.fixture
async def node(node_config: NeuronConfig, make_registry: MakeRegistry,
               tmp_path: Path) -> AsyncIterator[Node]:
    config = dataclasses.replace(node_config, node_id="n1", api_key="sesame",
                                 models=(ModelSpec("m", harness="fake"),))
    registry = make_registry(config)
    await registry.load(config.catalogue()["m"])
    runner = web.AppRunner(create_app(registry), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    made = Node(f"http://127.0.0.1:{port}", runner)
    yield made
    await runner.cleanup()


async def test_the_hook_follows_a_node_and_prefers_where_it_is_warm(node: Node) -> None:
    warm = hook.WarmFirst()
    other = deployment("http://127.0.0.1:9", key="sesame")  # nothing listens on port 9
    mine = deployment(node.url, key="sesame")
    try:
        # Nothing known yet: LiteLLM's list as it came.
        first = [other, mine]
        assert await warm.async_filter_deployments("m", first, None) is first
        await poll_until_async(lambda: warm.views[node.url].heard_at is not None, 20)
        await poll_until_async(lambda: warm.views["http://127.0.0.1:9"].down_at is not None, 20)
        assert await warm.async_filter_deployments("m", [other, mine], None) == [mine]
        assert warm.views[node.url].models["m"].status == "loaded"
        # Heartbeats keep it fresh without any request.
        before = warm.views[node.url].heard_at
        await poll_until_async(lambda: warm.views[node.url].heard_at != before, 5)
    finally:
        await asyncio.wait_for(warm.close(), 20)


async def test_a_node_that_goes_away_drops_out_and_comes_back(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = dataclasses.replace(node_config, node_id="n2",
                                 models=(ModelSpec("m", harness="fake"),))
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def serve() -> web.AppRunner:
        """A node on `port`: a new one each time (a restart), its model loaded."""
        registry = make_registry(config)
        await registry.load(config.catalogue()["m"])
        runner = web.AppRunner(create_app(registry), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = await serve()
    warm = hook.WarmFirst()
    try:
        warm.watch([deployment(url)])
        await poll_until_async(lambda: warm.views[url].heard_at is not None, 20)
        await asyncio.wait_for(runner.cleanup(), 20)
        await poll_until_async(lambda: warm.views[url].down_at is not None, 20)
        assert hook.rank(warm.views[url], "m", warm.clock()) is None
        runner = await serve()
        await poll_until_async(lambda: warm.views[url].heard_at is not None, 20)
        assert hook.rank(warm.views[url], "m", warm.clock()) == (hook.FREE,)
    finally:
        await asyncio.wait_for(warm.close(), 20)
        await asyncio.wait_for(runner.cleanup(), 20)


async def test_a_wrong_key_is_a_node_out_of_the_choice(node: Node) -> None:
    warm = hook.WarmFirst()
    try:
        warm.watch([deployment(node.url, key="wrong")])
        await poll_until_async(lambda: warm.views[node.url].down_at is not None, 20)
    finally:
        await asyncio.wait_for(warm.close(), 20)


async def test_a_bug_in_the_choice_leaves_litellms_list(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(hook, "choose", broken)
    warm = hook.WarmFirst()
    listed = [deployment(A)]
    try:
        assert await warm.async_filter_deployments("m", listed, None) is listed
    finally:
        await asyncio.wait_for(warm.close(), 20)
    assert await asyncio.wait_for(warm.async_filter_deployments("m", {"x": 1}, None), 5) == \
        {"x": 1}  # type: ignore[comparison-overlap]


def test_the_file_imports_as_litellm_imports_it(tmp_path: Path) -> None:
    """By path, under its own name, not entered in sys.modules (LiteLLM's get_instance_fn),
    in a fresh interpreter without neuronctl on its path."""
    import subprocess
    import sys

    copy = tmp_path / "neuron_routing.py"
    copy.write_bytes(Path(hook.__file__).read_bytes())
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('neuron_routing', {str(copy)!r})\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "assert 'neuronctl' not in sys.modules, 'it imported neuronctl'\n"
            "print(type(module.warm_first).__name__)\n")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "WarmFirst"
