"""Ollama's API against a real `neuronctl start` with real llama-cpp-python workers (the
tiny GGUF), driven by the real `ollama` client; the worker that dies mid-stream is the fake
llama-server's."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest

from ..helpers import (
    LLAMA_MISSING,
    NEURONCTL,
    Daemon,
    clean_env,
    find_llama_server,
    free_port,
    poll_until,
    start_daemon,
)

KEY = "sk-ollama-test"


def _start(directory: Path, tiny_gguf: Path, api_key: str | None = None) -> Daemon:
    port = free_port()
    key = f'api_key = "{api_key}"\n' if api_key else ""
    config = directory / "neuron.toml"
    config.write_text(f"""
port = {port}
host = "127.0.0.1"
log_dir = "{directory}/log"
state_dir = "{directory}/state"
stop_timeout_s = 5.0
max_request_bytes = 65536
{key}
[[default_models]]
model_id = "tiny"
path = "{tiny_gguf}"
n_ctx = 256
args = ["--embedding", "true"]

[[models]]
model_id = "extra"
path = "{tiny_gguf}"
n_ctx = 128
""")
    with (directory / "daemon.log").open("ab") as log:
        process = subprocess.Popen([str(NEURONCTL), "start", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    daemon = Daemon(process, f"http://127.0.0.1:{port}", directory, api_key)

    def tiny_loaded() -> bool:
        assert process.poll() is None, (directory / "daemon.log").read_text()[-2000:]
        try:
            return bool(daemon.model("tiny")["status"] == "loaded")
        except (OSError, StopIteration, AssertionError):
            return False

    try:
        poll_until(tiny_loaded, 120, interval=0.2)
    except BaseException:
        daemon.stop()
        raise
    return daemon


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Daemon]:
    daemon = _start(tmp_path_factory.mktemp("ollama"), tiny_gguf)
    try:
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def connected(url: str, **kwargs: Any) -> Iterator[ollama.Client]:
    """The `ollama` client, its connections closed after (httpx keeps them open)."""
    client = ollama.Client(host=url, timeout=120, **kwargs)
    try:
        yield client
    finally:
        client._client.close()


@pytest.fixture
def client(node: Daemon) -> Iterator[ollama.Client]:
    with connected(node.url) as client:
        yield client


def raw(node: Daemon, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, seen: dict[str, str] | None = None
        ) -> tuple[int, str, bytes]:
    """(status, content type, body) of a request sent as written; `seen` gets the answer's
    headers."""
    host, port = node.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        sent = {"Host": "127.0.0.1", **({"Content-Type": "application/json"} if body
                                        is not None else {}), **(headers or {})}
        connection.request(method, path, body=body, headers=sent)
        answer = connection.getresponse()
        if seen is not None:
            seen.update(answer.getheaders())
        return answer.status, answer.getheader("Content-Type", ""), answer.read()
    finally:
        connection.close()


pytestmark = [pytest.mark.llama, LLAMA_MISSING]

CHAT = [{"role": "user", "content": "hello"}]


def test_version_tags_ps_show(node: Daemon, client: ollama.Client) -> None:
    status, _, body = raw(node, "GET", "/api/version")
    assert status == 200 and json.loads(body)["version"]
    listed = client.list()
    names = sorted(m.model or "" for m in listed.models)
    assert names == ["extra:latest", "tiny:latest"]
    _, v1 = node.request("GET", "/v1/models")
    assert sorted(e["id"] + ":latest" for e in v1["data"]) == names  # the same models
    tiny = next(m for m in listed.models if m.model == "tiny:latest")
    assert tiny.size and tiny.size > 0 and tiny.digest and len(tiny.digest) == 64
    assert tiny.details is not None and tiny.details.family == "llama"
    assert tiny.details.quantization_level == "F32"
    assert tiny.details.parameter_size and tiny.details.parameter_size.endswith("K")

    running = client.ps()
    entry = next(m for m in running.models if m.model == "tiny:latest")
    assert entry.context_length == 256 and entry.size and entry.expires_at is not None
    assert entry.size_vram == 0  # the CPU

    shown = client.show("tiny:latest")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 256
    assert shown.parameters == "num_ctx 256"
    assert shown.details is not None and shown.details.format == "gguf"


def test_chat_and_generate_streamed_and_not(client: ollama.Client) -> None:
    options = {"num_predict": 6, "temperature": 0, "seed": 1, "top_k": 5, "top_p": 0.9,
               "repeat_penalty": 1.1, "stop": ["\n\n\n"]}
    whole = client.chat(model="tiny", messages=CHAT, options=options, stream=False)
    assert whole.done is True and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count and whole.total_duration and whole.total_duration > 0
    assert whole.eval_duration is not None and whole.prompt_eval_duration is not None

    parts = list(client.chat(model="tiny:latest", messages=CHAT, options=options,
                             stream=True))
    assert parts[-1].done is True and parts[-1].done_reason == "length"
    assert all(p.done is False for p in parts[:-1]) and len(parts) >= 2
    streamed = "".join(p.message.content or "" for p in parts)
    assert streamed == whole.message.content  # greedy, seeded: the same answer

    generated = client.generate(model="tiny", prompt="hello", options=options, stream=False)
    assert generated.done and generated.response and generated.done_reason == "length"
    pieces = list(client.generate(model="tiny", prompt="hello", options=options, stream=True))
    assert pieces[-1].done and "".join(p.response or "" for p in pieces) == generated.response
    raw_prompt = client.generate(model="tiny", prompt="hello", raw=True, options=options,
                                 stream=False)
    assert raw_prompt.done and raw_prompt.eval_count


def test_counts_are_the_workers_streamed_or_not(node: Daemon, client: ollama.Client) -> None:
    """prompt_eval_count is the prompt's tokens, eval_count the generated ones: what the
    worker's own non-streamed usage says for the same greedy request (the node always
    asks the worker for a stream, whose chunks are not tokens)."""
    sampling = {"temperature": 0, "seed": 3}
    for n in (5, 17):
        options = {**sampling, "num_predict": n}
        status, chat = node.request("POST", "/v1/chat/completions", {
            "model": "tiny", "messages": CHAT, "max_tokens": n, **sampling})
        assert status == 200, chat
        status, completion = node.request("POST", "/v1/completions", {
            "model": "tiny", "prompt": "hello", "max_tokens": n, **sampling})
        assert status == 200, completion
        expected = {kind: (usage["prompt_tokens"], usage["completion_tokens"])
                    for kind, usage in (("chat", chat["usage"]),
                                        ("raw", completion["usage"]))}
        assert all(p > 0 and c > 0 for p, c in expected.values()), expected
        for stream in (True, False):
            chatted = list(client.chat(model="tiny", messages=CHAT, options=options,
                                       stream=True)) if stream else [
                client.chat(model="tiny", messages=CHAT, options=options)]
            generated = list(client.generate(model="tiny", prompt="hello", raw=True,
                                             options=options, stream=True)) if stream else [
                client.generate(model="tiny", prompt="hello", raw=True, options=options)]
            for kind, last in (("chat", chatted[-1]), ("raw", generated[-1])):
                assert last.done is True
                assert (last.prompt_eval_count, last.eval_count) == expected[kind], (
                    kind, stream, n)


def test_format_json_schema_and_ignored_num_ctx(node: Daemon) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    body = {"model": "tiny", "messages": CHAT, "stream": False, "format": schema,
            "options": {"num_predict": 8, "num_ctx": 4096, "num_gpu": 1, "wé\r\nX-Evil": 1}}
    seen: dict[str, str] = {}
    status, _, text = raw(node, "POST", "/api/chat", json.dumps(body).encode(), seen=seen)
    assert status == 200, text
    ignored = seen.get("X-Neuron-Ignored-Options", "")
    assert "num_ctx=4096 (the model is loaded with n_ctx 256" in ignored
    assert "num_gpu" in ignored
    assert "w???X-Evil (not supported)" in ignored and "X-Evil" not in seen  # no injection
    content = json.loads(text)["message"]["content"]
    assert content.lstrip().startswith("{")  # the grammar held the tiny model to JSON


def test_embed_and_embeddings(node: Daemon, client: ollama.Client) -> None:
    embedded = client.embed(model="tiny", input=["a", "b"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 64
    norm = sum(v * v for v in embedded.embeddings[0]) ** 0.5
    assert abs(norm - 1.0) < 1e-3  # Ollama's /api/embed normalizes
    old = client.embeddings(model="tiny", prompt="a")
    assert len(old.embedding) == 64
    # A model loaded without embeddings: the request's 400, saying what to set.
    for ask in (lambda: client.embed(model="extra", input=["a"]),
                lambda: client.embeddings(model="extra:latest", prompt="a")):
        with pytest.raises(ollama.ResponseError) as refused:
            ask()
        assert refused.value.status_code == 400, refused.value
        assert "was not loaded with embeddings enabled" in refused.value.error
        assert 'add "--embedding", "true" to its `args`' in refused.value.error
    status, _, answer = raw(node, "POST", "/api/embed",
                            b'{"model": "extra", "input": "a"}')
    assert (status, json.loads(answer)["code"]) == (400, "embeddings_not_enabled")
    # OpenAI's route says the same in OpenAI's shape, not the worker's 500.
    status, _, answer = raw(node, "POST", "/v1/embeddings",
                            b'{"model": "extra", "input": "a"}')
    error = json.loads(answer)["error"]
    assert (status, error["code"], error["param"]) == (400, "embeddings_not_enabled", "model")
    assert 'add "--embedding", "true" to its `args`' in error["message"]
    status, _, answer = raw(node, "POST", "/v1/embeddings", b'{"model": "tiny", "input": "a"}')
    assert status == 200 and json.loads(answer)["data"][0]["object"] == "embedding"


def test_pull_then_keep_alive_zero_unloads(node: Daemon, client: ollama.Client) -> None:
    lines = list(client.pull("extra", stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    assert "extra:latest" in [m.model for m in client.ps().models]
    answer = client.generate(model="extra", prompt="hi", options={"num_predict": 2},
                             keep_alive=0)
    assert answer.done

    def unloaded() -> bool:
        return "extra:latest" not in [m.model for m in client.ps().models]

    poll_until(unloaded, 30, interval=0.2)
    assert node.model("tiny")["status"] == "loaded"  # nothing else touched


def test_preload_and_unload_idiom_and_keep_alive_duration(node: Daemon,
                                                           client: ollama.Client) -> None:
    loaded = client.generate(model="extra", keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load"
    until = node.model("extra")["idle_until"]
    assert until is not None and 500 < until - time.time() <= 600  # keep_alive, not ttl_s
    (entry,) = [m for m in client.ps().models if m.model == "extra:latest"]
    assert entry.expires_at is not None and abs(entry.expires_at.timestamp() - until) < 1
    gone = client.chat(model="extra", messages=[], keep_alive=0)
    assert gone.done_reason == "unload"
    poll_until(lambda: node.model("extra")["status"] == "unloaded", 30, interval=0.2)


BAD = [
    ("missing model", b'{"messages": []}', 400),
    ("unknown model", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}],'
                      b' "prompt": "x", "input": "x"}', 404),
    ("wrong types", b'{"model": "tiny", "messages": "hi", "prompt": 3, "input": 3,'
                    b' "stream": "yes"}', 400),
    ("options wrong", b'{"model": "tiny", "options": {"temperature": "hot"},'
                      b' "messages": [{"role": "user", "content": "x"}], "prompt": "x",'
                      b' "input": "x"}', 400),
    ("invalid json", b'{"model": "tiny",', 400),
    ("not an object", b'[1, 2]', 400),
]
ROUTES = ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show",
          "/api/pull"]


@pytest.mark.parametrize("route", ROUTES)
def test_bad_input_is_an_ollama_error_and_disturbs_nothing(node: Daemon, route: str) -> None:
    for what, body, status in BAD:
        if route in ("/api/show", "/api/pull") and what in ("wrong types", "options wrong"):
            continue  # fields those routes do not read
        got, kind, answer = raw(node, "POST", route, body)
        assert (got, kind.split(";")[0]) == (status, "application/json"), (route, what, answer)
        error = json.loads(answer)
        assert list(error) == ["error", "type", "code"], error  # Ollama's + the node's
        assert isinstance(error["error"], str) and error["code"], error
    huge = b'{"model": "tiny", "prompt": "' + b"x" * 100_000 + b'"}'
    got, _, answer = raw(node, "POST", route, huge)
    assert got == 413 and json.loads(answer)["code"] == "request_too_large"
    # Nothing was disturbed: the model still answers.
    ok, _, answer = raw(node, "POST", "/api/generate",
                        b'{"model": "tiny", "prompt": "hi", "stream": false,'
                        b' "options": {"num_predict": 2}}')
    assert ok == 200 and json.loads(answer)["done"] is True


def test_schema_that_is_not_json_schema(node: Daemon) -> None:
    for route in ("/api/chat", "/api/generate"):
        for schema in ({"type": "objectx"}, {"properties": []}, ["a"], "yaml"):
            body = {"model": "tiny", "messages": CHAT, "prompt": "x", "format": schema}
            got, _, answer = raw(node, "POST", route, json.dumps(body).encode())
            assert got == 400 and "format" in json.loads(answer)["error"], answer


def test_what_the_node_does_not_do_says_what_to_do(client: ollama.Client) -> None:
    for call, advice in ((lambda: client.delete("tiny"), "POST /models/unload"),
                         (lambda: client.copy("tiny", "other"), "[[models]]"),
                         (lambda: client.create("x", from_="tiny"), "[[models]]"),
                         (lambda: client.push("tiny"), "does not push")):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 400 and advice in refused.value.error
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("not-in-the-catalogue")
    assert unknown.value.status_code == 404 and "catalogue" in unknown.value.error


def _served(node: Daemon) -> float:
    """neuron_requests_total{model="tiny",code="200"}."""
    _, _, text = raw(node, "GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith('neuron_requests_total{code="200",model="tiny"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_counted_as_v1_requests_are(node: Daemon, client: ollama.Client) -> None:
    before = _served(node)
    client.generate(model="tiny", prompt="hi", options={"num_predict": 2})
    list(client.chat(model="tiny", messages=CHAT, options={"num_predict": 2}, stream=True))
    node.request("POST", "/v1/completions", {"model": "tiny", "prompt": "hi",
                                             "max_tokens": 2})
    assert _served(node) == before + 3


def test_keys_on(tmp_path: Path, tiny_gguf: Path) -> None:
    daemon = _start(tmp_path, tiny_gguf, api_key=KEY)
    try:
        with connected(daemon.url) as without:
            with pytest.raises(ollama.ResponseError) as refused:
                without.list()
            assert refused.value.status_code == 401
            with pytest.raises(ollama.ResponseError):
                without.chat(model="tiny", messages=CHAT)
        with connected(daemon.url, headers={"Authorization": f"Bearer {KEY}"}) as keyed:
            assert [m.model for m in keyed.list().models] == ["tiny:latest", "extra:latest"]
            answer = keyed.chat(model="tiny", messages=CHAT, options={"num_predict": 2})
            assert answer.done
            streamed = list(keyed.generate(model="tiny", prompt="hi", stream=True,
                                           options={"num_predict": 2}))
            assert streamed[-1].prompt_eval_count
        # The key's counters are the answers' counts, the prompts' included.
        status, usage = daemon.request("GET", "/keys/usage")
        assert status == 200, usage
        (tokens,) = (entry["tokens"]["tiny"] for entry in usage["keys"].values())
        assert tokens["prompt"] == answer.prompt_eval_count + streamed[-1].prompt_eval_count
        assert tokens["completion"] == answer.eval_count + streamed[-1].eval_count
    finally:
        daemon.stop()


def test_a_worker_dying_mid_stream_and_tool_calls_both_ways(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    daemon = start_daemon(tmp_path, f"""
[[default_models]]
model_id = "fake"
harness = "llama-server"
path = "{model}"
""")
    try:
        poll_until(lambda: daemon.model("fake")["status"] == "loaded", 30, interval=0.1)
        with connected(daemon.url) as client:
            ok = list(client.chat(model="fake", messages=CHAT, stream=True,
                                  options={"num_predict": 3}))
            assert ok[-1].done is True and ok[-1].eval_count == 3  # the worker's usage
            assert "".join(p.message.content or "" for p in ok) == "xxx"
            lines: list[Any] = []
            with pytest.raises(ollama.ResponseError) as broken:
                for part in client.chat(model="fake", stream=True, messages=[
                        {"role": "user", "content": "die mid-stream"}]):
                    lines.append(part)
        assert "broke off its answer" in broken.value.error
        assert len(lines) == 2 and not any(p.done for p in lines)
        # Not streamed: a 502 in Ollama's shape, counted once, as /v1 counts it.
        poll_until(lambda: daemon.model("fake")["status"] == "loaded", 30, interval=0.1)
        with connected(daemon.url) as client, pytest.raises(ollama.ResponseError) as cut:
            client.chat(model="fake", messages=[{"role": "user", "content": "die mid-stream"}])
        assert cut.value.status_code == 502 and "broke off" in cut.value.error
        poll_until(lambda: daemon.model("fake")["status"] == "loaded", 30, interval=0.1)
        _, _, metrics = raw(daemon, "GET", "/metrics")
        assert 'neuron_requests_total{code="502",model="fake"} 1.0' in metrics.decode()
        assert "worker_unavailable" not in metrics.decode()  # not a refusal of the router
        # Tool calls both ways: the worker's streamed call comes back whole, arguments an
        # object; sent back with the tool's answer, it reaches the worker as OpenAI's.
        tools = [{"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]
        with connected(daemon.url) as client:
            for stream in (False, True):
                asked = [{"role": "user", "content": "call a tool"}]
                parts = list(client.chat(model="fake", messages=asked, tools=tools,
                                         stream=True)) if stream else [
                    client.chat(model="fake", messages=asked, tools=tools)]
                last = parts[-1]
                assert last.done is True and last.done_reason == "stop"
                (call,) = last.message.tool_calls or []
                assert call.function.name == "weather"
                assert call.function.arguments == {"city": "Oslo"}
            answered = client.chat(model="fake", tools=tools, messages=[
                *asked, last.message, {"role": "tool", "content": "cold",
                                       "tool_name": "weather"}],
                options={"num_predict": 2})
            assert answered.done and answered.message.content == "xx"
    finally:
        daemon.stop()


@pytest.mark.llama_server
@pytest.mark.skipif(find_llama_server() is None, reason="needs llama.cpp's llama-server")
def test_llama_server_full_context_ends_with_length(tmp_path: Path, tiny_gguf: Path) -> None:
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(f"""
port = {port}
host = "127.0.0.1"
log_dir = "{tmp_path}/log"
state_dir = "{tmp_path}/state"
stop_timeout_s = 5.0
[harness.llama-server]
binary = "{find_llama_server()}"

