"""Keys over HTTP: model scope on /v1 and on-demand loads, per-key limits before the
queue, fairness between keys through the router, usage per key, rotation by reload, and
no key in any log line or answer. Stand-in workers (test_v1.py's) answer on cue."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from neuronctl.api.app import create_app
from neuronctl.api.keylimits import KeyLimits
from neuronctl.api.traffic import RouterStats
from neuronctl.config import KeySpec, ModelSpec, NeuronConfig, load_config
from neuronctl.errors import KeyConcurrencyLimited, KeyRateLimited
from neuronctl.keys import Principal, sha256_hex
from neuronctl.supervisor.registry import ModelRegistry
from neuronctl.supervisor.reload import Reloader

from ..helpers import MakeRegistry
from .test_v1 import Client, StandIn, StandIns, error_of, eventually, run, stand_in_spec

ADMIN_KEY = "nk-admin-secret-0001"
GW_KEY = "nk-gateway-secret-0002"
READ_KEY = "nk-monitor-secret-0003"
SECRETS = (ADMIN_KEY, GW_KEY, READ_KEY)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed(node_config: NeuronConfig, *models: ModelSpec, **gateway: Any) -> NeuronConfig:
    keys = (
        KeySpec("root", ("admin",), sha256=sha256_hex(ADMIN_KEY)),
        KeySpec("gw", ("inference",), sha256=sha256_hex(GW_KEY), **gateway),
        KeySpec("monitor", ("read",), sha256=sha256_hex(READ_KEY)),
    )
    return dataclasses.replace(node_config, keys=keys, models=models)


class OnDemand(StandIns):
    """Stand-ins loaded only when a request asks for them."""

    async def load_all(self, registry: ModelRegistry) -> None:
        pass


async def usage_answer(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"choices": [], "usage": {"prompt_tokens": 3,
                                                       "completion_tokens": 5}})


async def stream_answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for part in ('{"choices":[{"delta":{"content":"a"}}]}',
                 '{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}'):
        await response.write(f"data: {part}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def test_scope_hides_models_and_never_loads_one_outside_it(
    node_config: NeuronConfig, make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neuronctl.api.auth")
    stand_ins = OnDemand(**{"qwen-small": StandIn(usage_answer),
                            "secret": StandIn(usage_answer)})
    config = keyed(node_config, stand_in_spec("qwen-small"), stand_in_spec("secret"),
                   models=("qwen*",))

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async def listed(key: str) -> list[str]:
            async with client.get("/v1/models", headers=auth(key)) as resp:
                assert resp.status == 200
                return [m["id"] for m in (await resp.json())["data"]]

        assert await listed(GW_KEY) == ["qwen-small"]
        assert await listed(ADMIN_KEY) == ["qwen-small", "secret"]
        # Outside the scope is word for word an id the node never heard of.
        absent = {}
        for model_id in ("secret", "ghost"):
            async with client.get(f"/v1/models/{model_id}", headers=auth(GW_KEY)) as resp:
                absent[model_id] = await error_of(resp, 404)
        assert absent["secret"]["code"] == absent["ghost"]["code"] == "model_not_found"
        assert absent["secret"]["message"].replace("'secret'", "ID") == \
            absent["ghost"]["message"].replace("'ghost'", "ID")
        assert "model 'secret' not found" in absent["secret"]["message"]
        assert "not loaded" not in absent["secret"]["message"]
        body = {"model": "secret", "messages": []}
        async with client.post("/v1/chat/completions", json=body, headers=auth(GW_KEY)) as resp:
            error = await error_of(resp, 403)
        assert error["code"] == "model_not_in_scope" and "'gw'" in error["message"]
        assert registry.get("secret") is None  # never loaded on its behalf
        assert any("for key 'gw': model 'secret' is outside its scope" in r.getMessage()
                   for r in caplog.records)
        body["model"] = "qwen-small"
        async with client.post("/v1/chat/completions", json=body, headers=auth(GW_KEY)) as resp:
            assert resp.status == 200
        assert registry.get("qwen-small") is not None  # on demand, within scope
        body["model"] = "secret"  # an admin key's scope is every model
        async with client.post("/v1/chat/completions", json=body,
                               headers=auth(ADMIN_KEY)) as resp:
            assert resp.status == 200

    await run(make_registry, config, scenario, stand_ins)


async def test_scope_and_usage_hold_on_ollamas_and_anthropics_routes_too(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    # Ollama's chat asks the worker for a stream whatever its client asked.
    stand_ins = StandIns(**{"qwen-small": StandIn(stream_answer),
                            "secret": StandIn(usage_answer)})
    config = keyed(node_config, stand_in_spec("qwen-small"), stand_in_spec("secret"),
                   models=("qwen*",))

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        for path in ("/api/tags", "/api/ps"):
            async with client.get(path, headers=auth(GW_KEY)) as resp:
                assert resp.status == 200
                names = [m["name"] for m in (await resp.json())["models"]]
            assert names == ["qwen-small:latest"], path
        async with client.post("/api/show", json={"model": "secret"},
                               headers=auth(GW_KEY)) as resp:
            assert resp.status == 404  # as if it did not exist
        chat = {"model": "secret", "messages": [{"role": "user", "content": "hi"}],
                "stream": False}
        async with client.post("/api/chat", json=chat, headers=auth(GW_KEY)) as resp:
            assert resp.status == 403
            refused = await resp.json()
        # Ollama's shape (`error` a string, what its clients read), with the machine fields
        # every other refusal has: a scope refusal, and a role refusal by the middleware.
        assert "may not use model 'secret'" in refused["error"]
        assert (refused["type"], refused["code"]) == ("invalid_request_error",
                                                      "model_not_in_scope")
        async with client.post("/api/chat", json=chat, headers=auth(READ_KEY)) as resp:
            assert resp.status == 403
            role = await resp.json()
        assert isinstance(role["error"], str) and role["code"] == "insufficient_role"
        assert set(refused) == set(role) == {"error", "type", "code"}
        async with client.post("/api/chat", json={**chat, "model": "ghost"},
                               headers=auth(ADMIN_KEY)) as resp:
            assert resp.status == 404
            assert (await resp.json())["code"] == "model_not_found"
        # Ollama's unload idiom is a use of the model too: refused, and nothing unloaded.
        unload = {"model": "secret", "messages": [], "keep_alive": 0}
        async with client.post("/api/chat", json=unload, headers=auth(GW_KEY)) as resp:
            assert resp.status == 403
        assert registry.get("secret") is not None
        message = {"model": "secret", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]}
        async with client.post("/v1/messages", json=message, headers=auth(GW_KEY)) as resp:
            answer = await resp.json()
            assert resp.status == 403 and answer["type"] == "error", answer
            assert "may not use model 'secret'" in answer["error"]["message"]
        # A typo is answered with the nearest id the key may use, never another.
        typo = {"model": "qwen-smal", "messages": []}
        async with client.post("/v1/chat/completions", json=typo,
                               headers=auth(GW_KEY)) as resp:
            error = await error_of(resp, 404)
        assert "(did you mean qwen-small?)" in error["message"]
        assert "secret" not in error["message"]  # loaded, but not the key's to know
        async with client.post("/v1/chat/completions", json={"model": "secre"},
                               headers=auth(ADMIN_KEY)) as resp:
            error = await error_of(resp, 404)
        assert "(did you mean secret?)" in error["message"]
        chat["model"] = "qwen-small:latest"  # Ollama's tag: the same model, in scope
        async with client.post("/api/chat", json=chat, headers=auth(GW_KEY)) as resp:
            assert resp.status == 200, await resp.text()
        async with client.get("/keys/usage", headers=auth(ADMIN_KEY)) as resp:
            usage = (await resp.json())["keys"]["gw"]
        assert usage["requests"]["qwen-small"] == {"200": 1}
        assert usage["requests"]["secret"] == {"403": 3}
        assert usage["tokens"]["qwen-small"] == {"prompt": 7, "completion": 1}

    await run(make_registry, config, scenario, stand_ins)


async def test_rpm_is_a_429_with_retry_after_before_the_queue(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    config = keyed(node_config, rpm=2)

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        body = {"model": "m"}
        for _ in range(2):
            async with client.post("/v1/completions", json=body, headers=auth(GW_KEY)) as resp:
                assert resp.status == 200
        async with client.post("/v1/completions", json=body, headers=auth(GW_KEY)) as resp:
            error = await error_of(resp, 429)
            retry_after = int(resp.headers["Retry-After"])
        assert error["code"] == "key_rate_limited" and "rpm 2" in error["message"]
        assert 1 <= retry_after <= 60
        assert stats.models["m"].requests == 2  # the refused one never reached the queue
        # Another key has its own minute.
        async with client.post("/v1/completions", json=body, headers=auth(ADMIN_KEY)) as resp:
            assert resp.status == 200
        # Listing what the node has serves no model: neither counted nor limited (Open
        # WebUI polls /api/tags every few seconds; it must not eat a key's minute).
        for path in ("/v1/models", "/v1/models/m", "/api/tags", "/api/ps", "/api/version"):
            async with client.get(path, headers=auth(GW_KEY)) as resp:
                assert resp.status == 200, path
        async with client.post("/api/chat", json={"model": "m", "messages": []},
                               headers=auth(GW_KEY)) as resp:
            assert resp.status == 429

    await run(make_registry, config, scenario, StandIns(m=StandIn(usage_answer)))


async def test_max_concurrent_is_a_429_while_the_key_has_that_many_in_flight(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await request.read()
        await gate.wait()
        return web.json_response({"choices": []})

    config = keyed(node_config, max_concurrent=1)

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async def post(key: str) -> int:
            async with client.post("/v1/completions", json={"model": "m"},
                                   headers=auth(key)) as resp:
                if resp.status == 429:
                    assert (await error_of(resp, 429))["code"] == "key_concurrency_limited"
                    assert resp.headers["Retry-After"] == "1"
                return resp.status

        first = asyncio.create_task(post(GW_KEY))
        await eventually(lambda: "m" in stats.models and stats.models["m"].in_flight == 1)
        assert await post(GW_KEY) == 429
        other = asyncio.create_task(post(ADMIN_KEY))  # another key is not limited by it
        await eventually(lambda: stats.models["m"].queue.queued == 1)
        gate.set()
        assert await first == 200 and await other == 200
        assert await post(GW_KEY) == 200  # its one slot is free again

    await run(make_registry, config, scenario, StandIns(m=StandIn(held)))


def test_the_rpm_window_slides_and_a_lowered_rpm_applies() -> None:
    now = [1000.0]
    limits = KeyLimits(clock=lambda: now[0])
    key = Principal("gw", frozenset({"inference"}), rpm=3)
    for _ in range(3):
        limits.take(key)()
        now[0] += 10
    with pytest.raises(KeyRateLimited) as refused:
        limits.take(key)
    assert refused.value.headers["Retry-After"] == "30"  # the first falls out at 1060
    now[0] = 1060.0
    limits.take(key)()
    lowered = dataclasses.replace(key, rpm=1)
    with pytest.raises(KeyRateLimited):
        limits.take(lowered)
    busy = Principal("b", frozenset({"inference"}), max_concurrent=2)
    releases = [limits.take(busy), limits.take(busy)]
    with pytest.raises(KeyConcurrencyLimited):
        limits.take(busy)
    releases[0]()
    releases[0]()  # twice is once
    assert limits.in_flight("b") == 1
    limits.keep_only({"gw"})  # a reload removed "b": its count stays while in flight
    assert limits.in_flight("b") == 1
    releases[1]()
    limits.keep_only({"gw"})
    assert limits.in_flight("b") == 0


async def test_through_the_router_a_flooding_key_cannot_starve_another(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    """20 requests of one key at once, then another key's: it is served second, not
    21st (what is asserted is the order the worker saw, not how fast)."""
    seen: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    async def one_at_a_time(request: web.Request) -> web.Response:
        who = json.loads(await request.read())["who"]
        seen.append(who)
        gates[who] = asyncio.Event()
        await gates[who].wait()
        return web.json_response({"choices": []})

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async def post(key: str, who: str) -> int:
            async with client.post("/v1/completions", json={"model": "m", "who": who},
                                   headers=auth(key)) as resp:
                return resp.status

        flood = [asyncio.create_task(post(ADMIN_KEY, f"f{i}")) for i in range(20)]
        await eventually(lambda: len(seen) == 1 and "m" in stats.models
                         and stats.models["m"].queue.queued == 19)
        queue = stats.models["m"].queue
        trickle = asyncio.create_task(post(GW_KEY, "t"))
        await eventually(lambda: queue.queued_for("gw") == 1)
        while "t" not in seen:
            gates[seen[-1]].set()
            count = len(seen)
            await eventually(lambda count=count: len(seen) > count)
        assert seen.index("t") == 2, seen  # after the flood's first two, not its twentieth
        for gate in list(gates.values()):
            gate.set()
        while len(seen) < 21:
            count = len(seen)
            await eventually(lambda count=count: len(seen) > count)
            for gate in list(gates.values()):
                gate.set()
        assert await trickle == 200
        assert set(await asyncio.gather(*flood)) == {200}

    await run(make_registry, keyed(node_config), scenario,
              StandIns(m=StandIn(one_at_a_time)))


async def test_usage_per_key_matches_what_was_sent(
    node_config: NeuronConfig, make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stand_ins = StandIns(m=StandIn(usage_answer), s=StandIn(stream_answer))
    config = keyed(node_config, stand_in_spec("m"), stand_in_spec("s"), models=("m", "s", "g*"),
                   rpm=6)
    answers: list[str] = []

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async def post(key: str, model: str, path: str = "/v1/completions") -> int:
            async with client.post(path, json={"model": model}, headers=auth(key)) as resp:
                answers.append(await resp.text() + json.dumps(dict(resp.headers)))
                return resp.status

        statuses = [await post(GW_KEY, "m") for _ in range(4)]
        statuses.append(await post(GW_KEY, "s"))
        statuses.append(await post(GW_KEY, "ghost"))  # a model nobody knows: a 404
        statuses.append(await post(GW_KEY, "m"))  # the seventh in a minute: rpm
        statuses.append(await post(READ_KEY, "m"))  # no inference role
        statuses.append(await post("nk-made-up", "m"))
        assert statuses == [200] * 5 + [404, 429, 403, 401]
        async with client.get("/keys/usage", headers=auth(READ_KEY)) as resp:
            assert resp.status == 403  # usage is the admin's
        async with client.get("/keys/usage", headers=auth(ADMIN_KEY)) as resp:
            usage = await resp.json()
            answers.append(json.dumps(usage))
        assert usage["keys"]["gw"] == {
            "requests": {"m": {"200": 4}, "s": {"200": 1}, "": {"404": 1, "429": 1}},
            "tokens": {"m": {"prompt": 12, "completion": 20},
                       "s": {"prompt": 7, "completion": 1}},  # the stream's usage
        }
        assert usage["keys"]["monitor"] == {"requests": {"": {"403": 1}}, "tokens": {}}
        assert "root" not in usage["keys"] and "nk-made-up" not in json.dumps(usage)
        async with client.get("/metrics", headers=auth(READ_KEY)) as resp:
            metrics = await resp.text()
            answers.append(metrics)
        assert 'neuron_key_requests_total{code="200",key="gw",model="m"} 4.0' in metrics
        assert 'neuron_key_requests_total{code="429",key="gw",model=""} 1.0' in metrics
        assert 'neuron_key_tokens_total{key="gw",kind="prompt",model="m"} 12.0' in metrics
        assert 'neuron_key_tokens_total{key="gw",kind="completion",model="m"} 20.0' in metrics

    await run(make_registry, config, scenario, stand_ins)
    # One journal line per kind of refusal, naming the key by its name, never the key.
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("for key 'gw'" in line and "rpm 6" in line for line in refusals), refusals
    assert any("invalid API key" in line for line in refusals), refusals
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (*SECRETS, "nk-made-up"):
        assert secret not in logged
        assert all(secret not in answer for answer in answers)


async def test_refusals_are_logged_at_most_once_a_minute(
    node_config: NeuronConfig, make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neuronctl.api.auth")

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        for _ in range(5):
            async with client.post("/models/unload", json={"model_id": "m"},
                                   headers=auth(READ_KEY)) as resp:
                assert (await resp.json())["code"] == "insufficient_role"

    await run(make_registry, keyed(node_config), scenario, StandIns())
    lines = [r.getMessage() for r in caplog.records if r.name == "neuronctl.api.auth"]
    assert len(lines) == 1 and "for key 'monitor'" in lines[0]
    assert "lacks the 'admin' role" in lines[0]


def write_config(path: Path, node_config: NeuronConfig, keys: str) -> None:
    path.write_text(f'host = "127.0.0.1"\nlog_dir = "{node_config.log_dir}"\n'
                    f'state_dir = "{node_config.state_dir}"\napi_key = "{ADMIN_KEY}"\n'
                    + keys)


async def test_reload_rotates_keys_and_a_malformed_entry_keeps_the_old_ones(
    node_config: NeuronConfig, make_registry: MakeRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "neuron.toml"
    keyfile = tmp_path / "monitor.key"
    keyfile.write_text("nk-monitor-first\n")
    keyfile.chmod(0o600)

    def entries(name: str, key: str) -> str:
        return (f'[[keys]]\nname = "{name}"\nroles = ["read"]\nsha256 = "{sha256_hex(key)}"\n'
                f'[[keys]]\nname = "monitor"\nroles = ["read"]\nfile = "{keyfile}"\n')

    write_config(path, node_config, entries("old", "nk-old-key"))
    registry = make_registry(load_config(path, {}))
    reloader = Reloader(registry, path, build=lambda config: dict(registry.harnesses))
    app = create_app(registry, reloader=reloader)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession(url) as client:
            async def status(key: str) -> int:
                async with client.get("/models", headers=auth(key)) as resp:
                    return resp.status

            async def reload() -> tuple[int, Any]:
                async with client.post("/reload", headers=auth(ADMIN_KEY)) as resp:
                    return resp.status, await resp.json()

            assert [await status(k) for k in ("nk-old-key", "nk-monitor-first")] == [200, 200]
            write_config(path, node_config, entries("new", "nk-new-key"))
            keyfile.write_text("nk-monitor-second\n")
            code, answer = await reload()
            assert code == 200, answer
            assert (answer["keys_added"], answer["keys_removed"], answer["keys_changed"]) == (
                ["new"], ["old"], ["monitor"])
            assert "keys added: new; keys removed: old; keys changed: monitor" in \
                answer["summary"]
            assert "nk-" not in json.dumps(answer)
            assert await status("nk-new-key") == 200
            assert await status("nk-old-key") == 401  # removed: from the next request
            assert await status("nk-monitor-second") == 200  # a file's key rotated
            assert await status("nk-monitor-first") == 401
            write_config(path, node_config, entries("new", "nk-new-key").replace(
                sha256_hex("nk-new-key"), "not-a-hash"))
            code, answer = await reload()
            assert code == 400 and "keys[0].sha256" in answer["error"], answer
            assert await status("nk-new-key") == 200  # the old keys stay in force
            assert await status(ADMIN_KEY) == 200
    finally:
        await runner.cleanup()


async def test_an_ad_hoc_models_usage_goes_when_it_is_unloaded(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    """Load/unload churn of ids outside the catalogue does not grow the per-key series."""
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async def usage() -> dict[str, Any]:
            async with client.get("/keys/usage", headers=auth(ADMIN_KEY)) as resp:
                return await resp.json()  # type: ignore[no-any-return]

        async with client.post("/v1/completions", json={"model": "adhoc"},
                               headers=auth(GW_KEY)) as resp:
            assert resp.status == 200
        assert (await usage())["keys"]["gw"]["tokens"] == {
            "adhoc": {"prompt": 3, "completion": 5}}
        await registry.unload("adhoc")
        await eventually(lambda: registry.get("adhoc") is None)
        assert (await usage())["keys"] == {}

    await run(make_registry, keyed(node_config), scenario, StandIns(adhoc=StandIn(usage_answer)))
