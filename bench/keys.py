"""Keys: fairness between keys on one model, and what checking keys costs.

One `neuronctl start` serves the tiny test GGUF (llama-server when one is found, else
llama-cpp-python), one request at a time, with two inference keys. Printed:

* fairness: a `flood` key keeps 50 completions waiting for the model while a `trickle`
  key sends one a second; the trickle's latency against its latency alone (target: about
  2x, one flood answer ahead of it, not 50) and what a shared FIFO would have made it wait;
* cost: GET /v1/models, sequentially, on a node with no keys and on one with 50 named
  keys (every key's digest is compared on every request), and their ratio (target <= 1.2).

    .venv/bin/python bench/keys.py [--trickles 8] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from _common import Node, find_llama_server, pct, start_node, write_tiny_gguf

from neuronctl.keys import sha256_hex

FLOOD, TRICKLE = "nk-bench-flood", "nk-bench-trickle"


def keys_toml(extra: int = 0) -> str:
    entries = [("flood", FLOOD), ("trickle", TRICKLE)]
    entries += [(f"spare{i}", f"nk-bench-spare-{i}") for i in range(extra)]
    return "".join(f'[[keys]]\nname = "{name}"\nroles = ["inference", "read"]\n'
                   f'sha256 = "{sha256_hex(key)}"\n' for name, key in entries)


def model_toml(gguf: Path, llama_server: str | None) -> str:
    harness = "llama-server" if llama_server else "llama-cpp-python"
    table = f'[harness.llama-server]\nbinary = "{llama_server}"\n' if llama_server else ""
    return (f'{table}[[default_models]]\nmodel_id = "tiny"\n'
            f'path = "{gguf}"\nharness = "{harness}"\nn_ctx = 512\n')


async def complete(session: aiohttp.ClientSession, url: str, key: str,
                   max_tokens: int) -> float:
    started = time.monotonic()
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": max_tokens,
            "temperature": 0}
    async with session.post(url + "/v1/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return time.monotonic() - started


async def trickle(session: aiohttp.ClientSession, node: Node, n: int,
                  max_tokens: int) -> list[float]:
    latencies = []
    for _ in range(n):
        began = time.monotonic()
        latencies.append(await complete(session, node.url, TRICKLE, max_tokens))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))  # one a second
    return latencies


async def fairness(node: Node, trickles: int, max_tokens: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for _ in range(3):  # warm up: the worker's first answers are slower
            await complete(session, node.url, TRICKLE, max_tokens)
        alone = await trickle(session, node, trickles, max_tokens)
        stop = asyncio.Event()
        flooded: list[float] = []

        async def flooder() -> None:
            while not stop.is_set():
                flooded.append(await complete(session, node.url, FLOOD, max_tokens))

        flood_began = time.monotonic()
        flood = [asyncio.create_task(flooder()) for _ in range(50)]
        await asyncio.sleep(1.0)  # the flood's 50 are waiting
        crowded = await trickle(session, node, trickles, max_tokens)
        stop.set()
        await asyncio.gather(*flood)
        served = len(flooded)
        service_s = (time.monotonic() - flood_began) / max(1, served + trickles)
    ratio = statistics.median(crowded) / statistics.median(alone)
    print(f"fairness: trickle alone p50 {statistics.median(alone) * 1000:.0f} ms, "
          f"with 50 flood requests waiting p50 {statistics.median(crowded) * 1000:.0f} ms, "
          f"max {max(crowded) * 1000:.0f} ms; ratio {ratio:.2f}x; one answer takes "
          f"~{service_s * 1000:.0f} ms, so a shared FIFO would make it wait "
          f"~{50 * service_s * 1000:.0f} ms; the flood's own requests p50 "
          f"{statistics.median(flooded) * 1000:.0f} ms ({served} served)")


async def sequential_gets(url: str, key: str | None, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            started = time.monotonic()
            async with session.get(url + "/v1/models", headers=headers) as resp:
                await resp.read()
            times.append(time.monotonic() - started)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trickles", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--gets", type=int, default=400)
    args = parser.parse_args()
    llama_server = find_llama_server()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = write_tiny_gguf(Path(tmp) / "tiny.gguf")
        model = model_toml(gguf, llama_server)
        print(f"worker: {'llama-server' if llama_server else 'llama-cpp-python'}, one slot")
        node = start_node(Path(tmp) / "keyed", "max_queue = 200\n" + keys_toml() + model)
        try:
            await fairness(node, args.trickles, args.max_tokens)
        finally:
            node.stop()

        results = {}
        for label, body, key in (("no keys", "", None),
                                 ("50 keys", keys_toml(extra=48), TRICKLE)):
            node = start_node(Path(tmp) / label.replace(" ", "-"), body)
            try:
                await sequential_gets(node.url, key, 50)  # warm up
                results[label] = pct(await sequential_gets(node.url, key, args.gets), 0.5)
            finally:
                node.stop()
        print(f"cost: GET /v1/models p50 {results['no keys'] * 1e6:.0f} us without keys, "
              f"{results['50 keys'] * 1e6:.0f} us with 50 keys; ratio "
              f"{results['50 keys'] / results['no keys']:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
