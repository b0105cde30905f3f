"""Harnesses: how to turn a model spec into a worker command, and how to tell it is ready.

A harness knows nothing about processes; `worker.Worker` runs what it describes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import workers

from .config import ConfigError, HarnessConfig, ModelSpec, NeuronConfig, effective


class LoadError(Exception):
    """A model could not be loaded; the message is what the operator sees."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UnknownHarness(LoadError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown harness: {name}")
        self.name = name


@dataclass(frozen=True)
class WorkerPlan:
    """Everything needed to start one worker process."""

    command: tuple[str, ...]
    env: Mapping[str, str]  # added to the supervisor's environment
    probe_path: str  # GET answers 200 once the model is loaded
    ready_timeout_s: float


class Harness(Protocol):
    name: str

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        """Raise LoadError for a spec this harness cannot run (a missing file, say)."""
        ...


LLAMA_CPP_PYTHON = "llama-cpp-python"
DEFAULT_READY_TIMEOUT_S = 600.0


def worker_script(name: str) -> Path:
    """Worker entry points are run by path so the worker interpreter (perhaps a CUDA venv)
    needs llama_cpp but not neuronctl."""
    return Path(workers.__file__).parent / name


class LlamaCppPythonHarness:
    """llama-cpp-python's OpenAI-compatible server, one model per process.

    It loads the model before it opens its port and has no /health, so the first 200 from
    /v1/models means ready.
    """

    name = LLAMA_CPP_PYTHON

    def __init__(self, defaults: HarnessConfig) -> None:
        self._defaults = defaults

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        d = self._defaults
        cmd = [d.python or sys.executable, str(worker_script("llama_cpp_server.py"))]
        if spec.path is not None:
            if not spec.path.is_file():
                raise LoadError(f"model file not found: {spec.path}")
            cmd += ["--model", str(spec.path)]
        else:
            # No local file: the server fetches from the Hugging Face repo named by model_id,
            # choosing the GGUF whose name carries the quant.
            pattern = f"*{spec.quant}*.gguf" if spec.quant else "*.gguf"
            cmd += ["--hf_model_repo_id", spec.model_id, "--model", pattern]
        cmd += ["--model_alias", spec.model_id, "--host", "127.0.0.1", "--port", str(port)]
        n_ctx = effective(spec, d, "n_ctx")
        if n_ctx is not None:
            cmd += ["--n_ctx", str(n_ctx)]
        n_gpu_layers = effective(spec, d, "n_gpu_layers")
        if n_gpu_layers is None and spec.devices:
            n_gpu_layers = -1  # devices named: the operator wants it on the GPU, all of it
        if n_gpu_layers is not None:
            cmd += ["--n_gpu_layers", str(n_gpu_layers)]
        chat_format = effective(spec, d, "chat_format")
        if chat_format is not None:
            cmd += ["--chat_format", chat_format]
        cmd += [*d.args, *spec.args]

        env: dict[str, str] = {}
        if spec.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in spec.devices)
        if d.hf_cache is not None:
            env["HF_HUB_CACHE"] = str(d.hf_cache)
        timeout = effective(spec, d, "ready_timeout_s") or DEFAULT_READY_TIMEOUT_S
        return WorkerPlan(tuple(cmd), env, "/v1/models", timeout)


def build_harnesses(config: NeuronConfig) -> dict[str, Harness]:
    """The harness registry: every harness this node can run, by name."""
    harnesses: dict[str, Harness] = {
        LLAMA_CPP_PYTHON: LlamaCppPythonHarness(config.harness_config(LLAMA_CPP_PYTHON)),
    }
    for name in config.harness:
        if name not in harnesses:
            known = ", ".join(sorted(harnesses))
            raise ConfigError(f"harness.{name}", f"unknown harness (known: {known})")
    return harnesses
