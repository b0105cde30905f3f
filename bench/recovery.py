"""Crash recovery: kill -9 of a ready worker until it is ready again, vs a cold start.

The same tiny llama.cpp model, in one run: a cold start (POST /models/load's path: spawn
to ready) and recovery (SIGKILL of the ready worker to `loaded` again, through the
registry's exit watcher, the first backoff step and a new spawn). Recovery should cost
the cold start plus the first backoff delay and nothing more; the ratio is printed.

    .venv/bin/python bench/recovery.py [--rounds 5] [--delay 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from _common import write_tiny_gguf

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.states import ModelStatus
from neuronctl.supervisor.harness import build_harnesses
from neuronctl.supervisor.registry import ModelRegistry


async def measure(workdir: Path, rounds: int, delay_s: float) -> tuple[list[float], list[float]]:
    model = write_tiny_gguf(workdir / "tiny.gguf")
    config = NeuronConfig(log_dir=workdir / "log", state_dir=workdir / "state",
                          restart_delay_s=delay_s, restart_reset_s=0.0, max_restarts=1000)
    registry = ModelRegistry(config, build_harnesses(config))
    cold: list[float] = []
    recovery: list[float] = []
    try:
        for i in range(rounds):
            started = time.monotonic()
            record = await registry.load(ModelSpec(f"m{i}", path=model, n_ctx=64))
            cold.append(time.monotonic() - started)
            assert record.worker is not None and record.worker.pid is not None
            killed = time.monotonic()
            os.kill(record.worker.pid, signal.SIGKILL)
            while record.status is not ModelStatus.RESTARTING:
                await asyncio.sleep(0.001)
            while record.status is not ModelStatus.LOADED:
                await asyncio.sleep(0.002)
            recovery.append(time.monotonic() - killed)
            await registry.unload(record.model_id)
    finally:
        await registry.shutdown()
    return cold, recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay", type=float, default=1.0, help="first backoff step, s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the restarts log warnings by design
    with tempfile.TemporaryDirectory() as tmp:
        cold, recovery = asyncio.run(measure(Path(tmp), args.rounds, args.delay))
    c, r = statistics.median(cold), statistics.median(recovery)
    print(f"rounds: {args.rounds}, first backoff step: {args.delay:g} s")
    print(f"cold start           median {c:.3f} s  ({', '.join(f'{x:.3f}' for x in cold)})")
    print(f"kill -9 -> ready     median {r:.3f} s  ({', '.join(f'{x:.3f}' for x in recovery)})")
    print(f"overhead beyond cold start + backoff: {1000 * (r - c - args.delay):+.0f} ms")
    print(f"ratio recovery / (cold start + backoff) {r / (c + args.delay):.3f}  (target ~1.0)")


if __name__ == "__main__":
    main()
