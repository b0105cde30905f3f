"""A fleet behind LiteLLM's proxy (docs/fleet.md): what the gateway costs and what a node's
death costs, in one run.

Three nodes serve the tiny GGUF (llama-server when there is one); LiteLLM's proxy starts
from `neuronctl fleet litellm-config`. Measured:

* latency p50/p99 of one short chat completion sent to a node directly and through the
  proxy, interleaved one by one so machine noise hits both alike;
* requests lost per node death: clients keep `--concurrency` requests in flight through the
  proxy while one node's supervisor is killed with SIGKILL; repeated for all but one node;
* warm first: two nodes, each `max_loaded_models = 1`, two catalogue models; requests
  alternating between the models for `--warm-seconds`, through a proxy without the routing
  hook and through one with it (`neuron_routing.warm_first`): evictions counted from the
  nodes' /metrics, p50/p99, requests lost; then, with the hook, a node killed mid-run.

    .venv/bin/python bench/fleet.py [--requests 200] [--concurrency 4] [--warm-seconds 60]
    .venv/bin/python bench/fleet.py --only warm-first --warm-seconds 30

Needs the proxy from .ci/litellm.sh (or LITELLM_PROXY=/path/to/litellm).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
from _common import (
    LITELLM,
    LITELLM_ENV,
    NEURONCTL,
    clean_env,
    find_llama_server,
    fleet_node_toml,
    free_port,
    pct,
    spawn,
    stop_group,
    wait_http,
    write_tiny_gguf,
)

CHAT = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 1, "temperature": 0}).encode()
NODES = ("node-a", "node-b", "node-c")


async def chat(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    async with session.post(url, data=CHAT, headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    return time.perf_counter() - started


async def latency(direct: str, proxy: str, key: str, n: int) -> dict[str, list[float]]:
    ways = {"direct": (f"{direct}/v1/chat/completions", {"Content-Type": "application/json"}),
            "proxy": (f"{proxy}/v1/chat/completions",
                      {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})}
    samples: dict[str, list[float]] = {w: [] for w in ways}
    order = list(ways)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for way in order:  # warm both: connections, the proxy's first-request work
            for _ in range(5):
                await chat(session, *ways[way])
        for _ in range(n):
            for way in order:
                samples[way].append(await chat(session, *ways[way]))
            order.reverse()
    return samples


async def lost_when_killed(proxy: str, key: str, victim: subprocess.Popen[bytes],
                           total: int, kill_after: int, concurrency: int) -> tuple[int, int]:
    """`total` requests through the proxy by `concurrency` clients; the victim's supervisor
    gets SIGKILL once `kill_after` have been answered. Returns (failed, sent)."""
    url = f"{proxy}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    sent = failed = done = 0
    killed = False

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent, failed, done, killed
        while sent < total:
            sent += 1
            try:
                await chat(session, url, headers)
            except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError):
                failed += 1
            done += 1
            if done >= kill_after and not killed:
                killed = True
                os.kill(victim.pid, signal.SIGKILL)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.wait_for(asyncio.gather(*(client(session) for _ in range(concurrency))),
                               300)
    return failed, sent


WARM_MODELS = ("alpha", "beta")
WARM_NODES = ("warm-a", "warm-b")


def warm_node_toml(port: int, name: str, model: Path, llama_server: str | None) -> str:
    """Two catalogue models (the same tiny file under two ids), loaded on demand, one at a
    time: a request for the other one evicts."""
    harness = "llama-server" if llama_server else "llama-cpp-python"
    table = f'[harness.llama-server]\nbinary = "{llama_server}"\n' if llama_server else ""
    catalogue = "".join(f'[[models]]\nmodel_id = "{m}"\nharness = "{harness}"\n'
                        f'path = "{model}"\nn_ctx = 256\n' for m in WARM_MODELS)
    return (f'port = {port}\nhost = "127.0.0.1"\nnode_id = "{name}"\nlog_dir = "log"\n'
            f'state_dir = "state"\nmax_loaded_models = 1\n{table}{catalogue}')


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 1, "temperature": 0}).encode()


async def node_call(session: aiohttp.ClientSession, url: str, method: str, path: str,
                    body: dict[str, str] | None = None) -> str:
    async with session.request(method, url + path, json=body,
                               headers={"Host": "127.0.0.1"}) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"{url}{path}: HTTP {resp.status}: {text[:200]}")
        return text


async def evictions(session: aiohttp.ClientSession, urls: list[str]) -> int:
    total = 0.0
    for url in urls:
        text = await node_call(session, url, "GET", "/metrics")
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("neuron_model_evictions_total{"))
    return int(total)


async def alternating(proxy: str, key: str, urls: list[str], seconds: float
                      ) -> tuple[int, int, int, list[float]]:
    """Sequential requests alternating between the two models for `seconds`, from the same
    start (alpha warm on the first node, beta on the second). Returns (evictions, lost,
    sent, latencies of the answered ones)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for model in WARM_MODELS:  # a hook follows the nodes from its first request on
            async with session.post(f"{proxy}/v1/chat/completions", data=chat_body(model),
                                    headers=headers) as resp:
                await resp.read()
        for url, model in zip(urls, WARM_MODELS, strict=True):
            await node_call(session, url, "POST", "/models/load", {"model_id": model})
        await asyncio.sleep(1.5)  # a hook learns the loads within a second or so
        before = await evictions(session, urls)
        lost = sent = 0
        samples: list[float] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            model = WARM_MODELS[sent % 2]
            sent += 1
            started = time.perf_counter()
            try:
                async with session.post(f"{proxy}/v1/chat/completions", data=chat_body(model),
                                        headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                samples.append(time.perf_counter() - started)
            except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError):
                lost += 1
        return await evictions(session, urls) - before, lost, sent, samples


