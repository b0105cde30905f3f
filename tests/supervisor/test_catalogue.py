"""The catalogue: models listed before they are loaded, loaded by id or by the first /v1
request naming them, and evicted (least recently used, idle, unpinned) to make room,
never while a request is in flight."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from neuronctl.api.app import create_app
from neuronctl.api.traffic import RouterStats
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig, load_config
from neuronctl.errors import NoRoom
from neuronctl.states import ModelStatus, WorkerState
from neuronctl.supervisor.harness import LLAMA_CPP_PYTHON, LlamaCppPythonHarness
from neuronctl.supervisor.registry import ModelRegistry

from ..fakes import FakeHarness
from ..gpu_fakes import gpu, install_fake_smi, lay_out_hf_cache
from ..helpers import MakeRegistry, free_port, llama_required, poll_until_async

NO_EOS = {"2": -100}  # the tiny model's end-of-text token: long answers stay long


def fake(model_id: str, **kw: Any) -> ModelSpec:
    return ModelSpec(model_id, harness="fake", **kw)


def catalogue(node_config: NeuronConfig, *models: ModelSpec, **config: Any) -> NeuronConfig:
    return dataclasses.replace(node_config, models=models, **config)


# --- the registry, with fake workers -------------------------------------------------------


async def test_catalogue_models_are_listed_unloaded_and_load_by_id(
    node_config: NeuronConfig, make_registry: MakeRegistry, fake_harness: FakeHarness,
) -> None:
    config = catalogue(node_config, fake("cat", args=("--delay", "0.1"), ttl_s=60.0))
    registry = make_registry(config)
    (listed,) = registry.listing()
    assert listed["id"] == "cat" and listed["status"] == "unloaded"
    assert listed["pinned"] is False and listed["pid"] is None
    # An id alone means the catalogue's entry, with what the request adds on top.
    spec = registry.spec_for(ModelSpec("cat", force=True), {"model_id", "force"})
    assert spec.args == ("--delay", "0.1") and spec.ttl_s == 60.0 and spec.force
    model = await registry.load(spec)
    assert model.status is ModelStatus.LOADED
    assert [m["status"] for m in registry.listing()] == ["loaded"]
    # A request naming a source of its own is a model of its own.
    own = registry.spec_for(ModelSpec("cat", harness="fake"), {"model_id", "harness"})
    assert own.args == ()
    await registry.unload("cat")
    assert [m["status"] for m in registry.listing()] == ["unloaded"]


async def test_a_failed_default_model_comes_back_by_id_over_http(
    node_config: NeuronConfig, make_registry: MakeRegistry, tmp_path: Path,
) -> None:
    flag = tmp_path / "crashed-once"
    default = fake("d", args=("--crash-if-exists", str(flag)))
    flag.touch()  # its first load fails
    config = dataclasses.replace(node_config, default_models=(default,))
    registry = make_registry(config)
    with contextlib.suppress(Exception):
        await registry.load(default)
    assert registry.listing()[0]["status"] == "failed"
    flag.unlink()
    app = create_app(registry)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/models/load", json={"model_id": "d"}) as resp:
            assert resp.status == 200, await resp.text()
        model = registry.get("d")
        assert model is not None and model.spec == default  # its configured settings
        assert model.to_json()["pinned"] is True  # a default model
    finally:
        await runner.cleanup()


async def test_with_max_loaded_models_the_least_recently_used_idle_model_is_evicted(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = catalogue(node_config, fake("a"), fake("b"), fake("c"), max_loaded_models=2)
    registry = make_registry(config)
    used = {"a": 2.0, "b": 1.0}  # b was used longest ago
    from neuronctl.supervisor.eviction import Activity

    registry.activity = lambda m: Activity(last_used=used.get(m, 0.0))
    await registry.load(fake("a"))
    await registry.load(fake("b"))
    with registry.events.subscribe() as events:
        await registry.load(fake("c"))
        stopped = await events.wait_for(lambda e: e.new is WorkerState.STOPPING, 5.0)
    assert stopped.model == "b" and "evicted: max_loaded_models 2" in stopped.reason
    await registry.settle_stops()  # the evicted model's stop overlaps the load
    assert sorted(m.model_id for m in registry.models()) == ["a", "c"]
    assert registry.evictions[("b", "max_loaded_models")] == 1


async def test_a_busy_model_is_never_evicted_the_load_waits_then_gives_up(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = catalogue(node_config, fake("a"), fake("b"), max_loaded_models=1,
                       eviction_wait_s=0.5)
    registry = make_registry(config)
    from neuronctl.supervisor.eviction import Activity

    busy = {"a": Activity(in_flight=1)}
    registry.activity = lambda m: busy.get(m, Activity())
    await registry.load(fake("a"))
    with pytest.raises(NoRoom, match="stayed busy for eviction_wait_s"):
        await registry.load(fake("b"))
    assert registry.get("a") is not None and registry.get("a").status is ModelStatus.LOADED
    # Once a is idle, the same load evicts it.
    busy.clear()
    await registry.load(fake("b"))
    await registry.settle_stops()  # the evicted model's stop overlaps the load
    assert [m.model_id for m in registry.models()] == ["b"]


async def test_a_busy_model_that_becomes_idle_makes_room_for_a_waiting_load(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = catalogue(node_config, fake("a"), fake("b"), max_loaded_models=1)
    registry = make_registry(config)
    from neuronctl.supervisor.eviction import Activity

    busy = {"a": Activity(queued=1)}
    asked: list[str] = []

    def activity(model_id: str) -> Activity:
        asked.append(model_id)
        return busy.get(model_id, Activity())

    registry.activity = activity
    await registry.load(fake("a"))
    load_b = asyncio.create_task(registry.load(fake("b")))
    # Found busy twice: b's load judged a, waited, and judged it again (not a fixed time).
    await poll_until_async(lambda: asked.count("a") >= 2)
    assert not load_b.done() and registry.get("a") is not None  # waiting, a untouched
    busy.clear()
    await asyncio.wait_for(load_b, 10)
    assert registry.get("a") is None


async def test_a_pinned_model_is_never_evicted(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = dataclasses.replace(
        catalogue(node_config, fake("b"), fake("p", pinned=True), max_loaded_models=2),
        default_models=(fake("d"), fake("e", pinned=False)))
    registry = make_registry(config)
    await registry.load(fake("d"))  # a default model: pinned
    await registry.load(fake("p", pinned=True))  # pinned by its entry
    with pytest.raises(NoRoom, match="taken by pinned models"):
        await registry.load(fake("b"))  # fails at once: waiting would never help
    assert {m.model_id for m in registry.models() if m.status is ModelStatus.LOADED} == \
        {"d", "p"}
    await registry.unload("p")
    await registry.load(fake("e", pinned=False))  # a default model that may go
    await registry.load(fake("b"))
    # b started while the evicted e exited (no GPU memory to wait for): e is listed,
    # stopping, until its stop is over.
    await registry.settle_stops()
    assert {m.model_id for m in registry.models()} == {"d", "b"}


async def test_a_model_that_does_not_fit_the_vram_evicts_one_on_the_same_device(
    node_config: NeuronConfig, make_registry: MakeRegistry, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, 40), gpu(1, 40)])
    # 65536 tokens of f16 KV cache on the tiny model: about 33 MiB each.
    big = {"path": tiny_gguf, "n_ctx": 65536, "devices": (0,)}
    config = catalogue(node_config, fake("a", **big), fake("b", **big),
                       fake("g1", **{**big, "devices": (1,)}), vram_release_timeout_s=5.0)
    registry = make_registry(config)
    await registry.load(fake("g1", **{**big, "devices": (1,)}))
    await registry.load(fake("a", **big))
    smi.set(gpus=[gpu(0, 7), gpu(1, 7)])  # what the driver says with a and g1 loaded

    async def free_when_a_stops() -> None:
        with registry.events.subscribe() as events:
            await events.wait_for(lambda e: e.model == "a" and e.new is WorkerState.STOPPED,
                                  10.0)
        smi.set(gpus=[gpu(0, 40), gpu(1, 7)])

    freeing = asyncio.create_task(free_when_a_stops())
    await asyncio.sleep(0)
    b = await asyncio.wait_for(registry.load(fake("b", **big)), 20)
    await freeing
    assert b.status is ModelStatus.LOADED
    assert registry.get("a") is None  # evicted: on the same device
    assert registry.get("g1") is not None  # on another device: untouched
    assert registry.evictions[("a", "vram")] == 1


def test_catalogue_keys_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text('max_loaded_models = 2\nautoload = false\n'
                    '[[default_models]]\nmodel_id = "d"\npath = "d.gguf"\n'
                    '[[models]]\nmodel_id = "q8"\nrepo = "org/x-GGUF"\nquant = "Q8_0"\n'
                    'autoload = true\n'
                    '[[models]]\nmodel_id = "q4"\nrepo = "org/x-GGUF"\nquant = "Q4_K_M"\n')
    config = load_config(path, {})
    assert list(config.catalogue()) == ["d", "q8", "q4"]
    assert config.pinned(config.catalogue()["d"]) and not config.pinned(config.models[0])
    assert config.autoloads(config.models[0]) and not config.autoloads(config.models[1])
    path.write_text('[[default_models]]\nmodel_id = "d"\npath = "d.gguf"\n'
                    '[[models]]\nmodel_id = "d"\npath = "e.gguf"\n')
    with pytest.raises(Exception, match=r"models\[0\]\.model_id: duplicate model 'd'"):
        load_config(path, {})
    path.write_text('[[models]]\nmodel_id = "d"\npath = "e.gguf"\nrepo = "a/b"\n')
    with pytest.raises(Exception, match="a `path` or a `repo`, not both"):
        load_config(path, {})


# --- real workers on the tiny GGUF, served as the daemon serves ------------------------------


@dataclass
class Node:
    registry: ModelRegistry
    url: str
    session: aiohttp.ClientSession

    async def complete(self, model: str, **body: Any) -> tuple[int, Any]:
        payload = {"model": model, "prompt": "x", "max_tokens": 8, **body}
        async with self.session.post(f"{self.url}/v1/completions", json=payload) as resp:
            return resp.status, await resp.json()

    async def stream(self, model: str, **body: Any) -> tuple[int, str | None]:
        payload = {"model": model, "prompt": "x", "stream": True, **body}
        async with self.session.post(f"{self.url}/v1/completions", json=payload) as resp:
            if resp.status != 200:
                return resp.status, None
            finish = None
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    finish = json.loads(line[6:])["choices"][0].get("finish_reason") or finish
            return 200, finish

    async def metrics(self) -> str:
        async with self.session.get(f"{self.url}/metrics") as resp:
            return await resp.text()


@pytest.fixture
async def node(make_registry: MakeRegistry, node_config: NeuronConfig) -> AsyncIterator[Any]:
    made: list[tuple[web.AppRunner, aiohttp.ClientSession]] = []

    async def start(config: NeuronConfig) -> Node:
        harnesses = {LLAMA_CPP_PYTHON: LlamaCppPythonHarness(HarnessConfig(n_ctx=256))}
        stats = RouterStats()  # as the daemon wires them: eviction sees the router's counts
        registry = make_registry(config, harnesses, activity=stats.activity)
        runner = web.AppRunner(create_app(registry, stats=stats), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        session = aiohttp.ClientSession()
        made.append((runner, session))
        return Node(registry, f"http://127.0.0.1:{port}", session)

    yield start
    for runner, session in made:
        await session.close()
        await runner.cleanup()


def tiny(model_id: str, path: Path, **kw: Any) -> ModelSpec:
    return ModelSpec(model_id, path=path, **kw)


@llama_required
async def test_an_unloaded_catalogue_model_answers_its_first_request(
    node: Any, node_config: NeuronConfig, tiny_gguf: Path,
) -> None:
    n = await node(catalogue(node_config, tiny("tiny", tiny_gguf)))
    status, answer = await n.complete("tiny")
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    model = n.registry.get("tiny")
    assert model is not None and model.status is ModelStatus.LOADED


@llama_required
async def test_without_autoload_an_unloaded_model_is_a_404(
    node: Any, node_config: NeuronConfig, tiny_gguf: Path,
) -> None:
    n = await node(catalogue(node_config, tiny("tiny", tiny_gguf), autoload=False))
    status, answer = await n.complete("tiny")
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert n.registry.get("tiny") is None


@llama_required
async def test_a_load_that_fails_on_demand_answers_503_with_the_reason(
    node: Any, node_config: NeuronConfig, tmp_path: Path,
) -> None:
    missing = tmp_path / "gone.gguf"
    n = await node(catalogue(node_config, tiny("gone", missing)))
    status, answer = await n.complete("gone")
    assert status == 503 and answer["error"]["code"] == "model_failed"
    assert "model file not found" in answer["error"]["message"]


@llama_required
async def test_alternating_requests_swap_two_models_with_max_loaded_models_1(
    node: Any, node_config: NeuronConfig, tiny_gguf: Path,
) -> None:
    n = await node(catalogue(node_config, tiny("a", tiny_gguf), tiny("b", tiny_gguf),
                             max_loaded_models=1))
    for model in ("a", "b", "a", "b"):
        status, answer = await n.complete(model)
        assert status == 200, (model, answer)
        assert [m.model_id for m in n.registry.models()
                if m.status is ModelStatus.LOADED] == [model]
    metrics = await n.metrics()
    assert 'neuron_model_evictions_total{model="a",reason="max_loaded_models"} 2.0' in metrics
    assert 'neuron_model_evictions_total{model="b",reason="max_loaded_models"} 1.0' in metrics


@llama_required
async def test_a_model_with_a_stream_in_flight_is_not_evicted(
    node: Any, node_config: NeuronConfig, tiny_gguf: Path,
) -> None:
    n = await node(catalogue(node_config, tiny("a", tiny_gguf, n_ctx=1024),
                             tiny("b", tiny_gguf), max_loaded_models=1))
    await n.registry.load(tiny("a", tiny_gguf, n_ctx=1024))
    with n.registry.events.subscribe() as events:
        stream = asyncio.create_task(n.stream("a", max_tokens=300, logit_bias=NO_EOS))
        await poll_until_async(lambda: n.registry.activity("a").in_flight, 30, 0.005)
        other = asyncio.create_task(n.complete("b"))  # needs a's room
        status, finish = await asyncio.wait_for(stream, 120)
        stream_done = time.time()
        evicted = await events.wait_for(
            lambda e: e.model == "a" and e.new is WorkerState.STOPPING, 60)
    assert (status, finish) == (200, "length")  # the stream ran to its end
    assert "evicted" in evicted.reason
    assert evicted.time >= stream_done  # a was stopped only once its stream had ended
    status, answer = await asyncio.wait_for(other, 60)  # then b got the room
    assert status == 200, answer
    assert n.registry.get("a") is None


@llama_required
async def test_two_quants_of_one_repo_are_two_models_by_alias(
    node: Any, node_config: NeuronConfig, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf"
    data = tiny_gguf.read_bytes()
    lay_out_hf_cache(cache, "neuron/tiny-GGUF", {"tiny-F32.gguf": data,
                                                 "tiny-Q8_0.gguf": data + b"\0" * 64})
    config = catalogue(node_config,
                       ModelSpec("tiny-f32", repo="neuron/tiny-GGUF", quant="F32"),
                       ModelSpec("tiny-q8", repo="neuron/tiny-GGUF", quant="Q8_0"))
    config = dataclasses.replace(
        config, harness={LLAMA_CPP_PYTHON: HarnessConfig(hf_cache=cache, n_ctx=256)})
    n = await node(config)
    n.registry.reconfigure(config, {LLAMA_CPP_PYTHON: LlamaCppPythonHarness(
        config.harness_config(LLAMA_CPP_PYTHON))})
    for model, file in (("tiny-f32", "tiny-F32.gguf"), ("tiny-q8", "tiny-Q8_0.gguf")):
        status, answer = await n.complete(model)
        assert status == 200, answer
        record = n.registry.get(model)
        assert record is not None and record.worker is not None
        command = record.worker.plan.command
        assert Path(command[command.index("--model") + 1]).name == file
    assert sorted(m["id"] for m in n.registry.listing()) == ["tiny-f32", "tiny-q8"]


async def test_v1_models_lists_what_a_request_may_name(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = catalogue(node_config, fake("on-demand"), fake("manual", autoload=False))
    registry = make_registry(config)
    await registry.load(fake("loaded"))
    runner = web.AppRunner(create_app(registry))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
                listed = {m["id"]: m["status"] for m in (await resp.json())["data"]}
            async with session.get(f"http://127.0.0.1:{port}/v1/models/manual") as resp:
                assert resp.status == 404
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics = await resp.text()
        assert listed == {"loaded": "loaded", "on-demand": "unloaded"}
        assert 'neuron_model_status{model="manual",status="unloaded"} 1.0' in metrics
    finally:
        await runner.cleanup()


# --- from review: eviction's corner cases --------------------------------------------------


async def test_a_load_cancelled_while_it_evicts_leaves_the_victim_listed_until_it_is_gone(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    slow = fake("a", args=("--mode", "ignore-term"))  # its stop takes stop_timeout_s
    config = catalogue(node_config, slow, fake("b"), max_loaded_models=1)
    registry = make_registry(config)
    old = await registry.load(slow)
    with registry.events.subscribe() as events:
        load_b = asyncio.create_task(registry.load(fake("b")))
        await events.wait_for(lambda e: e.model == "a" and e.new is WorkerState.STOPPING, 5.0)
    await registry.unload("b")  # cancels b's load inside its eviction of a
    with contextlib.suppress(Exception):
        await load_b
    assert registry.get("a") is old  # still listed while its worker stops: no second one
    assert old.worker is not None and old.worker.returncode is None
    again = await registry.demand("a")  # a request now waits for that stop, then reloads
    assert again is not None and again is not old
    assert old.worker.returncode is not None  # the old worker was gone first
    await again.wait_loaded()
    assert registry.get("a") is again


async def test_a_load_waiting_for_vram_is_neither_counted_nor_evicted(
    node_config: NeuronConfig, make_registry: MakeRegistry, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from neuronctl.supervisor.eviction import Activity

    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, 40)])
    big = {"path": tiny_gguf, "n_ctx": 65536, "devices": (0,)}
    config = catalogue(node_config, fake("a", **big), fake("b", **big), fake("c"),
                       max_loaded_models=2, eviction_wait_s=5.0, vram_release_timeout_s=1.0)
    registry = make_registry(config)
    busy = {"a": Activity(in_flight=1)}
    registry.activity = lambda m: busy.get(m, Activity())
    await registry.load(fake("a", **big))
    smi.set(gpus=[gpu(0, 7)])
    load_b = asyncio.create_task(registry.load(fake("b", **big)))  # waits: a is busy
    await poll_until_async(lambda: (b := registry.get("b")) is not None
                           and b.state is WorkerState.STARTING
                           and not registry.services.load_lock.locked())
    await registry.load(fake("c"))  # one model loaded of 2: nothing to evict
    assert not registry.evictions
    busy.clear()  # a goes idle: b evicts it and loads
    smi.set(gpus=[gpu(0, 40)])
    await asyncio.wait_for(load_b, 20)
    # Two loaded of 2 by then (a, c): b's slot and memory both come from evicting a.
    assert sum(n for (m, _), n in registry.evictions.items() if m == "a") == 1
    assert {m.model_id for m in registry.models()} == {"b", "c"}


async def test_for_vram_only_models_on_that_gpu_are_evicted_and_a_missing_gpu_evicts_none(
    node_config: NeuronConfig, make_registry: MakeRegistry, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from neuronctl.errors import NotEnoughVram
    from neuronctl.supervisor.eviction import Activity

    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, 40)])
    big = {"path": tiny_gguf, "n_ctx": 65536, "devices": (0,)}
    config = catalogue(node_config, fake("g", **big), fake("b", **big), fake("cpu"),
                       vram_release_timeout_s=5.0)
    registry = make_registry(config)
    used = {"cpu": 1.0, "g": 2.0}  # the CPU model is the least recently used
    registry.activity = lambda m: Activity(last_used=used.get(m, 0.0))
    await registry.load(fake("cpu"))
    with pytest.raises(NotEnoughVram, match="no GPU 5"):
        await registry.load(fake("x", path=tiny_gguf, devices=(5,)))
    assert not registry.evictions  # no eviction makes a GPU appear
    await registry.load(fake("g", **big))
    smi.set(gpus=[gpu(0, 7)])

    async def free_when_g_stops() -> None:
        with registry.events.subscribe() as events:
            await events.wait_for(lambda e: e.model == "g" and e.new is WorkerState.STOPPED,
                                  15.0)
        smi.set(gpus=[gpu(0, 40)])

    freeing = asyncio.create_task(free_when_g_stops())
    await asyncio.sleep(0)
    await asyncio.wait_for(registry.load(fake("b", **big)), 20)
    await freeing
    assert registry.evictions == {("g", "vram"): 1}  # not the CPU model
    assert registry.get("cpu") is not None


async def test_a_model_no_eviction_could_fit_evicts_nothing(
    node_config: NeuronConfig, make_registry: MakeRegistry, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from neuronctl.errors import NotEnoughVram

    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, 40)])
    big = {"path": tiny_gguf, "n_ctx": 65536, "devices": (0,)}  # about 33 MiB
    huge = {**big, "n_ctx": 262144}  # about 129 MiB: more than the GPU has at all
    registry = make_registry(catalogue(node_config, fake("g", **big), fake("huge", **huge)))
    await registry.load(fake("g", **big))
    smi.set(gpus=[gpu(0, 7)])
    with pytest.raises(NotEnoughVram, match="not enough free VRAM"):
        await asyncio.wait_for(registry.load(fake("huge", **huge)), 10)
    assert not registry.evictions and registry.get("g") is not None


async def test_health_counts_unloaded_catalogue_models(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    registry = make_registry(catalogue(node_config, fake("x"), fake("y")))
    await registry.load(fake("x"))
    runner = web.AppRunner(create_app(registry))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/health") as resp:
            counts = (await resp.json())["models"]
        assert counts["loaded"] == 1 and counts["unloaded"] == 1
    finally:
        await runner.cleanup()


# --- a swap does not wait for the evicted worker's exit when no GPU memory comes back ------


async def test_a_swap_without_gpu_memory_to_free_starts_while_the_evicted_worker_exits(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    slow = fake("a", args=("--mode", "ignore-term"))  # its stop takes stop_timeout_s (2 s)
    config = catalogue(node_config, slow, fake("b"), max_loaded_models=1)
    registry = make_registry(config)
    old = await registry.load(slow)
    assert old.worker is not None
    await registry.load(fake("b"))
    # b is serving while a's worker still waits out its SIGTERM: the count forced the
    # eviction, not memory, so the two overlap.
    assert old.stopping and old.worker.returncode is None
    assert registry.evictions[("a", "max_loaded_models")] == 1
    assert await registry.settle_stops() is True
    assert old.worker.returncode is not None and registry.get("a") is None
    assert await registry.settle_stops() is False


async def test_a_swap_that_frees_gpu_memory_waits_for_the_evicted_worker_to_exit(
    node_config: NeuronConfig, make_registry: MakeRegistry, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, 40000)])
    on_gpu = {"devices": (0,), "n_gpu_layers": 99}
    slow = fake("a", args=("--mode", "ignore-term"), **on_gpu)
    config = catalogue(node_config, slow, fake("b", **on_gpu), max_loaded_models=1,
                       vram_release_timeout_s=1.0)
    registry = make_registry(config)
    old = await registry.load(slow)
    assert old.worker is not None
    await registry.load(fake("b", **on_gpu))
    assert old.worker.returncode is not None  # gone before b started: its VRAM counts


async def test_a_start_short_of_ram_judges_again_once_an_evicted_worker_has_exited(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    from neuronctl.errors import NotEnoughRam

    slow = fake("a", args=("--mode", "ignore-term"))
    config = catalogue(node_config, slow, fake("b"), max_loaded_models=1)
    registry = make_registry(config)
    old = await registry.load(slow)
    assert old.worker is not None
    worker = old.worker
    gate = registry.services.vram_gate
    check = gate.check
    refused: list[str] = []

    async def short_while_a_runs(spec: ModelSpec, *args: Any) -> Any:
        # The host's memory comes back only once a's worker has exited.
        if worker.returncode is None:
            refused.append(spec.model_id)
            raise NotEnoughRam(f"{spec.model_id}: not enough free memory")
        return await check(spec, *args)

    gate.check = short_while_a_runs  # type: ignore[method-assign]
    model = await registry.load(fake("b"))
    assert model.status is ModelStatus.LOADED and worker.returncode is not None
    assert refused == ["b"]  # refused once, judged again after the exit


async def test_a_load_waiting_for_a_busy_model_goes_on_when_a_request_ends(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    """No poll needed: the router's word that a request ended wakes the waiting load (its
    poll here never comes)."""
    from neuronctl.supervisor.eviction import Activity

    async def never(_: float) -> None:
        await asyncio.Event().wait()

    config = catalogue(node_config, fake("a"), fake("b"), max_loaded_models=1)
    registry = make_registry(config, sleep=never)
    busy = {"a": Activity(in_flight=1)}
    registry.activity = lambda m: busy.get(m, Activity())
    await registry.load(fake("a"))
    load_b = asyncio.create_task(registry.load(fake("b")))
    # b judged the room taken and waits, outside the load lock.
    await poll_until_async(lambda: registry.services.room.waiting == 1
                           and not registry.services.load_lock.locked())
    registry.request_ended()  # still busy: b waits on
    await asyncio.sleep(0.05)
    assert not load_b.done()
    busy.clear()
    registry.request_ended()
    model = await asyncio.wait_for(load_b, 20)
    assert model.status is ModelStatus.LOADED and registry.get("a") is None
