"""Stand-ins for a model server: the harness that runs tests/fake_worker.py."""

from __future__ import annotations

import sys
from pathlib import Path

from neuronctl.config import ModelSpec
from neuronctl.supervisor.apiargs import Flag
from neuronctl.supervisor.harness import Harness, WorkerPlan

FAKE_WORKER = Path(__file__).parent / "fake_worker.py"
FAKE_LLAMA_SERVER = Path(__file__).parent / "fake_llama_server.py"


class _AnyFlagWithValue(dict[str, Flag]):
    """The fake worker's flags all take a value, and tests choose its behaviour through the
    API (`--mode crash`): every `--flag VALUE` is allowed for it."""

    def get(self, key: str, default: object = None) -> Flag:  # type: ignore[override]
        return Flag((key,), lambda value: None)


class FakeHarness(Harness):
    """Runs tests/fake_worker.py; the spec's `args` choose its behaviour (`--mode crash`)."""

    name = "fake"
    api_flags = _AnyFlagWithValue()

    def __init__(self, ready_timeout_s: float = 10.0) -> None:
        self.ready_timeout_s = ready_timeout_s
        self.planned: list[str] = []

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        self.planned.append(spec.model_id)
        command = (sys.executable, str(FAKE_WORKER), "--port", str(port), *spec.args)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, spec.devices))} if spec.devices else {}
        timeout = spec.ready_timeout_s or self.ready_timeout_s
        return WorkerPlan(command, env, "/health", timeout)


class FileHarness(FakeHarness):
    """The fake worker, but with a model file resolved first, as the real harnesses do."""

    needs_model_file = True

    def __init__(self) -> None:
        super().__init__()
        self.planned_specs: list[ModelSpec] = []

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        self.planned_specs.append(spec)
        return super().plan(spec, port)
