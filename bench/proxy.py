"""Router overhead: one short chat completion sent to a worker directly and through the /v1
router of `neuronctl start`, against the same worker in the same run.

Measured per round: latency p50/p99 sequentially and at concurrency 8, requests per second
both ways, and time to the first streamed chunk. Direct and routed requests are interleaved
so machine noise hits both alike: sequential and streamed requests alternate one by one,
concurrent ones in slices of 100 (the order flipping each time), and throughput is requests
over the summed wall time of a way's slices. The figures printed are medians over the
rounds. Targets: added p50 <= 1 ms, throughput ratio >= 0.90 at concurrency 8, first chunk
added <= 2 ms.

    .venv/bin/python bench/proxy.py [--rounds 7] [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from _common import Node, clean_env, pct, start_node, write_tiny_gguf

MODEL = "tiny"
HEADERS = {"Content-Type": "application/json"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1, "temperature": 0}
STREAM = {**CHAT, "max_tokens": 4, "stream": True}
SLICE = 100  # concurrent requests per way before switching to the other
Timed = Callable[[aiohttp.ClientSession, str], Coroutine[Any, Any, float]]


def start_daemon(workdir: Path, model: Path) -> Node:
    body = f'[[default_models]]\nmodel_id = "{MODEL}"\npath = "{model}"\nn_ctx = 256\n'
    # Activation takes ~1 s; polled, not waited out.
    return start_node(workdir, body, ready=f"/models/{MODEL}/endpoint", log_level="warning",
                      env=clean_env(), poll_s=0.02)


def endpoint(router: str) -> str:
    with urllib.request.urlopen(f"{router}/models/{MODEL}/endpoint", timeout=5) as resp:
        return str(json.load(resp)["url"])


async def chat(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, data=CHAT_BYTES, headers=HEADERS) as resp:
        await resp.read()
    elapsed = time.perf_counter() - started
    if resp.status != 200:
        raise RuntimeError(f"{url}: {resp.status}")
    return elapsed


async def first_chunk(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, data=STREAM_BYTES, headers=HEADERS) as resp:
        await resp.content.readuntil(b"\n\n")
        elapsed = time.perf_counter() - started
        await resp.read()  # the rest, so the connection goes back to the pool
    if resp.status != 200:
        raise RuntimeError(f"{url}: {resp.status}")
    return elapsed


CHAT_BYTES = json.dumps(CHAT).encode()
STREAM_BYTES = json.dumps(STREAM).encode()


async def interleaved(
    timed: Timed, sessions: dict[str, aiohttp.ClientSession], urls: dict[str, str], n: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"direct": [], "router": []}
    order = ["direct", "router"]
    for _ in range(n):
        for way in order:
            samples[way].append(await timed(sessions[way], urls[way]))
        order.reverse()
    return samples


async def concurrent(
    session: aiohttp.ClientSession, url: str, n: int, concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    remaining = n

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await chat(session, url))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def measure(urls: dict[str, str], args: argparse.Namespace) -> list[dict[str, float]]:
    connector = {"limit": 0, "keepalive_timeout": 4.0}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector)) as direct,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector)) as routed,
    ):
        sessions = {"direct": direct, "router": routed}
        await interleaved(chat, sessions, urls, 50)  # warm-up: connections, caches
        await interleaved(first_chunk, sessions, urls, 10)
        rounds = []
        order = ["direct", "router"]
        for i in range(args.rounds):
            row: dict[str, float] = {}
            seq = await interleaved(chat, sessions, urls, args.requests)
            for way in order:
                row[f"{way} seq p50"] = 1000 * pct(seq[way], 0.5)
                row[f"{way} seq p99"] = 1000 * pct(seq[way], 0.99)
                row[f"{way} seq rps"] = len(seq[way]) / sum(seq[way])
            latencies: dict[str, list[float]] = {"direct": [], "router": []}
            walls = {"direct": 0.0, "router": 0.0}
            for _ in range(args.requests * 4 // SLICE):
                for way in order:
                    lat, wall = await concurrent(
                        sessions[way], urls[way], SLICE, args.concurrency
                    )
                    latencies[way] += lat
                    walls[way] += wall
                order.reverse()
            for way in latencies:
                row[f"{way} c p50"] = 1000 * pct(latencies[way], 0.5)
                row[f"{way} c p99"] = 1000 * pct(latencies[way], 0.99)
                row[f"{way} c rps"] = len(latencies[way]) / walls[way]
            ttfc = await interleaved(first_chunk, sessions, urls, args.requests // 4)
            for way in order:
                row[f"{way} ttfc p50"] = 1000 * pct(ttfc[way], 0.5)
            rounds.append(row)
            print(f"round {i + 1}/{args.rounds}: added p50 "
                  f"{row['router seq p50'] - row['direct seq p50']:+.3f} ms, c={args.concurrency} "
                  f"ratio {row['router c rps'] / row['direct c rps']:.3f}, first chunk added "
                  f"{row['router ttfc p50'] - row['direct ttfc p50']:+.3f} ms", flush=True)
        return rounds


def report(rounds: list[dict[str, float]], args: argparse.Namespace) -> None:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def added(key: str) -> float:
        return statistics.median(r[f"router {key}"] - r[f"direct {key}"] for r in rounds)

    def ratio(key: str) -> float:
        return statistics.median(r[f"router {key}"] / r[f"direct {key}"] for r in rounds)

    c = args.concurrency
    print(f"\nmedians of {args.rounds} rounds; per way and round: {args.requests} sequential "
          f"requests, {args.requests * 4 // SLICE * SLICE} at concurrency {c}, "
          f"{args.requests // 4} streamed")
    print(f"{'':26}{'direct':>10}{'router':>10}{'router - direct':>18}")
    lines = [
        ("sequential p50 (ms)", "seq p50"), ("sequential p99 (ms)", "seq p99"),
        (f"concurrency {c} p50 (ms)", "c p50"), (f"concurrency {c} p99 (ms)", "c p99"),
        ("first chunk p50 (ms)", "ttfc p50"),
    ]
    for label, key in lines:
        print(f"{label:26}{med('direct ' + key):10.3f}{med('router ' + key):10.3f}"
              f"{added(key):+18.3f}")
    print(f"{'':26}{'direct':>10}{'router':>10}{'router / direct':>18}")
    for label, key in (("sequential req/s", "seq rps"), (f"concurrency {c} req/s", "c rps")):
        print(f"{label:26}{med('direct ' + key):10.1f}{med('router ' + key):10.1f}"
              f"{ratio(key):18.3f}")
    checks = [
        ("added p50 (sequential)", added("seq p50"), "<=", 1.0, "ms"),
        (f"throughput ratio at concurrency {c}", ratio("c rps"), ">=", 0.90, ""),
        ("first chunk added (p50)", added("ttfc p50"), "<=", 2.0, "ms"),
    ]
    for name, value, op, target, unit in checks:
        ok = value <= target if op == "<=" else value >= target
        print(f"{name}: {value:.3f}{unit} (target {op} {target:g}{unit}) "
              f"{'met' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = write_tiny_gguf(workdir / "tiny.gguf")
        node = start_daemon(workdir, model)
        try:
            urls = {
                "direct": endpoint(node.url) + "/v1/chat/completions",
                "router": node.url + "/v1/chat/completions",
            }
            rounds = asyncio.run(measure(urls, args))
        finally:
            node.stop()
        report(rounds, args)


if __name__ == "__main__":
    main()
