"""A fleet behind LiteLLM's proxy (docs/fleet.md): what the gateway costs and what a node's
death costs, in one run.

Three nodes serve the tiny GGUF (llama-server when there is one); LiteLLM's proxy starts
from `neuronctl fleet litellm-config`. Measured:

* latency p50/p99 of one short chat completion sent to a node directly and through the
  proxy, interleaved one by one so machine noise hits both alike;
* requests lost per node death: clients keep `--concurrency` requests in flight through the
  proxy while one node's supervisor is killed with SIGKILL; repeated for all but one node.

    .venv/bin/python bench/fleet.py [--requests 200] [--concurrency 4]

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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="latency samples per way")
    parser.add_argument("--concurrency", type=int, default=4, help="clients during a kill")
    parser.add_argument("--kill-requests", type=int, default=120, help="requests per kill run")
    args = parser.parse_args()
    if not LITELLM.is_file():  # skipped, as its tests are: `make bench` goes on
        print(f"fleet: skipped, LiteLLM's proxy is not at {LITELLM} (run .ci/litellm.sh)")
        return
    llama_server = find_llama_server()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_tiny_gguf(work / "tiny.gguf")
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

    worker = "llama-server" if llama_server else "llama-cpp-python"
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
