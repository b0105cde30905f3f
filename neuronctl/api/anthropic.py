"""Anthropic's Messages API in terms of OpenAI's chat completions: pure functions, no I/O.

A worker that does not speak `/v1/messages` itself (llama-cpp-python's server) is sent the
request as a chat completion (`to_chat`), and its answer comes back as a Message
(`from_chat`) or, streamed, as Anthropic's event sequence (`EventStream`: `message_start`,
then per content block `content_block_start`, its deltas and `content_block_stop`, then
`message_delta` with the stop reason and usage, and `message_stop`). Every request is
checked here (`check_request`), whichever worker answers it, so bad input gets the same 400
in Anthropic's error shape (`error_body`) on every harness.

What has no chat-completions counterpart is refused with a 400 that says so (images,
documents, server tools), or dropped where Anthropic's own API treats it as a hint
(`metadata`, `thinking`, cache controls).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from .. import errors
from ..errors import NeuronError

# The HTTP status of an error, as Anthropic names it (its client libraries map the status
# to their exception classes; the type is what their users read).
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    503: "overloaded_error", 529: "overloaded_error",
}
# OpenAI's finish_reason -> Anthropic's stop_reason.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
ROLES = ("user", "assistant")
# Anthropic's tool_choice types -> OpenAI's.
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def error_type(status: int) -> str:
    """Anthropic's name for a status; a client's mistake it has no name for is still an
    invalid request (a 405, a 415), anything else the server's."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(error: NeuronError) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`, Anthropic's shape."""
    return {"type": "error", "error": {"type": error_type(error.status),
                                       "message": error.message}}


def error_event(error: NeuronError) -> bytes:
    """The `error` event a stream ends with when it cannot go on."""
    return sse("error", error_body(error))


def sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def _bad(message: str, param: str | None = None) -> errors.InvalidValue:
    return errors.InvalidValue(message, param=param)


def _text_of(content: object, where: str) -> str:
    """A string, or a list of text blocks, as one string (system prompts, tool results)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: expected a string or a list of text blocks", where)
    parts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise _bad(f"{where}[{i}]: only text blocks are served here, not {kind!r}",
                       where)
        parts.append(_string(block.get("text"), f"{where}[{i}].text"))
    return "".join(parts)


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where}: expected a string", where)
    return value


def _number(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise _bad(f"{key}: expected a number" if kind is not int else
                   f"{key}: expected an integer", key)
    return value


def check_request(body: object, *, counting: bool = False) -> dict[str, Any]:
    """The request as a chat-completions body; InvalidValue/InvalidJson (400) for what is
    not a Messages request. `counting`: a count_tokens body (no max_tokens)."""
    if not isinstance(body, dict):
        raise errors.InvalidJson("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: required, a string", "model")
    max_tokens = _number(body, "max_tokens", int)
    if not counting:
        if max_tokens is None:
            raise _bad("max_tokens: required, an integer of at least 1", "max_tokens")
        if max_tokens < 1:
            raise _bad("max_tokens: must be at least 1", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: required, a non-empty list", "messages")
    chat: list[dict[str, Any]] = []
    if body.get("system") is not None:
        chat.append({"role": "system", "content": _text_of(body["system"], "system")})
    for i, message in enumerate(messages):
        chat.extend(_message(message, f"messages[{i}]"))
    request: dict[str, Any] = {"model": model, "messages": chat}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        if (value := _number(body, key, (int, float))) is not None:
            request[key] = value
    if (top_k := _number(body, "top_k", int)) is not None:
        request["top_k"] = top_k
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop_sequences: expected a list of strings", "stop_sequences")
        if stop:
            request["stop"] = stop
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: expected true or false", "stream")
    if stream and not counting:
        request["stream"] = True
    if body.get("tools") is not None:
        request["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        choice = _tool_choice(body["tool_choice"])
        if choice is not None:
            request["tool_choice"] = choice
    return request


def _message(message: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise _bad(f"{where}: expected an object with role and content", where)
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role: expected 'user' or 'assistant', got {role!r}"[:300], where)
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content: expected a string or a list of content blocks", where)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(block, dict) or not isinstance(kind, str):
            raise _bad(f"{at}: expected a content block with a type", at)
        if kind == "text":
            texts.append(_string(block.get("text"), f"{at}.text"))
        elif kind == "tool_use" and role == "assistant":
            name = _string(block.get("name"), f"{at}.name")
            call_id = _string(block.get("id"), f"{at}.id")
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise _bad(f"{at}.input: expected an object", at)
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(arguments)}})
        elif kind == "tool_result" and role == "user":
            call_id = _string(block.get("tool_use_id"), f"{at}.tool_use_id")
            text = _text_of(block.get("content", ""), f"{at}.content")
            if block.get("is_error") is True:
                text = f"error: {text}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning: a hint to Anthropic's models, nothing to ours
        else:
            raise _bad(f"{at}: {kind!r} blocks in {role} messages are not served here "
                       "(text, tool_use and tool_result are)"[:300], at)
    out: list[dict[str, Any]] = list(results)  # tool results answer the previous turn
    if role == "assistant":
        # "" rather than None beside tool calls: llama-cpp-python's server refuses a null.
        turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    elif texts or not results:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools: expected a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"{at}: expected an object", at)
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"{at}: server tools ({tool.get('type')!r}) are not served here; "
                       "give name, description and input_schema"[:300], at)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"{at}.input_schema: expected a JSON Schema object", at)
        function: dict[str, Any] = {"name": _string(tool.get("name"), f"{at}.name"),
                                    "parameters": schema}
        if tool.get("description") is not None:
            function["description"] = _string(tool["description"], f"{at}.description")
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> object:
    if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
        raise _bad("tool_choice: expected an object with a type", "tool_choice")
    kind = choice["type"]
    if kind in _TOOL_CHOICES:
        return _TOOL_CHOICES[kind]
    if kind == "tool":
        name = _string(choice.get("name"), "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    raise _bad(f"tool_choice.type: expected auto, any, tool or none, got {kind!r}"[:300],
               "tool_choice")


