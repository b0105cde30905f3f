"""The fleet tooling: node identity in the API, the LiteLLM config built from nodes' answers
(pure functions), and `neuronctl fleet ...` against nodes served in the test's event loop.
The real proxy in front of real nodes is tests/fleet/test_litellm.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.config import ConfigError, ModelSpec, NeuronConfig, config_from_mapping
from neuronctl.fleet import nodes as fleet
from neuronctl.identity import INCARNATION_HEADER, NODE_HEADER, NodeIdentity, default_node_id

from ..helpers import NEURONCTL, MakeRegistry, clean_env, free_port

# --- node identity --------------------------------------------------------------------------


def test_node_id_defaults_to_host_name_and_port() -> None:
    identity = NodeIdentity.new(NeuronConfig(port=14001))
    assert identity.node_id == f"{socket.gethostname()}:14001" == default_node_id(14001)
    assert NodeIdentity.new(NeuronConfig(node_id="gpu1")).node_id == "gpu1"


def test_every_start_is_a_new_incarnation() -> None:
    config = NeuronConfig(node_id="gpu1")
    incarnations = {NodeIdentity.new(config).incarnation for _ in range(50)}
    assert len(incarnations) == 50 and all(len(i) == 12 for i in incarnations)


@pytest.mark.parametrize("bad", ["", "gpu/1", "gpu@1", "-gpu", "gpu 1", "gpü", "x" * 129])
def test_a_node_id_that_cannot_travel_in_an_id_or_header_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="node_id"):
        config_from_mapping({"node_id": bad})


def test_a_node_id_may_be_a_host_and_port() -> None:
    assert config_from_mapping({"node_id": "gpu-1.lab:13131"}).node_id == "gpu-1.lab:13131"


async def test_health_discovery_and_every_answer_name_the_node(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = dataclasses.replace(node_config, node_id="gpu1",
                                 models=(ModelSpec("m", harness="fake"),))
    registry = make_registry(config)
    identity = NodeIdentity("gpu1", "abc123", 1.0)
    async with TestClient(TestServer(create_app(registry, identity=identity),
                                     host="127.0.0.1")) as client:
        health = await client.get("/health")
        body = await health.json()
        assert body["node_id"] == "gpu1" and body["incarnation"] == "abc123"
        assert body["started_at"] == 1.0
        discovery = await (await client.get("/discovery")).json()
        assert discovery["node_id"] == "gpu1" and discovery["incarnation"] == "abc123"
        for path in ("/models", "/health", "/no-such-route", "/v1/models"):
            answer = await client.get(path)
            assert answer.headers[NODE_HEADER] == "gpu1", path
            assert answer.headers[INCARNATION_HEADER] == "abc123", path
        # /models stays a list; each entry says whether a request for it loads it.
        models = await (await client.get("/models")).json()
        assert isinstance(models, list) and models[0]["autoload"] is True


async def test_two_apps_are_two_incarnations(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    registry = make_registry(node_config)
    seen = set()
    for _ in range(2):
        async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
            seen.add((await client.get("/health")).headers[INCARNATION_HEADER])
    assert len(seen) == 2


async def test_a_reload_keeps_the_node_id_and_says_it_needs_a_restart(
    tmp_path: Path, make_registry: MakeRegistry,
) -> None:
    from neuronctl.config import load_config
    from neuronctl.supervisor.reload import Reloader

    path = tmp_path / "neuron.toml"
    path.write_text('node_id = "one"\nlog_dir = "log"\nstate_dir = "state"\n')
    registry = make_registry(load_config(path, {}))
    path.write_text('node_id = "two"\nlog_dir = "log"\nstate_dir = "state"\n')
    result = await Reloader(registry, path).reload()
    assert result.needs_restart == ["node_id"] and registry.config.node_id == "one"


def test_autoload_in_the_listing_follows_the_catalogue(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    config = dataclasses.replace(
        node_config, autoload=False,
        models=(ModelSpec("off", harness="fake"), ModelSpec("on", harness="fake", autoload=True)))
    listed = {m["id"]: m["autoload"] for m in make_registry(config).listing()}
    assert listed == {"off": False, "on": True}


# --- the LiteLLM config, from answers -------------------------------------------------------


def entry(model_id: str, status: str = "loaded", autoload: bool = False) -> dict[str, Any]:
    return {"id": model_id, "status": status, "autoload": autoload}


def answered(url: str, node_id: str, *models: dict[str, Any],
             incarnation: str = "i1") -> fleet.Node:
    return fleet.node_from_answers(url, list(models),
                                   {"node_id": node_id, "incarnation": incarnation})


@pytest.mark.parametrize(("status", "autoload", "expected"), [
    ("loaded", False, True),       # loaded: served now
    ("unloaded", True, True),      # catalogue with autoload: the request loads it
    ("loading", True, True),
    ("failed", True, True),        # a request loads it again
    ("unloaded", False, False),    # catalogue without autoload: a 404 there
    ("loading", False, False),     # loaded by hand, not ready yet
    ("failed", False, False),
    ("unloading", False, False),
])
def test_servable(status: str, autoload: bool, expected: bool) -> None:
    assert fleet.servable(entry("m", status, autoload)) is expected


def test_one_deployment_per_servable_model_per_node() -> None:
    a = answered("http://a:13131", "a", entry("m1"), entry("m2", "unloaded"),
                 entry("m3", "unloaded", autoload=True))
    b = answered("http://b:13131", "b", entry("m1"))
    result = fleet.litellm_config([a, b], api_key="sekrit")
    assert result.complete and not result.empty
    listed = [(d["model_name"], d["litellm_params"]["api_base"], d["model_info"]["id"])
              for d in result.config["model_list"]]
    assert listed == [("m1", "http://a:13131/v1", "a@i1/m1"),
                      ("m3", "http://a:13131/v1", "a@i1/m3"),
                      ("m1", "http://b:13131/v1", "b@i1/m1")]
    for deployment in result.config["model_list"]:
        params = deployment["litellm_params"]
        assert params["model"] == f"openai/{deployment['model_name']}"
        assert params["api_key"] == "sekrit"


def test_the_router_settings_retry_elsewhere_and_cool_down_at_once() -> None:
    config = fleet.litellm_config([answered("http://a:1", "a", entry("m"))], None).config
    assert config["router_settings"] == {
        "routing_strategy": "simple-shuffle", "num_retries": 2, "allowed_fails": 0,
        "cooldown_time": 10, "retry_policy": {"NotFoundErrorRetries": 2},
    }
    assert config["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY"}
    # Without a node key the provider still needs one; the node ignores it.
    assert config["model_list"][0]["litellm_params"]["api_key"] == "none"


def test_several_proxies_share_state_through_redis_named_by_their_environment() -> None:
    nodes = [answered("http://a:1", "a", entry("m"))]
    assert "redis_host" not in fleet.litellm_config(nodes, None).config["router_settings"]
    router = fleet.litellm_config(nodes, None, redis=True).config["router_settings"]
    assert router["redis_host"] == "os.environ/REDIS_HOST"
    assert router["redis_port"] == "os.environ/REDIS_PORT"
    assert router["redis_password"] == "os.environ/REDIS_PASSWORD"
    assert router["num_retries"] == 2


def test_a_restarted_node_gets_new_deployment_ids() -> None:
    before = fleet.litellm_config([answered("http://a:1", "a", entry("m"), incarnation="i1")], None)
    after = fleet.litellm_config([answered("http://a:1", "a", entry("m"), incarnation="i2")], None)
    ids = [r.config["model_list"][0]["model_info"]["id"] for r in (before, after)]
    assert ids == ["a@i1/m", "a@i2/m"]
    assert fleet.deployment_id("a:13131", "i1", "Qwen/Q") == "a:13131@i1/Qwen/Q"


def test_nodes_that_do_not_answer_or_repeat_an_id_are_left_out_and_reported() -> None:
    nodes = [answered("http://a:1", "a", entry("m")),
             fleet.Node("http://down:1", error="not answering"),
             answered("http://again:1", "a", entry("m"))]
    result = fleet.litellm_config(nodes, None)
    assert not result.complete
    assert [d["model_info"]["id"] for d in result.config["model_list"]] == ["a@i1/m"]
    assert result.left_out[0] == ("http://down:1", "not answering")
    assert result.left_out[1][0] == "http://again:1" and "also the one of http://a:1" \
        in result.left_out[1][1]


def test_no_servable_model_is_an_empty_config() -> None:
    result = fleet.litellm_config([answered("http://a:1", "a", entry("m", "unloaded"))], None)
    assert result.empty and result.complete


@pytest.mark.parametrize(("models", "host", "why"), [
    ({"not": "a list"}, {"node_id": "a", "incarnation": "i"}, "list of models"),
    ([{"no": "id"}], {"node_id": "a", "incarnation": "i"}, "list of models"),
    ([], ["x"], "/discovery did not answer an object"),
    ([], {"hostname": "old"}, "names no node_id"),
    ([], {"node_id": "", "incarnation": "i"}, "names no node_id"),
])
def test_answers_that_are_not_a_nodes_are_refused(models: Any, host: Any, why: str) -> None:
    node = fleet.node_from_answers("http://x:1", models, host)
    assert not node.answered and why in str(node.error)


def test_the_config_holds_what_the_key_may_serve() -> None:
    """LiteLLM sends the key given: a read-only key would have every request refused (the
    node is left out, saying why), a scoped one serves only its models."""
    node = answered("http://a:1", "a", entry("qwen-small"), entry("gemma"))
    reader = fleet.within_key(node, {"name": "dash", "roles": ["read"], "models": []})
    assert not reader.answered
    assert "(dash) lacks the inference role there (it has: read)" in str(reader.error)
    scoped = fleet.within_key(node, {"name": "gw", "roles": ["inference", "read"],
                                     "models": ["qwen*"]})
    assert [m["id"] for m in scoped.models] == ["qwen-small"]
    result = fleet.litellm_config([scoped], "k")
    assert [d["model_name"] for d in result.config["model_list"]] == ["qwen-small"]
    # An admin key, or a node without keys (any role), sees the node as it is.
    for me in ({"name": "root", "roles": ["admin"], "models": ["x"]}, None):
        assert [m["id"] for m in fleet.within_key(node, me).models] == ["qwen-small", "gemma"]


def test_the_rendered_config_is_yaml_litellm_reads() -> None:
    yaml = pytest.importorskip("yaml")
    result = fleet.litellm_config([answered("http://a:1", "a", entry("Qwen/Qwen3: \"x\"#1"))],
                                  None)
    text = fleet.render(result, ["http://a:1"])
    assert text.startswith("# Generated by `neuronctl fleet litellm-config http://a:1`")
    assert yaml.safe_load(text) == result.config == json.loads(text.split("\n", 1)[1])


def test_status_rows_show_unreachable_and_empty_nodes() -> None:
    rows = fleet.status_rows([answered("http://a:1", "a", entry("m")), answered("http://b:1", "b"),
                              fleet.Node("http://c:1", error="down")])
    assert [(r["node_id"], r["model"] and r["model"]["id"], r["error"]) for r in rows] == [
        ("a", "m", None), ("b", None, None), (None, None, "down")]


# --- the commands, against nodes in this event loop ----------------------------------------

StartNode = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve_node(node_config: NeuronConfig, make_registry: MakeRegistry,
                     tmp_path: Path) -> AsyncIterator[StartNode]:
    runners: list[web.AppRunner] = []

    async def start(node_id: str, *models: ModelSpec, load: tuple[str, ...] = (),
                    **config: Any) -> str:
        own = dataclasses.replace(
            node_config, node_id=node_id, models=models, log_dir=tmp_path / node_id / "log",
            state_dir=tmp_path / node_id / "state", **config)
        registry = make_registry(own)
        for model_id in load:
            await registry.load(own.catalogue()[model_id])
        runner = web.AppRunner(create_app(registry), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def neuronctl(*args: str, **env: str) -> tuple[int, str, str]:
    """The console script, run while this loop keeps serving the nodes."""
    proc = await asyncio.create_subprocess_exec(
        str(NEURONCTL), *args, env=clean_env(COLUMNS="200", **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def fake(model_id: str, **kw: Any) -> ModelSpec:
    return ModelSpec(model_id, harness="fake", **kw)


async def test_the_routing_hook_is_written_beside_the_config_and_named_in_it(
    serve_node: StartNode, tmp_path: Path,
) -> None:
    yaml = pytest.importorskip("yaml")
    a = await serve_node("node-a", fake("m"), load=("m",))
    out = tmp_path / "litellm.yaml"
    hook = tmp_path / "neuron_routing.py"
    code, _, err = await neuronctl("fleet", "litellm-config", a, "--out", str(out))
    assert code == 0, err
    assert yaml.safe_load(out.read_text())["litellm_settings"] == {
        "callbacks": ["neuron_routing.warm_first"]}
    shipped = Path(fleet.__file__).with_name("warm_first.py").read_bytes()
    assert hook.read_bytes() == shipped
    assert oct(hook.stat().st_mode & 0o777) == "0o644"  # no secret in it
    # The file the proxy imports stands alone: nothing of neuronctl in it.
    assert b"neuronctl" not in b"".join(
        line for line in shipped.splitlines() if line.lstrip().startswith((b"import", b"from")))

    hook.unlink()
    code, _, err = await neuronctl("fleet", "litellm-config", a, "--out", str(out),
                                   "--no-routing-hook")
    assert code == 0, err
    assert "litellm_settings" not in yaml.safe_load(out.read_text()) and not hook.exists()
    # To stdout there is nowhere to put the file: the config goes without the hook.
    code, text, err = await neuronctl("fleet", "litellm-config", a)
    assert code == 0 and "litellm_settings" not in yaml.safe_load(text)


async def test_litellm_config_from_two_nodes_and_one_that_is_down(
    serve_node: StartNode, tmp_path: Path,
) -> None:
    yaml = pytest.importorskip("yaml")
    a = await serve_node("node-a", fake("m"), fake("cold", autoload=False), load=("m",))
    b = await serve_node("node-b", fake("m", autoload=True))
    down = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "litellm.yaml"
    code, _, err = await neuronctl("fleet", "litellm-config", a, b, "--out", str(out))
    assert code == 0, err
    assert f"{out}: 2 deployments" in err
    written = yaml.safe_load(out.read_text())
    assert [(d["model_name"], d["litellm_params"]["api_base"]) for d in written["model_list"]] \
        == [("m", f"{a}/v1"), ("m", f"{b}/v1")]
    assert oct(out.stat().st_mode & 0o777) == "0o600"  # it holds the nodes' key
    mtime = out.stat().st_mtime_ns
    code, _, err = await neuronctl("fleet", "litellm-config", a, b, "--out", str(out))
    assert code == 0 and "unchanged" in err and out.stat().st_mtime_ns == mtime

    code, text, err = await neuronctl("fleet", "litellm-config", a, down, b)
    assert code == fleet_incomplete()
    assert f"neuronctl: left out {down}: not answering" in err
    assert "Traceback" not in err
    assert len(yaml.safe_load(text)["model_list"]) == 2
    assert f"# Left out: {down}" in text

    code, text, err = await neuronctl("fleet", "litellm-config", down)
    assert code == 1 and text == "" and "nothing written" in err


def fleet_incomplete() -> int:
    from neuronctl.cli.fleet import EX_INCOMPLETE

    return EX_INCOMPLETE


async def test_the_nodes_key_is_sent_and_written(serve_node: StartNode) -> None:
    yaml = pytest.importorskip("yaml")
    a = await serve_node("node-a", fake("m", autoload=True), api_key="node-key")
    code, _, err = await neuronctl("fleet", "litellm-config", a)
    assert code == 1 and "left out" in err and "NEURON_API_KEY" in err, err
    assert "pass --api-key" in err and "--config" not in err, err  # fleet has no --config
    code, text, err = await neuronctl("fleet", "litellm-config", a, NEURON_API_KEY="node-key")
    assert code == 0, err
    assert yaml.safe_load(text)["model_list"][0]["litellm_params"]["api_key"] == "node-key"
    code, text, _ = await neuronctl("fleet", "litellm-config", a, "--api-key", "node-key")
    assert code == 0


async def test_fleet_status_table_and_json(serve_node: StartNode) -> None:
    a = await serve_node("node-a", fake("m"), fake("other", autoload=False), load=("m",))
    down = f"http://127.0.0.1:{free_port()}"
    code, text, err = await neuronctl("fleet", "status", a, down)
    assert code == 1
    lines = text.splitlines()
    assert lines[0].split() == ["NODE", "MODEL", "STATUS", "MEMORY", "Q/RUN", "GATEWAY"]
    assert lines[1].split()[:3] == ["node-a", "m", "loaded"] and lines[1].split()[-1] == "serves"
    assert lines[2].split()[:3] == ["node-a", "other", "unloaded"]
    assert lines[3].split()[:3] == [down, "-", "unreachable"]
    assert f"neuronctl: {down}: not answering" in err
    env = clean_env()  # piped, no COLUMNS: one line per row, however long the URL
    proc = await asyncio.create_subprocess_exec(
        str(NEURONCTL), "fleet", "status", a, f"{down}/{'x' * 120}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    piped, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert len(piped.decode().splitlines()) == 4
    code, text, _ = await neuronctl("fleet", "status", a, "--json")
    assert code == 0
    (node,) = json.loads(text)
    assert node["node_id"] == "node-a" and node["error"] is None
    assert [m["id"] for m in node["models"]] == ["m", "other"]


@pytest.mark.parametrize("args", [["fleet", "status", "ftp://x"],
                                  ["fleet", "litellm-config", "http://a:99999"]])
async def test_a_bad_node_url_is_one_line_and_status_2(args: list[str]) -> None:
    code, _, err = await neuronctl(*args)
    assert code == 2 and err.startswith("neuronctl: NODE_URL:") and len(err.splitlines()) == 1


async def test_the_fleet_commands_read_no_neuron_fleet_variables(serve_node: StartNode) -> None:
    """A NEURON_FLEET_* variable would make the node refuse to start (an unknown key); the
    tooling takes nodes from its arguments only."""
    a = await serve_node("node-a", fake("m", autoload=True))
    code, text, _ = await neuronctl("fleet", "litellm-config", a,
                                    NEURON_FLEET_NODES="http://127.0.0.1:1")
    assert code == 0 and "127.0.0.1:1/" not in text
    assert not any(k.startswith("NEURON_FLEET") for k in os.environ)
