"""No cross-site or rebinding requests (neuronctl/api/crosssite.py), and no loads of files,
repos or flags from other hosts unless the operator opts in."""

from __future__ import annotations

import dataclasses
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from neuronctl.api import app as api
from neuronctl.api.app import create_app
from neuronctl.api.crosssite import HostNames, host_name
from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.errors import RemoteLoadRefused
from neuronctl.identity import is_loopback
from neuronctl.node.daemon import exposure_warning

from ..fakes import FakeHarness
from ..helpers import MakeRegistry

FAKE = {"model_id": "m", "harness": "fake"}


async def _client(make_registry: MakeRegistry, config: NeuronConfig,
                  fake: FakeHarness) -> TestClient[Any, Any]:
    return TestClient(TestServer(create_app(make_registry(config, {"fake": fake}))))


async def test_a_text_plain_post_is_refused_with_415(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
) -> None:
    async with await _client(make_registry, node_config, fake_harness) as client:
        # The report's CSRF request: a "simple" request a browser sends without a preflight.
        headers = {"Content-Type": "text/plain;charset=UTF-8"}
        async with client.post("/models/load", data=b'{"model_id":"m","harness":"fake"}',
                               headers=headers) as resp:
            assert resp.status == 415
            assert (await resp.json())["code"] == "unsupported_media_type"
        async with client.post("/v1/chat/completions", data=b'{"model":"m"}',
                               headers=headers) as resp:
            assert resp.status == 415
            body = await resp.json()
            assert body["error"]["code"] == "unsupported_media_type"  # OpenAI's shape
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        async with client.post("/models/unload", data=b"model_id=m", headers=form) as resp:
            assert resp.status == 415
        async with client.get("/models") as resp:
            assert await resp.json() == []  # nothing was loaded
        async with client.post("/models/load", json=FAKE) as resp:
            assert resp.status == 200  # JSON still works


async def test_a_bodyless_post_needs_no_content_type(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
) -> None:
    async with await _client(make_registry, node_config, fake_harness) as client, \
            client.post("/reload") as resp:
        assert resp.status == 404  # no reloader in this app: past the check
        assert (await resp.json())["code"] == "not_found"


@pytest.mark.parametrize("headers", [
    {"Origin": "http://attacker.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},  # another port
], ids=["foreign-origin", "null-origin", "cross-site", "other-port"])
async def test_cross_site_requests_are_refused_on_every_route_but_health(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    headers: dict[str, str],
) -> None:
    async with await _client(make_registry, node_config, fake_harness) as client:
        async with client.post("/models/load", json=FAKE, headers=headers) as resp:
            assert resp.status == 403
            assert (await resp.json())["code"] == "cross_site_request"
        for path in ("/models", "/models/events", "/metrics", "/models/m/logs"):
            async with client.get(path, headers=headers) as resp:
                assert resp.status == 403, path
        async with client.post("/v1/completions", json={"model": "m"},
                               headers=headers) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "cross_site_request"
        async with client.get("/health", headers=headers) as resp:
            assert resp.status == 200
        async with client.get("/models") as resp:
            assert await resp.json() == []


async def test_the_nodes_own_origin_and_a_navigation_to_the_dashboard_pass(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
) -> None:
    async with await _client(make_registry, node_config, fake_harness) as client:
        own = f"http://{client.host}:{client.port}"
        async with client.post("/models/load", json=FAKE, headers={
                "Origin": own, "Sec-Fetch-Site": "same-origin"}) as resp:
            assert resp.status == 200, await resp.text()
        # A link to the dashboard from an intranet page: the page itself, nothing more.
        navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        async with client.get("/", headers=navigate) as resp:
            assert resp.status == 200
        async with client.get("/models", headers=navigate) as resp:
            assert resp.status == 403


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example:{port}", 421),
    ("evil.example", 421),
    ("127.0.0.1.evil.example:{port}", 421),
    ("localhost:{port}", 200),
    ("127.0.0.1:{port}", 200),
    ("[::1]:{port}", 200),
    ("10.1.2.3:{port}", 200),  # an address: nothing to rebind
    ("node.example:{port}", 200),  # allowed_hosts
    ("gpu7.corp.example:{port}", 200),  # allowed_hosts' ".corp.example"
    ("box:{port}", 200),  # node_id's host
])
async def test_host_must_be_one_the_node_answers_to(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    host: str, status: int,
) -> None:
    config = dataclasses.replace(node_config, node_id="box:13131",
                                 allowed_hosts=("node.example", ".corp.example"))
    async with await _client(make_registry, config, fake_harness) as client:
        headers = {"Host": host.format(port=client.port)}
        async with client.get("/models", headers=headers) as resp:
            assert resp.status == status
            if status == 421:
                assert (await resp.json())["code"] == "unknown_host"
                assert "allowed_hosts" in (await resp.json())["error"]
        async with client.get("/health", headers=headers) as resp:
            assert resp.status == 200  # balancers probe with any Host


