from __future__ import annotations

from pathlib import Path

import pytest

from neuronctl.config import NeuronConfig

from .fakes import FakeHarness
from .tiny_gguf import write_tiny_gguf


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
