"""The warm-first routing hook inside the real LiteLLM proxy (docs/fleet.md): two nodes, each
`max_loaded_models = 1` with two catalogue models, the config and the hook written by
`neuronctl fleet litellm-config --out`, all on loopback.

The nodes run the fake llama-server (tests/fake_llama_server.py: loads in milliseconds, and a
request can hold its slot, `hold_s`) on the tiny GGUF; the supervisors, their queues and
evictions are real. Each node sits behind a relay (relay.py) that counts every request the
proxy and its hook make, can stall the node's event stream alone and can fail `/v1`
requests. The proxy comes from .ci/litellm.sh and Redis from .ci/redis.sh; without them the
module (or the Redis test) skips with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..fakes import FAKE_LLAMA_SERVER
from ..helpers import (
    LITELLM,
    LITELLM_ENV,
    NEURONCTL,
    clean_env,
    free_port,
    http_ok,
    poll_until,
    spawn,
    stop_group,
    wait_http,
)
from .relay import Relay

pytestmark = [
    pytest.mark.litellm,
    pytest.mark.skipif(not LITELLM.is_file(),
                       reason=f"LiteLLM's proxy is not installed at {LITELLM} (.ci/litellm.sh)"),
]

REDIS = shutil.which("redis-server")
NODES = ("node-a", "node-b")
MODELS = ("alpha", "beta")
NODE_KEY = "node-key-" + secrets.token_hex(4)
REQUEST_TIMEOUT_S = 60.0
NODE_HEADER = "llm_provider-x-neuron-node"  # the node's own header, passed on by the proxy
# How often a LiteLLM proxy re-reads from Redis a cooldown it has not seen (1.108's default).
COOLDOWN_READ_INTERVAL_S = 1.0


def node_toml(port: int, name: str, model: Path, binary: Path) -> str:
    catalogue = "".join(f'[[models]]\nmodel_id = "{m}"\nharness = "llama-server"\n'
                        f'path = "{model}"\nn_ctx = 256\n' for m in MODELS)
    return (f'host = "127.0.0.1"\nport = {port}\nnode_id = "{name}"\n'
            f'api_key = "{NODE_KEY}"\nlog_dir = "log"\nstate_dir = "state"\n'
            f'stop_timeout_s = 2.0\nmax_loaded_models = 1\n'
            f'[harness.llama-server]\nbinary = "{binary}"\nparallel = 1\n{catalogue}')


@dataclass
class Fleet:
    workdir: Path
    gguf: Path
    master_key: str
    ports: dict[str, int] = field(default_factory=dict)
    relays: dict[str, Relay] = field(default_factory=dict)
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxies: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxy_urls: list[str] = field(default_factory=list)
    redis_env: dict[str, str] = field(default_factory=dict)

    def direct(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_node(self, name: str) -> None:
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        binary = home / "llama-server"
        binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_LLAMA_SERVER}" "$@"\n')
        binary.chmod(0o755)
        port = self.ports.setdefault(name, free_port())
        if name not in self.relays:
            self.relays[name] = Relay(port)
        (home / "neuron.toml").write_text(node_toml(port, name, self.gguf, binary))
        log = home / "daemon.log"
        self.nodes[name] = proc = spawn(
            [str(NEURONCTL), "start", "--config", "neuron.toml", "--log-level", "warning"],
            log, clean_env(), cwd=home)
        wait_http(proc, f"{self.direct(name)}/health", 120, log)

    def call(self, name: str, method: str, path: str, body: Any = None,
             timeout: float = 60.0) -> tuple[int, Any]:
        """The node's API, directly (not through its relay), with its key."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.direct(name) + path, data=data, method=method,
                                     headers={"Host": "127.0.0.1",
                                              "Authorization": f"Bearer {NODE_KEY}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, raw if path == "/metrics" else json.loads(raw or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def load(self, name: str, model: str) -> None:
        status, body = self.call(name, "POST", "/models/load", {"model_id": model})
        assert status == 200, body

    def model(self, name: str, model: str) -> dict[str, Any]:
        status, models = self.call(name, "GET", "/models")
        assert status == 200, models
        return next(m for m in models if m["id"] == model)

    def evictions(self) -> int:
        """Every eviction on every node so far, from their /metrics."""
        total = 0.0
        for name in NODES:
            status, text = self.call(name, "GET", "/metrics")
            assert status == 200
            total += sum(float(line.rsplit(" ", 1)[1])
                         for line in text.decode().splitlines()
                         if line.startswith("neuron_model_evictions_total{"))
        return int(total)

    def fresh(self, *names: str, streams: int = 1) -> None:
        """Until the hook(s) in `streams` proxies heard two heartbeats more from each node:
        what they know now is what the nodes say now."""
        relays = [self.relays[name] for name in names or NODES]
        before = [relay.heard() for relay in relays]
        poll_until(lambda: all(relay.fresh_since(heard, 2, streams)
                               for relay, heard in zip(relays, before, strict=True)),
                   30, interval=0.05)

    def start_proxy(self) -> str:
        port = free_port()
        log = self.workdir / f"proxy-{len(self.proxies)}.log"
        env = clean_env(**LITELLM_ENV, **self.redis_env, LITELLM_MASTER_KEY=self.master_key)
        proc = spawn([str(LITELLM), "--config", str(self.workdir / "litellm.yaml"),
                      "--host", "127.0.0.1", "--port", str(port)], log, env, cwd=self.workdir)
        self.proxies.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.proxy_urls.append(url)
        wait_http(proc, f"{url}/health/liveliness", 180, log)
        return url

    def chat(self, model: str, proxy: int = 0) -> tuple[int, str]:
        """One request through a proxy: (status, the node that answered)."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2}
        req = urllib.request.Request(
            f"{self.proxy_urls[proxy]}/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.master_key}"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                resp.read()
                return resp.status, resp.headers.get(NODE_HEADER, "?")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")[:300]

    def alternate(self, count: int, proxy: int = 0) -> list[tuple[str, int, str]]:
        """`count` requests alternating between the two models: (model, status, node)."""
        return [(m, *self.chat(m, proxy)) for m in (MODELS[i % 2] for i in range(count))]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A redis-server of this module's own (password set, as LiteLLM's config reads one), or
    nothing: the proxies then run without it and the Redis test skips."""
    if REDIS is None:
        yield {}
        return
    port, password = free_port(), secrets.token_hex(8)
    workdir = tmp_path_factory.mktemp("redis")
    proc = spawn([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--requirepass", password, "--dir", str(workdir)],
                 workdir / "redis.log", clean_env())
    try:
        poll_until(lambda: proc.poll() is not None or _redis_up(port), 30)
        assert proc.poll() is None, (workdir / "redis.log").read_text()
        yield {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(port), "REDIS_PASSWORD": password}
    finally:
        stop_group(proc)


def _redis_up(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64) != b""  # -NOAUTH is an answer too
    except OSError:
        return False


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path,
          redis: dict[str, str]) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("warm-fleet")
    made = Fleet(workdir, tiny_gguf, "sk-" + secrets.token_hex(16), redis_env=redis)
    try:
        for name in NODES:
            made.start_node(name)
        done = subprocess.run(
            [str(NEURONCTL), "fleet", "litellm-config",
             *(made.relays[n].url for n in NODES), "--api-key", NODE_KEY,
             "--out", str(workdir / "litellm.yaml"), *(["--redis"] if redis else [])],
            env=clean_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (workdir / "neuron_routing.py").is_file()
        made.start_proxy()
        # The hook follows a node from the first request that could go there.
        assert made.chat("alpha")[0] == 200
        made.fresh()
        yield made
    finally:
        for proc in made.proxies:
            stop_group(proc)
        for proc in made.nodes.values():
            stop_group(proc)
        for relay in made.relays.values():
            relay.close()


def test_requests_go_where_their_model_is_warm_and_cost_the_nodes_nothing_more(
    fleet: Fleet,
) -> None:
    fleet.load("node-a", "alpha")
    fleet.load("node-b", "beta")
    fleet.fresh()
    evictions = fleet.evictions()
    seen = {n: len(fleet.relays[n].requests) for n in NODES}
    answers = fleet.alternate(20)
    assert all(status == 200 for _, status, _ in answers), answers
    assert [node for _, _, node in answers] == ["node-a", "node-b"] * 10
    assert fleet.evictions() == evictions
    # One request to a node per routed request, and nothing else: the hook asks nothing per
    # request (its event stream stays the one it opened).
    for name in NODES:
        assert fleet.relays[name].requests[seen[name]:] == ["POST /v1/chat/completions"] * 10


def test_a_busy_warm_node_s_queue_is_weighed(fleet: Fleet) -> None:
    fleet.load("node-a", "alpha")
    fleet.load("node-b", "alpha")
    held: list[int] = []

    def hold() -> None:  # two slow requests on node-a: one in its only slot, one waiting
        status, _ = fleet.call("node-a", "POST", "/v1/chat/completions",
                               {"model": "alpha", "messages": [], "hold_s": 6})
        held.append(status)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        poll_until(lambda: fleet.model("node-a", "alpha")["queued"] == 1, 30)
        fleet.fresh()
        # Both warm: the one with a free slot.
        assert [fleet.chat("alpha") for _ in range(4)] == [(200, "node-b")] * 4
        # node-b swaps to beta: a queue on a warm node beats a load on a cold one.
        fleet.load("node-b", "beta")
        fleet.fresh()
        assert fleet.model("node-a", "alpha")["queued"] >= 1
        evictions = fleet.evictions()
        assert fleet.chat("alpha") == (200, "node-a")
        assert fleet.evictions() == evictions
    finally:
        for thread in threads:
            thread.join(60)
    assert held == [200, 200]


def test_a_stalled_event_stream_is_not_trusted_beyond_its_age(fleet: Fleet) -> None:
    fleet.load("node-a", "alpha")
    fleet.load("node-b", "beta")
    fleet.fresh()
    assert fleet.chat("alpha") == (200, "node-a")
    relay = fleet.relays["node-a"]
    relay.stalled.set()
    try:
        stalled_at = time.monotonic()
        # Behind the stall the nodes swap: node-a has beta now, node-b alpha. The hook still
        # holds "node-a: alpha, free" and must stop believing it after about a second.
        fleet.load("node-a", "beta")
        fleet.load("node-b", "alpha")
        fleet.fresh("node-b")
        time.sleep(max(0.0, stalled_at + 1.5 - time.monotonic()))  # the scenario: its age
        answers = [fleet.chat("alpha") for _ in range(6)]
        assert answers == [(200, "node-b")] * 6
    finally:
        relay.stalled.clear()
    fleet.fresh()  # back: it reconnects and is believed again
    fleet.load("node-a", "alpha")
    fleet.load("node-b", "beta")
    fleet.fresh()
    assert [fleet.chat("alpha") for _ in range(3)] == [(200, "node-a")] * 3


def test_a_dead_node_drops_out_and_is_picked_up_again_when_it_returns(fleet: Fleet) -> None:
    fleet.load("node-a", "alpha")
    fleet.load("node-b", "beta")
    fleet.fresh()
    relay = fleet.relays["node-a"]
    attempts = relay.count("GET /models/events")
    victim = fleet.nodes["node-a"]
    os.killpg(victim.pid, signal.SIGKILL)  # the supervisor and its workers
    victim.wait(10)
    # The hook saw its stream end, and tries again (and fails: nothing listens behind).
    poll_until(lambda: relay.count("GET /models/events") > attempts
               or not relay.heard(), 30)
    answers = [fleet.chat("alpha") for _ in range(6)]
    assert answers == [(200, "node-b")] * 6  # nothing lost, nothing tried on the dead node
    poll_until(lambda: not http_ok(f"{fleet.direct('node-a')}/health"), 10)
    fleet.start_node("node-a")  # the same port: a new incarnation
    fleet.load("node-a", "alpha")
    fleet.load("node-b", "beta")
    fleet.fresh()
    assert [fleet.chat("alpha") for _ in range(3)] == [(200, "node-a")] * 3


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (.ci/redis.sh)")
def test_two_proxies_through_redis_share_cooldowns_and_both_prefer_warm_nodes(
    fleet: Fleet,
) -> None:
    second = len(fleet.proxy_urls)
    fleet.start_proxy()
    # Its hook starts following the nodes with its first request, which goes where LiteLLM
    # alone sends it (and may load a model there): the scene is set after it.
    assert fleet.chat("beta", second)[0] == 200
    fleet.load("node-a", "alpha")
    fleet.load("node-b", "beta")
    fleet.fresh(streams=2)
    for proxy in (0, second):
        answers = fleet.alternate(6, proxy)
        assert [(m, node) for m, _, node in answers] == [
            ("alpha", "node-a"), ("beta", "node-b")] * 3, answers
    last_read = time.monotonic()  # the second proxy's last look at the cooldowns in Redis
    relay = fleet.relays["node-a"]
    relay.failing.set()  # node-a's /v1 fails; its event stream says it is warm and free
    try:
        # The first proxy tries node-a, fails, cools it down (in Redis) and retries node-b.
        assert fleet.chat("alpha") == (200, "node-b")
        fleet.load("node-b", "beta")  # node-b cold for alpha again: the hook alone says A
        fleet.fresh(streams=2)
        tried = relay.count("POST /v1/")
        # A proxy reads a cooldown it has not seen from Redis at most once per interval
        # (LiteLLM's DEFAULT_COOLDOWN_REDIS_READ_INTERVAL_SECONDS): the scenario is a later
        # request, not one inside the interval of the second proxy's last read.
        time.sleep(max(0.0, last_read + COOLDOWN_READ_INTERVAL_S + 0.2 - time.monotonic()))
        # The second proxy never had a failure of its own: the cooldown it skips node-a
        # for is the first one's, read from Redis.
        assert fleet.chat("alpha", second) == (200, "node-b")
        assert relay.count("POST /v1/") == tried
    finally:
        relay.failing.clear()
