"""The real lifecycle on a real NVIDIA GPU: `neuronctl start` with a model on `devices = [0]`,
its VRAM as nvidia-smi reports it, the estimate held against that, an unload giving the
memory back, a model that cannot fit refused with both numbers, and a kill -9 restarted on
the same GPU.

Marked `cuda` and skipped, with a one-line reason, wherever there is no NVIDIA GPU, no
nvidia-smi or no CUDA build of `llama-server` (`pytest -m cuda` on a GPU host; bench/gpu.sh
builds the binary and runs this first). Every other GPU path is tested against a fake
nvidia-smi; this is the one place the driver itself answers. The model is a generated
llama-architecture GGUF with random weights, large enough that its memory is measured
rather than lost in the CUDA context: speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from neuronctl.models import gguf, vram

from .helpers import NEURONCTL, REPO, clean_env, free_port, poll_until, spawn, stop_group
from .tiny_gguf import write_llama_gguf

pytestmark = pytest.mark.cuda

# Where bench/gpu.sh puts its CUDA build; NEURON_CUDA_LLAMA_SERVER names another.
CUDA_BUILD = REPO / ".cache/llama-server-cuda/bin/llama-server"
# ~1.6 GiB of f16 weights: 16 layers of a 2048-wide model with a 5632-wide FFN.
SHAPE = {"n_layers": 16, "n_embd": 2048, "n_head": 16, "n_ff": 5632}
# Trained context: far more than any GPU holds the KV cache of, so a load asking for it is
# refused by the estimate alone (the node allows an n_ctx up to the trained one).
TRAINED_CTX = 1 << 24
N_CTX = 4096
HUGE_CTX = 1 << 22  # 16 layers x 4096 x 2 x 2 bytes per token: 512 GiB of KV cache
# What comes on top of the estimate (weights + KV cache, a floor by design, see
# models/vram.py): the CUDA context (~0.3-0.6 GiB) and llama.cpp's compute buffers.
MARGIN_MB = 1536
MARGIN_SHARE = 0.35
LOAD_TIMEOUT_S = 180.0
FREE_TIMEOUT_S = 30.0


def _skip_reason() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi on PATH: not an NVIDIA GPU host"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    if listed.returncode != 0 or "GPU 0" not in listed.stdout:
        return f"nvidia-smi lists no GPU ({(listed.stderr or listed.stdout).strip()[:80]})"
    binary = cuda_llama_server()
    if binary is None:
        return "no llama-server built with CUDA (bench/gpu.sh builds one)"
    return None


def cuda_llama_server() -> str | None:
    """A llama-server whose device list names a CUDA device."""
    candidates = [os.environ.get("NEURON_CUDA_LLAMA_SERVER"), str(CUDA_BUILD),
                  shutil.which("llama-server")]
    for candidate in candidates:
        if not candidate or not Path(candidate).is_file():
            continue
        proc = subprocess.run([candidate, "--list-devices"], capture_output=True, text=True,
                              timeout=60, check=False)
        if re.search(r"^\s*CUDA\d+:", proc.stdout + proc.stderr, re.M):
            return candidate
    return None


@pytest.fixture(scope="module")
def cuda_server() -> str:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    binary = cuda_llama_server()
    assert binary is not None
    return binary


def smi(*query: str) -> list[list[str]]:
    proc = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30, check=True)
    return [[cell.strip() for cell in line.split(",")] for line in proc.stdout.splitlines()
            if line.strip()]


def gpu_uuid(index: int) -> str:
    return next(uuid for i, uuid in smi("--query-gpu=index,uuid") if int(i) == index)


def apps() -> dict[int, tuple[str, int]]:
    """pid -> (GPU uuid, MiB) for every compute process nvidia-smi lists."""
    return {int(pid): (uuid, int(used)) for pid, uuid, used
            in smi("--query-compute-apps=pid,gpu_uuid,used_memory") if used.isdigit()}


def gpu0_used_mb() -> int:
    return int(smi("--query-gpu=index,memory.used")[0][1])


def gpu0_free_mb() -> int:
    return int(smi("--query-gpu=index,memory.free")[0][1])


@dataclass
class Node:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def call(self, method: str, path: str, body: Any = None,
             timeout: float = LOAD_TIMEOUT_S) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def model(self, model_id: str) -> dict[str, Any] | None:
        _, models = self.call("GET", "/models", timeout=10)
        return next((m for m in models if m["id"] == model_id), None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("cuda-models")
    return {
        "big": write_llama_gguf(directory / "big.gguf", **SHAPE, context_length=TRAINED_CTX,
                                f16=True, seed=1, name="neuron-cuda-test"),
        "second": write_llama_gguf(directory / "second.gguf", **SHAPE,
                                   context_length=TRAINED_CTX, f16=True, seed=2,
                                   name="neuron-cuda-test-2"),
    }


@pytest.fixture(scope="module")
def node(cuda_server: str, models: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("cuda-node")
    port = free_port()
    config = directory / "neuron.toml"
    # parallel = 1: one KV cache of N_CTX, so the estimate below is the one the node made.
    config.write_text(f"""
