"""Anthropic's Messages API through the node (api/messages.py), and answers that end
well-formed under a full context or a worker that dies.

Stand-in workers (tests/api/test_v1.py's) die mid-stream on cue, on both paths: the one a
worker that speaks the API itself takes (passed through) and the translated one. A real
daemon with real workers (llama-cpp-python, and llama-server where its binary is found)
serves the real `anthropic` and `openai` clients, with an API key on.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from neuronctl.api.traffic import RouterStats
from neuronctl.config import NeuronConfig
from neuronctl.supervisor.registry import ModelRegistry

from ..helpers import (
    LLAMA_MISSING,
    NEURONCTL,
    MakeRegistry,
    clean_env,
    find_llama_server,
    free_port,
    kill_quietly,
    poll_until,
)
from .test_v1 import JSON, Client, StandIn, StandIns, run

MESSAGE = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


class SpeakingStandIns(StandIns):
    """Stand-ins for workers that answer /v1/messages themselves (as llama-server does)."""

    serves_anthropic_messages = True


def anthropic_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.strip().splitlines()
                     if ": " in line)
        if "event" in lines and "data" in lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


async def read_cut(resp: aiohttp.ClientResponse) -> bytes:
    """A stream the node cut after its error event: what arrived before the cut."""
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    return received


async def anthropic_error_of(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


# --- stand-in workers ---------------------------------------------------------------------


def chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    data = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(data)}\n\n".encode()


async def dies_mid_chat_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(chunk("Hel"))
    assert request.transport is not None
    request.transport.close()  # the process "dies"
    return resp


async def ends_chat_stream_early(request: web.Request) -> web.StreamResponse:
    """What llama-cpp-python does when its generation raises: the stream ends cleanly,
    without a finish_reason or [DONE]."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(chunk("Hel"))
    await resp.write_eof()
    return resp


