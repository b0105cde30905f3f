"""Side by side with llama.cpp's own router: `llama-server --models-dir DIR --models-max 1`
and `neuronctl start` (`max_loaded_models = 1`) on the same GGUF files, with the same
`llama-server` binary as their workers, each with its own default settings otherwise. One
run measures every row and prints one table with the ratio node/router:

* added latency of a small request (max_tokens 1), p50 and p99, through each against its
  own worker asked directly (the router's child by the port its `/models` lists), and the
  CPU each side's own process spent per such request (steadier than latencies here);
* first answer from an unloaded model (the tiny model, unloaded through each API first);
* A/B/A/B swaps with one model resident: each request evicts the other model;
* the first token of a returning ~1,500-token conversation after its model was swapped
  out and back (Gemma 3 270M): the router, the node with `prompt_cache = false` and with
  `prompt_cache = true` (a row of "n/a" where this build has no such key);
* 8 concurrent streams to one model (Gemma 3 270M, 64 tokens each, 16 requests), each side
  with its defaults (4 slots): tokens/s and streams completed;
* a stream in flight when a request for another model forces an eviction: does it finish,
  and how long did the other request wait;
* a hung worker (SIGSTOP): how long until requests are served again (the router's child
  is never replaced: given up after --hung-wait-s).

Requests alternate between the two sides step by step, so machine noise hits both alike.
Lower is better except tokens/s; the targets are issue 22's. The Gemma rows need the demo
model (`make demo` assembles it); without it they say so.

    .venv/bin/python bench/peers.py [--quick] [--binary PATH] [--hung-wait-s 60]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    ENV,
    BenchError,
    demo_model,
    free_port,
    pct,
    running_node,
    stop,
    wait_for,
    write_tiny_gguf,
)

from neuronctl.config import ConfigError, model_spec_from_mapping
from neuronctl.supervisor.harness import cpu_has_amx

DEFAULT_BINARY = Path("/work/main/.cache/llama-server/bin/llama-server")
REQUEST_TIMEOUT_S = 300.0


# --- HTTP, the same for both sides -----------------------------------------------------


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    host, _, port = url.removeprefix("http://").partition(":")
    return http.client.HTTPConnection(host, int(port.split("/")[0]), timeout=timeout)


def call(url: str, method: str, path: str, body: Any = None,
         timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, Any]:
    """(status, parsed JSON or None), on a fresh connection."""
    conn = _connection(url, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Host": "127.0.0.1"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


def complete(url: str, model: str, prompt: str = "a", max_tokens: int = 8,
             timeout: float = REQUEST_TIMEOUT_S, **extra: Any) -> float:
    """Seconds to a whole non-streamed completion; BenchError unless it is a 200."""
    started = time.perf_counter()
    status, answer = call(url, "POST", "/v1/completions",
                          {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                           **extra}, timeout)
    took = time.perf_counter() - started
    if status != 200:
        raise BenchError(f"{url} {model}: {status} {str(answer)[:300]}")
    return took


@dataclass
class Streamed:
    first_token_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    finish: str | None = None
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish is not None


def stream(url: str, model: str, prompt: str, max_tokens: int,
           timeout: float = REQUEST_TIMEOUT_S,
           on_first: Callable[[], None] | None = None, **extra: Any) -> Streamed:
    """A streamed completion: when its first token came, how many, how it ended."""
    result = Streamed()
    started = time.perf_counter()
    conn = _connection(url, timeout)
    try:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                           "stream": True, **extra}).encode()
        conn.request("POST", "/v1/completions", body,
                     {"Host": "127.0.0.1", "Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            result.error = f"{resp.status} {resp.read()[:200]!r}"
            return result
        while line := resp.readline():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = str(event["error"])[:200]
                break
            choice = (event.get("choices") or [{}])[0]
            if choice.get("text"):
                result.tokens += 1
                if result.first_token_s is None:
                    result.first_token_s = time.perf_counter() - started
                    if on_first is not None:
                        on_first()
            result.finish = choice.get("finish_reason") or result.finish
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        result.total_s = time.perf_counter() - started
    return result


# --- the two sides -----------------------------------------------------------------------


@dataclass
class Side:
    name: str
    url: str
    process: subprocess.Popen[bytes]

    def unload(self, model: str) -> None:
        raise NotImplementedError

    def worker(self, model: str) -> tuple[str, int]:
        """(its worker's URL, the worker's pid), the model loaded."""
        raise NotImplementedError


@dataclass
class Router(Side):
    def _entries(self) -> list[dict[str, Any]]:
        status, answer = call(self.url, "GET", "/models", timeout=10)
        if status != 200 or not isinstance(answer, dict):
            raise BenchError(f"router /models: {status} {answer}")
        return list(answer["data"])

    def _status(self, model: str) -> dict[str, Any]:
        return next(e["status"] for e in self._entries() if e["id"] == model)

    def _children(self, model: str) -> list[Any]:
        import psutil

        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                args = child.cmdline()
                if "--alias" in args and args[args.index("--alias") + 1] == model:
                    found.append(child)
        return found

    def unload(self, model: str) -> None:
        """Unloaded, and its child gone: the router says `unloaded` while the child may
        still be exiting, which would load the machine during the other side's next step
        (the node's unload returns once its worker has exited)."""
        import psutil

        if self._status(model)["value"] == "unloaded" and not self._children(model):
            return
        children = self._children(model)
        call(self.url, "POST", "/models/unload", {"model": model}, timeout=30)
        deadline = time.monotonic() + 60
        while self._status(model)["value"] != "unloaded":
            if time.monotonic() > deadline:
                raise BenchError(f"router: {model} not unloaded within 60 s")
            time.sleep(0.005)
        _, alive = psutil.wait_procs(children, timeout=30)
        if alive:
            raise BenchError(f"router: {model}'s child outlived its unload by 30 s")

    def worker(self, model: str) -> tuple[str, int]:
        status = self._status(model)
        if status["value"] != "loaded":
            raise BenchError(f"router: {model} is {status['value']}")
        args = status["args"]
        port = int(args[args.index("--port") + 1])
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if f"127.0.0.1:{port}" in {f"{c.laddr.ip}:{c.laddr.port}"
                                           for c in child.net_connections("tcp")}:
                    return f"http://127.0.0.1:{port}", child.pid
        raise BenchError(f"router: no child listens on port {port}")


@dataclass
class Node(Side):
    def _entry(self, model: str) -> dict[str, Any]:
        status, answer = call(self.url, "GET", "/models", timeout=10)
        if status != 200 or not isinstance(answer, list):
            raise BenchError(f"node /models: {status} {answer}")
        return next(e for e in answer if e["id"] == model)

    def unload(self, model: str) -> None:
        if self._entry(model)["status"] == "unloaded":
            return
        status, answer = call(self.url, "POST", "/models/unload", {"model_id": model}, 60)
        if status != 200:
            raise BenchError(f"node: unload {model}: {status} {answer}")

    def worker(self, model: str) -> tuple[str, int]:
        entry = self._entry(model)
        if entry["status"] != "loaded":
            raise BenchError(f"node: {model} is {entry['status']}")
        return entry["endpoint"], int(entry["pid"])


# --- the rows ------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    router: str
    node: str
    ratio: str
    target: str
    notes: list[str] = field(default_factory=list)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio(node: float, router: float) -> str:
    return f"{node / router:.2f}x" if router > 0 else "n/a"


def alternate(sides: list[Side], steps: int, step: Callable[[Side, int], float]
              ) -> dict[str, list[float]]:
    """`step(side, i)` for every side at each step, the order turning each step."""
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for i in range(steps):
        order = sides if i % 2 == 0 else list(reversed(sides))
        for side in order:
            times[side.name].append(step(side, i))
    return times


def added_latency(router: Router, node: Node, n: int) -> list[Row]:
    for side in (router, node):
        complete(side.url, "tinya", max_tokens=1)
    direct = {side.name: side.worker("tinya")[0] for side in (router, node)}
    targets = [("router", router.url), ("router direct", direct["router"]),
               ("node", node.url), ("node direct", direct["node"])]
    for _, url in targets:  # warm: keep-alive pools, the workers' first answers
        for _ in range(3):
            complete(url, "tinya", max_tokens=1)
    times: dict[str, list[float]] = {name: [] for name, _ in targets}
    # The CPU each side's own process spends on them (its workers not counted): steadier
    # than the latencies on a shared host, where one wakeup can cost a millisecond.
    cpu_before = {side.name: _cpu_s(side) for side in (router, node)}
    for i in range(n):
        for name, url in (targets if i % 2 == 0 else list(reversed(targets))):
            times[name].append(complete(url, "tinya", max_tokens=1))
    cpu = {side.name: (_cpu_s(side) - cpu_before[side.name]) / n for side in (router, node)}
    rows = [Row(f"CPU of the router's / node's own process per small request ({n} each)",
                ms(cpu["router"]), ms(cpu["node"]), ratio(cpu["node"], cpu["router"]),
                "<= 1.00x")]
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        r = pct(times["router"], q) - pct(times["router direct"], q)
        nd = pct(times["node"], q) - pct(times["node direct"], q)
        rows.append(Row(f"added latency of a small request, {label} (over the worker "
                        f"direct; {n} each)", ms(r), ms(nd), ratio(nd, r),
                        "<= router's (<= 1.00x)"))
    return rows


def _cpu_s(side: Side) -> float:
    import psutil

    times = psutil.Process(side.process.pid).cpu_times()
    return float(times.user + times.system)


def first_answer(router: Router, node: Node, rounds: int) -> Row:
    def step(side: Side, _: int) -> float:
        side.unload("tinya")
        side.unload("tinyb")
        return complete(side.url, "tinya", max_tokens=8)

    times = alternate([router, node], rounds, step)
    r, n = statistics.median(times["router"]), statistics.median(times["node"])
    return Row(f"first answer from an unloaded model (tiny, median of {rounds})", ms(r),
               ms(n), ratio(n, r), "<= 1.00x")


def swaps(router: Router, node: Node, count: int) -> Row:
    for side in (router, node):
        complete(side.url, "tinya", max_tokens=8)

    def step(side: Side, i: int) -> float:
        return complete(side.url, "tinyb" if i % 2 == 0 else "tinya", max_tokens=8)

    times = alternate([router, node], count, step)
    r, n = statistics.median(times["router"]), statistics.median(times["node"])
    return Row(f"A/B swap, one model resident (tiny, request to answer, median of {count})",
               ms(r), ms(n), ratio(n, r), "<= 1.00x")


def swaps_with_cache(node: Node, count: int) -> Row:
    """The node alone: A/B swaps of models whose prompt cache is on (tinya, tinyb: each
    swap saves the evicted one's slots and restores the other's) against swaps of the same
    files with it off (tinyc, tinyd), interleaved."""
    pairs = {"on": ("tinya", "tinyb"), "off": ("tinyc", "tinyd")}
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(count):
        for kind in (("on", "off") if i % 2 == 0 else ("off", "on")):
            a, b = pairs[kind]
            complete(node.url, a, max_tokens=8)  # resident, its slot holding a prompt
            times[kind].append(complete(node.url, b, max_tokens=8))
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return Row(f"A/B swap on the node, prompt cache on vs off (tiny, median of {count})",
               "n/a (no prompt cache)", f"{ms(on)} on; {ms(off)} off",
               f"{on / off:.2f}x (on/off)", "<= 1.10x (on/off)")


def long_prompt(tokens: int = 1500) -> str:
    """About `tokens` Gemma tokens of plain prose, the same every run."""
    words = ["the", "river", "ran", "past", "the", "old", "mill", "where", "the", "miller",
             "kept", "his", "ledgers", "of", "grain", "and", "flour", "sold", "to", "the",
             "village", "every", "autumn"]
    out, i = [], 0
    while len(out) < tokens * 3 // 4:
        out.append(words[i % len(words)] + ("." if i % 17 == 16 else ""))
        i += 1
    return " ".join(out)


def returning_conversation(router: Router, node: Node, cache: bool, rounds: int) -> Row:
    """A long prompt answered, its model swapped out and back, then the same conversation
    one turn on: the first token of that answer."""
    prompt = long_prompt()
    variants: list[tuple[Side, str, str]] = [(router, "gemma", "router")]
    variants.append((node, "gemma-nocache", "node, prompt_cache = false"))
    if cache:
        variants.append((node, "gemma-cache", "node, prompt_cache = true"))
    results: dict[str, list[float]] = {label: [] for _, _, label in variants}
    prefill: dict[str, list[float]] = {label: [] for _, _, label in variants}
    for r in range(rounds):
        for side, model, label in (variants if r % 2 == 0 else list(reversed(variants))):
            side.unload(model)
            first = stream(side.url, model, prompt, 1)
            if not first.completed or first.first_token_s is None:
                raise BenchError(f"{label}: the long prompt failed: {first.error}")
            prefill[label].append(first.first_token_s)
            complete(side.url, "tinyb", max_tokens=1)  # swapped out
            back = stream(side.url, model, prompt + " and then", 8)
            if not back.completed or back.first_token_s is None:
                raise BenchError(f"{label}: the returning request failed: {back.error}")
            results[label].append(back.first_token_s)
    r_s = statistics.median(results["router"])
    off = statistics.median(results["node, prompt_cache = false"])
    notes = ["cold prefill of the prompt (first time): "
             + ", ".join(f"{label} {ms(statistics.median(v))}" for label, v in prefill.items())]
    if cache:
        on = statistics.median(results["node, prompt_cache = true"])
        node_text = f"{ms(on)} (cache on); {ms(off)} (cache off)"
        notes.append(f"cache on / cache off: {on / off:.2f}x (target <= 0.25x)")
        return Row(f"first token of a returning ~1,500-token conversation after a swap "
                   f"(Gemma 3 270M, median of {rounds})", ms(r_s), node_text,
                   f"{ratio(on, r_s)} (cache on); {ratio(off, r_s)} (off)",
                   "<= 0.25x (cache on)", notes)
    return Row(f"first token of a returning ~1,500-token conversation after a swap "
               f"(Gemma 3 270M, median of {rounds})", ms(r_s),
               f"{ms(off)}; with prompt_cache: n/a (no prompt_cache in this build)",
               f"{ratio(off, r_s)} (no cache)", "<= 0.25x (cache on)", notes)


def concurrent(router: Router, node: Node, requests: int, width: int = 8,
               tokens: int = 64) -> list[Row]:
    """`requests` streams of `tokens` tokens, `width` at a time, to one model."""
    def run(side: Side, model: str) -> tuple[float, int, int]:
        complete(side.url, model, max_tokens=4)  # loaded and warm
        results: list[Streamed] = []
        lock = threading.Lock()
        todo = list(range(requests))

        def client() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                got = stream(side.url, model, f"Story number {i}: once upon a time", tokens,
                             ignore_eos=True)
                with lock:
                    results.append(got)

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(width)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        return (sum(r.tokens for r in results) / wall, sum(r.completed for r in results),
                len(results))

    router_tps, router_done, total = run(router, "gemma")
    node_tps, node_done, _ = run(node, "gemma")
    router_tps2, router_done2, _ = run(router, "gemma")  # the router again: the noise
    router_tps = (router_tps + router_tps2) / 2
    return [
        Row(f"{width} concurrent streams, one model, defaults (Gemma 3 270M, {requests} x "
            f"{tokens} tokens): tokens/s", f"{router_tps:.1f}", f"{node_tps:.1f}",
            ratio(node_tps, router_tps), ">= 0.95x",
            [f"router runs before and after the node, averaged ({router_tps2:.1f} after)"]),
        Row("  streams completed", f"{router_done + router_done2}/{2 * total}",
            f"{node_done}/{total}", "", "all"),
    ]


def stream_during_eviction(router: Router, node: Node) -> list[Row]:
    out: dict[str, tuple[Streamed, float | None]] = {}
    for side in (router, node):
        side.unload("tinyb")
        complete(side.url, "tinya", max_tokens=1)
        other: list[float] = []
        started_other = threading.Event()

        def evict(side: Side = side, other: list[float] = other,
                  started_other: threading.Event = started_other) -> None:
            started_other.set()
            other.append(complete(side.url, "tinyb", max_tokens=4))

        thread = threading.Thread(target=evict)
        got = stream(side.url, "tinya", "a", 200, ignore_eos=True,
                     on_first=thread.start)
        if started_other.is_set():
            thread.join(REQUEST_TIMEOUT_S)
        out[side.name] = (got, other[0] if other else None)

    def said(got: Streamed, other: float | None) -> str:
        done = (f"finished ({got.tokens} tokens)" if got.completed
                else f"cut after {got.tokens} tokens ({got.error})")
        waited = f"; the other model answered after {ms(other)}" if other else ""
        return done + waited

    return [Row("a stream in flight when another model's request forces an eviction",
                said(*out["router"]), said(*out["node"]), "", "finishes")]


def hung_worker(router: Router, node: Node, give_up_s: float) -> Row:
    took: dict[str, float | None] = {}
    for side in (node, router):  # the router last: its stopped child stays until killed
        complete(side.url, "tinya", max_tokens=1)
        _, pid = side.worker("tinya")
        os.kill(pid, signal.SIGSTOP)
        started = time.perf_counter()
        took[side.name] = None
        try:
            while time.perf_counter() - started < give_up_s:
                try:
                    complete(side.url, "tinya", max_tokens=1,
                             timeout=max(1.0, min(5.0, give_up_s
                                                  - (time.perf_counter() - started))))
                except (OSError, BenchError, http.client.HTTPException):
                    continue
                took[side.name] = time.perf_counter() - started
                break
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # SIGCONT would let it answer late

    def said(t: float | None) -> str:
        return f"{t:.1f} s" if t is not None else f"never (not within {give_up_s:g} s)"

    r, n = took["router"], took["node"]
    return Row("a hung (SIGSTOP) worker: until requests are served again", said(r), said(n),
               ratio(n, r) if r and n else ("node only" if n else "neither"), "<= 15 s")


# --- running it ----------------------------------------------------------------------------


def prompt_cache_supported() -> bool:
    try:
        model_spec_from_mapping({"model_id": "x", "path": "/x.gguf", "prompt_cache": True,
                                 "harness": "llama-server"})
    except ConfigError:
        return False
    return True


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
            f"load average {load} at the start")


