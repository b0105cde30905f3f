"""`GET /models/events` over a registry of fake workers, served as the daemon serves it (a
client that hangs up does not cancel its handler); and `neuronctl events` against a real
daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pty
import queue
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from aiohttp import web

from neuronctl.api.app import ROUTER_STATS, create_app
from neuronctl.api.events_sse import STREAMS, EventStreams
from neuronctl.client import read_events
from neuronctl.config import HarnessConfig, KeySpec, ModelSpec, NeuronConfig
from neuronctl.events import ModelEvent
from neuronctl.keys import sha256_hex
from neuronctl.states import WorkerState
from neuronctl.supervisor.registry import ModelRegistry

from ..fakes import FAKE_LLAMA_SERVER, FileHarness
from ..gpu_fakes import FakeHub, hide_nvidia_smi, wrapper
from ..helpers import (
    NEURONCTL,
    MakeRegistry,
    clean_env,
    free_port,
    kill_quietly,
    poll_until,
    poll_until_async,
)

REPO = "Qwen/Qwen3-0.6B-GGUF"

FAKE = {"model_id": "m", "harness": "fake"}
Frame = tuple[str, Any]


# --- serving and reading a stream ------------------------------------------------------------


@dataclasses.dataclass
class Served:
    url: str
    streams: EventStreams
    runner: web.AppRunner
    session: aiohttp.ClientSession
    stopped: bool = False

    async def stop(self) -> None:
        """The daemon's shutdown of the API: on_shutdown, then a wait for the handlers."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def serve(registry: ModelRegistry, **settings: Any) -> AsyncIterator[Served]:
    """The API on 127.0.0.1 as the daemon runs it; `settings` shorten the streams' own."""
    app = create_app(registry)
    streams = app[STREAMS]
    for name, value in settings.items():
        assert hasattr(streams, name), name
        setattr(streams, name, value)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    served: Served | None = None
    try:
        async with aiohttp.ClientSession() as session:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            served = Served(f"http://127.0.0.1:{runner.addresses[0][1]}", streams, runner, session)
            yield served
    finally:
        if served is not None:
            await served.stop()
        else:
            await runner.cleanup()


