"""The store's routes: `POST /models/pull` (one download at a time, progress on
`/models/events`, a full disk refused with 507), `GET /models/pulls`, `GET /models/store`
and `GET /models/{id}/show` (the fit against the fake nvidia-smi)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.models.hub import Fetcher

from ..fakes import FileHarness
from ..gpu_fakes import FakeHub, gpu, hide_nvidia_smi, install_fake_smi, lay_out_hf_cache
from ..helpers import MakeRegistry
from .test_events_sse import Served, serve, stream


async def call(served: Served, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with served.session.request(method, served.url + path, json=body) as resp:
        return resp.status, await resp.json()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf"


@pytest.fixture
def config(node_config: NeuronConfig, cache: Path) -> NeuronConfig:
    # A repo pulled by name runs on the default harness: its cache is the test's too.
    return dataclasses.replace(
        node_config, harness={"fake": HarnessConfig(hf_cache=cache),
                              "llama-cpp-python": HarnessConfig(hf_cache=cache)},
        models=(ModelSpec("a", harness="fake", repo="org/a-GGUF", quant="Q4_K_M"),))


async def test_pulls_run_one_at_a_time_with_their_progress_on_the_event_stream(
        config: NeuronConfig, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_registry: MakeRegistry) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    hub = FakeHub(cache, {"a-Q4_K_M.gguf": b"a" * 4000, "b-Q8_0.gguf": b"b" * 1000})
    hub.gate.clear()
    registry = make_registry(config, {"fake": FileHarness()}, fetcher_factory=hub.fetcher)
    try:
        async with serve(registry, progress_s=0.1) as served, stream(served) as events:
            name, snapshot = await events.frame()
            assert name == "snapshot" and snapshot["pulls"] == []
            status, first = await call(served, "POST", "/models/pull", {"model_id": "a"})
            assert status == 202 and first["pull"]["by"] == "client"
            status, second = await call(served, "POST", "/models/pull",
                                        {"model_id": "org/b-GGUF:Q8_0"})
            assert (status, second["status"]) == (202, "queued")
            await asyncio.to_thread(hub.midway.wait, 10)
            frames = await events.until(lambda f: f[0] == "pull" and f[1]["model"] == "a"
                                        and f[1]["done_bytes"] == 2000)
            assert frames[-1][1]["state"] == "downloading"
            assert frames[-1][1]["file"] == "a-Q4_K_M.gguf"
            assert frames[-1][1]["total_bytes"] == 4000
            # One at a time: b waits while a downloads, and /models says so for a.
            _, pulls = await call(served, "GET", "/models/pulls")
            assert [(p["model"], p["state"]) for p in pulls] == \
                [("a", "downloading"), ("org/b-GGUF:Q8_0", "queued")]
            _, models = await call(served, "GET", "/models")
            assert [m["pull"]["state"] for m in models if m["id"] == "a"] == ["downloading"]
            assert hub.downloads == ["a-Q4_K_M.gguf"]
            hub.gate.set()
            await events.until(lambda f: f[0] == "pull" and f[1]["model"] == "org/b-GGUF:Q8_0"
                               and f[1]["state"] == "done")
            assert hub.downloads == ["a-Q4_K_M.gguf", "b-Q8_0.gguf"]
            # A pull loads nothing.
            assert registry.models() == []
            # Pulled again: the cache answers at once.
            status, again = await call(served, "POST", "/models/pull",
                                       {"model_id": "a", "wait": True})
            assert (status, again["status"]) == (200, "done")
            assert again["pull"]["path"].endswith("a-Q4_K_M.gguf")
            assert len(hub.downloads) == 2
            # Removed since (neuronctl rm, another host's cleanup): /models no longer says
            # the download is there.
            Path(again["pull"]["path"]).unlink()
            _, models = await call(served, "GET", "/models")
            assert [m["pull"] for m in models if m["id"] == "a"] == [None]
    finally:
        hub.gate.set()


async def test_every_pull_shows_its_start_and_end_however_quick(
        config: NeuronConfig, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_registry: MakeRegistry) -> None:
    """No tick comes (progress_s an hour): each change of a pull's state is sent as it
    happens: a pull the cache answers at once (again and again: the same bytes and state
    as the last) and a failed one, with its reason."""
    hide_nvidia_smi(tmp_path, monkeypatch)
    hub = FakeHub(cache, {"a-Q4_K_M.gguf": b"a" * 4000})

    registry = make_registry(config, {"fake": FileHarness()}, fetcher_factory=hub.fetcher)
    async with serve(registry, progress_s=3600.0) as served, stream(served) as events:
        assert (await events.frame())[0] == "snapshot"
        for model_id, outcome in (("a", "done"), ("a", "done"), ("a", "done"),
                                  ("org/a-GGUF:Q8_0", "failed")):  # no such file
            status, answer = await call(served, "POST", "/models/pull",
                                        {"model_id": model_id, "wait": True})
            assert answer["pull"]["state"] == outcome, (status, answer)
            frames = await events.until(lambda f: f[0] == "pull"
                                        and f[1]["state"] in ("done", "failed"))
            states = [(f[1]["model"], f[1]["state"]) for f in frames if f[0] == "pull"]
            assert states == [(model_id, "queued"), (model_id, "downloading"),
                              (model_id, outcome)], frames
        assert frames[-1][1]["error"] and frames[-1][1]["code"], frames[-1]


async def test_a_pull_the_disk_cannot_hold_answers_507_with_both_numbers(
        config: NeuronConfig, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_registry: MakeRegistry) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    hub = FakeHub(cache, {"a-Q4_K_M.gguf": b"a" * 4096})

    def small_disk(defaults: HarnessConfig) -> Fetcher:
        return Fetcher(defaults.hf_cache, offline=False, api=hub, download=hub.download,
                       free_space=lambda path: 1024)

    registry = make_registry(config, {"fake": FileHarness()}, fetcher_factory=small_disk)
    async with serve(registry) as served:
        status, answer = await call(served, "POST", "/models/pull",
                                    {"model_id": "a", "wait": True})
    assert status == 507 and answer["code"] == "insufficient_storage"
    assert "it needs 4 KiB, the Hugging Face cache" in answer["error"]
    assert "has 1 KiB free" in answer["error"]
    assert answer["pull"]["state"] == "failed" and hub.downloads == []


@pytest.mark.parametrize(("body", "status", "says"), [
    ({}, 400, "model_id: required"),
    ({"model_id": "nonsense"}, 400, "neither a model of the config"),
    ({"model_id": "a", "wait": "yes"}, 400, "wait: must be true or false"),
    ({"model_id": "local"}, 400, "has a local path"),
])
async def test_bad_pulls_are_refused(config: NeuronConfig, make_registry: MakeRegistry,
                                     tmp_path: Path, body: dict[str, Any], status: int,
                                     says: str) -> None:
    config = dataclasses.replace(config, models=(
        *config.models, ModelSpec("local", harness="fake", path=tmp_path / "x.gguf")))
    async with serve(make_registry(config, {"fake": FileHarness()})) as served:
        got, answer = await call(served, "POST", "/models/pull", body)
    assert got == status and says in answer["error"]


async def test_show_and_store_from_the_cache_with_the_fit_per_gpu(
        config: NeuronConfig, cache: Path, tiny_gguf: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, make_registry: MakeRegistry) -> None:
    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, free=6000, total=8192), gpu(1, free=0, total=8192)])
    lay_out_hf_cache(cache, "org/a-GGUF", {"a-Q4_K_M.gguf": tiny_gguf.read_bytes()})
    config = dataclasses.replace(config, models=(
        *config.models, ModelSpec("gone", harness="fake", repo="org/gone-GGUF")))
    async with serve(make_registry(config, {"fake": FileHarness()})) as served:
        status, shown = await call(served, "GET", "/models/a/show")
        assert status == 200, shown
        assert shown["header"]["architecture"] == "llama" and shown["loaded"] is False
        verdicts = [g["verdict"] for g in shown["estimate"]["configured"]["gpus"]]
        assert verdicts[0].startswith("fits on GPU 0 with 5.")
        assert verdicts[1] == "does not fit: needs 1 MiB, GPU 1 has 0 B free"
        status, missing = await call(served, "GET", "/models/gone/show")
        assert status == 404 and "neuronctl pull gone" in missing["error"]
        status, unknown = await call(served, "GET", "/models/nope/show")
        assert status == 404 and "no such model" in unknown["error"]
        status, listing = await call(served, "GET", "/models/store")
        assert status == 200
        assert [(m["file"], m["ids"]) for m in listing["models"]] == [("a-Q4_K_M.gguf", ["a"])]
        assert listing["total_bytes"] == tiny_gguf.stat().st_size