async def dies_mid_messages_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message",
             "role": "assistant", "content": [], "model": "m"}}
    await resp.write(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
    assert request.transport is not None
    request.transport.close()
    return resp


@pytest.mark.parametrize("worker", ["dies", "ends-early", "speaks-and-dies"])
async def test_a_worker_dying_mid_stream_ends_with_an_error_event(
    node_config: NeuronConfig, make_registry: MakeRegistry, worker: str,
) -> None:
    handler = {"dies": dies_mid_chat_stream, "ends-early": ends_chat_stream_early,
               "speaks-and-dies": dies_mid_messages_stream}[worker]
    stand_ins = (SpeakingStandIns if worker == "speaks-and-dies" else StandIns)(
        m=StandIn(handler))

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async with client.post("/v1/messages", json={**MESSAGE, "stream": True}) as resp:
            assert resp.status == 200
            got = anthropic_events(await read_cut(resp))
        assert got[0][0] == "message_start"
        name, data = got[-1]
        assert name == "error" and data["type"] == "error"
        assert data["error"]["type"] == "api_error"
        assert "broke off its answer" in data["error"]["message"]
        assert "message_stop" not in [name for name, _ in got]
        assert stats.models["m"].worker_errors == 1

    await run(make_registry, node_config, scenario, stand_ins)


async def test_a_passed_through_stream_always_begins_with_message_start(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    """llama-server leaves its message_start out now and then; the node puts one in."""
    async def no_start(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for name, data in (("content_block_start", {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}),
                           ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                           ("message_stop", {"type": "message_stop"})):
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        return resp

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async with client.post("/v1/messages", json={**MESSAGE, "stream": True}) as resp:
            got = anthropic_events(await resp.read())
        assert [name for name, _ in got] == ["message_start", "content_block_start",
                                             "content_block_stop", "message_stop"]
        assert got[0][1]["message"]["model"] == "m"

    await run(make_registry, node_config, scenario, SpeakingStandIns(m=StandIn(no_start)))


async def test_a_chat_stream_that_ends_before_done_is_an_error_on_v1_too(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        async with client.post("/v1/chat/completions",
                               json={"model": "m", "stream": True}) as resp:
            assert resp.status == 200
            raw = await read_cut(resp)
        data = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert json.loads(data[0])["choices"][0]["delta"]["content"] == "Hel"
        assert json.loads(data[-1])["error"]["code"] == "worker_unavailable"
        assert "[DONE]" not in data

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(ends_chat_stream_early)))


async def test_bad_input_gets_anthropics_error_shape_and_reaches_no_worker(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    reached: list[dict[str, Any]] = []

    async def answers(request: web.Request) -> web.StreamResponse:
        reached.append(await request.json())
        return web.json_response({"choices": [{"message": {"content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            for data, status, needle in (
                (b"{not json", 400, "not valid JSON"),
                (b"[1]", 400, "JSON object"),
                (json.dumps({**MESSAGE, "model": None}).encode(), 400, "model"),
                (json.dumps({**MESSAGE, "model": 7}).encode(), 400, "model"),
                (json.dumps({**MESSAGE, "messages": "hi"}).encode(), 400, "messages"),
                (json.dumps({**MESSAGE, "temperature": "x"}).encode(), 400, "temperature"),
                (json.dumps({**MESSAGE, "tools": [{"name": "t", "input_schema": "no"}]}
                            ).encode(), 400, "JSON Schema"),
                (json.dumps({**MESSAGE, "model": "nope"}).encode(), 404, "not loaded"),
                (json.dumps({**MESSAGE, "x": "y" * 10_000}).encode(), 413, "too large"),
            ):
                async with client.post(path, data=data, headers=JSON) as resp:
                    error = await anthropic_error_of(resp, status)
                assert needle in error["message"], (path, error)
            async with client.get(path) as resp:
                error = await anthropic_error_of(resp, 405)
            assert error["type"] == "invalid_request_error"
        async with client.post("/v1/messages", json={**MESSAGE, "max_tokens": None}) as resp:
            assert "max_tokens" in (await anthropic_error_of(resp, 400))["message"]
        assert reached == []  # nothing was forwarded
        # A worker's own refusal comes back in the same shape, with its status.
        async with client.post("/v1/messages", json=MESSAGE) as resp:
            assert resp.status == 200
            message = await resp.json()
        assert message["content"] == [{"type": "text", "text": "ok"}]
        assert message["usage"] == {"input_tokens": 3, "output_tokens": 1}
        assert reached[0]["messages"] == [{"role": "user", "content": "hi"}]

    config = dataclasses.replace(node_config, max_request_bytes=4_000)
    await run(make_registry, config, scenario, StandIns(m=StandIn(answers)))


async def test_a_workers_refusal_comes_back_in_anthropics_shape(
    node_config: NeuronConfig, make_registry: MakeRegistry,
) -> None:
    async def refuses(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "Requested tokens (300) exceed "
                                            "context window of 256", "type": "x"}}, status=400)

    async def scenario(client: Client, registry: ModelRegistry, stats: RouterStats) -> None:
        for stream in (False, True):
            async with client.post("/v1/messages", json={**MESSAGE, "stream": stream}) as resp:
                error = await anthropic_error_of(resp, 400)
            assert "exceed context window" in error["message"]

    await run(make_registry, node_config, scenario, StandIns(m=StandIn(refuses)))
    await run(make_registry, node_config, scenario, SpeakingStandIns(m=StandIn(refuses)))


# --- a real daemon, real workers, the real clients ------------------------------------------

KEY = "test-key-23"
LLAMA_SERVER = find_llama_server()
HARNESSES = ["py", *(["srv"] if LLAMA_SERVER else [])]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ..tiny_gguf import write_tiny_gguf

    tmp = tmp_path_factory.mktemp("messages")
    tiny = write_tiny_gguf(tmp / "tiny.gguf")
    port = free_port()
    server = f'[harness.llama-server]\nbinary = "{LLAMA_SERVER}"\n' if LLAMA_SERVER else ""
    models = f'[[default_models]]\nmodel_id = "py"\npath = "{tiny}"\nn_ctx = 256\n'
    if LLAMA_SERVER:
        models += (f'[[default_models]]\nmodel_id = "srv"\nharness = "llama-server"\n'
                   f'path = "{tiny}"\nn_ctx = 256\n')
    config = tmp / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\nlog_dir = "{tmp}/log"\n'
                      f'state_dir = "{tmp}/state"\nstop_timeout_s = 3.0\napi_key = "{KEY}"\n'
                      f"{server}{models}")
    journal = tmp / "daemon.log"
    with journal.open("wb") as out:
        proc = subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: b"listening on" in journal.read_bytes() or proc.poll() is not None,
                   120)
        assert proc.poll() is None, journal.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            kill_quietly(proc.pid)


def anthropic_client(url: str, key: str = KEY) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=120)


def openai_client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


@pytest.mark.llama
@LLAMA_MISSING
@pytest.mark.parametrize("model", HARNESSES)
def test_the_anthropic_client_works_unchanged(node: str, model: str) -> None:
    client = anthropic_client(node)
    message = client.messages.create(
        model=model, max_tokens=8, system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    with client.messages.stream(model=model, max_tokens=8,
                                messages=[{"role": "user", "content": "hello"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    assert final.stop_reason in ("end_turn", "max_tokens")
    # Streamed, the counts are the non-streamed answer's (llama-cpp-python's worker puts
    # them on its stream's last chunk; message_delta carries them).
    greedy: dict[str, Any] = {"model": model, "max_tokens": 8, "extra_body": {"temperature": 0},
                              "messages": [{"role": "user", "content": "hello"}]}
    whole = client.messages.create(**greedy)
    with client.messages.stream(**greedy) as stream:
        streamed = stream.get_final_message()
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == \
        (whole.usage.input_tokens, whole.usage.output_tokens), model

    counted = client.messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "hello"}])
    longer = client.messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "hello " * 20}])
    assert 0 < counted.input_tokens < longer.input_tokens


