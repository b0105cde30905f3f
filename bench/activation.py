"""Activation overhead: N tiny models started bare vs through `neuronctl start`.

Bare: the very worker command neuronctl would run, spawned and polled directly (every 5 ms),
one model after another. Through neuronctl: spawn `neuronctl start` with the same N default
models and stop the clock at the first answered GET /models. Rounds alternate between the two
so machine noise hits both alike; medians and their ratio are printed. Target: <= 1.10.

Both run as deployed: with Python's bytecode cache (an RPM or pip install byte-compiles),
so PYTHONDONTWRITEBYTECODE, if this shell sets it, is dropped for both, and a warm-up
round writes the caches before anything is timed.

    .venv/bin/python bench/activation.py [--models 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import ENV, free_port, start_node, stop, wait_for, write_tiny_gguf

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.supervisor.harness import LlamaCppPythonHarness


def bare(model: Path, n: int, log: Path) -> float:
    harness = LlamaCppPythonHarness(NeuronConfig().harness_config("llama-cpp-python"))
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        with log.open("ab") as out:
            for i in range(n):
                port = free_port()
                plan = harness.plan(ModelSpec(f"m{i}", path=model, n_ctx=128), port)
                proc = subprocess.Popen(plan.command, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=ENV)
                procs.append(proc)
                wait_for(f"http://127.0.0.1:{port}{plan.probe_path}", proc, log)
        return time.monotonic() - started
    finally:
        for proc in procs:
            stop(proc)


def supervised(model: Path, n: int, workdir: Path) -> float:
    entries = "".join(
        f'\n[[default_models]]\nmodel_id = "m{i}"\npath = "{model}"\nn_ctx = 128\n'
        for i in range(n)
    )
    started = time.monotonic()
    node = start_node(workdir, entries, ready="/models")
    elapsed = time.monotonic() - started
    node.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = write_tiny_gguf(workdir / "tiny.gguf")
        bare(model, 1, workdir / "warmup.log")  # page cache, .pyc files
        supervised(model, 1, workdir)
        bare_s, sup_s = [], []
        for _ in range(args.rounds):
            bare_s.append(bare(model, args.models, workdir / "bare.log"))
            sup_s.append(supervised(model, args.models, workdir))
        b, s = statistics.median(bare_s), statistics.median(sup_s)
        print(f"models per run: {args.models}, rounds: {args.rounds}")
        print(f"bare worker starts   median {b:.3f} s  ({', '.join(f'{x:.3f}' for x in bare_s)})")
        print(f"neuronctl start      median {s:.3f} s  ({', '.join(f'{x:.3f}' for x in sup_s)})")
        print(f"ratio neuronctl/bare {s / b:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