async def warm_killed(proxy: str, key: str, victim: subprocess.Popen[bytes], total: int,
                      concurrency: int) -> tuple[int, int]:
    """`total` requests alternating between the models by `concurrency` clients, the first
    node's supervisor killed once a quarter are answered. Returns (failed, sent)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    sent = failed = done = 0
    killed = False

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent, failed, done, killed
        while sent < total:
            model = WARM_MODELS[sent % 2]
            sent += 1
            try:
                async with session.post(f"{proxy}/v1/chat/completions", data=chat_body(model),
                                        headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
            except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError):
                failed += 1
            done += 1
            if done >= total // 4 and not killed:
                killed = True
                os.kill(victim.pid, signal.SIGKILL)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.wait_for(asyncio.gather(*(client(session) for _ in range(concurrency))),
                               600)
    return failed, sent


async def warm_first(work: Path, model: Path, llama_server: str | None, seconds: float,
                     kill_requests: int, concurrency: int) -> list[str]:
    """The warm-first rows: the same nodes behind a proxy without the hook, then one with
    it, then a node killed under the one with it."""
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    urls: list[str] = []
    proxy: subprocess.Popen[bytes] | None = None
    lines: list[str] = []
    key = "sk-" + secrets.token_hex(16)
    try:
        for name in WARM_NODES:
            home = work / name
            home.mkdir()
            port = free_port()
            (home / "neuron.toml").write_text(warm_node_toml(port, name, model, llama_server))
            urls.append(f"http://127.0.0.1:{port}")
            log = home / "daemon.log"
            nodes[name] = spawn([str(NEURONCTL), "start", "--config", "neuron.toml",
                                 "--log-level", "warning"], log, clean_env(), cwd=home)
            wait_http(nodes[name], f"{urls[-1]}/health", 120, log)
        for hook in (False, True):
            where = work / ("with-hook" if hook else "without-hook")
            where.mkdir()
            config = where / "litellm.yaml"
            subprocess.run([str(NEURONCTL), "fleet", "litellm-config", *urls, "--out",
                            str(config), *([] if hook else ["--no-routing-hook"])],
                           env=clean_env(), check=True, timeout=60, capture_output=True)
            port = free_port()
            proxy_url = f"http://127.0.0.1:{port}"
            log = where / "proxy.log"
            proxy = spawn([str(LITELLM), "--config", str(config), "--host", "127.0.0.1",
                           "--port", str(port)], log,
                          clean_env(**LITELLM_ENV, LITELLM_MASTER_KEY=key), cwd=where)
            wait_http(proxy, f"{proxy_url}/health/liveliness", 180, log)
            evicted, lost, sent, samples = await alternating(proxy_url, key, urls, seconds)
            per_30 = evicted * 30 / sent if sent else float("nan")
            lines.append(
                f"  {'with the hook   ' if hook else 'without the hook'}  {sent:4d} requests, "
                f"{evicted:4d} evictions ({per_30:4.1f} per 30), lost {lost}, "
                f"p50 {statistics.median(samples) * 1e3:8.1f} ms, "
                f"p99 {pct(samples, 0.99) * 1e3:8.1f} ms")
            if hook:
                failed, total = await warm_killed(proxy_url, key, nodes[WARM_NODES[0]],
                                                  kill_requests, concurrency)
                lines.append(f"  with the hook, {WARM_NODES[0]} killed mid-run "
                             f"({concurrency} clients): {failed} of {total} requests failed")
            stop_group(proxy)
            proxy = None
    finally:
        if proxy is not None:
            stop_group(proxy)
        for proc in nodes.values():
            stop_group(proc)
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="latency samples per way")
    parser.add_argument("--concurrency", type=int, default=4, help="clients during a kill")
    parser.add_argument("--kill-requests", type=int, default=120, help="requests per kill run")
    parser.add_argument("--warm-seconds", type=float, default=60.0,
                        help="alternating requests for this long, with and without the hook")
    parser.add_argument("--only", choices=("warm-first",), help="run only these rows")
    args = parser.parse_args()
    if not LITELLM.is_file():  # skipped, as its tests are: `make bench` goes on
        print(f"fleet: skipped, LiteLLM's proxy is not at {LITELLM} (run .ci/litellm.sh)")
        return
    llama_server = find_llama_server()
    worker = "llama-server" if llama_server else "llama-cpp-python"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_tiny_gguf(work / "tiny.gguf")
        warm = await warm_first(work, model, llama_server, args.warm_seconds,
                                args.kill_requests, args.concurrency)
        print(f"warm first: {len(WARM_NODES)} nodes with max_loaded_models = 1 ({worker} "
              f"workers, tiny GGUF as {' and '.join(WARM_MODELS)}), requests alternating "
              f"between the models for {args.warm_seconds:g} s:")
        print("\n".join(warm))
        if args.only == "warm-first":
            return
        nodes: dict[str, subprocess.Popen[bytes]] = {}
        urls: dict[str, str] = {}
        proxy: subprocess.Popen[bytes] | None = None
        try:
            for name in NODES:
                home = work / name
                home.mkdir()
                port = free_port()
                (home / "neuron.toml").write_text(fleet_node_toml(port, name, model, llama_server))
                urls[name] = f"http://127.0.0.1:{port}"
                log = home / "daemon.log"
                nodes[name] = spawn([str(NEURONCTL), "start", "--config", "neuron.toml",
                                     "--log-level", "warning"], log, clean_env(), cwd=home)
                wait_http(nodes[name], f"{urls[name]}/models/tiny/endpoint", 120, log)
            config = work / "litellm.yaml"
            subprocess.run([str(NEURONCTL), "fleet", "litellm-config", *urls.values(),
                            "--out", str(config)], env=clean_env(), check=True, timeout=60)
            key = "sk-" + secrets.token_hex(16)
            port = free_port()
            proxy_url = f"http://127.0.0.1:{port}"
            log = work / "proxy.log"
            started = time.monotonic()
            proxy = spawn([str(LITELLM), "--config", str(config), "--host", "127.0.0.1",
                           "--port", str(port)], log,
                          clean_env(**LITELLM_ENV, LITELLM_MASTER_KEY=key), cwd=work)
            wait_http(proxy, f"{proxy_url}/health/liveliness", 180, log)
            proxy_start_s = time.monotonic() - started

            samples = await latency(urls["node-a"], proxy_url, key, args.requests)
            losses = []
            for name in NODES[:-1]:
                losses.append(await lost_when_killed(
                    proxy_url, key, nodes[name], args.kill_requests, args.kill_requests // 4,
                    args.concurrency))
                nodes[name].wait(10)
        finally:
            if proxy is not None:
                stop_group(proxy)
            for proc in nodes.values():
                stop_group(proc)

    print(f"fleet: {len(NODES)} nodes ({worker} workers, tiny GGUF), LiteLLM proxy started "
          f"in {proxy_start_s:.1f} s")
    d, p = samples["direct"], samples["proxy"]
    print(f"latency, {args.requests} sequential requests each (ms):")
    print(f"  direct to a node  p50 {statistics.median(d) * 1e3:7.2f}  "
          f"p99 {pct(d, 0.99) * 1e3:7.2f}")
    print(f"  through LiteLLM   p50 {statistics.median(p) * 1e3:7.2f}  "
          f"p99 {pct(p, 0.99) * 1e3:7.2f}")
    print(f"  added by LiteLLM  p50 {(statistics.median(p) - statistics.median(d)) * 1e3:7.2f}  "
          f"ratio p50 {statistics.median(p) / statistics.median(d):.1f}x")
    for i, (failed, sent) in enumerate(losses, 1):
        print(f"node death {i} (kill -9, {args.concurrency} clients): {failed} of {sent} "
              "requests failed")


if __name__ == "__main__":
    asyncio.run(main())
