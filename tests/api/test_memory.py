"""Issue 27: what a client or a worker can make the node hold, and for how long.

Each test runs a real `neuronctl start` (tests/helpers.start_daemon) whose workers are the
fake llama-server, asked by fields of the request body to misbehave (hold its slot, answer
hundreds of MiB, stall mid-answer, lie about its length, send too many headers). The
daemon's own RSS is read with psutil, sampled all along, so a peak between two requests
counts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from neuronctl import errors
from neuronctl.api.requestbody import MAX_ROUTING_KEYS, PARSE_BYTES, Routing, routing
from neuronctl.api.traffic import ModelQueue, QueuedBytes

from ..helpers import Daemon, poll_until, start_daemon

MIB = 1024 * 1024


def model_toml(model_id: str, gguf: Path, table: str = "default_models") -> str:
    # One slot (llama-server's own default is 4): a held request makes the rest queue.
    return (f'[[{table}]]\nmodel_id = "{model_id}"\nharness = "llama-server"\n'
            f'path = "{gguf}"\nparallel = 1\n\n')


@contextlib.contextmanager
def node(tmp_path: Path, gguf: Path, settings: str = "", models: str = "") -> Iterator[Daemon]:
    """A daemon serving the fake llama-server as `fake` (a default model)."""
    daemon = start_daemon(tmp_path / "node", model_toml("fake", gguf) + models,
                          settings=settings)
    try:
        poll_until(lambda: daemon.model("fake")["status"] == "loaded", 20)
        yield daemon
    finally:
        daemon.stop()


class PeakRss:
    """The daemon's resident memory, sampled every 10 ms in a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        """The growth over the baseline at its peak, in bytes."""
        self._done.set()
        self._thread.join(5)
        return self.peak - self.baseline


