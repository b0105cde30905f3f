from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from neuronctl.config import NeuronConfig
from neuronctl.supervisor.harness import Harness
from neuronctl.supervisor.registry import ModelRegistry

from .fakes import FakeHarness
from .helpers import MakeRegistry
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


@pytest.fixture
async def make_registry(
    node_config: NeuronConfig, fake_harness: FakeHarness
) -> AsyncIterator[MakeRegistry]:
    """`make_registry(config=None, harnesses=None, **kwargs)`: a ModelRegistry over
    `node_config` and `{"fake": fake_harness}` unless told otherwise, keyword arguments
    passed on as they are. Every registry it made is shut down after the test, even a
    failed one, so no worker outlives it."""
    async with contextlib.AsyncExitStack() as made:

        def make(
            config: NeuronConfig | None = None,
            harnesses: Mapping[str, Harness] | None = None,
            **kwargs: Any,
        ) -> ModelRegistry:
            registry = ModelRegistry(
                node_config if config is None else config,
                {"fake": fake_harness} if harnesses is None else harnesses,
                **kwargs,
            )
            made.push_async_callback(registry.shutdown)
            return registry

        yield make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.5 MB llama GGUF that llama-cpp-python really loads."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`slow`: the RPM build and the real browser, left out of `make check`."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        builds = {"built_rpm", "built_srpm"} & fixtures
        if builds or item.path.name == "test_dashboard_browser.py":
            item.add_marker(pytest.mark.slow)
