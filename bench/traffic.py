"""Real traffic through the node against the same worker directly, side by side in one run.

For each model (the tiny test GGUF, and Gemma 3 270M when the demo extra is installed) and
each worker kind (llama-cpp-python; llama-server with parallel 1 and 4, when a
`llama-server` binary is on PATH or in .cache/llama-server/bin), one `neuronctl start`
serves the model; at concurrency 1, 4, 8 and 16, a batch of streamed completions goes to
the worker's own port and the same batch through the node's /v1, the order flipping at
each level. Printed per level: aggregate completion tokens/s both ways and their ratio
(target >= 0.95), p50/p99 time to first token both ways, and the share of streams that
completed with a finish_reason (target 100%). Then llama-server parallel 4 against 1 at
concurrency 8 (target >= 1.5x). Temperature 0 and one prompt per request index, so both
ways generate the same tokens.

    .venv/bin/python bench/traffic.py [--quick] [--max-tokens 32] [--models tiny,gemma]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from _common import Node, demo_model, find_llama_server, pct, start_node, write_tiny_gguf


@dataclass
class Batch:
    tokens: int
    wall_s: float
    ttft_s: list[float]
    completed: int
    sent: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


async def one_stream(session: aiohttp.ClientSession, url: str, model: str, i: int,
                     max_tokens: int) -> tuple[int, float | None, bool]:
    body = {"model": model, "prompt": f"Story number {i}: once upon a time",
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.monotonic()
    first: float | None = None
    tokens, finished = 0, False
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return 0, None, False
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if choice.get("text"):
                tokens += 1
                if first is None:
                    first = time.monotonic() - started
            if choice.get("finish_reason"):
                finished = True
    return tokens, first, finished


async def batch(url: str, model: str, concurrency: int, requests: int,
                max_tokens: int, way: str = "warm-up") -> Batch:
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def run(i: int) -> tuple[int, float | None, bool]:
            async with gate:
                try:
                    return await one_stream(session, url, model, i, max_tokens)
                except aiohttp.ClientError as exc:  # counted as not completed
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return 0, None, False

        started = time.monotonic()
        results = await asyncio.gather(*(run(i) for i in range(requests)))
        wall = time.monotonic() - started
    for error in sorted(set(errors)):
        print(f"  {way}, concurrency {concurrency}: {errors.count(error)} x {error}")
    return Batch(sum(r[0] for r in results), wall, [r[1] for r in results if r[1] is not None],
                 sum(r[2] for r in results), requests)


def start(workdir: Path, model_path: Path, harness: str, parallel: int,
          llama_server: str | None, entry_extra: str = "") -> tuple[Node, str]:
    """A node serving the model as `m` (`entry_extra`: more keys of its entry, such as
    `devices`); back with it and the worker's own URL once the model is loaded."""
    table = f'\n[harness.llama-server]\nbinary = "{llama_server}"\n' if llama_server else ""
    entry = (f'[[default_models]]\nmodel_id = "m"\npath = "{model_path}"\nn_ctx = 1024\n'
             f'harness = "{harness}"\n' + (f"parallel = {parallel}\n" if parallel > 1 else "")
             + entry_extra)
    endpoint: list[str] = []

    def loaded(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/models", timeout=2) as resp:
                models = json.load(resp)
        except OSError:
            return False
        if models and models[0]["status"] == "failed":
            raise RuntimeError(models[0]["error"])
        if models and models[0]["status"] == "loaded":
            endpoint.append(models[0]["endpoint"])
        return bool(endpoint)

    node = start_node(workdir, f"max_queue = 256\n{table}{entry}", ready=loaded,
                      log_level="warning", poll_s=0.1)
    return node, endpoint[0]


Results = dict[int, tuple[Batch, Batch]]  # concurrency -> (direct, through the node)


async def measure(model_path: Path, harness: str, parallel: int, llama_server: str | None,
                  levels: list[int], max_tokens: int, quick: bool,
                  entry_extra: str = "") -> Results:
    with tempfile.TemporaryDirectory() as tmp:
        node, direct_url = start(Path(tmp), model_path, harness, parallel, llama_server,
                                 entry_extra)
        node_url, model = node.url, "m"
        try:
            await batch(direct_url, model, 1, 2, 4)  # warm both paths
            await batch(node_url, model, 1, 2, 4)
            out: Results = {}
            for n, level in enumerate(levels):
                requests = max(4 if quick else 8, 2 * level)
                order = ("direct", "node") if n % 2 == 0 else ("node", "direct")
                got: dict[str, Batch] = {}
                for way in order:
                    url = direct_url if way == "direct" else node_url
                    got[way] = await batch(url, model, level, requests, max_tokens, way)
                out[level] = (got["direct"], got["node"])
            return out
        finally:
            node.stop(60)


def report(name: str, results: Results) -> None:
    print(f"\n{name}")
    print(f"{'conc':>4} {'direct tok/s':>12} {'node tok/s':>10} {'ratio':>6} "
          f"{'ttft p50 d/n ms':>16} {'ttft p99 d/n ms':>16} {'complete d/n':>12}")
    for level, (direct, node) in results.items():
        ratio = node.tokens_per_s / direct.tokens_per_s if direct.tokens_per_s else float("nan")
        done = f"{direct.completed / direct.sent:.0%}/{node.completed / node.sent:.0%}"
        print(f"{level:>4} {direct.tokens_per_s:>12.1f} {node.tokens_per_s:>10.1f} {ratio:>6.3f} "
              f"{pct(direct.ttft_s, .5) * 1e3:>7.0f}/{pct(node.ttft_s, .5) * 1e3:<8.0f} "
              f"{pct(direct.ttft_s, .99) * 1e3:>7.0f}/{pct(node.ttft_s, .99) * 1e3:<8.0f} "
              f"{done:>12}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,gemma")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="levels 1 and 8, fewer requests")
    args = parser.parse_args()
    levels = [1, 8] if args.quick else [1, 4, 8, 16]
    models: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "tiny" in args.models:
            models["tiny"] = write_tiny_gguf(Path(tmp) / "tiny.gguf")
        if "gemma" in args.models:
            gemma = demo_model()
            if gemma is None:
                print("gemma: skipped (pip install -e '.[demo]', or make demo, first)")
            else:
                models["gemma-3-270m"] = gemma
        llama_server = find_llama_server()
        kinds: list[tuple[str, str, int]] = [("llama-cpp-python", "llama-cpp-python", 1)]
        if llama_server:
            kinds += [("llama-server parallel 1", "llama-server", 1),
                      ("llama-server parallel 4", "llama-server", 4)]
        else:
            print("llama-server: not found (bash .ci/llama-server.sh builds it); skipped")
        summary: list[str] = []
        for model_name, path in models.items():
            by_kind: dict[str, Results] = {}
            for kind, harness, parallel in kinds:
                results = await measure(path, harness, parallel, llama_server, levels,
                                        args.max_tokens, args.quick)
                by_kind[kind] = results
                report(f"{model_name}, {kind}", results)
                ratios = [n.tokens_per_s / d.tokens_per_s for d, n in results.values()
                          if d.tokens_per_s]
                lost = {way: sum(pair[i].sent - pair[i].completed for pair in results.values())
                        for i, way in enumerate(("direct", "node"))}
                summary.append(f"{model_name}, {kind}: node/direct tok/s min "
                               f"{min(ratios):.3f} median {statistics.median(ratios):.3f} "
                               f"(target >= 0.95); streams not completed: direct "
                               f"{lost['direct']}, through the node {lost['node']}")
            p1 = by_kind.get("llama-server parallel 1", {}).get(8)
            p4 = by_kind.get("llama-server parallel 4", {}).get(8)
            if p1 and p4 and p1[1].tokens_per_s:
                summary.append(f"{model_name}: llama-server parallel 4 / parallel 1 at "
                               f"concurrency 8, through the node: "
                               f"{p4[1].tokens_per_s / p1[1].tokens_per_s:.2f}x (target >= 1.5x)")
    print("\nsummary")
    for line in summary:
        print("  " + line)


if __name__ == "__main__":
    asyncio.run(main())
