"""An operator's first hour: the journal reads well (priorities, the API's state names, one
summary line per load, refusals logged), the CLI finds a daemon whose config moved on, a
worker's log says how it ended, and `neuronctl chat` talks to a model."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from neuronctl.cli import chat
from neuronctl.client import ApiError, Client
from neuronctl.notes import Listening, ListeningNote, local_url, read_listening

from ..fakes import FAKE_LLAMA_SERVER
from ..gpu_fakes import wrapper
from ..helpers import NEURONCTL, clean_env, free_port, kill_quietly, llama_required, poll_until


def run_cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NEURONCTL, *args], capture_output=True, text=True, timeout=120,
                          input=stdin, env=clean_env(**env))


class Node:
    def __init__(self, tmp_path: Path, body: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "neuron.toml"
        self.head = (f'host = "127.0.0.1"\nport = {self.port}\nlog_dir = "{tmp_path}/log"\n'
                     f'state_dir = "{tmp_path}/state"\nstop_timeout_s = 2.0\n')
        self.config.write_text(self.head + body)
        self.journal = tmp_path / "daemon.log"
        with self.journal.open("wb") as out:
            self.proc = subprocess.Popen([NEURONCTL, "start", "--config", str(self.config)],
                                         env=clean_env(**env), stdout=out,
                                         stderr=subprocess.STDOUT)
        poll_until(lambda: b"listening on" in self.journal.read_bytes()
                   or self.proc.poll() is not None, 60)
        assert self.proc.poll() is None, self.journal.read_text()

    def get(self, path: str, key: str | None = None) -> Any:
        req = urllib.request.Request(self.url + path)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0
        finally:
            kill_quietly(self.proc.pid)


@pytest.fixture
def fake_server_harness(tmp_path: Path, tiny_gguf: Path) -> str:
    binary = wrapper(tmp_path / "llama-server", FAKE_LLAMA_SERVER)
    return f'[harness.llama-server]\nbinary = "{binary}"\n'


def model_entry(table: str, model_id: str, path: Path) -> str:
    return (f'[[{table}]]\nmodel_id = "{model_id}"\nharness = "llama-server"\n'
            f'path = "{path}"\n')


# --- the journal ----------------------------------------------------------------------------


def test_journal_uses_the_api_state_names_and_sums_up_every_load(
    tmp_path: Path, tiny_gguf: Path, fake_server_harness: str,
) -> None:
    node = Node(tmp_path, fake_server_harness + model_entry("models", "tiny", tiny_gguf))
    try:
        load = run_cli("load", "tiny", "--config", str(node.config))
        assert load.returncode == 0, load.stderr
        model = next(m for m in node.get("/models") if m["id"] == "tiny")
        pid, port = model["pid"], model["port"]
        os.kill(pid, signal.SIGKILL)
        poll_until(lambda: b"restart 1, in " in node.journal.read_bytes(), 30)
    finally:
        node.stop()
    journal = node.journal.read_text()
    # A load through the API gets the line a default model gets: file, process, placement.
    assert "tiny: loading -> loaded (in " in journal
    assert f"{tiny_gguf}, pid {pid} on port {port}, CPU)" in journal
    # `grep restarting` finds a crash, as `/models` calls it.
    assert "tiny: loaded -> restarting (worker was killed by SIGKILL unexpectedly" in journal
    assert "tiny: loaded -> unloading (shutting down)" in journal
    assert "tiny: unloading -> unloaded" in journal
    for finer in ("ready", "backoff", "pending ->", "-> starting"):
        assert f"-> {finer}" not in journal.replace("pending -> starting", ""), finer
    assert "stopping: closing the listener and stopping 1 worker\n" in journal


def test_a_workers_log_ends_with_how_it_ended(
    tmp_path: Path, tiny_gguf: Path, fake_server_harness: str,
) -> None:
    node = Node(tmp_path, fake_server_harness + model_entry("default_models", "tiny", tiny_gguf))
    try:
        first = next(m for m in node.get("/models") if m["id"] == "tiny")["pid"]
        os.kill(first, signal.SIGKILL)
        poll_until(lambda: b"restart 1, in " in node.journal.read_bytes(), 30)
        previous = run_cli("logs", "tiny", "--previous", "-n", "1", "--config", str(node.config))
        assert previous.returncode == 0, previous.stderr
        assert previous.stdout.rstrip().endswith(f"worker pid {first} was killed by SIGKILL")
        second = next(m for m in node.get("/models") if m["id"] == "tiny")["pid"]
        unload = run_cli("unload", "tiny", "--config", str(node.config))
        assert unload.returncode == 0, unload.stderr
        last = run_cli("logs", "tiny", "-n", "1", "--config", str(node.config)).stdout.rstrip()
        assert f"worker pid {second} " in last and last.endswith("(neuronctl sent SIGTERM)")
    finally:
        node.stop()


def test_refused_keys_and_refused_reloads_are_logged_without_flooding(tmp_path: Path) -> None:
    node = Node(tmp_path, 'api_key = "s3cret"\n')
    try:
        for key in ("wrong", None, "wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                node.get("/models", key)
            assert refused.value.code == 401
            refused.value.close()
        node.config.write_text(node.head + 'api_key = "s3cret"\nnonsense = 1\n')
        reload = run_cli("reload", "--config", str(node.config))
        assert reload.returncode == 1 and "reload refused" in reload.stderr
        poll_until(lambda: b"POST /reload" in node.journal.read_bytes(), 10)
    finally:
        node.stop()
    journal = node.journal.read_text()
    refusals = [line for line in journal.splitlines() if "refused GET '/models'" in line]
    # The first is logged with its peer and reason; the next ones, inside the window, not.
    assert len(refusals) == 1, journal
    assert "from 127.0.0.1: invalid API key" in refusals[0]
    assert "s3cret" not in journal and "wrong" not in journal  # keys are never logged
    assert "reload (POST /reload from 127.0.0.1) refused, nothing changed: " in journal
    assert "nonsense" in journal


def test_a_default_model_naming_an_unknown_harness_is_a_config_error(
    tmp_path: Path, tiny_gguf: Path,
) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(f'state_dir = "{tmp_path}"\nlog_dir = "{tmp_path}"\n'
                      f'[[default_models]]\nmodel_id = "m"\nharness = "lama"\n'
                      f'path = "{tiny_gguf}"\n')
    result = run_cli("start", "--config", str(config))
    assert result.returncode == 78
    assert "default_models[0].harness: unknown harness 'lama' (known: llama-cpp-python, " \
           "llama-server)" in result.stderr
    assert "Traceback" not in result.stderr


# --- finding the daemon ---------------------------------------------------------------------


def test_the_listening_note_names_a_live_daemon_only(tmp_path: Path) -> None:
    note = tmp_path / "listening"
    assert read_listening(tmp_path) is None
    # A stand-in daemon: a live process whose command line says neuronctl.
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "neuronctl"])
    try:
        note.write_text(f"{daemon.pid} http://127.0.0.1:4000\n/etc/neuron/neuron.toml\n")
        # poll: until its exec is done, /proc shows the parent's command line
        assert poll_until(lambda: read_listening(tmp_path), 10) == Listening(
            daemon.pid, "http://127.0.0.1:4000", "/etc/neuron/neuron.toml")
        for planted in ("file:///etc/passwd", "http://127.0.0.1:4000/a b",
                        "http://user:pw@127.0.0.1:4000", "http://[::1", "http://h:4000?x=1"):
            note.write_text(f"{daemon.pid} {planted}\n")
            assert read_listening(tmp_path) is None, planted  # not what a daemon writes
        note.write_text(f"{daemon.pid} http://127.0.0.1:4000\n" + "\0" * 10_000_000)
        assert read_listening(tmp_path) is not None  # read bounded, not whole
        note.unlink()
        os.mkfifo(note)
        assert read_listening(tmp_path) is None  # never opened for a blocking read
        note.unlink()
        note.symlink_to(tmp_path / "elsewhere")
        assert read_listening(tmp_path) is None
        note.unlink()
    finally:
        daemon.kill()
        daemon.wait()
    note.write_text(f"{daemon.pid} http://127.0.0.1:4000\n")
    assert read_listening(tmp_path) is None  # that daemon is gone
    # A live pid that is not a neuronctl (the daemon died, its pid was reused).
    ListeningNote(tmp_path).listening("http://127.0.0.1:4000", None)
    assert read_listening(tmp_path) is None
    assert local_url("0.0.0.0", 13131) == "http://127.0.0.1:13131"
    assert local_url("::1", 13131) == "http://[::1]:13131"


def test_after_a_port_change_the_cli_still_finds_the_running_daemon(tmp_path: Path) -> None:
    node = Node(tmp_path, "")
    try:
        assert read_listening(tmp_path / "state") == Listening(
            node.proc.pid, node.url, str(node.config.resolve()))
        moved = free_port()
        node.config.write_text(node.head.replace(f"port = {node.port}", f"port = {moved}"))
        reload = run_cli("reload", "--config", str(node.config))
        assert reload.returncode == 0, reload.stderr
        assert "needs a restart to apply: port" in reload.stdout
        assert (f"note: the daemon (pid {node.proc.pid}) started from {node.config.resolve()} "
                f"listens on {node.url}, not http://127.0.0.1:{moved}") in reload.stderr
        status = run_cli("status", "--config", str(node.config))
        assert status.returncode == 0 and "no models" in status.stdout
        # Another node's config sharing the state_dir is not sent to this daemon ...
        other = tmp_path / "other.toml"
        other.write_text(node.head.replace(f"port = {node.port}", f"port = {moved}"))
        elsewhere = run_cli("status", "--config", str(other))
        assert elsewhere.returncode == 1 and "not running" in elsewhere.stderr
        # ... nor is a client that names its port itself.
        named = run_cli("status", "--config", str(node.config), NEURON_PORT=str(moved))
        assert named.returncode == 1 and f"not running at http://127.0.0.1:{moved}" in \
            named.stderr
    finally:
        node.stop()
    assert not (tmp_path / "state" / "listening").exists()
    gone = run_cli("status", "--config", str(node.config))
    assert gone.returncode == 1 and "not running" in gone.stderr


# --- neuronctl chat ------------------------------------------------------------------------


class SseStub:
    """A node's /v1 streaming answers, canned: each POST gets the next entry of `answers`
    (a list of text chunks, or an (HTTP status, error message) pair)."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.bodies: list[dict[str, Any]] = []
        self.url = ""
        self.models: list[dict[str, Any]] | None = None  # GET /models; None: a 404


