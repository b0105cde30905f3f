"""The fleet recipe for real (docs/fleet.md): three nodes serving the tiny GGUF, LiteLLM's
proxy started from `neuronctl fleet litellm-config`, all on loopback.

The proxy comes from .ci/litellm.sh (its own venv); without it the module skips with the
reason. The proxy starts once for the module (~8 s); every run below is bounded in requests
and in time, and every process started here is stopped as a group.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..helpers import (
    LITELLM,
    LITELLM_ENV,
    NEURONCTL,
    clean_env,
    find_llama_server,
    fleet_node_toml,
    free_port,
    http_ok,
    poll_until,
    spawn,
    stop_group,
    wait_http,
)

pytestmark = [
    pytest.mark.litellm,
    pytest.mark.skipif(not LITELLM.is_file(),
                       reason=f"LiteLLM's proxy is not installed at {LITELLM} (.ci/litellm.sh)"),
    pytest.mark.skipif(find_llama_server() is None
                       and importlib.util.find_spec("llama_cpp") is None,
                       reason="needs llama-server or llama-cpp-python[server]"),
]

NODES = ("node-a", "node-b", "node-c")
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 0}
REQUEST_TIMEOUT_S = 30.0
# Which node answered: the proxy passes the node's own headers on with this prefix.
NODE_HEADER = "llm_provider-x-neuron-node"


@dataclass
class Fleet:
    workdir: Path
    model: Path
    llama_server: str | None
    master_key: str
    ports: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxy: subprocess.Popen[bytes] | None = None
    proxy_url: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_node(self, name: str) -> None:
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        port = self.ports.setdefault(name, free_port())
        (home / "neuron.toml").write_text(
            fleet_node_toml(port, name, self.model, self.llama_server))
        log = home / "daemon.log"
        self.nodes[name] = proc = spawn(
            [str(NEURONCTL), "start", "--config", "neuron.toml", "--log-level", "warning"],
            log, clean_env(), cwd=home)
        wait_http(proc, f"{self.url(name)}/models/tiny/endpoint", 120, log)

    def generate(self, *names: str) -> tuple[int, dict[str, Any], str]:
        out = self.workdir / "litellm.yaml"
        done = subprocess.run(
            [str(NEURONCTL), "fleet", "litellm-config", *(self.url(n) for n in names),
             "--out", str(out)], env=clean_env(), capture_output=True, text=True, timeout=60)
        text = out.read_text() if out.exists() else ""
        # The file is JSON under YAML comments: YAML, as LiteLLM reads it.
        body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        return done.returncode, json.loads(body) if body else {}, done.stderr

    def post(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            f"{self.proxy_url}/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.master_key}"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
        except OSError as exc:
            return 0, {}, str(exc).encode()

    def run(self, count: int, seconds: float, during: Any = None,
            at: int = -1) -> tuple[list[int], list[str]]:
        """`count` sequential requests through the proxy, at most `seconds`; `during()` is
        called before request number `at`. Returns the statuses and the answering nodes."""
        statuses, nodes = [], []
        deadline = time.monotonic() + seconds
        for i in range(count):
            if i == at and during is not None:
                during()
            status, headers, _ = self.post(CHAT)
            statuses.append(status)
            nodes.append(headers.get(NODE_HEADER, "?"))
            assert time.monotonic() < deadline, f"{count} requests took over {seconds} s"
        return statuses, nodes


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    made = Fleet(workdir, tiny_gguf, find_llama_server(), "sk-" + secrets.token_hex(16))
    try:
        for name in NODES:
            made.start_node(name)
        code, made.config, err = made.generate(*NODES)
        assert code == 0, err
        port = free_port()
        log = workdir / "proxy.log"
        env = clean_env(**LITELLM_ENV, LITELLM_MASTER_KEY=made.master_key)
        made.proxy = spawn([str(LITELLM), "--config", str(workdir / "litellm.yaml"),
                            "--host", "127.0.0.1", "--port", str(port)], log, env, cwd=workdir)
        made.proxy_url = f"http://127.0.0.1:{port}"
        wait_http(made.proxy, f"{made.proxy_url}/health/liveliness", 120, log)
        yield made
    finally:
        if made.proxy is not None:
            stop_group(made.proxy)
        for proc in made.nodes.values():
            stop_group(proc)


def test_the_generated_config_has_one_deployment_per_node(fleet: Fleet) -> None:
    ids = [d["model_info"]["id"] for d in fleet.config["model_list"]]
    assert [i.split("@")[0] for i in ids] == list(NODES)
    assert {d["model_name"] for d in fleet.config["model_list"]} == {"tiny"}


def test_requests_through_the_proxy_reach_every_node(fleet: Fleet) -> None:
    statuses, nodes = fleet.run(30, 60)
    assert statuses == [200] * 30
    assert set(nodes) == set(NODES)


def test_streaming_passes_through(fleet: Fleet) -> None:
    status, headers, body = fleet.post({**CHAT, "stream": True, "max_tokens": 4})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) >= 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_a_model_unloaded_on_one_node_costs_no_request(fleet: Fleet) -> None:
    unload = urllib.request.Request(
        f"{fleet.url('node-b')}/models/unload", data=b'{"model_id": "tiny"}', method="POST",
        headers={"Content-Type": "application/json"})

    def unload_b() -> None:
        with urllib.request.urlopen(unload, timeout=30) as resp:
            assert resp.status == 200

    statuses, nodes = fleet.run(30, 60, during=unload_b, at=5)
    assert statuses == [200] * 30, statuses
    assert "node-b" not in nodes[5:]
    print(f"unload on node-b: 0 of 30 requests failed, {nodes[5:].count('?')} unattributed")
    load = urllib.request.Request(
        f"{fleet.url('node-b')}/models/load", data=b'{"model_id": "tiny"}', method="POST",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(load, timeout=60) as resp:  # back, for the tests after
        assert resp.status == 200


def test_a_node_killed_mid_run_costs_at_most_one_request(fleet: Fleet) -> None:
    victim = fleet.nodes["node-a"]

    def kill_a() -> None:
        os.kill(victim.pid, signal.SIGKILL)  # the supervisor; its workers die with it

    statuses, nodes = fleet.run(40, 90, during=kill_a, at=10)
    victim.wait(10)
    failed = [s for s in statuses if s != 200]
    print(f"kill -9 of node-a: {len(failed)} of {len(statuses)} requests failed")  # for -s
    assert len(failed) <= 1, statuses
    assert not http_ok(f"{fleet.url('node-a')}/health")
    # Only node-c, maybe: node-b is still cooling down from its 404s of the test before.
    assert set(nodes[11:]) <= {"node-b", "node-c"}


def test_a_restarted_node_gets_a_new_deployment_id(fleet: Fleet) -> None:
    before = {d["model_info"]["id"] for d in fleet.config["model_list"]}
    if fleet.nodes["node-a"].poll() is None:  # run alone: kill it here
        stop_group(fleet.nodes["node-a"])
    code, config, err = fleet.generate(*NODES)
    assert code == 3 and "left out http://127.0.0.1:" in err  # node-a is down
    assert all(not d["model_info"]["id"].startswith("node-a@") for d in config["model_list"])
    poll_until(lambda: not http_ok(f"{fleet.url('node-a')}/health"), 10)
    fleet.start_node("node-a")  # same port, same node_id, a new incarnation
    code, config, err = fleet.generate(*NODES)
    assert code == 0, err
    after = {d["model_info"]["id"] for d in config["model_list"]}
    (old,) = [i for i in before if i.startswith("node-a@")]
    (new,) = [i for i in after if i.startswith("node-a@")]
    assert old != new and old.endswith("/tiny") and new.endswith("/tiny")
    assert before - {old} == after - {new}  # the other nodes did not restart
