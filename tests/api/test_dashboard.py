"""The dashboard's server side over HTTP: the page and its assets (CSP, caching, no inline
script, no data), the key, `GET /models/stats`, and `GET /models/{id}/logs` with hostile
input, rotation, slow and departed clients, its bound and shutdown. The page itself runs in a
real browser in test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import re
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from neuronctl import logfiles
from neuronctl.api import dashboard
from neuronctl.api.app import create_app
from neuronctl.api.logstream import FOLLOWERS, MAX_LINES, LogFollowers
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.supervisor.harness import LlamaServerHarness
from neuronctl.supervisor.registry import ModelRegistry

from ..fakes import FAKE_LLAMA_SERVER
from ..gpu_fakes import wrapper
from ..helpers import MakeRegistry, poll_until_async

UI = Path(dashboard.__file__).parent / "ui"
REPO = Path(__file__).resolve().parents[2]
KEY = "s3cret-key"


@dataclasses.dataclass
class Served:
    url: str
    registry: ModelRegistry
    followers: LogFollowers
    runner: web.AppRunner
    session: aiohttp.ClientSession
    port: int

    async def get(self, path: str, **kw: Any) -> tuple[int, CIMultiDict[str], bytes]:
        async with self.session.get(self.url + path, **kw) as resp:
            return resp.status, resp.headers.copy(), await resp.read()


@contextlib.asynccontextmanager
async def serve(registry: ModelRegistry) -> AsyncIterator[Served]:
    """The API on 127.0.0.1 as the daemon runs it (handlers not cancelled on hang-up)."""
    app = create_app(registry)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            yield Served(f"http://127.0.0.1:{port}", registry, app[FOLLOWERS], runner,
                         session, port)
    finally:
        await runner.cleanup()


def fake(model_id: str, **kw: Any) -> ModelSpec:
    return ModelSpec(model_id, harness="fake", **kw)


@pytest.fixture
def catalogue_config(node_config: NeuronConfig) -> NeuronConfig:
    return dataclasses.replace(node_config, models=(fake("m"), fake("org/other+x@1")))


# --- the page and its assets -----------------------------------------------------------------


async def test_the_page_and_assets_are_served_with_a_strict_csp_and_etags(
    make_registry: MakeRegistry, catalogue_config: NeuronConfig,
) -> None:
    async with serve(make_registry(catalogue_config)) as node:
        for path, name, kind in (("/", "index.html", "text/html"),
                                 ("/ui/app.js", "app.js", "text/javascript"),
                                 ("/ui/app.css", "app.css", "text/css")):
            status, headers, body = await node.get(path, headers={"Accept-Encoding": "identity"})
            assert status == 200 and headers["Content-Type"].startswith(kind)
            assert body == (UI / name).read_bytes()
            csp = headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Cache-Control"] == "no-cache"
            status, again, _ = await node.get(path, headers={"If-None-Match": headers["ETag"],
                                                             "Accept-Encoding": "identity"})
            assert status == 304 and again["ETag"] == headers["ETag"]
            status, zipped, gz = await node.get(path, headers={"Accept-Encoding": "gzip"})
            assert status == 200 and zipped["Content-Encoding"] == "gzip"
            assert gzip.decompress(gz) == body and zipped["ETag"] != headers["ETag"]
        async with node.session.head(node.url + "/") as resp:
            assert resp.status == 200
        status, _, body = await node.get("/ui/nope.js")
        assert status == 404 and b'"error"' in body
        status, _, _ = await node.get("/ui/../neuronctl/api/app.py")
        assert status == 404


def test_the_page_has_no_inline_script_or_style_and_renders_data_as_text() -> None:
    html = (UI / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(re.search(r'\bsrc="/ui/app\.js"', s) for s in scripts)
    assert re.search(r"<script\b[^>]*>\s*[^<\s]", html) is None  # no script body
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    js = (UI / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "localStorage", "new EventSource"):
        assert sink not in js, sink
    # Nothing external: no CDN, no fonts from elsewhere.
    for text in (html, js, (UI / "app.css").read_text()):
        assert not re.search(r"https?://", text)


async def test_with_a_key_only_the_page_is_open_and_it_holds_no_data(
    make_registry: MakeRegistry, catalogue_config: NeuronConfig,
) -> None:
    config = dataclasses.replace(catalogue_config, api_key=KEY)
    async with serve(make_registry(config)) as node:
        for path in ("/", "/ui/app.js", "/ui/app.css"):
            status, _, body = await node.get(path)
            assert status == 200
            assert b"org/other" not in body  # the catalogue is not in the page
        for path in ("/models", "/models/stats", "/models/events", "/models/m/logs",
                     "/discovery", "/index.html", "/ui/"):
            status, _, body = await node.get(path)
            assert status == 401, path
            assert b"org/other" not in body
        auth = {"Authorization": f"Bearer {KEY}"}
        status, _, body = await node.get("/models/stats", headers=auth)
        assert status == 200 and b'"models"' in body
        status, _, _ = await node.get("/models/stats", headers={"x-api-key": "wrong"})
        assert status == 401


# --- the charts' counters --------------------------------------------------------------------


async def test_models_stats_counts_requests_and_tokens(
    make_registry: MakeRegistry, node_config: NeuronConfig, tiny_gguf: Path, tmp_path: Path,
) -> None:
    binary = wrapper(tmp_path / "llama-server", FAKE_LLAMA_SERVER)
    harness = LlamaServerHarness(HarnessConfig(binary=str(binary)))
    spec = ModelSpec("tok", harness="llama-server", path=tiny_gguf)
    config = dataclasses.replace(node_config, models=(spec,))
    async with serve(make_registry(config, {"llama-server": harness})) as node:
        status, _, body = await node.get("/models/stats")
        assert status == 200 and b'"models": {}' in body
        for max_tokens in (3, 5):
            async with node.session.post(node.url + "/v1/completions",
                                         json={"model": "tok", "max_tokens": max_tokens}) as r:
                assert r.status == 200, await r.text()
        async with node.session.get(node.url + "/models/stats") as resp:
            stats = await resp.json()
        assert stats["models"]["tok"] == {"requests": 2, "tokens": 8, "in_flight": 0,
                                          "queued": 0}
        assert abs(stats["time"] - time.time()) < 5


# --- the log route -----------------------------------------------------------------------------


async def loaded(node: Served, model_id: str = "m") -> Path:
    model = await node.registry.load(fake(model_id))
    return model.log_path


async def test_the_log_tail_with_lines_previous_and_hostile_input(
    make_registry: MakeRegistry, catalogue_config: NeuronConfig,
) -> None:
    async with serve(make_registry(catalogue_config)) as node:
        path = await loaded(node)
        with path.open("a") as fh:
            fh.writelines(f"line {i}\n" for i in range(50))
            fh.write("<script>alert(1)</script> \xff bytes\n")
        status, headers, body = await node.get("/models/m/logs?lines=3")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert body.decode().splitlines() == ["line 48", "line 49",
                                              "<script>alert(1)</script> \xff bytes"]
        status, _, body = await node.get("/models/m/logs?lines=0")
        assert status == 200 and body == b""
        status, _, body = await node.get(f"/models/m/logs?lines={10**11}")  # clamped
        assert status == 200 and len(body.decode().splitlines()) <= MAX_LINES
        assert b"line 0\n" in body
        status, _, body = await node.get("/models/m/logs?previous=1")
        assert status == 404 and b"no previous log yet for m" in body
        logfiles.previous_path(path).write_text("before the restart\n")
        status, _, body = await node.get("/models/m/logs?previous=1&follow=1")
        assert status == 200 and body == b"before the restart\n"  # ends: it does not grow
        # A catalogue model never loaded has no log yet; ids with + @ / are fine.
        status, _, body = await node.get("/models/org/other%2Bx%401/logs")
        assert status == 404 and b"no log yet for org/other+x@1" in body
        for bad, expected in [
            ("lines=-1", 400), ("lines=abc", 400), ("lines=1e9", 400),
            ("lines=%D9%A1", 400), ("lines=" + "9" * 40, 400), ("follow=maybe", 400),
            ("previous=%00", 400),
        ]:
            status, _, body = await node.get(f"/models/m/logs?{bad}")
            assert status == expected, (bad, body)
            assert b'"error"' in body
        for hostile, expected in [
            ("..%2F..%2Fetc%2Fpasswd", 400), ("%2E%2E/%2E%2E/etc/passwd", 400),
            ("m%00", 400), ("nope", 404), ("-m", 400), ("a/../../m", 400),
            ("x" * 300, 400), ("%F0%9F%98%80", 400), ("etc/passwd", 404),
        ]:
            status, _, body = await node.get(f"/models/{hostile}/logs")
            assert status in (expected, 404) and b'"error"' in body, (hostile, body)
            assert b"root:" not in body
        status, _, _ = await node.get("/models/m/logs/x")  # only the model's own file
        assert status == 404


async def read_until(resp: aiohttp.ClientResponse, needle: bytes, timeout: float = 10) -> bytes:
    seen = b""

    async def read() -> bytes:
        nonlocal seen
        while needle not in seen:
            chunk = await resp.content.readany()
            assert chunk, f"the stream ended before {needle!r}; got {seen[-300:]!r}"
            seen += chunk
        return seen

    return await asyncio.wait_for(read(), timeout)


async def test_follow_streams_new_lines_across_rotation_and_truncation(
    make_registry: MakeRegistry, catalogue_config: NeuronConfig,
) -> None:
    async with serve(make_registry(catalogue_config)) as node:
        node.followers.poll_s = 0.05
        path = await loaded(node)
        async with node.session.get(node.url + "/models/m/logs?follow=1&lines=1") as resp:
            assert resp.status == 200
            await read_until(resp, b"\n")  # the tail
            with path.open("a") as fh:
                fh.write("appended one\n")
            await read_until(resp, b"appended one\n")
            # A restart rotates: the old file is finished, the new one read from its start.
            with path.open("a") as fh:
                fh.write("last of the old\n")
            logfiles.rotate(path, keep=2)
            path.write_text("first of the new\n")
            seen = await read_until(resp, b"first of the new\n")
            assert b"last of the old\n" in seen
            # Truncated and written again, shorter than what was read: no pause needed for
            # the follower to see the file shrink under its position.
            path.write_text("cut\n")
            await read_until(resp, b"cut\n")
            # A multi-byte character split across writes arrives whole.
            with path.open("ab") as fh:
                fh.write("é".encode()[:1])
                fh.flush()
                await asyncio.sleep(0.2)  # the pause is the scenario: a read between writes
                fh.write("é".encode()[1:] + b"\n")
            await read_until(resp, "é\n".encode())


async def test_followers_are_bounded_and_end_when_the_client_leaves(
    make_registry: MakeRegistry, catalogue_config: NeuronConfig,
) -> None:
    async with serve(make_registry(catalogue_config)) as node:
        node.followers.poll_s = 0.05
        node.followers.limit = 3
        await loaded(node)
        url = node.url + "/models/m/logs?follow=1"
        responses = [await node.session.get(url) for _ in range(3)]
        try:
            assert all(r.status == 200 for r in responses)
            await poll_until_async(lambda: node.followers.open == 3)
            status, _, body = await node.get("/models/m/logs?follow=1")
            assert status == 503 and b"too_many_streams" in body
            status, _, _ = await node.get("/models/m/logs")  # a tail is no follower
            assert status == 200
        finally:
            for r in responses:
                r.close()  # the client hangs up
        await poll_until_async(lambda: node.followers.open == 0, timeout=5)


async def test_a_client_that_never_reads_holds_little_and_shutdown_ends_it(
    make_registry: MakeRegistry, catalogue_config: NeuronConfig,
) -> None:
    registry = make_registry(catalogue_config)
    async with serve(registry) as node:
        node.followers.poll_s = 0.02
        path = await loaded(node)
        stuck = socket.create_connection(("127.0.0.1", node.port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /models/m/logs?follow=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        idle = await node.session.get(node.url + "/models/m/logs?follow=1")
        try:
            await poll_until_async(lambda: node.followers.open == 2)
            line = ("x" * 1000 + "\n").encode()
            with path.open("ab") as fh:
                for _ in range(20_000):  # 20 MB that the stuck client never reads
                    fh.write(line)
            await poll_until_async(lambda: node.followers.stuck >= 1, timeout=10)
            started = time.monotonic()
            await node.runner.cleanup()  # the daemon's shutdown of the API
            assert time.monotonic() - started < 4
            assert node.followers.open == 0
        finally:
            stuck.close()
            idle.close()


# --- the package ships the page -----------------------------------------------------------------


def test_the_built_wheel_holds_the_dashboard(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("neuronctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("index.html", "app.js", "app.css", "__init__.py"):
        assert f"neuronctl/api/ui/{name}" in names, sorted(names)


async def test_a_hundred_followers_get_the_bound_and_one_waits_for_a_log_to_appear(
    make_registry: MakeRegistry, catalogue_config: NeuronConfig,
) -> None:
    async with serve(make_registry(catalogue_config)) as node:
        node.followers.poll_s = 0.05
        await loaded(node)
        # A model never loaded: the follower waits for its file, then reads it from the start.
        waiting = await node.session.get(node.url + "/models/org/other%2Bx%401/logs?follow=1")
        assert waiting.status == 200
        url = node.url + "/models/m/logs?follow=1&lines=1"
        many = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        answers = await asyncio.wait_for(
            asyncio.gather(*(many.get(url) for _ in range(100))), 30)
        try:
            statuses = sorted(r.status for r in answers)
            # One of the 32 is the follower waiting above.
            assert statuses.count(200) == 31 and statuses.count(503) == 69
            assert node.followers.open == node.followers.limit
            await node.registry.load(fake("org/other+x@1"))
            seen = await read_until(waiting, b"fake worker pid")
            assert seen.startswith(b"=== ")  # the start header: the first line, no blank one
        finally:
            waiting.close()
            for r in answers:
                r.close()
            await many.close()
        await poll_until_async(lambda: node.followers.open == 0, timeout=5)


def test_token_counts_come_only_from_a_sane_usage() -> None:
    from neuronctl.api.upstream import completion_tokens

    class Answer:
        def __init__(self, status: int = 200, kind: str = "application/json") -> None:
            self.status, self.headers = status, {"Content-Type": kind}

    def count(body: bytes, answer: Any = None) -> int:
        return completion_tokens(answer or Answer(), body)

    assert count(b'{"usage": {"completion_tokens": 7}}') == 7
    for body in (b"[1]", b'{"usage": 3}', b'{"usage": {"completion_tokens": "7"}}',
                 b'{"usage": {"completion_tokens": -1}}', b"not json", b"[" * 100_000,
                 b'{"usage": {"completion_tokens": 1e400}}',
                 b'{"usage": {"completion_tokens": 99999999999999999999}}'):
        assert count(body) == 0, body
    assert count(b'{"usage": {"completion_tokens": 7}}', Answer(500)) == 0
    assert count(b'{"usage": {"completion_tokens": 7}}', Answer(kind="text/plain")) == 0
