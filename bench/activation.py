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
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neuronctl.config import ModelSpec, NeuronConfig  # noqa: E402
from neuronctl.supervisor.harness import LlamaCppPythonHarness  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.tiny_gguf import write_tiny_gguf  # noqa: E402

NEURONCTL = str(Path(sys.executable).parent / "neuronctl")
POLL_S = 0.005
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith("NEURON_") and k != "PYTHONDONTWRITEBYTECODE"}


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not answers(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout} s")
        time.sleep(POLL_S)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM) if p.pid == os.getpgid(p.pid) else p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


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
                wait_for(f"http://127.0.0.1:{port}{plan.probe_path}", proc)
        return time.monotonic() - started
    finally:
        stop(procs)


def supervised(model: Path, n: int, workdir: Path) -> float:
    port = free_port()
    entries = "".join(
        f'\n[[default_models]]\nmodel_id = "m{i}"\npath = "{model}"\nn_ctx = 128\n'
        for i in range(n)
    )
    config = workdir / "neuron.toml"
    config.write_text(
        f'port = {port}\nhost = "127.0.0.1"\nlog_dir = "log"\nstate_dir = "state"\n{entries}'
    )
    started = time.monotonic()
    with (workdir / "daemon.log").open("ab") as out:
        proc = subprocess.Popen([NEURONCTL, "start", "--config", str(config)], env=ENV,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/models", proc)
        return time.monotonic() - started
    finally:
        stop([proc])


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
