"""The Hub: a GGUF picked from a Hugging Face repo and cached.

No test touches the network: the cache is laid out here in huggingface_hub's own format and
HF_HUB_OFFLINE=1 is set; downloads go through a stand-in for hf_hub_download.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from neuronctl.aio import in_thread
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.errors import LoadError
from neuronctl.models.hub import Fetcher, Progress, ResolveError, select
from neuronctl.states import ModelStatus, WorkerState
from neuronctl.supervisor.harness import LlamaCppPythonHarness, build_harnesses

from ..fakes import FileHarness
from ..gpu_fakes import FakeHub, hide_nvidia_smi, lay_out_hf_cache
from ..helpers import MakeRegistry, llama_required, poll_until

REPO = "Qwen/Qwen3-0.6B-GGUF"
FILES = {
    "README.md": b"# Qwen3",
    "Qwen3-0.6B-Q4_K_M.gguf": b"q4km",
    "Qwen3-0.6B-Q4_K_S.gguf": b"q4ks",
    "Qwen3-0.6B-Q8_0.gguf": b"q8",
    "Qwen3-0.6B-IQ4_XS.gguf": b"iq4xs",
    "mmproj-Qwen3-0.6B-Q8_0.gguf": b"projector",
    "BF16/Qwen3-0.6B-BF16-00001-of-00003.gguf": b"part1",
    "BF16/Qwen3-0.6B-BF16-00002-of-00003.gguf": b"part2",
    "BF16/Qwen3-0.6B-BF16-00003-of-00003.gguf": b"part3",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hf-cache"
    lay_out_hf_cache(cache, REPO, FILES)
    return cache


def spec(**kw: Any) -> ModelSpec:
    return ModelSpec(REPO, **kw)


def resolve(cache: Path, **kw: Any) -> tuple[Path, ...]:
    resolved = Fetcher(cache).resolve(spec(**kw), Progress())
    return resolved.parts


def test_the_layout_is_huggingface_hubs_own(cache: Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(REPO, "Qwen3-0.6B-Q8_0.gguf", cache_dir=cache)
    assert isinstance(found, str) and Path(found).read_bytes() == b"q8"


def test_exact_file(cache: Path) -> None:
    (path,) = resolve(cache, file="Qwen3-0.6B-Q8_0.gguf")
    assert path.name == "Qwen3-0.6B-Q8_0.gguf" and path.read_bytes() == b"q8"
    assert "snapshots" in path.parts  # the cache's own file, not a copy


def test_quant_is_matched_case_insensitively_and_exactly(cache: Path) -> None:
    assert [p.name for p in resolve(cache, quant="q4_k_m")] == ["Qwen3-0.6B-Q4_K_M.gguf"]
    # Q8_0 is also in the projector's name: projectors are never the model.
    assert [p.name for p in resolve(cache, quant="Q8_0")] == ["Qwen3-0.6B-Q8_0.gguf"]
    # Q4_XS must not pick IQ4_XS, nor IQ4_XS miss.
    assert [p.name for p in resolve(cache, quant="IQ4_XS")] == ["Qwen3-0.6B-IQ4_XS.gguf"]
    with pytest.raises(ResolveError, match="has no GGUF file with quant Q4_XS"):
        resolve(cache, quant="Q4_XS")
    # Nor Q4_K pick Q4_K_M or Q4_K_S: those are other quants.
    with pytest.raises(ResolveError, match="has no GGUF file with quant Q4_K;"):
        resolve(cache, quant="Q4_K")


def test_split_files_resolve_to_every_part_and_point_at_the_first(cache: Path) -> None:
    parts = resolve(cache, quant="bf16")
    assert [p.name for p in parts] == [
        f"Qwen3-0.6B-BF16-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    ]
    assert [p.read_bytes() for p in parts] == [b"part1", b"part2", b"part3"]
    # Naming any part means the whole model.
    named = resolve(cache, file="BF16/Qwen3-0.6B-BF16-00002-of-00003.gguf")
    assert named == parts


def test_ambiguous_quant_lists_the_matches(cache: Path) -> None:
    lay_out_hf_cache(cache, "org/two", {"a-Q4_K_M.gguf": b"a", "b-Q4_K_M.gguf": b"b"})
    with pytest.raises(ResolveError) as info:
        Fetcher(cache).resolve(ModelSpec("org/two", quant="Q4_K_M"), Progress())
    message = info.value.message
    assert "org/two (cached) has several GGUF files with quant Q4_K_M" in message
    assert "a-Q4_K_M.gguf" in message and "b-Q4_K_M.gguf" in message and "`file`" in message


def test_no_match_lists_what_the_repo_has(cache: Path) -> None:
    with pytest.raises(ResolveError) as info:
        resolve(cache, quant="Q2_K")
    message = info.value.message
    assert f"repo {REPO} (cached) has no GGUF file with quant Q2_K; it has: " in message
    assert "HF_HUB_OFFLINE=1" in message
    for name in ("Qwen3-0.6B-Q4_K_M.gguf", "Qwen3-0.6B-Q8_0.gguf",
                 "BF16/Qwen3-0.6B-BF16-00001-of-00003.gguf"):
        assert name in message
    assert "README.md" not in message and "00002-of" not in message
    with pytest.raises(ResolveError, match=r"has no file nope\.gguf; it has: "):
        resolve(cache, file="nope.gguf")


def test_no_quant_and_several_files_asks_for_one(cache: Path) -> None:
    with pytest.raises(ResolveError, match="several GGUF files: "):
        resolve(cache)
    lay_out_hf_cache(cache, "org/single", {"only.gguf": b"x", "mmproj-f16.gguf": b"p"})
    resolved = Fetcher(cache).resolve(ModelSpec("org/single"), Progress())
    assert resolved.path.name == "only.gguf"


def test_revision_tag_and_commit(tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    lay_out_hf_cache(cache, REPO, {"m-Q8_0.gguf": b"old"}, commit="1" * 40, refs=("v1",))
    lay_out_hf_cache(cache, REPO, {"m-Q8_0.gguf": b"new"}, commit="2" * 40, refs=("main",))
    assert resolve(cache, quant="Q8_0")[0].read_bytes() == b"new"
    assert resolve(cache, quant="Q8_0", revision="v1")[0].read_bytes() == b"old"
    assert resolve(cache, quant="Q8_0", revision="1" * 40)[0].read_bytes() == b"old"
    with pytest.raises(ResolveError, match=r"not in the cache .* HF_HUB_OFFLINE=1"):
        resolve(cache, quant="Q8_0", revision="v2")


def test_a_repo_not_in_the_cache_offline(tmp_path: Path) -> None:
    with pytest.raises(ResolveError, match=r"Hugging Face repo org/absent is not in the cache"):
        Fetcher(tmp_path).resolve(ModelSpec("org/absent", quant="Q4_K_M"), Progress())


def test_select_is_pure() -> None:
    names = ["x/a-Q4_K_M-00001-of-00002.gguf", "x/a-Q4_K_M-00002-of-00002.gguf", "b.gguf"]
    assert select(names, ModelSpec("r", quant="Q4_K_M"), "r") == names[:2]
    with pytest.raises(ResolveError, match="has 1 of its 2 parts"):
        select(names[1:], ModelSpec("r", file=names[1]), "r")


# --- downloads ---------------------------------------------------------------------------


def test_download_fetches_every_part_into_the_cache_with_progress(tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    hub = FakeHub(cache, {k: v * 1000 for k, v in FILES.items()})
    lines: list[str] = []
    progress = Progress(log=lines.append)
    resolved = hub.fetcher(HarnessConfig(hf_cache=cache)).resolve(spec(quant="BF16"), progress)
    assert hub.downloads == [f"BF16/Qwen3-0.6B-BF16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert resolved.path.name.endswith("00001-of-00003.gguf")
    assert resolved.path.read_bytes() == b"part1" * 1000
    assert progress.total_bytes == progress.done_bytes == 15000
    assert any("fetching BF16/Qwen3-0.6B-BF16-00002-of-00003.gguf" in ln for ln in lines)
    assert lines[-1] == "download: done, 15 KiB of 15 KiB (100%)"
    # A second resolution is served by the cache, with no listing and no download.
    again = Fetcher(cache, offline=True).resolve(spec(quant="BF16"), Progress())
    assert again.parts == resolved.parts and len(hub.downloads) == 3


async def test_a_load_shows_downloading_with_bytes_then_loads_the_file(
    node_config: NeuronConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_registry: MakeRegistry,
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    cache = tmp_path / "hf"
    hub = FakeHub(cache, {"m-Q4_K_M.gguf": b"w" * 4000})
    hub.gate.clear()
    config = dataclasses.replace(node_config, harness={"fake": HarnessConfig(hf_cache=cache)})
    harness = FileHarness()

    registry = make_registry(config, {"fake": harness}, fetcher_factory=hub.fetcher)
    load = asyncio.create_task(registry.load(ModelSpec(REPO, harness="fake", quant="Q4_K_M")))
    await asyncio.to_thread(hub.midway.wait, 10)
    record = registry.get(REPO)
    assert record is not None
    assert record.status is ModelStatus.DOWNLOADING
    shown = record.to_json()
    assert shown["status"] == "downloading"
    assert shown["download"] == {"file": "m-Q4_K_M.gguf", "done_bytes": 2000,
                                 "total_bytes": 4000}
    # The systemd heartbeat sees the download as progress.
    assert registry.load_progress() == ((REPO, "download", 2000),)
    # The event loop is free: the API would answer; nothing is spawned yet.
    assert harness.planned == []
    hub.gate.set()
    loaded = await load
    assert loaded.status is ModelStatus.LOADED and loaded.to_json()["download"] is None
    (planned,) = harness.planned_specs
    assert planned.path == cache / f"models--Qwen--Qwen3-0.6B-GGUF/snapshots/{'9' * 40}" \
        "/m-Q4_K_M.gguf"
    assert loaded.spec.path is None  # the record keeps the spec as asked
    log = loaded.log_path.read_text()
    # Download lines and the worker's own output share one log.
    assert log.index("download: fetching m-Q4_K_M.gguf") < log.index("neuronctl starting")


async def test_unload_during_a_download_returns_at_once(
    node_config: NeuronConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_registry: MakeRegistry,
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    cache = tmp_path / "hf"
    hub = FakeHub(cache, {"m-Q4_K_M.gguf": b"w" * 4000})
    hub.gate.clear()
    config = dataclasses.replace(node_config, harness={"fake": HarnessConfig(hf_cache=cache)})
    harness = FileHarness()

    registry = make_registry(config, {"fake": harness}, fetcher_factory=hub.fetcher)
    try:
        load = asyncio.create_task(registry.load(ModelSpec(REPO, harness="fake",
                                                           quant="Q4_K_M")))
        await asyncio.to_thread(hub.midway.wait, 10)
        record = registry.get(REPO)
        assert record is not None and record.state is WorkerState.DOWNLOADING
        # The download thread is still blocked: the unload must not wait for it.
        await registry.unload(REPO)
        assert record.state is WorkerState.STOPPED and registry.get(REPO) is None
        with pytest.raises(LoadError, match="load cancelled"):
            await load
        assert not hub.finished.is_set() and harness.planned == []
    finally:
        hub.gate.set()  # the thread notices its cancel flag at the next chunk
    await registry.shutdown()
    await asyncio.to_thread(
        poll_until, lambda: not any(t.name.startswith("download ") for t in threading.enumerate())
    )
    assert not hub.finished.is_set()  # it stopped rather than finishing the file


async def test_a_failed_resolution_fails_the_load_with_the_reason(
    node_config: NeuronConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_registry: MakeRegistry,
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    cache = tmp_path / "hf"
    lay_out_hf_cache(cache, REPO, FILES)
    config = dataclasses.replace(node_config, harness={"fake": HarnessConfig(hf_cache=cache)})

    registry = make_registry(config, {"fake": FileHarness()})
    with pytest.raises(LoadError, match="no GGUF file with quant Q5_K_M; it has: "):
        await registry.load(ModelSpec(REPO, harness="fake", quant="Q5_K_M"))
    record = registry.get(REPO)
    assert record is not None and record.status is ModelStatus.FAILED
    assert "Qwen3-0.6B-Q8_0.gguf" in (record.to_json()["error"] or "")


async def test_in_thread_delivers_results_and_errors() -> None:
    assert await in_thread(lambda: 42, "t") == 42
    with pytest.raises(ZeroDivisionError):
        await in_thread(lambda: 1 // 0, "t")


def test_llama_cpp_python_gets_a_local_file_never_a_repo(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    harness = LlamaCppPythonHarness(HarnessConfig())
    plan = harness.plan(ModelSpec(REPO, path=model, devices=(1, 3), tensor_split=(3.0, 1.0)),
                        4000)
    assert "--hf_model_repo_id" not in plan.command
    assert plan.command[plan.command.index("--model") + 1] == str(model)
    assert plan.command[plan.command.index("--n_gpu_layers") + 1] == "-1"
    split = plan.command.index("--tensor_split")
    assert plan.command[split + 1: split + 3] == ("3", "1")
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "1,3"
    with pytest.raises(LoadError, match="no model file was resolved"):
        harness.plan(ModelSpec(REPO), 4000)


@pytest.mark.parametrize(("body", "error"), [
    ({"file": "../outside.gguf"}, "file: must be a path in the repo, got '../outside.gguf'"),
    ({"file": "/abs/m.gguf"}, "file: must be a path in the repo, got '/abs/m.gguf'"),
    ({"file": "m.safetensors"}, "file: must name a .gguf file, got 'm.safetensors'"),
    ({"quant": ""}, "quant: must not be empty"),
    ({"revision": ""}, "revision: must not be empty"),
    ({"revision": 3}, "revision: expected a string, got an integer 3"),
])
def test_model_source_keys_are_validated(body: dict[str, Any], error: str) -> None:
    from neuronctl.config import ConfigError, model_spec_from_mapping

    with pytest.raises(ConfigError) as info:
        model_spec_from_mapping({"model_id": REPO, **body})
    assert str(info.value) == error


def test_model_source_keys_from_the_config_file(tmp_path: Path) -> None:
    from neuronctl.config import load_config

    path = tmp_path / "neuron.toml"
    path.write_text(f'[[default_models]]\nmodel_id = "{REPO}"\n'
                    'file = "BF16/m-00001-of-00002.gguf"\nrevision = "v1.0"\n')
    (model,) = load_config(path, {}).default_models
    assert (model.file, model.revision, model.quant) == ("BF16/m-00001-of-00002.gguf", "v1.0", None)


@pytest.mark.llama
@llama_required
async def test_a_real_worker_loads_a_model_from_the_hugging_face_cache(
    node_config: NeuronConfig, tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_registry: MakeRegistry,
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    cache = tmp_path / "hf"
    lay_out_hf_cache(cache, "neuron/tiny-GGUF", {"tiny-F32.gguf": tiny_gguf.read_bytes(),
                                                 "tiny-Q8_0.gguf": b"not this one"})
    config = dataclasses.replace(
        node_config, harness={"llama-cpp-python": HarnessConfig(hf_cache=cache, n_ctx=64)}
    )

    registry = make_registry(config, build_harnesses(config))
    record = await registry.load(ModelSpec("neuron/tiny-GGUF", quant="f32"))
    assert record.status is ModelStatus.LOADED and record.worker is not None
    command = record.worker.plan.command
    model = Path(command[command.index("--model") + 1])
    assert model.parent.parent.name == "snapshots" and model.name == "tiny-F32.gguf"


def test_every_state_edge_is_commented_with_its_reason() -> None:
    import re

    import neuronctl.states as states

    source = Path(states.__file__).read_text(encoding="utf-8")
    commented = set(re.findall(r"WorkerState\.(\w+),\s+# (\w+) -> \1: \S", source))
    edges = {(new.name, old.name) for old, news in states.TRANSITIONS.items() for new in news}
    assert commented == edges
    assert states.WorkerState.DOWNLOADING.status is ModelStatus.DOWNLOADING


async def test_a_download_that_fails_says_why_in_the_models_log(
    node_config: NeuronConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_registry: MakeRegistry,
) -> None:
    hide_nvidia_smi(tmp_path, monkeypatch)
    cache = tmp_path / "hf"
    hub = FakeHub(cache, {"m-Q8_0.gguf": b"w" * 4000})  # no Q4_K_M in the repo
    config = dataclasses.replace(node_config, harness={"fake": HarnessConfig(hf_cache=cache)})
    registry = make_registry(config, {"fake": FileHarness()}, fetcher_factory=hub.fetcher)
    with pytest.raises(LoadError) as failed:
        await registry.load(ModelSpec(REPO, harness="fake", quant="Q4_K_M"))
    record = registry.get(REPO)
    assert record is not None
    log = record.log_path.read_text(encoding="utf-8")
    assert f"download failed: {failed.value.message}" in log
