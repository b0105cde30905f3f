"""Anthropic's Messages API translated to and from chat completions (api/anthropic.py):
pure functions, no processes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from neuronctl import errors
from neuronctl.api import anthropic

BASE = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().strip().split("\n\n"):
        if not block:
            continue
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        out.append((event[7:], json.loads(data[6:])))
    return out


def test_a_plain_request_becomes_a_chat_completion() -> None:
    chat = anthropic.check_request({
        **BASE, "system": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        "stop_sequences": ["\n\n"], "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "stream": True, "metadata": {"user_id": "u"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
                     {"role": "assistant", "content": "hi there"},
                     {"role": "user", "content": "again"}],
    })
    assert chat == {
        "model": "m", "max_tokens": 16, "stream": True, "stop": ["\n\n"],
        "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hello"},
                     {"role": "assistant", "content": "hi there"},
                     {"role": "user", "content": "again"}],
    }


def test_tool_use_and_results_become_tool_calls_and_tool_messages() -> None:
    chat = anthropic.check_request({
        **BASE,
        "tools": [{"name": "weather", "description": "the weather",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "tool", "name": "weather"},
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "x"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "rain"}]},
                {"type": "text", "text": "and tomorrow?"}]},
        ],
    })
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    for kind, expected in (("auto", "auto"), ("any", "required"), ("none", "none")):
        assert anthropic.check_request({**BASE, "tool_choice": {"type": kind}})[
            "tool_choice"] == expected


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({**BASE, "max_tokens": None}, "max_tokens", "required"),
    ({**BASE, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({**BASE, "max_tokens": "9"}, "max_tokens", "integer"),
    ({**BASE, "max_tokens": True}, "max_tokens", "integer"),
    ({**BASE, "model": 3}, "model", "string"),
    ({**BASE, "messages": []}, "messages", "non-empty"),
    ({**BASE, "messages": "hi"}, "messages", "non-empty"),
    ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "messages[0]", "'user'"),
    ({**BASE, "messages": [{"role": "user", "content": 5}]}, "messages[0]", "content"),
    ({**BASE, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}]}]}, "messages[0].content[0]", "'image'"),
    ({**BASE, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]},
     "messages[0].content[0]", "'tool_use' blocks in user"),
    ({**BASE, "system": 5}, "system", "string"),
    ({**BASE, "temperature": "hot"}, "temperature", "number"),
    ({**BASE, "stop_sequences": "x"}, "stop_sequences", "list of strings"),
    ({**BASE, "stream": "yes"}, "stream", "true or false"),
    ({**BASE, "tools": [{"name": "t"}]}, "tools[0]", "input_schema"),
    ({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools[0]", "server tools"),
    ({**BASE, "tool_choice": {"type": "sometimes"}}, "tool_choice", "auto, any"),
])
def test_bad_input_is_a_400_naming_the_field(body: dict[str, Any], param: str,
                                             needle: str) -> None:
    with pytest.raises(errors.InvalidValue) as caught:
        anthropic.check_request(body)
    assert caught.value.status == 400 and caught.value.param == param
    assert needle in caught.value.message


def test_count_tokens_needs_no_max_tokens_and_counts_what_the_model_reads() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}],
            "system": "sys", "tools": [{"name": "t", "input_schema": {"type": "object"}}]}
    chat = anthropic.check_request(body, counting=True)
    assert "max_tokens" not in chat
    text = anthropic.counted_text(chat)
    assert "system: sys" in text and "user: hello" in text and '"name": "t"' in text
    with pytest.raises(errors.InvalidJson):
        anthropic.check_request([1, 2], counting=True)


def test_an_answer_becomes_a_message() -> None:
    message = anthropic.from_chat({
        "choices": [{"message": {"role": "assistant", "content": "It rains.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
            "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7}}, "m")
    assert message["type"] == "message" and message["id"].startswith("msg_")
    assert message["content"] == [
        {"type": "text", "text": "It rains."},
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}}]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 12, "output_tokens": 7}
    for finish, reason in (("stop", "end_turn"), ("length", "max_tokens"),
                           (None, "end_turn")):
        answer = {"choices": [{"message": {"content": "x"}, "finish_reason": finish}]}
        assert anthropic.from_chat(answer, "m")["stop_reason"] == reason
    # Arguments that are not JSON are kept, not lost.
    odd = anthropic.from_chat({"choices": [{"message": {"tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}}]}, "m")
    assert odd["content"][0]["input"] == {"arguments": "{oops"}


def test_a_stream_becomes_the_event_sequence() -> None:
    stream = anthropic.EventStream("m")
    raw = stream.start()
    for data in ({"choices": [{"delta": {"role": "assistant"}}]},
                 {"choices": [{"delta": {"content": "Hel"}}]},
                 {"choices": [{"delta": {"content": "lo"}}]},
                 {"choices": [{"delta": {}, "finish_reason": "length"}]}):
        raw += stream.chunk(data)
    assert stream.ended
    raw += stream.finish()
    got = events(raw)
    assert [name for name, _ in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert got[0][1]["message"]["content"] == [] and got[0][1]["message"]["role"] == "assistant"
    assert got[2][1]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert got[5][1]["delta"]["stop_reason"] == "max_tokens"
    assert got[5][1]["usage"]["output_tokens"] == 2


def test_streamed_tool_calls_become_tool_use_blocks() -> None:
    stream = anthropic.EventStream("m")
    raw = stream.start()
    for data in ({"choices": [{"delta": {"content": "ok"}}]},
                 {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_9",
                   "function": {"name": "weather", "arguments": '{"ci'}}]}}]},
                 {"choices": [{"delta": {"tool_calls": [{"index": 0,
                   "function": {"arguments": 'ty": "Oslo"}'}}]}}]},
                 {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}):
        raw += stream.chunk(data)
    raw += stream.finish()
    got = events(raw)
    starts = [data["content_block"] for name, data in got if name == "content_block_start"]
    assert starts == [{"type": "text", "text": ""},
                      {"type": "tool_use", "id": "call_9", "name": "weather", "input": {}}]
    partial = "".join(data["delta"]["partial_json"] for name, data in got
                      if name == "content_block_delta" and data["index"] == 1)
    assert json.loads(partial) == {"city": "Oslo"}
    assert [name for name, _ in got].count("content_block_stop") == 2
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_errors_take_anthropics_shape_and_type() -> None:
    for error, kind in ((errors.InvalidValue("bad"), "invalid_request_error"),
                        (errors.Unauthorized("key"), "authentication_error"),
                        (errors.ModelNotFound("nope"), "not_found_error"),
                        (errors.PayloadTooLarge("big"), "request_too_large"),
                        (errors.QueueFull("busy"), "rate_limit_error"),
                        (errors.MethodNotAllowed("GET"), "invalid_request_error"),
                        (errors.ModelNotReady("later"), "overloaded_error"),
                        (errors.WorkerUnavailable("gone"), "api_error")):
        assert anthropic.error_body(error) == {
            "type": "error", "error": {"type": kind, "message": error.message}}
    assert events(anthropic.error_event(errors.WorkerUnavailable("gone"))) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "gone"}})]


def test_a_workers_error_keeps_its_status_and_message() -> None:
    refused = anthropic.chat_error(400, json.dumps({"error": {
        "message": "Requested tokens (300) exceed context window of 256"}}).encode())
    assert refused.status == 400 and "exceed context window" in refused.message
    assert anthropic.error_body(refused)["error"]["type"] == "invalid_request_error"
    broken = anthropic.chat_error(500, b"<html>oops</html>")
    assert broken.status == 500 and "oops" in broken.message
    detail = anthropic.chat_error(422, b'{"detail": [{"loc": ["body"]}]}')
    assert detail.status == 422 and "loc" in detail.message