def post(daemon: Daemon, body: bytes | dict[str, Any], target: str = "/v1/completions",
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = urllib.parse.urlsplit(daemon.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    try:
        conn.request("POST", target, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw_request(daemon: Daemon, head: str, body: bytes) -> socket.socket:
    """A request sent and left waiting for its answer; the caller closes the socket."""
    port = urllib.parse.urlsplit(daemon.url).port
    sock = socket.create_connection(("127.0.0.1", port or 0), timeout=30)
    sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def hold_the_slot(daemon: Daemon) -> threading.Thread:
    """A request the worker answers only after a minute: the model's one slot is taken
    until the daemon stops (which ends the request)."""
    def hold() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            post(daemon, {"model": "fake", "prompt": "x", "hold_s": 60}, timeout=90)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    poll_until(lambda: daemon.model("fake")["in_flight"] == 1, 10)
    return thread


def metrics(daemon: Daemon) -> str:
    with contextlib.closing(http.client.HTTPConnection(
            "127.0.0.1", urllib.parse.urlsplit(daemon.url).port, timeout=10)) as conn:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()


def metric(daemon: Daemon, series: str) -> float:
    """The value of one series in /metrics (prometheus-client writes 1.3e+08 and the
    like)."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", metrics(daemon), re.M)
    assert found is not None, series
    return float(found.group(1))


def openai_error(status: int, answer: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, answer[:500]
    error: dict[str, Any] = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def object_bomb(size: int) -> bytes:
    """A JSON object of `size` bytes that parses to ~25x that in Python objects."""
    head, tail = b'{"model": "fake", "prompt": "x", "x": [', b"{}]}"
    return head + b"{}," * ((size - len(head) - len(tail)) // 3) + tail


# --- finding 3: what a queued request holds -------------------------------------------------


def test_queued_bodies_hold_their_bytes_not_their_parsed_json(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """8 queued 16 MiB bodies that parse to ~400 MiB each took the daemon from 44 MB to
    3.3 GB; now they hold their 128 MiB (and a scan passes over each once)."""
    with node(tmp_path, tiny_gguf) as daemon:
        hold_the_slot(daemon)
        bomb = object_bomb(16 * MIB - 1024)
        rss = PeakRss(daemon.process.pid)
        socks = [raw_request(daemon, "POST /v1/completions HTTP/1.1", bomb) for _ in range(8)]
        try:
            poll_until(lambda: daemon.model("fake")["queued"] == 8, 60)
            assert metric(daemon, "neuron_requests_queued_bytes") == 8 * len(bomb)
            grown = rss.stop()
            # 8 bodies are 128 MiB; the old router peaked at ~3 GiB over its baseline.
            assert grown < 8 * len(bomb) + 200 * MIB, f"grew {grown / MIB:.0f} MiB"
        finally:
            for sock in socks:
                sock.close()
        # Clients that hang up leave the queue, and their bytes the budget.
        poll_until(lambda: daemon.model("fake")["queued"] == 0, 10)
        assert metric(daemon, "neuron_requests_queued_bytes") == 0


def test_a_body_past_the_nodes_queued_bytes_is_a_429(tmp_path: Path, tiny_gguf: Path) -> None:
    settings = f"max_request_bytes = {MIB}\nmax_queued_bytes = {2 * MIB}\n"
    with node(tmp_path, tiny_gguf, settings) as daemon:
        hold_the_slot(daemon)
        body = object_bomb(900 * 1024)
        socks = [raw_request(daemon, "POST /v1/completions HTTP/1.1", body) for _ in range(2)]
        try:
            poll_until(lambda: daemon.model("fake")["queued"] == 2, 30)
            status, headers, answer = post(daemon, body)
            error = openai_error(status, answer, 429)
            assert error["code"] == "queue_bytes_full"
            assert "max_queued_bytes" in error["message"]
            assert headers["Retry-After"] == "2"
            # A small request still fits beside them.
            small = {"model": "fake", "prompt": "x"}
            third = raw_request(daemon, "POST /v1/completions HTTP/1.1",
                                json.dumps(small).encode())
            socks.append(third)
            poll_until(lambda: daemon.model("fake")["queued"] == 3, 10)
        finally:
            for sock in socks:
                sock.close()


def test_a_large_body_is_routed_by_its_top_level_model_only(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """Bodies over 1 MiB are scanned, not parsed: the scan finds the body's own `model`
    (escapes and all), not one nested deeper or inside a string."""
    pad = "y" * (2 * MIB)
    with node(tmp_path, tiny_gguf) as daemon:
        # A nested "model", one inside a string, and the body's own with an escape in it.
        nested = (b'{"tools": [{"model": "ghost"}], "prompt": "\\"model\\": \\"x\\" '
                  + pad.encode() + b'", "model": "f\\u0061ke"}')
        assert json.loads(nested)["model"] == "fake"
        status, _, answer = post(daemon, nested)
        assert status == 200, answer[:300]
        status, _, answer = post(daemon, json.dumps({"prompt": pad,
                                                     "x": {"model": "fake"}}).encode())
        assert openai_error(status, answer, 404)["code"] == "model_not_found"
        status, _, answer = post(daemon, json.dumps({"model": ["fake"], "p": pad}).encode())
        assert openai_error(status, answer, 400)["param"] == "model"
        for broken in (b'{"model": "fake", "p": "' + pad.encode() + b'"',
                       b'[{"model": "fake"}, "' + pad.encode() + b'"]'):
            status, _, answer = post(daemon, broken)
            assert openai_error(status, answer, 400)["code"] == "invalid_json"


PAD = b'"' + b"p" * PARSE_BYTES + b'"'  # makes a body one the router scans


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"pad": %s, "model": "a", "stream": true}', Routing("a", True)),
    (b'{"model": "a", "pad": %s, "model": "b"}', Routing("b", False)),  # the last, as json
    (b' {"stream" : true , "pad": %s} ', Routing(None, True)),
    (b'{"stream": "true", "model": "a\\\\", "pad": %s}', Routing("a\\", False)),
    (b'{"pad": [%s, {"stream": true, "model": "x"}], "model": "a"}', Routing("a", False)),
    (b'{"pad": "[{\\"model\\": \\"x\\"}", "p": %s, "model": "a"}', Routing("a", False)),
])
def test_the_scan_reads_what_json_would(body: bytes, expected: Routing) -> None:
    body = body % PAD
    parsed = json.loads(body)
    assert (parsed.get("model"), parsed.get("stream") is True) == (expected.model,
                                                                   expected.stream)
    assert routing(body) == expected


@pytest.mark.parametrize(("body", "error"), [
    (b'{"model": "a", "pad": %s', errors.InvalidJson),  # unclosed
    (b'{"model": "a", "pad": [%s}', errors.InvalidJson),  # unbalanced
    (b'{"model": "a", "pad": "%s}', errors.InvalidJson),  # unterminated string
    (b'[{"model": "a"}, %s]', errors.InvalidJson),  # not an object
    (b'{"model": "\\x", "pad": %s}', errors.InvalidJson),  # a bad escape
    (b'{"model": 7, "pad": %s}', errors.InvalidValue),
    (b'{"pad": [%s' + b', {"model": 1}' * MAX_ROUTING_KEYS + b'], "model": "a"}',
     errors.InvalidJson),
])
def test_the_scan_refuses_what_it_cannot_route(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        routing(body % PAD)


async def test_a_queued_body_gives_its_bytes_back_however_it_leaves() -> None:
    budget = QueuedBytes()
    queue = ModelQueue("m", lambda: 0.0, budget=budget)
    queue.ready(1)
    async with queue.admit(8, 5.0, size=100, max_bytes=150):  # at once: never queued
        assert budget.held == 0
        with pytest.raises(errors.QueueTimeout):
            async with queue.admit(8, 0.05, size=100, max_bytes=150):
                pass
        assert budget.held == 0
        with pytest.raises(errors.QueueBytesFull):
            async with queue.admit(8, 0.05, size=151, max_bytes=150):
                pass
    queue.fail(errors.ModelNotReady("gone"))
    assert budget.held == 0


# --- finding 9: what a worker's answer can make the node hold -------------------------------


@pytest.mark.parametrize("framing", ["length", "until-close"])
def test_a_huge_answer_is_passed_on_as_it_comes(
    tmp_path: Path, tiny_gguf: Path, framing: str
) -> None:
    """A 1 GiB answer drove the daemon to 3 GB (read whole, joined, sent); 256 MiB here
    would have been ~750 MiB."""
    with node(tmp_path, tiny_gguf) as daemon:
        request = {"model": "fake", "prompt": "x", "answer_mib": 256,
                   "no_length": framing == "until-close"}
        rss = PeakRss(daemon.process.pid)
        url = urllib.parse.urlsplit(daemon.url)
        conn = http.client.HTTPConnection("127.0.0.1", url.port, timeout=60)
        try:
            conn.request("POST", "/v1/completions", json.dumps(request).encode(),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            if framing == "length":
                assert resp.getheader("Content-Length") == str(256 * MIB + 12)
            received, last = 0, b""
            while chunk := resp.read(MIB):
                received += len(chunk)
                last = chunk
        finally:
            conn.close()
        grown = rss.stop()
        assert received == 256 * MIB + 12
        assert last.endswith(b'x"}')
        assert grown < 64 * MIB, f"grew {grown / MIB:.0f} MiB"
        assert daemon.model("fake")["in_flight"] == 0


@pytest.mark.parametrize("how", ["lie", "stall-mid-pass"])
def test_an_answer_that_stalls_is_cut_and_frees_its_slot(
    tmp_path: Path, tiny_gguf: Path, how: str
) -> None:
    """A worker that stopped sending mid-answer held its slot for good (its liveness probe
    still passing); now upstream_idle_timeout_s frees it."""
    with node(tmp_path, tiny_gguf, "upstream_idle_timeout_s = 1.0\n") as daemon:
        if how == "lie":  # Content-Length 1000, 10 bytes, silence: nothing sent on yet
            status, _, answer = post(daemon, {"model": "fake", "prompt": "x", "lie": True})
            error = openai_error(status, answer, 502)
            assert error["code"] == "worker_unavailable"
            assert "stalled mid-answer" in error["message"]
            assert "upstream_idle_timeout_s" in error["message"]
        else:  # 8 MiB of a 64 MiB answer passed on, then silence: only a cut is left
            with pytest.raises(http.client.IncompleteRead) as cut:
                post(daemon, {"model": "fake", "prompt": "x", "answer_mib": 64,
                              "stall_after_bytes": 8 * MIB})
            assert len(cut.value.partial) >= 8 * MIB - 64 * 1024
        poll_until(lambda: daemon.model("fake")["in_flight"] == 0, 10)
        status, _, answer = post(daemon, {"model": "fake", "prompt": "x"}, timeout=10)
        assert status == 200, answer
        assert json.loads(answer)["usage"]["completion_tokens"] == 4


def test_an_answer_with_too_many_headers_is_said_as_such(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    with node(tmp_path, tiny_gguf) as daemon:
        status, _, answer = post(daemon, {"model": "fake", "prompt": "x",
                                          "extra_headers": 500})
        error = openai_error(status, answer, 502)
        assert "cannot read" in error["message"]
        assert "Too many headers" in error["message"]
        assert "could not be reached" not in error["message"]


# --- finding 13: a target that is not a path --------------------------------------------------


def test_an_absolute_form_target_is_a_400_not_a_worker_error(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    with node(tmp_path, tiny_gguf) as daemon:
        body = b'{"model": "fake", "prompt": "x"}'
        with contextlib.closing(raw_request(
                daemon, "POST http://evil.example/v1/completions HTTP/1.1", body)) as sock:
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), head
        error = json.loads(payload)["error"]
        assert error["code"] == "invalid_request"
        assert "not a path" in error["message"]
        text = metrics(daemon)
        assert 'code="502"' not in text
        assert 'code="400"' not in text  # no model was ever named
        status, _, _ = post(daemon, body)
        assert status == 200


# --- finding 12: series of models that are gone -------------------------------------------------


def test_an_unloaded_ad_hoc_models_series_go_and_a_catalogue_models_stay(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    with node(tmp_path, tiny_gguf, models=model_toml("listed", tiny_gguf, "models")) as daemon:
        status, answer = daemon.request("POST", "/models/load", {
            "model_id": "churn-1", "harness": "llama-server", "path": str(tiny_gguf)})
        assert status == 200, answer
        for model_id in ("fake", "listed", "churn-1"):
            assert post(daemon, {"model": model_id, "prompt": "x"})[0] == 200
        before = metrics(daemon)
        assert 'model="churn-1"' in before
        for model_id in ("fake", "listed", "churn-1"):
            status, answer = daemon.request("POST", "/models/unload", {"model_id": model_id})
            assert status == 200, answer
        poll_until(lambda: all(m["status"] == "unloaded"
                               for m in daemon.request("GET", "/models")[1]), 10)
        after = metrics(daemon)
        assert 'model="churn-1"' not in after
        for model_id in ("fake", "listed"):  # catalogue models keep theirs
            for series in ("neuron_requests_total", "neuron_request_duration_seconds_count",
                           "neuron_request_queue_seconds_count",
                           "neuron_model_load_duration_seconds_count"):
                assert re.search(rf'^{series}{{[^}}]*model="{model_id}"', after, re.M), \
                    (series, model_id)
        _, stats = daemon.request("GET", "/models/stats")
        assert set(stats["models"]) == {"fake", "listed"}
