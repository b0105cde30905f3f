from __future__ import annotations

import sys
from pathlib import Path

import pytest

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.harness import WorkerPlan

from .tiny_gguf import write_tiny_gguf

FAKE_WORKER = Path(__file__).parent / "fake_worker.py"


class FakeHarness:
    """Runs tests/fake_worker.py; the spec's `args` choose its behaviour (`--mode crash`)."""

    name = "fake"

    def __init__(self, ready_timeout_s: float = 10.0) -> None:
        self.ready_timeout_s = ready_timeout_s
        self.planned: list[str] = []

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        self.planned.append(spec.model_id)
        command = (sys.executable, str(FAKE_WORKER), "--port", str(port), *spec.args)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, spec.devices))} if spec.devices else {}
        timeout = spec.ready_timeout_s or self.ready_timeout_s
        return WorkerPlan(command, env, "/health", timeout)


@pytest.fixture
def fake_harness() -> FakeHarness:
    return FakeHarness()


@pytest.fixture
def node_config(tmp_path: Path) -> NeuronConfig:
    return NeuronConfig(
        host="127.0.0.1", log_dir=tmp_path / "log", state_dir=tmp_path / "state",
        stop_timeout_s=2.0,
    )


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.5 MB llama GGUF that llama-cpp-python really loads."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")