def test_host_names() -> None:
    hosts = HostNames(NeuronConfig(host="0.0.0.0"), this_host="gpu1.lab.example")
    assert hosts.allows("gpu1") and hosts.allows("gpu1.lab.example")
    assert hosts.allows("localhost") and hosts.allows("app.localhost")
    assert not hosts.allows("gpu1.lab.example.evil.example")
    assert host_name("[::1]:13131") == "::1" and host_name("Node.Example.:80") == "node.example"
    assert host_name("x:notaport") is None
    assert is_loopback("127.0.0.5") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback(None) and not is_loopback("x")


def _remote_request(peer: str) -> Any:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default)
    return make_mocked_request("POST", "/models/load", transport=transport)


@pytest.mark.parametrize(("body", "refused"), [
    ({"model_id": "x", "path": "/srv/x.gguf"}, "path"),
    ({"model_id": "cat", "args": ["-t", "2"]}, "args"),
    ({"model_id": "org/repo", "quant": "Q4_K_M"}, "quant"),
    ({"model_id": "org/repo"}, "not in the catalogue"),
    ({"model_id": "cat", "harness": "fake"}, "harness"),
    # Past the memory checks, into every user's prompts, never evicted, the queue's size.
    ({"model_id": "cat", "n_ctx": 1 << 20, "force": True}, "force"),
    ({"model_id": "cat", "chat_format": "{% for m in messages %}X{% endfor %}"},
     "chat_format"),
    ({"model_id": "cat", "pinned": True, "max_queue": 100000}, "max_queue, pinned"),
    ({"model_id": "cat", "devices": [0]}, "devices"),
])
async def test_other_hosts_load_catalogue_models_only(
    node_config: NeuronConfig, make_registry: MakeRegistry, body: dict[str, Any],
    refused: str,
) -> None:
    config = dataclasses.replace(node_config, models=(ModelSpec("cat", harness="fake"),))
    registry = make_registry(config)
    spec = api.model_spec_from_mapping(body)
    with pytest.raises(RemoteLoadRefused, match=refused) as caught:
        api._check_remote_load(_remote_request("10.0.0.7"), registry, spec, body.keys())
    assert caught.value.status == 403 and "allow_remote_loads" in caught.value.message
    # From the node itself, or with the operator's opt-in, it is a load like any other.
    api._check_remote_load(_remote_request("127.0.0.1"), registry, spec, body.keys())
    opted_in = make_registry(dataclasses.replace(config, allow_remote_loads=True))
    api._check_remote_load(_remote_request("10.0.0.7"), opted_in, spec, body.keys())
    # A catalogue id alone, with its own context and TTL at most, is fine from anywhere.
    plain = api.model_spec_from_mapping({"model_id": "cat", "ttl_s": 60, "n_ctx": 512})
    api._check_remote_load(_remote_request("10.0.0.7"), registry, plain,
                           ["model_id", "ttl_s", "n_ctx"])


def test_an_exposed_node_says_what_it_exposes() -> None:
    assert exposure_warning(NeuronConfig(host="127.0.0.1")) is None
    assert exposure_warning(NeuronConfig(host="localhost")) is None
    assert exposure_warning(NeuronConfig(host="0.0.0.0", api_key="k")) is None
    warning = exposure_warning(NeuronConfig(host="0.0.0.0", port=13131))
    assert warning is not None and "0.0.0.0:13131 with no api_key" in warning
    for exposed in ("use every model", "load catalogue models", "read their logs",
                    "reload the config", "set api_key"):
        assert exposed in warning
    opted_in = exposure_warning(NeuronConfig(host="10.0.0.5", allow_remote_loads=True))
    assert opted_in is not None and "any model file or Hugging Face repo" in opted_in


async def test_ollamas_pull_is_checked_as_a_load(node_config: NeuronConfig,
                                                 make_registry: MakeRegistry) -> None:
    """`/api/pull hf.co/ORG/REPO:QUANT` is a Hugging Face load: from another host only
    with allow_remote_loads; a catalogue id is fine from anywhere (api.checked_spec)."""
    from aiohttp import web

    from neuronctl.api.ollama_models import pull_target

    config = dataclasses.replace(node_config, models=(ModelSpec("cat", harness="fake"),))
    app = web.Application()
    app[api.REGISTRY] = make_registry(config)

    def request(peer: str) -> Any:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: (
            (peer, 40000) if name == "peername" else default)
        return make_mocked_request("POST", "/api/pull", transport=transport, app=app)

    hub = pull_target("hf.co/org/repo-GGUF:Q4_K_M")
    with pytest.raises(RemoteLoadRefused, match="quant, repo"):
        api.checked_spec(request("10.0.0.7"), hub)
    assert api.checked_spec(request("127.0.0.1"), hub).repo == "org/repo-GGUF"
    assert api.checked_spec(request("10.0.0.7"), pull_target("cat")).harness == "fake"
