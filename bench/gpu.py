"""A GPU node measured end to end: tokens/s direct against through the node, the VRAM
estimate against what nvidia-smi reports, and A/B swaps, on a generated llama-architecture
GGUF large enough to matter (random weights: speed and memory do not depend on their values).

bench/gpu.sh builds a CUDA `llama-server` and runs this after `pytest -m cuda`. With `--cpu`
the same rows run on the CPU (a smaller model, no nvidia-smi), so the script is known to
work on a machine without a GPU.

1. Traffic: one node serving the model (`devices = [0]` on a GPU, 4 slots); at concurrency
   1, 4 and 8 a batch of streamed completions to the worker's own port and the same batch
   through the node's /v1 (bench/traffic.py's measurement). Target: node/direct >= 0.95.
2. VRAM: after the load, the node's estimate (weights + KV cache, models/vram.py) against
   what nvidia-smi lists for the worker's pid (the CUDA context and compute buffers come on
   top of the estimate, so it should be a floor) and against the node's `vram_used_mb`.
3. Swaps: `max_loaded_models = 1`, two catalogue models (two files of the same shape),
   requests alternating A, B, A, B: each evicts the other model and loads its own; time per
   swap (request to answer) and evictions counted by the node's /metrics.

    python bench/gpu.py [--cpu] [--llama-server BIN] [--swaps 6] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import BenchError, find_llama_server, pct, running_node
from traffic import measure, report

from neuronctl.models import gguf, vram
from tests.tiny_gguf import write_llama_gguf

# On a GPU: ~1.6 GiB of f16 weights (as tests/test_cuda.py). On the CPU: ~50 MB.
GPU_SHAPE = {"n_layers": 16, "n_embd": 2048, "n_head": 16, "n_ff": 5632}
CPU_SHAPE = {"n_layers": 8, "n_embd": 512, "n_head": 8, "n_ff": 1408}
N_CTX = 2048
REQUEST_TIMEOUT_S = 300.0


def smi_apps() -> dict[int, int]:
    """pid -> MiB for every compute process; empty without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return {}
    proc = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                           "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30, check=False)
    apps: dict[int, int] = {}
    for line in proc.stdout.splitlines():
        pid, _, used = (cell.strip() for cell in line.partition(","))
        if pid.isdigit() and used.isdigit():
            apps[int(pid)] = int(used)
    return apps


def call(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        return json.loads(resp.read())


def evictions(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("neuron_model_evictions_total"))


def swaps_and_vram(models: dict[str, Path], llama_server: str, on_gpu: bool,
                   swaps: int) -> list[str]:
    devices = "devices = [0]\n" if on_gpu else ""
    entries = "".join(
        f'[[models]]\nmodel_id = "{name}"\nharness = "llama-server"\npath = "{path}"\n'
        f"n_ctx = {N_CTX}\nparallel = 1\n{devices}" for name, path in models.items())
    body = ('max_loaded_models = 1\n'
            f'[harness.llama-server]\nbinary = "{llama_server}"\n{entries}')
    lines: list[str] = []
    with (tempfile.TemporaryDirectory() as tmp,
          running_node(Path(tmp), body, log_level="warning") as node):
        ask = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        call(node.url + "/v1/completions", {**ask, "model": "a"})  # the first load
        listed = {m["id"]: m for m in call(node.url + "/models")}
        pid = listed["a"]["pid"]
        need = vram.estimate(gguf.read_model([models["a"]]), N_CTX, -1 if on_gpu else None)
        if on_gpu:
            smi = smi_apps().get(pid)
            node_mb = listed["a"].get("vram_used_mb")
            over = f"{smi - need.total_mb:+d} MiB" if smi is not None else "n/a"
            lines.append(f"VRAM: estimate {need.total_mb} MiB ({need.describe()}); "
                         f"nvidia-smi {smi} MiB for pid {pid} ({over} over the estimate); "
                         f"node's vram_used_mb {node_mb}")
        else:
            rss = listed["a"].get("rss_bytes")
            lines.append(f"VRAM: no GPU (--cpu): estimate {need.total_mb} MiB "
                         f"({need.describe()}); worker RSS "
                         f"{rss // 2**20 if rss else 'n/a'} MiB (weights are mapped, not all "
                         "resident)")
        before = evictions(node.url)
        times: list[float] = []
        for i in range(swaps):
            model = "b" if i % 2 == 0 else "a"
            started = time.monotonic()
            call(node.url + "/v1/completions", {**ask, "model": model})
            times.append(time.monotonic() - started)
        counted = evictions(node.url) - before
        lines.append(f"swaps: {swaps} A/B requests, per swap p50 {pct(times, .5) * 1e3:.0f} ms, "
                     f"max {max(times) * 1e3:.0f} ms, mean {statistics.mean(times) * 1e3:.0f} ms; "
                     f"evictions counted by the node {counted:.0f} (expected {swaps})")
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="no GPU: the CPU, a smaller model")
    parser.add_argument("--llama-server", default=None, help="default: the one tests find")
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    args = parser.parse_args()
    llama_server = args.llama_server or find_llama_server()
    if llama_server is None:
        raise BenchError("no llama-server: bash .ci/llama-server.sh (CPU) or bench/gpu.sh")
    on_gpu = not args.cpu
    if on_gpu and not smi_apps() and shutil.which("nvidia-smi") is None:
        raise BenchError("no nvidia-smi: run with --cpu on a machine without a GPU")
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        models = {name: write_llama_gguf(Path(tmp) / f"{name}.gguf", **shape, f16=True,
                                         context_length=1 << 16, seed=seed,
                                         name=f"neuron-bench-{name}")
                  for name, seed in (("a", 1), ("b", 2))}
        size = models["a"].stat().st_size
        print(f"models: two llama GGUFs of {size / 2**20:.0f} MiB ({shape}), written in "
              f"{time.monotonic() - started:.1f} s; worker {llama_server}; "
              f"{'GPU 0' if on_gpu else 'CPU'}")
        extra = "devices = [0]\n" if on_gpu else ""
        levels = [1, 4, 8]
        results = await measure(models["a"], "llama-server", 4, llama_server, levels,
                                args.max_tokens, args.quick, entry_extra=extra)
        report(f"traffic, llama-server parallel 4, {'GPU 0' if on_gpu else 'CPU'}", results)
        ratios = [n.tokens_per_s / d.tokens_per_s for d, n in results.values()
                  if d.tokens_per_s]
        summary = [f"traffic: node/direct tok/s at concurrency {levels}: "
                   + ", ".join(f"{r:.3f}" for r in ratios) + " (target >= 0.95)"]
        summary += swaps_and_vram(models, llama_server, on_gpu, args.swaps)
    print("\nsummary")
    for line in summary:
        print("  " + line)


if __name__ == "__main__":
    asyncio.run(main())
