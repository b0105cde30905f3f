"""Ollama's requests and answers translated, and models described, without processes
(api/ollama_convert.py, the pure functions of api/ollama_models.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from neuronctl.api import ollama_convert as convert
from neuronctl.api import ollama_models, workererrors
from neuronctl.errors import BadRequest


def test_names_as_ollama_shows_and_sends_them() -> None:
    assert convert.ollama_name("tiny") == "tiny:latest"
    assert convert.ollama_name("Qwen/Qwen3-0.6B-GGUF") == "Qwen/Qwen3-0.6B-GGUF:latest"
    assert convert.ollama_name("qwen3:0.6b") == "qwen3:0.6b"
    assert convert.ollama_name("org/m:q4") == "org/m:q4"
    known = {"tiny", "odd:latest"}
    assert convert.model_id_for("tiny:latest", known) == "tiny"
    assert convert.model_id_for("odd:latest", known) == "odd:latest"  # its own id wins
    assert convert.model_id_for("tiny", known) == "tiny"
    assert convert.model_field({"name": "x"}) == "x"  # Ollama's older spelling
    with pytest.raises(BadRequest, match="model is required"):
        convert.model_field({})
    with pytest.raises(BadRequest, match="expected a string"):
        convert.model_field({"model": 3})


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), ("0", 0.0), (-1, -1.0), ("-1", -1.0), ("-1m", -1.0),
    (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25),
    # Past any time a listing can show: forever, as -1 (not year 33715, nor infinity).
    (1e12, -1.0), ("9" * 400 + "h", -1.0), (convert.KEEP_ALIVE_FOREVER_S - 1,
                                            convert.KEEP_ALIVE_FOREVER_S - 1),
])
def test_keep_alive(value: object, seconds: float | None) -> None:
    assert convert.keep_alive_s(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [1], "5m3", float("inf")])
def test_keep_alive_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        convert.keep_alive_s(value)


def test_options_mapped_and_the_rest_named() -> None:
    mapped = convert.options({
        "temperature": 0, "top_p": 0.5, "top_k": 40, "seed": 7, "repeat_penalty": 1.1,
        "num_predict": 12, "stop": ["\n"], "min_p": 0.1, "num_ctx": 4096, "num_gpu": 99,
        "mirostat": 2, "presence_penalty": None,
    }, n_ctx=2048)
    assert mapped.fields == {"temperature": 0.0, "top_p": 0.5, "top_k": 40, "seed": 7,
                             "repeat_penalty": 1.1, "max_tokens": 12, "stop": ["\n"],
                             "min_p": 0.1}
    assert mapped.ignored[0].startswith("num_ctx=4096 (the model is loaded with n_ctx 2048")
    assert any(i.startswith("num_gpu") for i in mapped.ignored)
    assert any(i.startswith("mirostat (not supported)") for i in mapped.ignored)
    assert convert.options({"num_ctx": 2048}, n_ctx=2048).ignored == []  # what it has
    assert "max_tokens" not in convert.options({"num_predict": -1}, None).fields
    assert convert.options({"stop": "END"}, None).fields == {"stop": ["END"]}


@pytest.mark.parametrize("value", [
    "hot", {"temperature": "hot"}, {"top_k": 1.5}, {"seed": True}, {"stop": [1]},
    {"num_predict": "10"}, {"temperature": float("nan")},
])
def test_options_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="options"):
        convert.options(value, None)


def test_format_json_and_schema() -> None:
    assert convert.response_format(None) is None
    assert convert.response_format("") is None
    assert convert.response_format("json") == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": ["string", "null"]},
                                               "b": {"type": "array",
                                                     "items": {"type": "integer"}}},
              "required": ["a"]}
    assert convert.response_format(schema) == {"type": "json_object", "schema": schema}


@pytest.mark.parametrize("schema", [
    "yaml", ["a"], {"type": "objectx"}, {"properties": []}, {"required": "a"},
    {"properties": {"a": {"type": "str"}}}, {"type": "array", "items": 3}, {"enum": "a"},
])
def test_format_that_is_not_json_schema(schema: object) -> None:
    with pytest.raises(BadRequest, match="format"):
        convert.response_format(schema)


def test_chat_request_with_tools_both_ways_and_images() -> None:
    body = {
        "model": "m", "stream": False, "keep_alive": "10m", "format": "json",
        "options": {"num_predict": 5},
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "look", "images": ["aGVsbG8="]},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "cold", "tool_name": "weather"},
        ],
    }
    asked = convert.chat_request(body, "m", None)
    assert asked.path == "/v1/chat/completions" and asked.stream is False
    assert asked.keep_alive_s == 600 and not asked.empty
    out = asked.body
    assert out["stream"] is True  # the worker always streams (the node times it)
    assert out["max_tokens"] == 5 and out["response_format"] == {"type": "json_object"}
    assert out["tools"] == body["tools"]
    system, user, assistant, tool = out["messages"]
    assert system == {"role": "system", "content": "be brief"}
    assert user["content"] == [{"type": "text", "text": "look"}, {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]
    (call,) = assistant["tool_calls"]
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert tool == {"role": "tool", "content": "cold", "tool_call_id": call["id"],
                    "name": "weather"}


@pytest.mark.parametrize(("messages", "where"), [
    ("hi", "messages"), ([3], "messages[0]"), ([{"role": "bot", "content": ""}], "role"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": "", "images": ["not base64!"]}], "images"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[]"}}]}],
     "arguments"),
])
def test_bad_messages(messages: object, where: str) -> None:
    with pytest.raises(BadRequest, match=where.replace("[", r"\[").replace("]", r"\]")):
        convert.chat_request({"messages": messages}, "m", None)


def test_no_messages_is_the_load_idiom() -> None:
    assert convert.chat_request({}, "m", None).empty
    assert convert.chat_request({"messages": []}, "m", None).empty
    assert convert.generate_request({"keep_alive": 0}, "m", None).keep_alive_s == 0


def test_generate_request() -> None:
    asked = convert.generate_request(
        {"prompt": "hi", "system": "brief", "template": "{{ .Prompt }}", "context": [1, 2]},
        "m", None)
    assert asked.path == "/v1/chat/completions" and asked.stream is True
    assert asked.body["messages"] == [{"role": "system", "content": "brief"},
                                      {"role": "user", "content": "hi"}]
    assert [i.split(" ")[0] for i in asked.ignored] == ["template", "context"]
    thinking = convert.chat_request({"messages": [], "think": True}, "m", None)
    assert thinking.ignored == ["think (not supported)"]
    raw = convert.generate_request({"prompt": "hi", "raw": True}, "m", None)
    assert raw.path == "/v1/completions" and raw.body["prompt"] == "hi"
    with pytest.raises(BadRequest, match="suffix"):
        convert.generate_request({"prompt": "a", "suffix": "b"}, "m", None)
    with pytest.raises(BadRequest, match="stream"):
        convert.generate_request({"prompt": "a", "stream": "no"}, "m", None)


def chunk(content: str | None = None, finish: str | None = None, **extra: Any
          ) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def test_tally_from_chunks_and_the_workers_timings() -> None:
    tally = convert.Tally(started=10.0, admitted=12.0, first_token=13.0, loaded_for_it=True)
    for part in (chunk(None), chunk("a"), chunk(""), chunk("b"), chunk(None, "length")):
        tally.take(part)
    assert tally.chunks == 3 and tally.finish_reason == "length"
    final = tally.final(now=15.0)
    assert final == {"total_duration": 5_000_000_000, "load_duration": 2_000_000_000,
                     "prompt_eval_count": 0, "prompt_eval_duration": 1_000_000_000,
                     "eval_count": 3, "eval_duration": 2_000_000_000}
    tally.take(chunk(None, "length", usage={"prompt_tokens": 9, "completion_tokens": 2},
                     timings={"prompt_n": 9, "prompt_ms": 5.0, "predicted_n": 2,
                              "predicted_ms": 20.0}))
    final = tally.final(now=15.0)
    assert (final["prompt_eval_count"], final["eval_count"]) == (9, 2)
    assert (final["prompt_eval_duration"], final["eval_duration"]) == (5_000_000, 20_000_000)
    assert convert.Tally(started=1.0, admitted=2.0).final(3.0)["load_duration"] == 0
    assert convert.done_reason("length") == "length"
    assert convert.done_reason("tool_calls") == convert.done_reason(None) == "stop"


def test_tally_counts_as_ollama_means_them() -> None:
    # llama-cpp-python's completion stream ends with a chunk of "" text: its end, no token.
    tally = convert.Tally(started=0.0)
    for text, finish in (("a", None), ("", None), ("b", None), ("", "length")):
        tally.take({"choices": [{"text": text, "index": 0, "finish_reason": finish}]})
    assert tally.counts() == (0, 3)
    # llama-server's second request on a prompt: `prompt_n` is what its cache lacked; the
    # prompt is usage.prompt_tokens (or, without usage, prompt_n + cache_n).
    cached = {"cache_n": 52, "prompt_n": 1, "predicted_n": 5}
    tally.take({"choices": [], "usage": {"prompt_tokens": 53, "completion_tokens": 5},
                "timings": cached})
    assert tally.counts() == (53, 5)
    without_usage = convert.Tally(started=0.0)
    without_usage.take({"choices": [], "timings": cached})
    assert without_usage.counts() == (53, 5)
    # The worker's usage wins over a guess from the chunks, even a count of 0.
    nothing = convert.Tally(started=0.0)
    nothing.take(chunk("x"))
    nothing.take(chunk(None, "stop", usage={"prompt_tokens": 4, "completion_tokens": 0}))
    assert nothing.counts() == (4, 0)


def test_a_worker_without_embeddings_is_told_apart_and_the_hint_names_the_flag() -> None:
    assert workererrors.embeddings_off(501, "This server does not support embeddings. Start it "
                                       "with `--embeddings`")
    assert workererrors.embeddings_off(500, "Llama model must be created with embedding=True to "
                                       "call this method")
    assert not workererrors.embeddings_off(500, "llama_decode returned -1")
    hint = workererrors.embeddings_hint("chat:latest", "llama-server", "Start it with --embeddings")
    assert hint.startswith("model 'chat:latest' was not loaded with embeddings enabled: "
                           'add "--embeddings" to its `args`')
    assert '"--embedding", "true"' in workererrors.embeddings_hint("m", "llama-cpp-python", "")
    assert "its `args`" in workererrors.embeddings_hint("m", "other", "")


def test_streamed_tool_calls_merged_and_turned_back() -> None:
    gathered: list[dict[str, Any]] = []
    convert.merge_tool_deltas(gathered, [{"index": 0, "function": {"name": "weather",
                                                                   "arguments": '{"ci'}}])
    convert.merge_tool_deltas(gathered, [{"index": 0, "function": {"arguments": 'ty": 1}'}}])
    convert.merge_tool_deltas(gathered, [{"index": 1, "function": {"name": "t",
                                                                   "arguments": "oops"}}])
    assert convert.tool_calls_back(gathered) == [
        {"function": {"index": 0, "name": "weather", "arguments": {"city": 1}}},
        {"function": {"index": 1, "name": "t", "arguments": {"arguments": "oops"}}},
    ]
    answer = {"choices": [{"message": {"content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    text, calls = convert.text_of(answer, delta=False)
    assert text == "" and convert.tool_calls_back(calls)[0]["function"]["name"] == "f"
    assert convert.text_of({"choices": [{"text": "raw"}]}, delta=True) == ("raw", None)


def test_lines_errors_and_vectors() -> None:
    line = convert.line("chat", "m:latest", 0.0, "hi", False)
    assert line == {"model": "m:latest", "created_at": "1970-01-01T00:00:00.000000Z",
                    "message": {"role": "assistant", "content": "hi"}, "done": False}
    assert convert.line("generate", "m", 0.0, "hi", True)["response"] == "hi"
    assert workererrors.worker_error(400, json.dumps(
        {"error": {"message": "context full"}}).encode()) == "context full"
    assert workererrors.worker_error(422, b'{"detail": [{"msg": "bad"}]}') == '[{"msg": "bad"}]'
    assert workererrors.worker_error(500, b"boom") == "boom"
    assert convert.normalized([3.0, 4.0]) == [0.6, 0.8]
    assert convert.normalized([0.0]) == [0.0]
    assert convert.embed_inputs({"input": "a"}, "input") == ["a"]
    with pytest.raises(BadRequest, match="input"):
        convert.embed_inputs({"input": [1]}, "input")


def test_details_from_the_gguf_header() -> None:
    header = {"architecture": "gemma3", "parameter_count": 268_098_176, "file_type": 15,
              "context_length": 32768, "block_count": 18, "head_count": 4}
    assert ollama_models.details(header) == {
        "parent_model": "", "format": "gguf", "family": "gemma3", "families": ["gemma3"],
        "parameter_size": "268.10M", "quantization_level": "Q4_K_M"}
    assert ollama_models.parameter_size(7_615_616_512) == "7.6B"
    info = ollama_models.model_info(header)
    assert info["gemma3.context_length"] == 32768
    assert info["gemma3.attention.head_count"] == 4
    assert info["general.parameter_count"] == 268_098_176
    assert ollama_models.details(None)["family"] == "" and ollama_models.model_info(None) == {}


def test_pull_targets() -> None:
    assert ollama_models.pull_target("tiny") == {"model_id": "tiny"}
    assert ollama_models.pull_target("hf.co/org/repo-GGUF:Q4_K_M") == {
        "model_id": "hf.co/org/repo-GGUF:Q4_K_M", "repo": "org/repo-GGUF", "quant": "Q4_K_M"}
    assert ollama_models.pull_target("hf.co/org/repo-GGUF") == {
        "model_id": "hf.co/org/repo-GGUF", "repo": "org/repo-GGUF"}
    with pytest.raises(BadRequest, match=r"hf\.co/ORG/REPO"):
        ollama_models.pull_target("hf.co/just-a-repo")