@pytest.fixture
def sse_stub() -> Iterator[SseStub]:
    stub = SseStub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.bodies.append({"path": self.path, **body})
            answer = stub.answers.pop(0)
            if isinstance(answer, tuple):
                status, message = answer
                data = json.dumps({"error": {"message": message, "type": "x"}}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            cut = isinstance(answer, dict)  # {"cut": chunks}: the stream ends without [DONE]
            delay = 0.2 if cut and answer.get("slow") else 0.0
            for text in answer["cut"] if cut else answer:
                time.sleep(delay)  # a slow stream: the pace is the scenario
                if self.path == "/v1/completions":
                    chunk: dict[str, Any] = {"choices": [{"text": text}]}
                else:
                    chunk = {"choices": [{"delta": {"content": text}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            if not cut:
                self.wfile.write(b"data: [DONE]\n\n")

        def do_GET(self) -> None:
            found = self.path == "/models" and stub.models is not None
            data = json.dumps(stub.models if found else {"error": "no such route"}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_interactive_chat_keeps_the_conversation_and_survives_a_refusal(
    sse_stub: SseStub,
) -> None:
    sse_stub.answers = [["Hel", "lo!"], (429, "model 'm' has 64 requests waiting"), ["4"]]
    prompts = iter(["hi", "", "busy?", "/clear", "2+2?", "/bye", "never read"])

    def read(prompt: str) -> str:
        assert prompt == ">>> "
        return next(prompts)

    out, err = io.StringIO(), io.StringIO()
    conversation = chat.Conversation(chat.ChatOptions("m", system="be brief", max_tokens=8))
    chat.interactive(Client(sse_stub.url), conversation, read, out, err)
    assert out.getvalue() == "Hello!\n(conversation cleared)\n4\n"
    assert err.getvalue() == "neuronctl: model 'm' has 64 requests waiting\n"
    first, _, third = sse_stub.bodies
    assert first["path"] == "/v1/chat/completions" and first["stream"] is True
    assert first["max_tokens"] == 8 and first["model"] == "m"
    assert first["messages"] == [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "hi"}]
    # The refused turn was not remembered, and /clear forgot the first one.
    assert third["messages"] == [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "2+2?"}]
    assert next(prompts) == "never read"  # /bye ended the loop


def test_chat_one_prompt_from_stdin_and_raw_completions(sse_stub: SseStub) -> None:
    sse_stub.answers = [[" Paris", "."], [], (404, "model 'x' is not loaded on this node")]
    raw = run_cli("chat", "m", "--raw", "--url", sse_stub.url,
                  stdin="The capital of France is\n")
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == " Paris.\n"
    assert sse_stub.bodies[0]["path"] == "/v1/completions"
    assert sse_stub.bodies[0]["prompt"] == "The capital of France is"
    empty = run_cli("chat", "m", "hi", "--url", sse_stub.url)
    assert empty.returncode == 0 and empty.stdout == chat.EMPTY_ANSWER + "\n"
    missing = run_cli("chat", "x", "hi", "--url", sse_stub.url)
    assert missing.returncode == 1
    assert missing.stderr == "neuronctl: model 'x' is not loaded on this node\n"
    nothing = run_cli("chat", "m", "--url", sse_stub.url, stdin="")
    assert nothing.returncode == 2 and "stdin was empty" in nothing.stderr


def test_chat_says_when_an_answer_was_cut_off_or_stopped(sse_stub: SseStub) -> None:
    sse_stub.answers = [{"cut": ["Once", " upon"]}]
    cut = run_cli("chat", "m", "hi", "--url", sse_stub.url)
    assert cut.returncode == 1
    assert cut.stdout == "Once upon\n"  # the line is ended before the error
    assert "neuronctl: the answer was cut off: " in cut.stderr
    sse_stub.answers = [{"cut": ["word "] * 200, "slow": True}]
    proc = subprocess.Popen([NEURONCTL, "chat", "m", "hi", "--url", sse_stub.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(5) == "word "  # streaming, then Ctrl-C
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        kill_quietly(proc.pid)
    assert proc.returncode == 130
    assert out.endswith("\n") and "stopped" not in out  # stdout holds only the answer
    assert err == "neuronctl: answer stopped\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "0"], "--timeout: must be a positive number of seconds, got 0"),
    (["--timeout", "nan"], "--timeout: must be a positive number of seconds, got nan"),
    (["--max-tokens", "0"], "--max-tokens: must be at least 1, got 0"),
    (["--raw", "--system", "x"], "--system needs a chat"),
])
def test_chat_refuses_options_that_cannot_work(args: list[str], message: str) -> None:
    result = run_cli("chat", "m", "hi", "--url", "http://127.0.0.1:9", *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_sends_a_prompt_that_is_not_utf8_as_text(sse_stub: SseStub) -> None:
    sse_stub.answers = [["ok"]]
    result = subprocess.run([NEURONCTL, "chat", "m", "--raw", "--url", sse_stub.url],
                            input=b"\xff\xfe  indented\n", capture_output=True, timeout=60,
                            env=clean_env(PYTHONIOENCODING="utf-8"))
    assert result.returncode == 0, result.stderr
    assert sse_stub.bodies[0]["prompt"] == "\ufffd\ufffd  indented"  # indent kept for --raw


def test_chat_error_inside_the_stream_is_an_api_error(sse_stub: SseStub) -> None:
    class Broken(Client):
        def stream(self, method: str, path: str, body: Any,
                   read_timeout_s: float) -> Iterator[tuple[str, Any]]:
            yield "message", {"choices": [{"delta": {"content": "par"}}]}
            yield "message", {"error": {"message": "worker exited with code 139"}}

    conversation = chat.Conversation(chat.ChatOptions("m"))
    with pytest.raises(ApiError, match="worker exited with code 139"):
        list(chat.answer_chunks(Broken(sse_stub.url), conversation, "hi"))


@llama_required
def test_chat_and_pooled_embeddings_with_real_workers(tmp_path: Path, tiny_gguf: Path) -> None:
    models = "".join(
        f'[[default_models]]\nmodel_id = "{m}"\npath = "{tiny_gguf}"\nargs = {json.dumps(a)}\n'
        for m, a in (("tiny", []), ("per-token", ["--embedding", "true"]),
                     ("pooled", ["--embedding", "true", "--pooling", "mean"])))
    node = Node(tmp_path, models)
    try:
        result = run_cli("chat", "tiny", "hello", "--raw", "--max-tokens", "4",
                         "--temperature", "0", "--config", str(node.config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("\n") and result.stdout.strip()

        def embed(model: str) -> list[Any]:
            body = json.dumps({"model": model, "input": ["hello world", "hi"]}).encode()
            req = urllib.request.Request(node.url + "/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                return [d["embedding"] for d in json.loads(resp.read())["data"]]

        # What docs/guide.md says: without --pooling, one vector per token of each input.
        per_token = embed("per-token")
        assert all(isinstance(v, list) and isinstance(v[0], list) for v in per_token)
        pooled = embed("pooled")
        assert len(pooled) == 2
        assert all(isinstance(x, float) for v in pooled for x in v)
        assert len(pooled[0]) == len(per_token[0][0])  # the model's embedding width
    finally:
        node.stop()


def test_a_harness_that_cannot_run_here_is_said_at_start(tmp_path: Path, tiny_gguf: Path) -> None:
    node = Node(tmp_path, f'[harness.llama-server]\nbinary = "{tmp_path}/no-such-llama-server"\n'
                + model_entry("models", "native", tiny_gguf))
    try:
        discovery = node.get("/discovery")
        assert "llama-server" not in discovery["harnesses"]
        assert "llama-server" in discovery["harnesses_unavailable"]
    finally:
        node.stop()
    journal = node.journal.read_text()
    assert "WARNING neuronctl: harness llama-server cannot run here: " in journal
    assert "; native will fail to load" in journal


# --- what the review of this found ---------------------------------------------------------


def test_a_fifo_at_the_log_path_never_blocks_the_supervisor(tmp_path: Path) -> None:
    from neuronctl import logfiles

    fifo = tmp_path / "m.log"
    os.mkfifo(fifo)
    started = time.monotonic()
    logfiles.write_end_line(fifo, "worker pid 1 was killed by SIGKILL")  # nobody reads it
    assert logfiles.tail_lines(fifo, 10) == []
    assert time.monotonic() - started < 5


async def test_lines_any_client_can_cause_are_bounded_and_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import logging

    from neuronctl.api.ratelog import RateLimitedLog

    from ..helpers import poll_until_async

    # Both clocks are the test's: the log's own, and the event loop's that runs its
    # call_later flush. The window ends when the test says so, not after a real wait.
    loop = asyncio.get_running_loop()
    real_time, skipped = loop.time, [0.0]
    monkeypatch.setattr(loop, "time", lambda: real_time() + skipped[0])
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelog"), "things refused",
                             window_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.ratelog"):
        for i in range(1000):
            limited.log("refused %d", i)
        assert [r.getMessage() for r in caplog.records] == ["refused 0"]
        now[0] = skipped[0] = 60.0  # the window ends: one line says how many more there were
        await poll_until_async(lambda: len(caplog.records) > 1, timeout=5)
        assert [r.getMessage() for r in caplog.records] == [
            "refused 0", "999 more things refused in the last 60 s"]
        limited.log("refused %d", 1000)  # the count was said: this one is counted anew
        assert len(caplog.records) == 2


def test_logged_text_cannot_forge_journal_lines_or_send_escapes() -> None:
    import logging

    from neuronctl.node.logsetup import JournalFormatter, TextFormatter

    record = logging.LogRecord("neuronctl", logging.WARNING, __file__, 1,
                               "model file not found: %s", ("/x\n<2>CRIT fake\x1b[31m",), None)
    journal = JournalFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert journal == ("<4>WARNING neuronctl: model file not found: "
                       "/x\\x0a<2>CRIT fake\\x1b[31m")
    text = TextFormatter("%(message)s").format(record)
    assert "\n" not in text and "\x1b" not in text


def test_events_name_states_as_the_api_and_the_journal_do() -> None:
    from neuronctl.cli.status import _event_lines

    line, = _event_lines("state", {"model": "m", "from": "ready", "to": "backoff",
                                   "reason": "worker was killed by SIGKILL", "time": 0})
    assert line.endswith("  m  loaded → restarting  worker was killed by SIGKILL")
    line, = _event_lines("state", {"model": "m", "from": "pending", "to": "starting",
                                   "time": 0})
    assert line.endswith("  m  loading")  # the API's names only: no `pending → starting`
    line, = _event_lines("state", {"model": "m", "from": "warming", "to": "ready", "time": 0})
    assert line.endswith("  m  warming → ready")  # a state this CLI does not know yet


def test_events_are_aligned_say_why_and_say_a_download_once_per_change() -> None:
    from neuronctl.cli.status import EventLines

    printer = EventLines()
    snapshot = printer.lines("snapshot", {"models": [
        {"id": "qwen3-0.6b", "status": "failed", "error": "cannot list Hugging Face repo\nx"},
        {"id": "tiny", "status": "loaded"}]})
    assert [line[10:] for line in snapshot] == [
        "qwen3-0.6b  failed      cannot list Hugging Face repo",
        "tiny        loaded"]
    progress = {"model": "tyni", "download": {"file": None, "done_bytes": 0,
                                              "total_bytes": None}}
    first = printer.lines("progress", progress)
    assert len(first) == 1 and printer.lines("progress", progress) == []  # the same: quiet
    unloaded = printer.lines("state", {"model": "tiny", "from": "ready", "to": "stopping",
                                       "reason": "idle: no request for 60 s (ttl_s 60)",
                                       "time": 0})
    # Columns as wide as the widest seen so far (the download's line here).
    assert unloaded[0][10:].startswith("tiny        loaded → unloading   ")
    assert unloaded[0].endswith("  idle: no request for 60 s (ttl_s 60)")


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:13131/a b", "holds spaces or control characters"),
    ("http://127.0.0.1:13131/\nX-Injected: 1", "holds spaces or control characters"),
    ("http://admin:hunter2@127.0.0.1:13131", "credentials in the URL are not used"),
])
def test_urls_that_cannot_name_a_node_exit_2(url: str, message: str) -> None:
    result = run_cli("status", "--url", url)
    assert result.returncode == 2 and message in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_a_missing_python_for_llama_cpp_python_is_said_at_start(tmp_path: Path) -> None:
    node = Node(tmp_path, f'[harness.llama-cpp-python]\npython = "{tmp_path}/no-python"\n')
    try:
        unavailable = node.get("/discovery")["harnesses_unavailable"]
        assert "is not an executable" in unavailable["llama-cpp-python"]
    finally:
        node.stop()
    assert "harness llama-cpp-python cannot run here: python " in node.journal.read_text()


def test_a_cut_off_answer_from_a_worker_still_loaded_quotes_its_log(
    sse_stub: SseStub, tmp_path: Path
) -> None:
    """A prompt longer than the context (llama-cpp-python ends the stream): the node and
    the worker are fine, and the worker's own line says why."""
    log = tmp_path / "gemma.log"
    log.write_text("Traceback (most recent call last):\n  ...\nValueError: Requested tokens "
                   "(1502) exceed context window of 1024\n", encoding="utf-8")
    sse_stub.models = [{"id": "gemma", "status": "loaded", "log_path": str(log)}]
    sse_stub.answers = [{"cut": []}]
    cut = run_cli("chat", "gemma", "hi", "--raw", "--url", sse_stub.url)
    assert cut.returncode == 1
    assert cut.stderr.splitlines() == [
        f"neuronctl: the answer was cut off: {sse_stub.url} ended the stream before it was "
        "complete: gemma is still loaded, so its worker ended the answer; its log says: "
        "ValueError: Requested tokens (1502) exceed context window of 1024"]
    sse_stub.models = [{"id": "gemma", "status": "restarting"}]
    sse_stub.answers = [{"cut": ["Once"]}]
    died = run_cli("chat", "gemma", "hi", "--url", sse_stub.url)
    assert died.stderr.splitlines()[-1] == (
        f"neuronctl: the answer was cut off: {sse_stub.url} ended the stream before it was "
        "complete (its worker stopped: gemma is restarting now)")


def test_chat_says_it_waits_for_an_on_demand_load(sse_stub: SseStub) -> None:
    sse_stub.models = [{"id": "slow", "status": "unloaded"}]
    sse_stub.answers = [["Hello"]]
    result = run_cli("chat", "slow", "hi", "--url", sse_stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["loading slow on demand…"]
    assert result.stdout == "Hello\n"


def test_a_second_refused_reload_with_another_reason_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from neuronctl.api.ratelog import RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.reloads"), "reloads refused",
                             clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.reloads"):
        for reason in ("ttl_s: expected a number", "ttl_s: expected a number",
                       "port: must be between 1 and 65535", "ttl_s: expected a number"):
            limited.log("reload refused, nothing changed: %s", reason, key=reason)
    assert [r.getMessage() for r in caplog.records] == [
        "reload refused, nothing changed: ttl_s: expected a number",
        "reload refused, nothing changed: port: must be between 1 and 65535"]