port = {port}
host = "127.0.0.1"
log_dir = "{directory}/log"
state_dir = "{directory}/state"
stop_timeout_s = 10.0

[harness.llama-server]
binary = "{cuda_server}"

[[default_models]]
model_id = "big"
harness = "llama-server"
path = "{models['big']}"
devices = [0]
n_ctx = {N_CTX}
parallel = 1
ready_timeout_s = {LOAD_TIMEOUT_S}
""")
    log = directory / "daemon.log"
    proc = spawn([str(NEURONCTL), "start", "--config", str(config)], log, clean_env())
    node = Node(f"http://127.0.0.1:{port}", proc, log)
    try:
        def serving() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return node.call("GET", "/health", timeout=2)[0] == 200
            except OSError:
                return False

        poll_until(serving, LOAD_TIMEOUT_S, interval=0.5)
        yield node
    finally:
        stop_group(proc, timeout=60)


def loaded(node: Node, model_id: str) -> dict[str, Any]:
    model = node.model(model_id)
    assert model is not None, f"{model_id} not listed"
    assert model["status"] == "loaded", (model, node.log.read_text()[-3000:])
    return model


def test_default_model_is_loaded_on_gpu0_with_the_vram_nvidia_smi_reports(node: Node) -> None:
    model = loaded(node, "big")
    assert model["devices"] == [0]
    pid = model["pid"]
    listed = poll_until(lambda: apps().get(pid), 30, interval=0.5)
    uuid, used_mb = listed
    assert uuid == gpu_uuid(0), "the worker runs on another GPU than devices = [0]"
    # The node's figure is the same driver reading, a moment apart (it refreshes its
    # readings every gpu_poll_interval_s, so the first listing may predate the worker).
    node_mb = poll_until(lambda: loaded(node, "big")["vram_used_mb"], 30, interval=0.5)
    assert abs(node_mb - used_mb) <= 64, (node_mb, used_mb)


def test_vram_estimate_is_a_floor_within_the_stated_margin(
    node: Node, models: dict[str, Path]
) -> None:
    pid = loaded(node, "big")["pid"]
    used_mb = poll_until(lambda: apps().get(pid), 30, interval=0.5)[1]
    need = vram.estimate(gguf.read_model([models["big"]]), N_CTX, -1)
    over = used_mb - need.total_mb
    margin = max(MARGIN_MB, MARGIN_SHARE * need.total_mb)
    assert 0 <= over <= margin, (
        f"estimate {need.total_mb} MiB ({need.describe()}), nvidia-smi {used_mb} MiB: "
        f"{over} MiB over, margin {margin:.0f}")


def test_unload_gives_the_memory_back(node: Node, models: dict[str, Path]) -> None:
    status, body = node.call("POST", "/models/load", {
        "model_id": "second", "harness": "llama-server", "path": str(models["second"]),
        "devices": [0], "n_ctx": N_CTX, "parallel": 1})
    assert status == 200, body
    pid = loaded(node, "second")["pid"]
    held_mb = poll_until(lambda: apps().get(pid), 30, interval=0.5)[1]
    before = gpu0_used_mb()

    status, body = node.call("POST", "/models/unload", {"model_id": "second"})
    assert status == 200, body

    def freed() -> bool:
        return pid not in apps() and gpu0_used_mb() <= before - 0.9 * held_mb

    poll_until(freed, FREE_TIMEOUT_S, interval=0.5)
    assert loaded(node, "big")  # the other model is untouched


def test_a_model_that_cannot_fit_is_refused_with_both_numbers(
    node: Node, models: dict[str, Path]
) -> None:
    free_before = gpu0_free_mb()
    status, body = node.call("POST", "/models/load", {
        "model_id": "huge", "harness": "llama-server", "path": str(models["second"]),
        "devices": [0], "n_ctx": HUGE_CTX, "parallel": 1})
    assert status == 503 and "insufficient_vram" in json.dumps(body), body
    message = json.dumps(body)
    match = re.search(r"needs about (\d+) MiB .* GPU 0 has (\d+) MiB free", message)
    assert match, message
    need_mb, free_mb = map(int, match.groups())
    assert need_mb > free_mb
    assert abs(free_mb - free_before) <= 2048, (free_mb, free_before)
    assert node.model("huge") is None or node.model("huge")["status"] != "loaded"
    assert loaded(node, "big")


def test_kill9_worker_is_restarted_on_the_same_gpu(node: Node) -> None:
    old = loaded(node, "big")
    os.kill(old["pid"], signal.SIGKILL)

    def back() -> dict[str, Any] | None:
        model = node.model("big")
        if model and model["status"] == "loaded" and model["pid"] != old["pid"]:
            return model
        return None

    model = poll_until(back, LOAD_TIMEOUT_S, interval=0.5)
    assert model["restarts"] >= old["restarts"] + 1
    assert model["devices"] == [0]
    uuid, _ = poll_until(lambda: apps().get(model["pid"]), 30, interval=0.5)
    assert uuid == gpu_uuid(0)
    assert old["pid"] not in apps()