class Stream:
    """One client's event stream, read frame by frame, every read bounded."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def frame(self, timeout_s: float = 10.0) -> Frame:
        """The next event as (name, data), a comment as (":", text), the end as ("eof", None)."""

        async def read() -> Frame:
            name, data = "message", []
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    return "eof", None
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    return ":", line[1:].strip()
                if not line:
                    if data:
                        return name, json.loads("\n".join(data))
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)

        return await asyncio.wait_for(read(), timeout_s)

    async def until(self, done: Callable[[Frame], bool], timeout_s: float = 20.0) -> list[Frame]:
        """Frames up to and including the first that is `done`, keep-alives left out."""
        deadline = time.monotonic() + timeout_s
        frames: list[Frame] = []
        while True:
            frame = await self.frame(max(0.01, deadline - time.monotonic()))
            assert frame[0] != "eof", f"the stream ended; got {frames}"
            if frame[0] != ":":
                frames.append(frame)
            if done(frame):
                return frames

    async def states_until(self, model: str, to: str) -> list[dict[str, Any]]:
        frames = await self.until(lambda f: f[0] == "state" and f[1]["model"] == model
                                  and f[1]["to"] == to)
        return [data for name, data in frames if name == "state" and data["model"] == model]


@contextlib.asynccontextmanager
async def stream(served: Served, **headers: str) -> AsyncIterator[Stream]:
    async with served.session.get(served.url + "/models/events", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "text/event-stream"
        yield Stream(resp)


def edges(states: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["from"], s["to"]) for s in states]


# --- the stream --------------------------------------------------------------------------------


async def test_the_snapshot_comes_first_and_lists_loaded_models(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    await registry.load(ModelSpec("a", harness="fake"))
    async with serve(registry) as served, stream(served) as events:
        name, data = await events.frame()
        assert name == "snapshot"
        listed = await (await served.session.get(served.url + "/models")).json()
        # The same list as GET /models (uptime_s aside, which moves).
        assert [{**m, "uptime_s": None} for m in data["models"]] == [
            {**m, "uptime_s": None} for m in listed]
        (model,) = data["models"]
        assert model["id"] == "a" and model["status"] == "loaded" and model["pid"]


async def test_a_load_streams_its_transitions_in_order(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    async with serve(registry) as served, stream(served) as events:
        assert await events.frame() == ("snapshot", {"models": [], "pulls": []})
        load = asyncio.create_task(served.session.post(served.url + "/models/load", json=FAKE))
        states = await events.states_until("m", "ready")
        assert (await load).status == 200
        assert edges(states) == [("pending", "starting"), ("starting", "ready")]
        assert [s["status"] for s in states] == ["loading", "loaded"]
        starting, ready = states
        assert starting["ready_s"] is None and ready["ready_s"] > 0
        assert abs(ready["time"] - time.time()) < 60
        assert set(ready) == {"model", "from", "to", "status", "reason", "time", "ready_s"}


async def test_an_unload_streams_its_transitions(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    await registry.load(ModelSpec("m", harness="fake"))
    async with serve(registry) as served, stream(served) as events:
        assert (await events.frame())[0] == "snapshot"
        unload = await served.session.post(served.url + "/models/unload", json={"model_id": "m"})
        assert unload.status == 200
        states = await events.states_until("m", "stopped")
        assert edges(states) == [("ready", "stopping"), ("stopping", "stopped")]
        assert states[0]["reason"] == "unloaded" and states[0]["status"] == "unloading"


async def test_a_failed_load_streams_the_reason(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    async with serve(registry) as served, stream(served) as events:
        await events.frame()
        body = {**FAKE, "args": ["--mode", "crash", "--code", "7"]}
        answer = await served.session.post(served.url + "/models/load", json=body)
        assert answer.status == 502
        states = await events.states_until("m", "failed")
        assert edges(states) == [("pending", "starting"), ("starting", "failed")]
        assert states[-1]["status"] == "failed"
        assert "exited with code 7" in states[-1]["reason"]


async def test_a_download_sends_progress_about_once_a_second(
    node_config: NeuronConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_registry: MakeRegistry,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hide_nvidia_smi(tmp_path, monkeypatch)
    cache = tmp_path / "hf"
    hub = FakeHub(cache, {"m-Q4_K_M.gguf": b"w" * 4000})
    hub.gate.clear()  # each download holds midway until the test lets it go
    config = dataclasses.replace(node_config, harness={"fake": HarnessConfig(hf_cache=cache)})
    registry = make_registry(config, {"fake": FileHarness()}, fetcher_factory=hub.fetcher)
    try:
        async with serve(registry, progress_s=0.1) as served, stream(served) as events:
            await events.frame()
            load = asyncio.create_task(registry.load(ModelSpec(REPO, harness="fake",
                                                               quant="Q4_K_M")))
            await asyncio.to_thread(hub.midway.wait, 10)
            frames = await events.until(lambda f: f[0] == "progress"
                                        and f[1]["download"]["done_bytes"] == 2000)
            assert ("state", "downloading") in [(n, d.get("to")) for n, d in frames]
            assert frames[-1] == ("progress", {"model": REPO, "download": {
                "file": "m-Q4_K_M.gguf", "done_bytes": 2000, "total_bytes": 4000}})
            hub.gate.set()
            await events.states_until(REPO, "ready")
            await load
            # No progress once the model left DOWNLOADING: the next frame is a keep-alive.
            served.streams.keepalive_s = 0.3
            assert await events.frame() == (":", "keep-alive")
    finally:
        hub.gate.set()


async def test_a_quiet_stream_sends_keep_alives(make_registry: MakeRegistry) -> None:
    async with serve(make_registry(), keepalive_s=0.2) as served, stream(served) as events:
        await events.frame()
        started = time.monotonic()
        assert await events.frame() == (":", "keep-alive")
        assert await events.frame() == (":", "keep-alive")
        assert 0.3 <= time.monotonic() - started < 5


async def test_a_reader_that_falls_behind_gets_a_resync_and_a_fresh_snapshot(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    await registry.load(ModelSpec("a", harness="fake"))
    async with serve(registry, backlog=4) as served, stream(served) as events:
        await events.frame()
        # Ten events in one turn of the loop: the stream's subscription keeps only four.
        for _ in range(10):
            registry.events.publish(ModelEvent("ghost", WorkerState.PENDING,
                                               WorkerState.STARTING))
        assert await events.frame() == ("resync", {"dropped": 6})
        name, data = await events.frame()
        assert name == "snapshot" and [m["id"] for m in data["models"]] == ["a"]
        # And then it goes on as before.
        registry.events.publish(ModelEvent("ghost", WorkerState.STARTING, WorkerState.FAILED))
        name, data = await events.frame()
        assert name == "state" and (data["model"], data["to"]) == ("ghost", "failed")


async def test_a_client_that_hangs_up_leaves_no_subscription_or_task(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    async with serve(registry) as served:  # the default settings: hang-ups seen within 1 s
        subscriptions = len(registry.events._subscriptions)
        tasks = len(asyncio.all_tasks())
        async with stream(served) as events:
            await events.frame()
            assert served.streams.open == 1
            assert len(registry.events._subscriptions) == subscriptions + 1
        # The response is closed: aiohttp drops the connection, as a client that leaves does.
        await poll_until_async(lambda: served.streams.open == 0)
        assert len(registry.events._subscriptions) == subscriptions
        await poll_until_async(lambda: len(asyncio.all_tasks()) <= tasks)


async def test_shutdown_ends_the_streams_at_once(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    async with serve(registry) as served, stream(served) as first, stream(served) as second:
        await first.frame()
        await second.frame()
        started = time.monotonic()
        await served.stop()
        assert time.monotonic() - started < 2.5  # well under the runner's 5 s grace
        assert await first.frame() == ("eof", None)
        assert await second.frame() == ("eof", None)
        assert served.streams.open == 0


async def test_shutdown_does_not_wait_for_a_client_that_stopped_reading(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    async with serve(registry) as served:
        port = int(served.url.rsplit(":", 1)[1])
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.transport.set_write_buffer_limits(0)
            writer.write(b"GET /models/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            await poll_until_async(lambda: served.streams.open == 1)
            # 40 MB of events the client never reads: the stream blocks in a write.
            reason = "x" * (1024 * 1024)
            for _ in range(40):
                registry.events.publish(ModelEvent("m", WorkerState.PENDING,
                                                   WorkerState.STARTING, reason))
            await poll_until_async(lambda: served.streams.stuck == 1)  # blocked in a write
            started = time.monotonic()
            await served.stop()
            assert time.monotonic() - started < 2.5  # well under the 5 s grace
            assert served.streams.open == 0
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_the_number_of_streams_is_bounded(make_registry: MakeRegistry) -> None:
    async with serve(make_registry(), limit=2) as served:
        async with stream(served) as one, stream(served) as two:
            await one.frame()
            await two.frame()
            refused = await served.session.get(served.url + "/models/events")
            assert refused.status == 503
            body = await refused.json()
            assert body["code"] == "too_many_streams"
            assert "limit" in body["error"]
        await poll_until_async(lambda: served.streams.open == 0)
        async with stream(served) as again:  # room again once they left
            assert (await again.frame())[0] == "snapshot"


async def test_traffic_s_sends_the_routers_counts_as_a_heartbeat(
    make_registry: MakeRegistry,
) -> None:
    registry = make_registry()
    await registry.load(ModelSpec("a", harness="fake"))
    async with serve(registry) as served:
        stats = served.runner.app[ROUTER_STATS]
        stats.model("a").queue.ready(4)
        stats.model("a").queue.in_flight = 3
        async with served.session.get(served.url + "/models/events?traffic_s=0.1") as resp:
            events = Stream(resp)
            assert (await events.frame())[0] == "snapshot"
            frames = await events.until(lambda f: f[0] == "traffic")
            first = frames[-1][1]
            assert first["models"]["a"] == {"in_flight": 3, "queued": 0, "slots": 4}
            started = time.monotonic()
            # Another one without any event in between: the stream's heartbeat.
            second = (await events.until(lambda f: f[0] == "traffic"))[-1][1]
            assert second["time"] > first["time"]
            assert time.monotonic() - started < 5
        async with stream(served) as plain:  # without traffic_s: none
            served.streams.keepalive_s = 0.3
            assert (await plain.frame())[0] == "snapshot"
            assert await plain.frame() == (":", "keep-alive")


@pytest.mark.parametrize("value", ["0", "0.01", "11", "nan", "x", "inf"])
async def test_a_bad_traffic_s_is_a_400(make_registry: MakeRegistry, value: str) -> None:
    async with serve(make_registry()) as served:
        refused = await served.session.get(served.url + f"/models/events?traffic_s={value}")
        assert refused.status == 400
        body = await refused.json()
        assert body["code"] == "invalid_value" and "traffic_s" in body["error"]


async def test_the_stream_needs_the_api_key(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    registry = make_registry(dataclasses.replace(node_config, api_key="sesame"))
    async with serve(registry) as served:
        refused = await served.session.get(served.url + "/models/events")
        assert refused.status == 401
        assert (await refused.json())["code"] == "invalid_api_key"
        async with stream(served, Authorization="Bearer sesame") as events:
            assert (await events.frame())[0] == "snapshot"


async def test_one_key_holds_at_most_a_quarter_of_the_streams(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    """A read-only key cannot take every stream: past its share it is refused with why,
    while another key, and an admin's, still get theirs."""
    keys = tuple(KeySpec(name, (role,), sha256=sha256_hex(f"nk-{name}"))
                 for name, role in (("watcher", "read"), ("other", "read"), ("root", "admin")))
    registry = make_registry(dataclasses.replace(node_config, keys=keys))

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer nk-{name}"}

    async with serve(registry, limit=8) as served:  # a quarter: 2 for each key
        async with contextlib.AsyncExitStack() as held:
            for _ in range(2):
                events = await held.enter_async_context(stream(served, **auth("watcher")))
                assert (await events.frame())[0] == "snapshot"
            refused = await served.session.get(served.url + "/models/events",
                                               headers=auth("watcher"))
            assert refused.status == 429
            body = await refused.json()
            assert body["code"] == "key_too_many_streams"
            assert "key 'watcher' holds 2 event streams, the most one key may hold" in \
                body["error"]
            for name in ("other", "root", "root", "root"):
                events = await held.enter_async_context(stream(served, **auth(name)))
                assert (await events.frame())[0] == "snapshot"
        await poll_until_async(lambda: served.streams.open == 0)
        async with stream(served, **auth("watcher")) as again:  # its share back
            assert (await again.frame())[0] == "snapshot"