@pytest.mark.llama
@LLAMA_MISSING
def test_a_tool_round_trip(node: str) -> None:
    """On llama-cpp-python (translated): a forced tool is called with arguments its schema's
    grammar shaped. llama-server answers tool use by its chat template, which the tiny
    model's does not have; it passes the same requests through untouched."""
    model = "py"
    client = anthropic_client(node)
    question = {"role": "user", "content": "What is the weather in Oslo?"}
    first = client.messages.create(
        model=model, max_tokens=64, tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"}, messages=[question])
    calls = [block for block in first.content if block.type == "tool_use"]
    assert calls, first.content
    assert calls[0].name == "get_weather" and isinstance(calls[0].input, dict)
    assert first.stop_reason in ("tool_use", "end_turn", "max_tokens")
    second = client.messages.create(
        model=model, max_tokens=8, tools=[WEATHER], messages=[
            question,
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id,
                                          "content": "Rain, 4 degrees."}]}])
    assert second.type == "message" and second.content


@pytest.mark.llama
@LLAMA_MISSING
def test_keys_are_checked_in_anthropics_shape(node: str) -> None:
    import anthropic

    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic_client(node, key="wrong").messages.create(
            model="py", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client(node).messages.create(
            model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError):
        anthropic_client(node).messages.create(
            model="py", max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])


# Greedy decoding and EOS (token 2) banned: every answer runs until the context is full.
BANNED_EOS = {"2": -100}
GREEDY = {"temperature": 0}  # this client version has no `temperature` argument
REPEATS = 4


@pytest.mark.llama
@LLAMA_MISSING
@pytest.mark.parametrize("model", HARNESSES)
def test_a_full_context_ends_with_length_every_time(node: str, model: str) -> None:
    client = openai_client(node)
    prompt = [{"role": "user", "content": "hello"}]
    for _ in range(REPEATS):
        answer = client.chat.completions.create(model=model, messages=prompt,
                                                logit_bias=BANNED_EOS)
        assert answer.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(
            model=model, messages=prompt, logit_bias=BANNED_EOS, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        completion = client.completions.create(model=model, prompt="hello",
                                               logit_bias=BANNED_EOS, max_tokens=1000)
        assert completion.choices[0].finish_reason == "length"


@pytest.mark.llama
@LLAMA_MISSING
@pytest.mark.parametrize("model", HARNESSES)
def test_a_full_context_ends_with_max_tokens_on_the_messages_api(node: str, model: str) -> None:
    client = anthropic_client(node)
    prompt = [{"role": "user", "content": "hello " * 25}]  # 150 of the 256 tokens
    for _ in range(REPEATS):
        message = client.messages.create(model=model, max_tokens=4096, messages=prompt,
                                         extra_body=GREEDY)
        # Greedy, this prompt's answer runs to the context's end (measured: no EOS).
        assert message.stop_reason == "max_tokens"
        with client.messages.stream(model=model, max_tokens=4096, messages=prompt,
                                    extra_body=GREEDY) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        assert kinds[-1] == "message_stop"
        assert final.stop_reason == message.stop_reason  # greedy: the same answer


@pytest.mark.llama
@LLAMA_MISSING
def test_neuronctl_chat_on_a_full_context_is_never_cut_off(node: str) -> None:
    for _ in range(REPEATS):
        result = subprocess.run(
            [NEURONCTL, "chat", "py", "hello", "--url", node],
            env=clean_env(NEURON_API_KEY=KEY), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "cut off" not in result.stderr
