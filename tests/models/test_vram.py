"""VRAM: the estimate from the GGUF header, the VRAM gate against a fake nvidia-smi, and the
wait for a stopped worker's memory to come back before the next load."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.errors import LoadError
from neuronctl.models.discovery import Gpu
from neuronctl.models.gguf import read_model
from neuronctl.models.vram import (
    MIB,
    Estimate,
    NotEnoughVram,
    Release,
    check_fits,
    estimate,
    split_by_free,
)
from neuronctl.states import ModelStatus, WorkerState

from ..fakes import FakeHarness
from ..gpu_fakes import FakeSmi, gpu, install_fake_smi
from ..helpers import MakeRegistry, poll_until
from ..tiny_gguf import N_EMBD, N_LAYERS

# tests/tiny_gguf.py: 21 float32 tensors, 4 heads of 16 over 2 layers, context 256.
TINY_WEIGHTS = 462080
KV_PER_TOKEN = N_LAYERS * N_EMBD * 2 * 2  # layers x (K + V widths) x f16


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSmi:
    return install_fake_smi(tmp_path, monkeypatch)


def test_estimate_reads_tensors_and_sizes_the_kv_cache(tiny_gguf: Path) -> None:
    header = read_model([tiny_gguf])
    need = estimate(header, 4096, None)
    assert need.weights_bytes == TINY_WEIGHTS
    assert need.kv_bytes == 4096 * KV_PER_TOKEN
    assert need.n_ctx == 4096
    # n_ctx unset or 0: the model's own context length.
    assert estimate(header, None, None).kv_bytes == 256 * KV_PER_TOKEN
    assert estimate(header, 0, -1).n_ctx == 256
    # Half the layers offloaded: half of it on the GPU.
    half = estimate(header, 4096, 1)
    assert half.gpu_fraction == 0.5
    assert half.total_mb == -(-(TINY_WEIGHTS + 4096 * KV_PER_TOKEN) // 2 // MIB)
    # Every part of a split model counts.
    split = read_model([tiny_gguf, tiny_gguf])
    assert estimate(split, 256, None).weights_bytes == 2 * TINY_WEIGHTS


def test_check_fits_refuses_with_both_numbers() -> None:
    need = Estimate(weights_bytes=3000 * MIB, kv_bytes=1000 * MIB, n_ctx=8192)
    gpus = [Gpu(0, "A", 40960, 38000, 2960, 0, 30, "535"),
            Gpu(1, "A", 40960, 0, 40960, 0, 30, "535")]
    with pytest.raises(NotEnoughVram) as info:
        check_fits("org/m", need, gpus, [0])
    assert info.value.message == (
        "org/m: not enough free VRAM: needs about 4000 MiB (weights 3000 MiB + KV cache "
        "1000 MiB for n_ctx 8192) but GPU 0 has 2960 MiB free; set force = true to load anyway"
    )
    check_fits("org/m", need, gpus, [1])
    check_fits("org/m", need, gpus, [0, 1])  # together they have it
    with pytest.raises(NotEnoughVram, match=r"no GPU 7 on this host \(GPUs: 0, 1\)"):
        check_fits("org/m", need, gpus, [7])


def test_split_by_free_vram() -> None:
    gpus = [Gpu(0, "A", 100, 70, 30000, 0, 0, "x"), Gpu(1, "A", 100, 0, 10000, 0, 0, "x")]
    assert split_by_free([0, 1], gpus) == (30000.0, 10000.0)
    assert split_by_free([0, 5], gpus) == (1.0, 1.0)


def test_release_is_judged_by_process_or_by_device_memory() -> None:
    gpus = [Gpu(0, "A", 40960, 30000, 10960, 0, 30, "535")]
    by_pid = Release("m", frozenset({10, 11}), (0,), accounted=True, held_mb=20000)
    assert not by_pid.freed(gpus, {11, 99})
    assert by_pid.freed(gpus, {99})
    by_memory = Release("m", frozenset({10}), (0,), accounted=False, held_mb=20000,
                        used_before_mb=31000)
    assert not by_memory.freed(gpus, None)  # 30000 used: not even half of it back
    assert by_memory.freed([dataclasses.replace(gpus[0], memory_used_mb=12000)], None)


def fake(model_id: str, path: Path, **kw: object) -> ModelSpec:
    return ModelSpec(model_id, harness="fake", path=path, **kw)  # type: ignore[arg-type]


async def test_a_load_that_does_not_fit_is_refused_and_force_loads_it(
    fake_smi: FakeSmi, make_registry: MakeRegistry, fake_harness: FakeHarness, tiny_gguf: Path
) -> None:
    # 65536 tokens of KV cache: 32 MiB; the GPU has 20 MiB free.
    fake_smi.set(gpus=[gpu(0, 20)])

    registry = make_registry()
    spec = fake("big", tiny_gguf, devices=(0,), n_ctx=65536)
    with pytest.raises(LoadError) as info:
        await registry.load(spec)
    message = info.value.message
    assert "big: not enough free VRAM: needs about 33 MiB" in message
    assert "for n_ctx 65536" in message and "GPU 0 has 20 MiB free" in message
    record = registry.get("big")
    assert record is not None and record.status is ModelStatus.FAILED
    assert fake_harness.planned == []  # refused before anything was spawned
    forced = await registry.load(dataclasses.replace(spec, force=True))
    assert forced.status is ModelStatus.LOADED and forced.vram_estimate_mb == 33
    # A model that fits needs no force.
    small = await registry.load(fake("small", tiny_gguf, devices=(0,), n_ctx=256))
    assert small.status is ModelStatus.LOADED
    # No GPU layers asked for: nothing to check.
    cpu = await registry.load(fake("cpu", tiny_gguf, n_ctx=65536))
    assert cpu.status is ModelStatus.LOADED


async def test_no_nvidia_smi_means_no_vram_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_registry: MakeRegistry,
    tiny_gguf: Path,
) -> None:
    from ..gpu_fakes import hide_nvidia_smi

    hide_nvidia_smi(tmp_path, monkeypatch)

    registry = make_registry()
    record = await registry.load(fake("m", tiny_gguf, devices=(0,), n_ctx=10**7))
    assert record.status is ModelStatus.LOADED and record.vram_estimate_mb is None


async def test_the_next_load_waits_until_the_driver_frees_the_memory(
    fake_smi: FakeSmi, make_registry: MakeRegistry, fake_harness: FakeHarness, tiny_gguf: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000)])
    caplog.set_level(logging.INFO, logger="neuronctl")

    registry = make_registry()
    first = await registry.load(fake("a", tiny_gguf, devices=(0,)))
    assert first.worker is not None and first.worker.pid is not None
    pid = first.worker.pid
    fake_smi.set(apps={str(pid): 20000})
    await registry.unload("a")
    # The process is gone, but the driver still lists its memory (as it may for a
    # moment after a big unload): the next load must wait for it.
    loading = asyncio.create_task(registry.load(fake("b", tiny_gguf, devices=(0,))))

    def waiting() -> bool:
        record = registry.get("b")
        return (record is not None and record.state is WorkerState.STARTING
                and "waiting for the driver to free the VRAM of a" in caplog.text)

    await asyncio.to_thread(poll_until, waiting, 10)
    record = registry.get("b")
    assert record is not None and record.worker is None  # nothing spawned yet
    assert fake_harness.planned == ["a"]
    fake_smi.set(apps={})
    second = await loading
    assert second.status is ModelStatus.LOADED and fake_harness.planned == ["a", "b"]


async def test_the_wait_for_freed_memory_is_bounded(
    fake_smi: FakeSmi, node_config: NeuronConfig, make_registry: MakeRegistry, tiny_gguf: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000)])
    config = dataclasses.replace(node_config, vram_release_timeout_s=0.5)

    registry = make_registry(config)
    first = await registry.load(fake("a", tiny_gguf, devices=(0,)))
    assert first.worker is not None and first.worker.pid is not None
    fake_smi.set(apps={str(first.worker.pid): 20000})  # never released
    await registry.unload("a")
    second = await registry.load(fake("b", tiny_gguf, devices=(0,)))
    assert second.status is ModelStatus.LOADED
    assert "VRAM of a not reported free 0.5 s after it stopped; loading anyway" in caplog.text


@pytest.mark.parametrize(("body", "error"), [
    ({"tensor_split": [1.0]}, "tensor_split: needs one share per device: 1 for 0 devices"),
    ({"devices": [0, 1], "tensor_split": [1.0, -1.0]},
     "tensor_split: shares must be >= 0, not all 0"),
    ({"devices": [0, 1], "tensor_split": [0, 0]}, "tensor_split: shares must be >= 0, not all 0"),
    ({"force": "yes"}, "force: expected true or false, got a string 'yes'"),
])
def test_gpu_keys_are_validated(body: dict[str, object], error: str) -> None:
    from neuronctl.config import ConfigError, model_spec_from_mapping

    with pytest.raises(ConfigError) as info:
        model_spec_from_mapping({"model_id": "m", **body})
    assert str(info.value) == error


def test_node_gpu_keys_and_the_binary_from_the_environment(tmp_path: Path) -> None:
    from neuronctl.config import ConfigError, load_config

    path = tmp_path / "neuron.toml"
    path.write_text("gpu_poll_interval_s = 2\n")
    config = load_config(path, {"NEURON_VRAM_RELEASE_TIMEOUT_S": "12.5",
                                "NEURON_HARNESS__LLAMA_SERVER__BINARY": "/opt/llama/llama-server"})
    assert config.gpu_poll_interval_s == 2.0 and config.vram_release_timeout_s == 12.5
    assert config.harness_config("llama-server").binary == "/opt/llama/llama-server"
    with pytest.raises(ConfigError, match="vram_release_timeout_s: must be positive, got 0"):
        load_config(path, {"NEURON_VRAM_RELEASE_TIMEOUT_S": "0"})
