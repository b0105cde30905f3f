"""GPU discovery: nvidia-smi's outputs parsed, and a fake nvidia-smi on PATH behind the API."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.models.discovery import (
    Discovery,
    Gpu,
    parse_compute_apps,
    parse_cuda_version,
    parse_gpu_csv,
)

from ..gpu_fakes import DATA, FakeSmi, gpu, hide_nvidia_smi, install_fake_smi
from ..helpers import MakeRegistry, poll_until

SMI = DATA / "nvidia-smi"


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSmi:
    return install_fake_smi(tmp_path, monkeypatch)


def test_parse_one_gpu() -> None:
    assert parse_gpu_csv((SMI / "one-gpu.csv").read_text()) == [
        Gpu(0, "NVIDIA A100-SXM4-40GB", 40960, 4, 40339, 0, 35, "535.129.03")
    ]


def test_parse_several_gpus() -> None:
    gpus = parse_gpu_csv((SMI / "four-gpus.csv").read_text())
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert {g.name for g in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert [g.memory_free_mb for g in gpus] == [9713, 80970, 40860, 80970]
    assert gpus[0].utilization_pct == 97 and gpus[0].temperature_c == 64
    assert gpus[0].memory_used_mb == 71235 and gpus[0].memory_total_mb == 81559
    assert {g.driver_version for g in gpus} == {"550.54.15"}


def test_parse_malformed_output_keeps_what_is_sound() -> None:
    # [N/A] and [Not Supported] are missing readings, not errors; a GPU that fell off the
    # bus, a short line and a line without an index are skipped.
    assert parse_gpu_csv((SMI / "malformed.csv").read_text()) == [
        Gpu(0, "NVIDIA GeForce RTX 3090", 24576, 1843, 22432, None, None, "545.29.06")
    ]
    assert parse_gpu_csv("") == []
    assert parse_gpu_csv("NVIDIA-SMI has failed because it couldn't communicate") == []


def test_parse_cuda_version_from_the_header() -> None:
    assert parse_cuda_version((SMI / "header.txt").read_text()) == "12.2"
    assert parse_cuda_version("no header here") is None


def test_parse_compute_apps() -> None:
    # One process on two GPUs is listed twice; [N/A] is an unknown amount.
    assert parse_compute_apps((SMI / "compute-apps.csv").read_text()) == {
        48213: 9696 + 9694, 51877: 40098, 52001: None,
    }
    assert parse_compute_apps("") == {}


async def test_no_nvidia_smi_means_no_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    discovery = Discovery()
    try:
        assert await discovery.refresh() == []
        assert discovery.listed_pids() is None
        assert discovery.process_vram_mb([1]) is None
        host = await discovery.host(["x"])
        assert host["devices"] == [] and host["cuda_version"] is None
    finally:
        await discovery.close()


async def test_a_failing_nvidia_smi_means_no_devices(fake_smi: FakeSmi) -> None:
    fake_smi.set(gpus=[gpu(0, 1000)], exit=9)
    discovery = Discovery()
    try:
        assert await discovery.refresh() == []
    finally:
        await discovery.close()


async def test_fake_nvidia_smi_drives_discovery_health_and_background_polling(
    fake_smi: FakeSmi, node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000), gpu(1, 40000, util=12)], cuda="12.4")
    config = dataclasses.replace(node_config, gpu_poll_interval_s=0.1)

    registry = make_registry(config)
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        resp = await client.get("/discovery")
        body = await resp.json()
        assert body["cuda_version"] == "12.4"
        assert body["driver_version"] == "535.129.03"
        assert [d["index"] for d in body["devices"]] == [0, 1]
        assert body["devices"][1]["memory_free_mb"] == 40000
        assert body["devices"][1]["utilization_pct"] == 12
        # The poller refreshes in the background; /health reads the cache.
        fake_smi.set(gpus=[gpu(0, 1234)])
        await asyncio.to_thread(poll_until, lambda: [
            g.memory_free_mb for g in registry.discovery.cached_gpus()] == [1234], 10)
        health = await (await client.get("/health")).json()
        assert [g["memory_free_mb"] for g in health["gpus"]] == [1234]
    polls = [c for c in fake_smi.calls() if c.startswith("--query-gpu=")]
    assert len(polls) >= 2


async def test_vram_used_mb_comes_from_per_process_accounting(
    fake_smi: FakeSmi, make_registry: MakeRegistry
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000)])

    registry = make_registry()
    record = await registry.load(ModelSpec("m", harness="fake"))
    assert record.worker is not None and record.worker.pid is not None
    await registry.discovery.refresh()
    assert record.to_json()["vram_used_mb"] is None  # not listed: not known
    fake_smi.set(apps={str(record.worker.pid): 5120, "999999": 7})
    await registry.discovery.refresh()
    assert record.to_json()["vram_used_mb"] == 5120
    async with TestClient(TestServer(create_app(registry), host="127.0.0.1")) as client:
        models: list[dict[str, Any]] = await (await client.get("/models")).json()
        assert models[0]["vram_used_mb"] == 5120
