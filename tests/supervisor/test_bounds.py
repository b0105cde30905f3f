"""Issue 27, findings #4, #6, #7 and #8: what a client can pile up on a node (failed
entries, long paths, workers, event streams that never read), what it can hold up (the
load lock), and what a large catalogue or a stalled loop must not cost (a slow listing,
a healthy worker killed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.api.events_sse import STREAMS
from neuronctl.config import ConfigError, ModelSpec, NeuronConfig, config_from_mapping, load_config
from neuronctl.errors import NotEnoughRam
from neuronctl.events import ModelEvent
from neuronctl.models.admission import VramGate
from neuronctl.states import ModelStatus, WorkerState
from neuronctl.supervisor.loadlock import LoadLock
from neuronctl.supervisor.registry import MAX_FAILED_AD_HOC, ModelRegistry

from ..fakes import FakeHarness, FileHarness
from ..helpers import MakeRegistry, poll_until_async

Client = TestClient[Any, Any]


@contextlib.asynccontextmanager
async def api(registry: ModelRegistry) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(registry))) as client:
        yield client


async def post(client: Client, body: Any) -> tuple[int, Any, str]:
    async with client.post("/models/load", json=body) as resp:
        text = await resp.text()
        return resp.status, json.loads(text), text


def with_(config: NeuronConfig, **changes: Any) -> NeuronConfig:
    """`config` with keys changed, validated as a config file is."""
    raw = {"host": config.host, "log_dir": str(config.log_dir),
           "state_dir": str(config.state_dir), "stop_timeout_s": config.stop_timeout_s}
    return config_from_mapping({**raw, **changes})


def long_path(tmp_path: Path, length: int) -> str:
    """A path of `length` characters to no file (in 100-character directory names, so
    that it is not refused for one name too long; under 4096, the kernel's own limit)."""
    path = str(tmp_path / "missing")
    while len(path) < length - 105:
        path += "/" + "a" * 99
    return path + "/" + "a" * (length - len(path) - 6) + ".gguf"


# --- #4: long paths, failed entries, quoting -------------------------------------------------


async def test_a_path_longer_than_path_max_is_refused_with_a_short_error(
    make_registry: MakeRegistry, tmp_path: Path
) -> None:
    registry = make_registry(harnesses={"fake": FileHarness()})
    path = long_path(tmp_path, 500_000)
    async with api(registry) as client:
        status, answer, text = await post(client, {"model_id": "m", "harness": "fake",
                                                   "path": path})
        assert (status, answer["code"]) == (400, "invalid_spec")
        assert answer["error"] == "path: longer than 4096 characters (PATH_MAX), got 500000"
        assert len(text) < 300
        async with client.get("/models") as resp:
            assert await resp.json() == []  # nothing was listed for it
    config = tmp_path / "neuron.toml"
    config.write_text(f'[[default_models]]\nmodel_id = "m"\npath = "{path}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config, environ={})
    assert info.value.key == "default_models[0].path"
    assert len(str(info.value)) < 300 + len(str(config))


async def test_errors_and_the_journal_quote_at_most_200_characters_of_a_path(
    make_registry: MakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    registry = make_registry(harnesses={"fake": FileHarness()})
    path = long_path(tmp_path, 4000)
    async with api(registry) as client:
        status, answer, text = await post(client, {"model_id": "m", "harness": "fake",
                                                   "path": path})
        assert (status, answer["code"]) == (400, "model_file_not_found")
        # The start and the end of the path (its file name), not all of it.
        assert answer["error"].startswith(
            f"model file not found or not readable: {path[:100]}")
        assert answer["error"].endswith("aaaa.gguf") and "[4000 characters]" in answer["error"]
        assert len(answer["error"]) < 300
        assert len(text) < 1500  # the error, the failed entry's error and last_error
    # The journal's lines (the failed transition quotes the error) are as short.
    assert caplog.records
    assert max(len(r.getMessage()) for r in caplog.records) < 600


async def test_a_conflicting_load_quotes_both_settings_shortly(
    make_registry: MakeRegistry, fake_harness: FakeHarness, tmp_path: Path
) -> None:
    registry = make_registry()
    first, second = long_path(tmp_path / "x", 4000), long_path(tmp_path / "y", 4000)
    async with api(registry) as client:
        status, _, _ = await post(client, {"model_id": "m", "harness": "fake", "path": first})
        assert status == 200  # the fake worker needs no file
        status, answer, _ = await post(client, {"model_id": "m", "harness": "fake",
                                                "path": second})
        assert (status, answer["code"]) == (409, "conflict")
        assert len(answer["error"]) < 700  # two paths of 4000 quoted at ~200 each


async def test_failed_models_outside_the_catalogue_are_capped_oldest_first(
    make_registry: MakeRegistry, tmp_path: Path
) -> None:
    registry = make_registry(harnesses={"fake": FileHarness()})
    count = MAX_FAILED_AD_HOC + 8
    async with api(registry) as client:
        for i in range(count):
            status, answer, _ = await post(client, {
                "model_id": f"f{i:03d}", "harness": "fake",
                "path": long_path(tmp_path / f"{i}", 4000)})
            assert (status, answer["code"]) == (400, "model_file_not_found")

        def listed() -> list[str]:
            return [m.model_id for m in registry.models()]

        await poll_until_async(lambda: len(listed()) == MAX_FAILED_AD_HOC)
        assert listed() == [f"f{i:03d}" for i in range(count - MAX_FAILED_AD_HOC, count)]
        async with client.get("/models") as resp:
            body = await resp.read()
        # Each entry quotes its path clipped: 32 entries, not 40 x 4 KB paths twice.
        assert len(body) < MAX_FAILED_AD_HOC * 2500


async def test_an_event_stream_that_never_reads_is_dropped_past_its_budget(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    async with api(registry) as client:
        streams = client.app[STREAMS]  # type: ignore[index]
        port = client.port
        assert port is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            await asyncio.get_running_loop().sock_sendall(
                sock, b"GET /models/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await poll_until_async(lambda: streams.open == 1)
            # A 16 MiB event: what the kernel's buffers do not take (they take up to about
            # 4 MiB here) waits in the stream's own buffer, over its 4 MiB budget.
            registry.events.publish(ModelEvent("m", WorkerState.PENDING,
                                               WorkerState.STARTING, "x" * (16 << 20)))
            started = time.monotonic()
            await poll_until_async(lambda: streams.open == 0, timeout=10)
            assert time.monotonic() - started < 5  # the grace is 1 s
        finally:
            sock.close()
        # The node goes on: a new stream opens and gets its snapshot.
        async with client.get("/models/events") as resp:
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"event: snapshot")


# --- #8: workers a client may start ----------------------------------------------------------


async def test_clients_may_start_at_most_max_api_models_outside_the_catalogue(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    config = with_(node_config, max_api_models=2,
                   models=[{"model_id": "cat", "harness": "fake"}])
    registry = make_registry(config)
    async with api(registry) as client:
        for model_id in ("a", "b"):
            status, _, _ = await post(client, {"model_id": model_id, "harness": "fake"})
            assert status == 200
        status, answer, _ = await post(client, {"model_id": "c", "harness": "fake"})
        assert (status, answer["code"]) == (409, "api_model_limit")
        assert answer["error"] == ("c: 2 models outside the catalogue are loaded or loading "
                                   "(a, b), the limit (max_api_models = 2); unload one first")
        assert registry.get("c") is None  # refused before anything was listed
        # The catalogue's models are the operator's: not counted, not refused.
        status, _, _ = await post(client, {"model_id": "cat"})
        assert status == 200
        # Loading one that is loaded is no new worker; an unload makes room.
        assert (await post(client, {"model_id": "a", "harness": "fake"}))[0] == 200
        async with client.post("/models/unload", json={"model_id": "a"}) as resp:
            assert resp.status == 200
        assert (await post(client, {"model_id": "c", "harness": "fake"}))[0] == 200


async def test_max_api_models_0_allows_catalogue_models_only(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    config = with_(node_config, max_api_models=0,
                   models=[{"model_id": "cat", "harness": "fake"}])
    registry = make_registry(config)
    async with api(registry) as client:
        status, answer, _ = await post(client, {"model_id": "x", "harness": "fake"})
        assert (status, answer["code"]) == (409, "api_model_limit")
        assert "max_api_models = 0" in answer["error"]
        # A catalogue id with a source of its own is a model of its own: refused too.
        status, _, _ = await post(client, {"model_id": "cat", "harness": "fake",
                                           "path": "/m/other.gguf"})
        assert status == 409
        assert (await post(client, {"model_id": "cat", "ttl_s": 60}))[0] == 200


async def test_an_n_ctx_above_the_trained_context_is_refused_for_a_client(
    make_registry: MakeRegistry, node_config: NeuronConfig, tiny_gguf: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = with_(node_config, models=[{"model_id": "cat", "harness": "fake",
                                         "path": str(tiny_gguf), "n_ctx": 1024}])
    registry = make_registry(config, {"fake": FileHarness()})
    async with api(registry) as client:
        status, answer, _ = await post(client, {"model_id": "big", "harness": "fake",
                                                "path": str(tiny_gguf), "n_ctx": 2**31 - 1})
        assert (status, answer["code"]) == (400, "n_ctx_too_large")
        assert answer["error"] == ("big: n_ctx 2147483647 is above the context the model was "
                                   "trained for (256 tokens); ask for at most 256")
        status, _, _ = await post(client, {"model_id": "ok", "harness": "fake",
                                           "path": str(tiny_gguf), "n_ctx": 256})
        assert status == 200
        # The operator's n_ctx (the catalogue's) loads, with a warning in the journal.
        caplog.set_level(logging.WARNING)
        assert (await post(client, {"model_id": "cat"}))[0] == 200
        assert "cat: n_ctx 1024 is above the context the model was trained for (256 tokens); " \
               "loading it as configured" in caplog.text
        # ... but a client's own n_ctx for it is the client's.
        await registry.unload("cat")
        status, answer, _ = await post(client, {"model_id": "cat", "n_ctx": 4096})
        assert (status, answer["code"]) == (400, "n_ctx_too_large")


async def test_a_cpu_model_over_the_available_ram_is_refused(
    make_registry: MakeRegistry, tiny_gguf: Path
) -> None:
    registry = make_registry(harnesses={"fake": FileHarness()})
    registry.services.vram_gate = VramGate(
        registry.discovery, lambda: 5.0, time.monotonic, available_ram=lambda: 512 * 1024)
    spec = ModelSpec("tiny", harness="fake", path=tiny_gguf, n_ctx=256)
    with pytest.raises(NotEnoughRam) as info:
        await registry.load(spec)
    assert info.value.status == 503 and info.value.code == "insufficient_ram"
    message = info.value.message
    assert message.startswith("tiny: not enough free memory: needs about 1 MiB (weights ")
    assert message.endswith("but the host has 0 MiB available; set force = true to load anyway")
    assert "KV cache" in message and "n_ctx 256" in message
    forced = await registry.load(ModelSpec("forced", harness="fake", path=tiny_gguf,
                                           n_ctx=256, force=True))
    assert forced.status is ModelStatus.LOADED
    # With the memory there, it loads.
    registry.services.vram_gate = VramGate(
        registry.discovery, lambda: 5.0, time.monotonic, available_ram=lambda: 1 << 30)
    assert (await registry.load(spec)).status is ModelStatus.LOADED


# --- #7: the load lock --------------------------------------------------------------------


async def test_a_never_ready_client_load_does_not_hold_up_a_restart(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    registry = make_registry(with_(node_config, restart_delay_s=0.1))
    default = await registry.load(ModelSpec("default", harness="fake"))
    async with api(registry) as client:
        hang = asyncio.create_task(post(client, {
            "model_id": "hang", "harness": "fake", "args": ["--mode", "hang"],
            "ready_timeout_s": 30}))
        await poll_until_async(lambda: (m := registry.get("hang")) is not None
                               and m.state is WorkerState.STARTING and m.worker is not None
                               and m.worker.pid is not None)
        assert registry.services.load_lock.locked()
        worker = default.worker
        assert worker is not None and worker.pid is not None
        crashed = time.monotonic()
        os.killpg(worker.pid, signal.SIGKILL)
        await poll_until_async(lambda: default.state is WorkerState.BACKOFF, timeout=5)
        await poll_until_async(lambda: default.state is WorkerState.READY, timeout=10)
        assert time.monotonic() - crashed < 10  # not the hang's 30 s
        assert default.restarts == 1 and not hang.done()
        await registry.unload("hang")
        status, answer, _ = await hang
        assert (status, answer["code"]) == (503, "load_cancelled")


async def test_waiting_restarts_go_before_waiting_loads() -> None:
    lock = LoadLock()
    order: list[str] = []
    release = asyncio.Event()

    async def take(name: str, restart: bool) -> None:
        async with lock.hold(restart=restart):
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.create_task(take("first", False))
    await poll_until_async(lock.locked)
    waiting = [asyncio.create_task(take("load", False)),
               asyncio.create_task(take("restart", True))]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["first", "restart", "load"]
    assert not lock.locked()


async def test_a_lent_lock_lets_restarts_in_but_not_loads() -> None:
    lock = LoadLock()
    entered: list[str] = []
    done = asyncio.Event()

    async def warm_up() -> None:
        async with lock.hold() as hold:
            hold.lend()  # its worker spawned: it only waits for it now
            await done.wait()

    async def take(name: str, restart: bool) -> None:
        async with lock.hold(restart=restart):
            entered.append(name)

    holder = asyncio.create_task(warm_up())
    await poll_until_async(lock.locked)
    load = asyncio.create_task(take("load", False))
    restart = asyncio.create_task(take("restart", True))
    await asyncio.wait_for(restart, 5)
    assert entered == ["restart"] and not load.done()
    done.set()
    await asyncio.wait_for(asyncio.gather(holder, load), 5)
    assert entered == ["restart", "load"]


async def test_a_load_request_may_wait_at_most_600_s_for_readiness(
    make_registry: MakeRegistry, tmp_path: Path
) -> None:
    registry = make_registry()
    async with api(registry) as client:
        status, answer, _ = await post(client, {"model_id": "m", "harness": "fake",
                                                "ready_timeout_s": 3600})
        assert (status, answer["code"]) == (400, "invalid_spec")
        assert answer["error"] == ("ready_timeout_s: must be at most 600 s in a load request "
                                   "(a config entry may set more), got 3600")
        assert registry.get("m") is None
    config = tmp_path / "neuron.toml"  # the operator may allow more
    config.write_text('[[default_models]]\nmodel_id = "m"\nready_timeout_s = 3600\n')
    assert load_config(config, environ={}).default_models[0].ready_timeout_s == 3600


# --- #6: a large catalogue, a stalled loop ----------------------------------------------------


async def test_8000_catalogue_models_are_listed_well_under_a_second(
    make_registry: MakeRegistry, node_config: NeuronConfig
) -> None:
    config = with_(node_config,
                   default_models=[{"model_id": "d", "harness": "fake"}],
                   models=[{"model_id": f"org/model-{i:05d}", "path": f"/m/{i}.gguf",
                            "pinned": i % 2 == 0} for i in range(8000)])
    registry = make_registry(config)
    await registry.load(config.default_models[0])
    async with api(registry) as client:
        for _ in range(2):  # the second, too: nothing is cached per request
            started = time.monotonic()
            async with client.get("/models") as resp:
                listed = await resp.json()
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"GET /models took {elapsed:.2f} s"
        assert len(listed) == 8001
        by_id = {m["id"]: m for m in listed}
        assert by_id["d"]["status"] == "loaded" and by_id["d"]["pinned"]
        assert by_id["org/model-00002"]["pinned"] and not by_id["org/model-00003"]["pinned"]


async def test_a_probe_that_failed_while_the_loop_was_stalled_does_not_count(
    make_registry: MakeRegistry, node_config: NeuronConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # One failed probe is enough to kill it, and a probe times out in 0.6 s.
    config = with_(node_config, liveness_interval_s=0.05, liveness_timeout_s=0.6,
                   liveness_failures=1)
    registry = make_registry(config)
    model = await registry.load(ModelSpec("m", harness="fake"))
    worker = model.worker
    assert worker is not None and worker.pid is not None
    answered = 0  # probes the worker answered in time
    stalls = 0
    real_probe = worker._probe

    async def probe(port: int, path: str) -> bool:
        nonlocal stalls, answered
        if stalls > 0:
            stalls -= 1
            time.sleep(1.0)  # the supervisor's own loop, stalled past the probe's timeout
        ok = await real_probe(port, path)  # cancelled when it took too long
        answered += ok
        return ok

    worker._probe = probe
    await poll_until_async(lambda: answered >= 2)
    stalls = 3
    before = answered
    with caplog.at_level(logging.INFO, logger="neuronctl.models"):
        await poll_until_async(lambda: stalls == 0 and answered >= before + 2, timeout=15)
    # Those probes failed (timed out); none was held against the worker.
    not_counted = [r.getMessage() for r in caplog.records
                   if "event loop was" in r.getMessage() and "not counted" in r.getMessage()]
    assert len(not_counted) >= 3, not_counted
    assert model.worker is worker and model.state is WorkerState.READY
    assert model.restarts == 0 and worker.returncode is None
    # A worker that really stops answering is still killed, and restarted.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        await poll_until_async(lambda: model.restarts == 1, timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGCONT)