def counted_text(chat: Mapping[str, Any]) -> str:
    """What a tokenizer counts for a count_tokens request on a worker that has no such
    route: every message's text and tool call, and the tools' definitions, one per line
    (the chat template's own tokens are not in it)."""
    lines = []
    for message in chat.get("messages", ()):
        if message.get("content"):
            lines.append(f"{message['role']}: {message['content']}")
        for call in message.get("tool_calls", ()):
            lines.append(json.dumps(call["function"]))
    for tool in chat.get("tools", ()):
        lines.append(json.dumps(tool["function"]))
    return "\n".join(lines)


def _tool_input(arguments: object) -> dict[str, Any]:
    """A tool call's arguments as an object (a worker that sent no valid JSON: kept whole,
    so nothing is lost)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def stop_reason(finish_reason: object, has_tool_calls: bool = False) -> str:
    if has_tool_calls and finish_reason in ("stop", None):
        return "tool_use"
    return STOP_REASONS.get(str(finish_reason), "end_turn")


def from_chat(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A chat completion (non-streamed) as a Message."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": str(message["content"])})
    calls = message.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": str(call.get("id") or _tool_id()),
                        "name": str(function.get("name", "")),
                        "input": _tool_input(function.get("arguments"))})
    if not content:
        content.append({"type": "text", "text": ""})
    usage = answer.get("usage") or {}
    return {
        "id": message_id(), "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason"), bool(calls)),
        "stop_sequence": None,
        "usage": {"input_tokens": _count(usage.get("prompt_tokens")),
                  "output_tokens": _count(usage.get("completion_tokens"))},
    }


def message_start(model: str, input_tokens: int = 0) -> bytes:
    """The `message_start` event: a stream's first."""
    return sse("message_start", {"type": "message_start", "message": {
        "id": message_id(), "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})


def _count(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


class EventStream:
    """A chat-completions stream, chunk by chunk, as Anthropic's events.

    `start()` is the `message_start`; `chunk(data)` takes one `data:` payload (a parsed
    chunk) and returns the events it makes; `finish()` the closing ones, once a chunk
    has said why the answer ended (`ended`). Blocks open and close in order: text, then
    each tool call (a tool call's arguments arrive as `input_json_delta`s)."""

    def __init__(self, model: str, input_tokens: int = 0) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.finish_reason: str | None = None
        self.ended = False
        self._index = -1  # the open block's index
        self._open: str | None = None  # "text" or the open tool call's key
        self._tools: dict[int, int] = {}  # the worker's tool_calls index -> block index
        self._any_tool = False

    def start(self) -> bytes:
        return message_start(self.model, self.input_tokens)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self._index})

    def _begin(self, key: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._open = key
        return out + sse("content_block_start", {"type": "content_block_start",
                                                 "index": self._index, "content_block": block})

    def chunk(self, data: Mapping[str, Any]) -> bytes:
        out = b""
        choices = data.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self._open != "text":
                out += self._begin("text", {"type": "text", "text": ""})
            out += sse("content_block_delta", {"type": "content_block_delta",
                                               "index": self._index,
                                               "delta": {"type": "text_delta", "text": text}})
            self.output_tokens += 1  # llama.cpp's servers send a token per chunk
        for call in delta.get("tool_calls") or []:
            out += self._tool_delta(call)
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.input_tokens = _count(usage.get("prompt_tokens")) or self.input_tokens
            self.output_tokens = _count(usage.get("completion_tokens")) or self.output_tokens
        reason = choice.get("finish_reason")
        if reason is not None:
            self.finish_reason = str(reason)
            self.ended = True
        return out

    def _tool_delta(self, call: Mapping[str, Any]) -> bytes:
        out = b""
        position = call.get("index", 0) if isinstance(call.get("index"), int) else 0
        function = call.get("function") or {}
        key = f"tool{position}"
        if position not in self._tools:
            out += self._begin(key, {"type": "tool_use", "id": str(call.get("id") or _tool_id()),
                                     "name": str(function.get("name") or ""), "input": {}})
            self._tools[position] = self._index
            self._any_tool = True
        elif self._open != key:
            return out  # a late fragment of a block already closed: nowhere to put it
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out += sse("content_block_delta", {
                "type": "content_block_delta", "index": self._tools[position],
                "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out

    def finish(self) -> bytes:
        out = self._close()
        usage = {"output_tokens": self.output_tokens}
        if self.input_tokens:
            usage["input_tokens"] = self.input_tokens
        out += sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(self.finish_reason, self._any_tool),
                      "stop_sequence": None},
            "usage": usage})
        return out + sse("message_stop", {"type": "message_stop"})


def chat_error(status: int, answer: bytes) -> NeuronError:
    """A worker's error answer to a translated request, as the node's error with the same
    status, its message kept (llama-cpp-python's `{"error": {"message"}}` or FastAPI's
    `{"detail": ...}`)."""
    message = ""
    try:
        parsed = json.loads(answer)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            message = str(error.get("message", ""))
        elif isinstance(error, str):
            message = error
        elif "detail" in parsed:
            message = json.dumps(parsed["detail"])
    if not message:
        message = answer[:300].decode("utf-8", "replace") or f"HTTP {status}"
    error_class = errors.BadRequest if 400 <= status < 500 else errors.WorkerUnavailable
    error = error_class(f"the worker refused the request: {errors.clip(message, 500)}")
    error.status = status  # type: ignore[misc]
    return error