@contextlib.contextmanager
def running_router(home: Path, binary: Path, models_dir: Path) -> Iterator[Router]:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "router.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(binary), "--models-dir", str(models_dir), "--models-max", "1",
             "--host", "127.0.0.1", "--port", str(port),
             # What the node's harness adds on AMX CPUs, where Gemma's worker crashes
             # without it (harness.cpu_has_amx); the router passes it to its children.
             *(["--no-repack"] if cpu_has_amx() else [])],
            stdout=out, stderr=subprocess.STDOUT, env=dict(ENV), start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/models", proc, log, timeout=60)
        yield Router("router", f"http://127.0.0.1:{port}", proc)
    finally:
        stop(proc)


def node_body(binary: Path, files: dict[str, Path], cache: bool) -> str:
    body = (f"max_loaded_models = 1\n\n[harness.llama-server]\nbinary = \"{binary}\"\n")
    for model_id, path in files.items():
        body += (f"\n[[models]]\nmodel_id = \"{model_id}\"\nharness = \"llama-server\"\n"
                 f"path = \"{path}\"\n")
        if model_id.startswith("gemma-") and cache:
            body += f"prompt_cache = {'true' if model_id == 'gemma-cache' else 'false'}\n"
        if model_id in ("tinyc", "tinyd"):
            body += "prompt_cache = false\n"
    return body


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| row | router | node | node/router | target |",
             "|---|---|---|---|---|"]
    notes = []
    for row in rows:
        lines.append(f"| {row.name} | {row.router} | {row.node} | {row.ratio} | {row.target} |")
        notes += [f"* {row.name.strip()}: {note}" for note in row.notes]
    return "\n".join(lines + (["", *notes] if notes else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds, and the Gemma rows once")
    parser.add_argument("--binary", type=Path,
                        default=Path(shutil.which("llama-server") or DEFAULT_BINARY))
    parser.add_argument("--hung-wait-s", type=float, default=None,
                        help="how long to wait for a hung worker's model to serve again "
                             "(60 s; 30 with --quick)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in this folder and keep it (the logs of both sides)")
    parser.add_argument("--only", default=None,
                        help="comma-separated row names to run (added,first,swaps,cacheswaps,"
                             "eviction,returning,concurrent,hung); all by default")
    args = parser.parse_args()
    if not args.binary.is_file():
        print(f"peers: no llama-server at {args.binary} (bash .ci/llama-server.sh builds "
              f"one; or --binary PATH)", file=sys.stderr)
        return 2
    quick = args.quick
    hung_wait = args.hung_wait_s or (30.0 if quick else 60.0)
    cache = prompt_cache_supported()
    gemma = demo_model()
    header = (f"bench/peers.py{' --quick' if quick else ''}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"{machine()}; llama-server {args.binary}")
    rows: list[Row] = []
    with contextlib.ExitStack() as cleanup:
        if args.keep is not None:
            home = args.keep.resolve()
            home.mkdir(parents=True, exist_ok=False)
        else:
            home = Path(cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="neuron-peers-")))
        models = home / "models"
        models.mkdir()
        tiny = write_tiny_gguf(home / "tiny.gguf")
        files = {"tinya": models / "tinya.gguf", "tinyb": models / "tinyb.gguf"}
        for path in files.values():
            shutil.copyfile(tiny, path)  # two files: two models for both sides
        node_files = dict(files)
        if cache:  # the same two files again, with the node's prompt cache off
            node_files.update(tinyc=files["tinya"], tinyd=files["tinyb"])
        if gemma is not None:
            (models / "gemma.gguf").symlink_to(gemma)
            node_files["gemma"] = gemma
            node_files["gemma-nocache"] = gemma
            if cache:
                node_files["gemma-cache"] = gemma
        with running_router(home / "router", args.binary, models) as router, \
                running_node(home / "node", node_body(args.binary, node_files, cache)) as n:
            node = Node("node", n.url, n.process)
            print(header, flush=True)
            steps: list[tuple[str, Callable[[], list[Row]]]] = [
                ("added", lambda: added_latency(router, node, 30 if quick else 200)),
                ("first", lambda: [first_answer(router, node, 3 if quick else 10)]),
                ("swaps", lambda: [swaps(router, node, 6 if quick else 20)]),
            ]
            if cache:
                steps.append(("cacheswaps",
                              lambda: [swaps_with_cache(node, 6 if quick else 20)]))
            steps += [
                ("eviction", lambda: stream_during_eviction(router, node)),
            ]
            if gemma is not None:
                steps += [
                    ("returning",
                     lambda: [returning_conversation(router, node, cache, 1 if quick else 2)]),
                    ("concurrent", lambda: concurrent(router, node, 8 if quick else 16)),
                ]
            else:
                rows.append(Row("Gemma 3 270M rows", "skipped", "skipped", "",
                                "", ["no demo model: `make demo` assembles it"]))
            steps.append(("hung", lambda: [hung_worker(router, node, hung_wait)]))
            only = set(args.only.split(",")) if args.only else None
            for name, run in steps:
                if only is not None and name not in only:
                    continue
                started = time.perf_counter()
                got = run()
                rows += got
                print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