# --- the client --------------------------------------------------------------------------------


def test_read_events_parses_what_the_daemon_sends_and_skips_comments() -> None:
    raw = [b"event: snapshot\n", b'data: {"models": []}\n', b"\n", b": keep-alive\n", b"\n",
           b"event: state\r\n", b'data: {"model": "m",\r\n', b'data: "to": "ready"}\r\n',
           b"\r\n", b"data: plain\n", b"\n"]
    assert list(read_events(raw)) == [
        ("snapshot", {"models": []}), ("state", {"model": "m", "to": "ready"}),
        ("message", "plain"),
    ]


class Lines:
    """A child's output line by line, each wait bounded (a thread reads the pipe)."""

    def __init__(self, pipe: IO[str]) -> None:
        self._pipe = pipe
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Once the child is gone: the reader has seen the end; the pipe is closed."""
        self._thread.join(10)
        assert not self._thread.is_alive()
        self._pipe.close()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next(self, timeout_s: float = 20.0) -> str | None:
        """The next line; None at the end of the output."""
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout_s} s") from None


def in_a_terminal(argv: list[str], until: Callable[[str], bool]) -> tuple[int, str]:
    """Run `argv` in a pseudo-terminal until its screen text meets `until`, then Ctrl-C;
    its exit status and what it drew (escape sequences removed)."""
    main, tty = pty.openpty()
    try:
        child = subprocess.Popen(argv, stdin=tty, stdout=tty, stderr=tty,
                                 env=clean_env(COLUMNS="120"))
    finally:
        os.close(tty)
    screen = b""

    def read() -> None:
        nonlocal screen
        if select.select([main], [], [], 0.1)[0]:
            with contextlib.suppress(OSError):  # EIO once the child is gone
                screen += os.read(main, 65536)

    try:
        deadline = time.monotonic() + 20
        while not until(text := ANSI.sub("", screen.decode(errors="replace"))):
            assert time.monotonic() < deadline, f"not drawn within 20 s: {text[-500:]!r}"
            assert child.poll() is None, text
            read()
        child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while child.poll() is None:
            assert time.monotonic() < deadline, "no exit within 10 s of Ctrl-C"
            read()
        return child.returncode, text
    finally:
        if child.poll() is None:
            kill_quietly(child.pid)
        child.wait(10)
        os.close(main)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_neuronctl_events_and_status_watch_against_a_real_daemon(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    binary = wrapper(tmp_path / "llama-server", FAKE_LLAMA_SERVER)
    config = tmp_path / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {free_port()}\nlog_dir = "log"\nstate_dir = "state"\n'
        f'stop_timeout_s = 2.0\n[harness.llama-server]\nbinary = "{binary}"\n')
    log = tmp_path / "daemon.log"
    client = [str(NEURONCTL), "--config", str(config)]  # the options go after the command
    children: list[tuple[subprocess.Popen[str], Lines]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], Lines]:
        child = subprocess.Popen([*args], env=clean_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.stdout is not None
        children.append((child, Lines(child.stdout)))
        return children[-1]

    with log.open("wb") as out:
        daemon = subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                  env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: b"listening" in log.read_bytes(), 30)
        # `events --json`: the snapshot, a load's transitions, then Ctrl-C: exit 0, quietly.
        watcher, lines = start(client[0], "events", "--json", *client[1:])
        assert watcher.stderr is not None
        assert json.loads(lines.next() or "") == {"event": "snapshot", "models": [],
                                                  "pulls": []}
        load = subprocess.run([client[0], "load", "tiny", "--harness", "llama-server",
                               "--path", str(tiny_gguf), *client[1:]],
                              env=clean_env(), capture_output=True, text=True, timeout=60)
        assert load.returncode == 0, load.stderr
        seen = [json.loads(lines.next() or "") for _ in range(2)]
        assert [(e["event"], e["model"], e["from"], e["to"]) for e in seen] == [
            ("state", "tiny", "pending", "starting"), ("state", "tiny", "starting", "ready")]
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
        assert watcher.stderr.read() == ""

        # `status --watch` draws the table from the stream; Ctrl-C exits 0.
        code, screen = in_a_terminal([client[0], "status", "--watch", *client[1:]],
                                     lambda text: "loaded" in text)
        assert code == 0, screen
        assert "MODEL" in screen and "tiny" in screen and "MEMORY" in screen
        # Which node it watches, by its name and address (the node's header names it).
        assert re.search(rf"node \S+:\d+ at {re.escape(stream_url(config))}", screen), screen

        # Readable lines; a daemon that stops ends the stream: one line, exit 1.
        follower, readable = start(client[0], "events", *client[1:])
        assert follower.stderr is not None
        assert re.fullmatch(r"\d\d:\d\d:\d\d  tiny  loaded", readable.next() or ""), readable
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert follower.wait(10) == 1
        assert follower.stderr.read().splitlines() == [
            f"neuronctl: the daemon at {stream_url(config)} ended the stream (it is stopping)"]
    finally:
        for child, output in children:
            if child.poll() is None:  # never a signal to a pid that is reaped: it is reused
                kill_quietly(child.pid)
            child.wait(10)
            output.close()
            assert child.stderr is not None
            child.stderr.close()
        if daemon.poll() is None:
            kill_quietly(daemon.pid)
        daemon.wait(30)


def stream_url(config: Path) -> str:
    port = re.search(r"port = (\d+)", config.read_text())
    assert port is not None
    return f"http://127.0.0.1:{port[1]}"