[[default_models]]
model_id = "small"
harness = "llama-server"
path = "{tiny_gguf}"
n_ctx = 128
""")
    with (tmp_path / "daemon.log").open("ab") as log:
        process = subprocess.Popen([str(NEURONCTL), "start", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    daemon = Daemon(process, f"http://127.0.0.1:{port}", tmp_path)
    try:
        def loaded() -> bool:
            assert process.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
            try:
                return bool(daemon.model("small")["status"] == "loaded")
            except (OSError, StopIteration, AssertionError):
                return False

        poll_until(loaded, 120, interval=0.2)
        status, asked = daemon.request("POST", "/v1/chat/completions", {
            "model": "small", "messages": CHAT, "max_tokens": 1})
        assert status == 200, asked
        with connected(daemon.url) as client:
            for _ in range(3):  # every time, not most times
                # Greedy: this prompt's answer runs until the context is full (no EOS).
                whole = client.generate(model="small", prompt="hello", stream=False,
                                        options={"temperature": 0})
                assert whole.done and whole.done_reason == "length", whole
                assert whole.prompt_eval_count and whole.eval_count  # llama-server's timings
                parts = list(client.chat(model="small:latest", messages=CHAT, stream=True,
                                         options={"temperature": 0}))
                assert parts[-1].done is True and parts[-1].done_reason == "length"
                # The whole prompt, though llama-server's cache held all of it but one
                # token (its timings' prompt_n counts only what it evaluated).
                assert parts[-1].prompt_eval_count == asked["usage"]["prompt_tokens"]
            # Started without --embeddings: the request's 400, saying what to set.
            with pytest.raises(ollama.ResponseError) as refused:
                client.embed(model="small", input="a")
            assert refused.value.status_code == 400
            assert 'add "--embeddings" to its `args`' in refused.value.error
    finally:
        daemon.stop()
