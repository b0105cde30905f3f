"""Ollama's API in the worker's terms and back, pure: no I/O, no aiohttp, no clock of its
own (times are given). ollama.py does the talking.

A request for `/api/chat` or `/api/generate` becomes an OpenAI-style chat (or, for a raw
`generate`, completion) body for the worker; the worker's answer, a JSON body or its
server-sent chunks, becomes Ollama's NDJSON lines. Ollama's `options` are mapped where the
worker has the same knob and named in `Translated.ignored` where it has none, so the
handler can say so instead of dropping them silently. Everything a client sends is checked
here and refused with `BadRequest`, whose message Ollama's clients show as it is.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest

NDJSON = "application/x-ndjson"  # Ollama's streams
# Ollama's default tag: clients (Open WebUI, the CLI) append it to a name that has none.
DEFAULT_TAG = ":latest"

# Ollama's options the worker takes per request under the same name.
_SAME_NAME: Mapping[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "typical_p": float,
    "seed": int, "repeat_penalty": float, "presence_penalty": float,
    "frequency_penalty": float,
}
# Options Ollama applies when it loads a model: here the node's config decides those, so
# they are reported as ignored (num_ctx with the context the model has).
_LOAD_TIME = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "numa",
    "num_keep", "rope_frequency_base", "rope_frequency_scale",
})
_ROLES = frozenset({"system", "user", "assistant", "tool"})
_SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean",
                           "null"})
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# --- names ---------------------------------------------------------------------------------


def ollama_name(model_id: str) -> str:
    """How Ollama would list `model_id`: with a tag, `:latest` unless it has one."""
    return model_id if ":" in model_id.rsplit("/", 1)[-1] else model_id + DEFAULT_TAG


def model_field(body: Mapping[str, Any], key: str = "model") -> str:
    """The model a request names (Ollama also takes `name`, its older spelling)."""
    name = body.get(key)
    if name is None and key == "model":
        name = body.get("name")
    if name is None or name == "":
        raise BadRequest("model is required")
    if not isinstance(name, str):
        raise BadRequest(f"{key}: expected a string, got {_kind(name)}")
    return name


def model_id_for(name: str, known: Sequence[str] | frozenset[str] | set[str]) -> str:
    """The node's id for an Ollama name: itself when known, else without `:latest`."""
    if name not in known and name.endswith(DEFAULT_TAG):
        return name[: -len(DEFAULT_TAG)]
    return name


# --- request fields ------------------------------------------------------------------------


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__.replace("dict", "object") \
        .replace("list", "array").replace("str", "string")


# A keep_alive this long or longer is forever (-1): a time past it is no time a listing, a
# timestamp or a table can show (year 33715), and no model is kept that long anyway.
KEEP_ALIVE_FOREVER_S = 100 * 365 * 86400


def keep_alive_s(value: object) -> float | None:
    """Ollama's `keep_alive` in seconds: a number of seconds or a Go duration ("5m",
    "1h30m", "-1"); negative, or 100 years and more: forever (-1); None when absent."""
    seconds = _keep_alive_s(value)
    if seconds is not None and not seconds < KEEP_ALIVE_FOREVER_S:  # inf from "9...9h" too
        return -1.0
    return seconds


def _keep_alive_s(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive: expected a duration (\"5m\") or a number of seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise BadRequest("keep_alive: must be finite")
        return -1.0 if value < 0 else float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return -1.0 if number < 0 else number
        sign = -1.0 if text.startswith("-") else 1.0
        rest = text.lstrip("+-")
        parts = _DURATION.findall(rest)
        if parts and "".join(n + u for n, u in parts) == rest:
            total = sum(float(n) * _UNIT_S[u] for n, u in parts)
            return -1.0 if sign < 0 else total
    raise BadRequest(f"keep_alive: {str(value)[:40]!r} is not a duration (\"5m\", \"1h\", "
                     "\"-1\" or a number of seconds)")


def check_schema(schema: object, where: str = "format") -> None:
    """Refuse what is not a JSON Schema (the worker turns one into a grammar and would
    fail later, less clearly): an object whose known keywords have the right types."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{where}: a JSON Schema must be an object")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in _SCHEMA_TYPES for k in kinds):
        raise BadRequest(f"{where}: type {str(kind)[:60]!r} is not a JSON Schema type")
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise BadRequest(f"{where}: properties must be an object")
        for name, sub in properties.items():
            check_schema(sub, f"{where}.properties.{str(name)[:40]}")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list)
                                     and all(isinstance(r, str) for r in required)):
        raise BadRequest(f"{where}: required must be an array of strings")
    items = schema.get("items")
    if items is not None and not isinstance(items, bool):
        check_schema(items, f"{where}.items")
    enum = schema.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise BadRequest(f"{where}: enum must be an array")


def response_format(value: object) -> dict[str, Any] | None:
    """Ollama's `format` as the worker's `response_format`: "json", or a JSON Schema
    (both llama.cpp servers take `{"type": "json_object", "schema": ...}`)."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, str):
        raise BadRequest(f"format: {value[:40]!r} is neither \"json\" nor a JSON Schema")
    check_schema(value)
    return {"type": "json_object", "schema": value}


@dataclass
class Options:
    """Ollama's `options` for the worker: `fields` go into its body; `ignored` names the
    ones the node does not apply per request (each with why, for a header)."""

    fields: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def options(value: object, n_ctx: int | None) -> Options:
    """Map `options` (see _SAME_NAME, _LOAD_TIME); `n_ctx`: the loaded context, against
    which a `num_ctx` is reported."""
    out = Options()
    if value is None:
        return out
    if not isinstance(value, dict):
        raise BadRequest(f"options: expected an object, got {_kind(value)}")
    for key, raw in value.items():
        if raw is None:
            continue
        if key in _SAME_NAME:
            out.fields[key] = _number(raw, _SAME_NAME[key], f"options.{key}")
        elif key == "num_predict":
            count = _number(raw, int, "options.num_predict")
            if count >= 0:  # -1: until the end; -2: fill the context. Both: no limit.
                out.fields["max_tokens"] = count
        elif key == "stop":
            stops = [raw] if isinstance(raw, str) else raw
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise BadRequest("options.stop: expected an array of strings")
            out.fields["stop"] = stops
        elif key == "num_ctx":
            asked = _number(raw, int, "options.num_ctx")
            if asked != n_ctx:
                loaded = f"loaded with n_ctx {n_ctx}" if n_ctx else "loaded with its default"
                out.ignored.append(f"num_ctx={asked} (the model is {loaded}; set n_ctx "
                                   "in the node's config)")
        elif key in _LOAD_TIME:
            out.ignored.append(f"{key} (set when the node loads the model)")
        else:
            out.ignored.append(f"{str(key)[:40]} (not supported)")
    return out


def _number(value: object, kind: type, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{where}: expected a number, got {_kind(value)}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise BadRequest(f"{where}: expected an integer, got {value}")
        return int(value)
    if not math.isfinite(value):
        raise BadRequest(f"{where}: must be finite")
    return float(value)


def _images(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise BadRequest(f"{where}: expected an array of base64 strings")
    for image in value:
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: not base64") from None
    return value


def _content(text: str, images: list[str]) -> str | list[dict[str, Any]]:
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i}"}}
              for i in images]
    return parts


def _tool_calls(value: object, where: str, first_id: int) -> list[dict[str, Any]]:
    """An assistant's Ollama tool calls (arguments an object) as OpenAI's (a JSON string)."""
    if not isinstance(value, list):
        raise BadRequest(f"{where}: expected an array")
    calls = []
    for n, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}[{n}]: expected {{\"function\": {{\"name\": ...}}}}")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, dict):
            raise BadRequest(f"{where}[{n}].function.arguments: expected an object")
        calls.append({"id": f"call_{first_id + n}", "type": "function",
                      "function": {"name": function["name"],
                                   "arguments": json.dumps(arguments)}})
    return calls


def messages(value: object) -> list[dict[str, Any]]:
    """Ollama's chat messages as OpenAI's: images as data URLs, tool calls' arguments as
    JSON strings, a tool's answer tied to the call it answers (by its name, else the
    latest)."""
    if not isinstance(value, list):
        raise BadRequest(f"messages: expected an array, got {_kind(value)}")
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []  # every tool call so far, for the answers' ids
    for n, message in enumerate(value):
        where = f"messages[{n}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where}: expected an object, got {_kind(message)}")
        role = message.get("role")
        if role not in _ROLES:
            raise BadRequest(f"{where}.role: expected one of {', '.join(sorted(_ROLES))}")
        text = message.get("content") or ""
        if not isinstance(text, str):
            raise BadRequest(f"{where}.content: expected a string, got {_kind(text)}")
        entry: dict[str, Any] = {
            "role": role, "content": _content(text, _images(message.get("images"),
                                                            f"{where}.images"))}
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls",
                                              len(calls))
            calls += entry["tool_calls"]
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            answered = [c for c in calls if c["function"]["name"] == name] or calls
            if answered:
                entry["tool_call_id"] = answered[-1]["id"]
            if isinstance(name, str):
                entry["name"] = name
        out.append(entry)
    return out


@dataclass
class Translated:
    """A request for the worker: where it goes, its body, and what the handler needs."""

    path: str
    body: dict[str, Any]
    stream: bool
    keep_alive_s: float | None
    ignored: list[str]
    empty: bool  # no messages or prompt: Ollama's load (or, with keep_alive 0, unload)


def _common(body: Mapping[str, Any], n_ctx: int | None) -> tuple[bool, float | None, Options,
                                                                dict[str, Any]]:
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected a boolean, got {_kind(stream)}")
    alive = keep_alive_s(body.get("keep_alive"))
    opts = options(body.get("options"), n_ctx)
    extra: dict[str, Any] = dict(opts.fields)
    fmt = response_format(body.get("format"))
    if fmt is not None:
        extra["response_format"] = fmt
    # The worker streams either way: the node times its first token, and a stream the
    # worker breaks off is noticed as one.
    extra["stream"] = True
    extra["stream_options"] = {"include_usage": True}
    for key in ("think", "logprobs", "top_logprobs"):  # no worker answers them in kind
        if body.get(key):
            opts.ignored.append(f"{key} (not supported)")
    return stream, alive, opts, extra


def chat_request(body: Mapping[str, Any], model_id: str, n_ctx: int | None) -> Translated:
    stream, alive, opts, extra = _common(body, n_ctx)
    raw_messages = body.get("messages")
    converted = messages(raw_messages if raw_messages is not None else [])
    out: dict[str, Any] = {"model": model_id, "messages": converted, **extra}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRequest("tools: expected an array of objects")
        if tools:
            out["tools"] = tools
    return Translated("/v1/chat/completions", out, stream, alive, opts.ignored,
                      not converted)


def generate_request(body: Mapping[str, Any], model_id: str, n_ctx: int | None
                     ) -> Translated:
    stream, alive, opts, extra = _common(body, n_ctx)
    prompt = body.get("prompt") or ""
    system = body.get("system") or ""
    for key, value in (("prompt", prompt), ("system", system)):
        if not isinstance(value, str):
            raise BadRequest(f"{key}: expected a string, got {_kind(value)}")
    if body.get("suffix"):
        raise BadRequest("suffix (fill-in-the-middle) is not served by this node; send "
                         "the code before the cursor as the prompt")
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise BadRequest(f"raw: expected a boolean, got {_kind(raw)}")
    images = _images(body.get("images"), "images")
    ignored = list(opts.ignored)
    if body.get("template"):
        ignored.append("template (the model's own chat template applies)")
    if body.get("context"):
        ignored.append("context (send the conversation to /api/chat instead)")
    if raw:  # the prompt as it is, no template: a completion
        if images:
            raise BadRequest("images: not with raw: true (a raw prompt is text only)")
        out = {"model": model_id, "prompt": prompt, **extra}
        return Translated("/v1/completions", out, stream, alive, ignored, not prompt)
    chat: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    chat.append({"role": "user", "content": _content(prompt, images)})
    out = {"model": model_id, "messages": chat, **extra}
    return Translated("/v1/chat/completions", out, stream, alive, ignored,
                      not prompt and not images)


def embed_inputs(body: Mapping[str, Any], key: str) -> list[str]:
    """`/api/embed`'s `input` (a string or strings) or `/api/embeddings`' `prompt`."""
    value = body.get(key)
    if value is None:
        value = ""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest(f"{key}: expected a string or an array of strings")
    return texts


# --- answers --------------------------------------------------------------------------------


def timestamp(unix: float) -> str:
    """Ollama's `created_at`: RFC 3339 in UTC with nanoseconds' room."""
    moment = datetime.datetime.fromtimestamp(unix, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def done_reason(finish_reason: object) -> str:
    """OpenAI's finish_reason as Ollama's done_reason ("tool_calls" is a stop there)."""
    return "length" if finish_reason == "length" else "stop"


def tool_calls_back(calls: object) -> list[dict[str, Any]]:
    """OpenAI's tool calls (arguments a JSON string) as Ollama's (an object)."""
    out = []
    for n, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = {"arguments": arguments}  # the model wrote no JSON: kept whole
        if not isinstance(arguments, dict):
            arguments = {"arguments": arguments}
        out.append({"function": {"index": n, "name": str(function.get("name", "")),
                                 "arguments": arguments}})
    return out


@dataclass
class Tally:
    """What an answer reports at its end, gathered from the worker's answer or chunks;
    times are monotonic seconds the handler measured."""

    started: float
    admitted: float = 0.0  # the model was serving and the request had its slot
    first_token: float = 0.0
    loaded_for_it: bool = False  # it waited for a load: that wait is its load_duration
    prompt_tokens: int | None = None  # the worker's usage: the counts, when it says them
    completion_tokens: int | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # merge_tool_deltas
    chunks: int = 0  # streamed chunks of text: the tokens, when the worker has no usage
    finish_reason: object = None
    # llama-server's own `timings` (ms), better than the node's clock when present.
    timings: dict[str, Any] = field(default_factory=dict)

    def take(self, answer: Mapping[str, Any]) -> None:
        """The usage, timings and finish reason of a worker's answer or chunk."""
        usage = answer.get("usage")
        if isinstance(usage, dict):
            if _count(usage.get("prompt_tokens")):
                self.prompt_tokens = usage["prompt_tokens"]
            if _count(usage.get("completion_tokens")):
                self.completion_tokens = usage["completion_tokens"]
        timings = answer.get("timings")
        if isinstance(timings, dict):
            self.timings = timings
        choices = answer.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            reason = choice.get("finish_reason")
            if reason is not None:
                self.finish_reason = reason
                return  # the last chunk: its text ("" from llama-cpp-python) is no token
            # One chunk per token, "" for a token that ends inside a UTF-8 character; not
            # the role-only first chunk. Only a guess: a chunk held back for a stop
            # sequence holds several; the worker's usage, when it sends one, wins.
            delta = choice.get("delta")
            if "text" in choice or (isinstance(delta, dict) and delta.get("content")
                                    is not None):
                self.chunks += 1

    def counts(self) -> tuple[int, int]:
        """(prompt, generated) tokens, as Ollama means them: the whole prompt, cached or
        not. The worker's `usage` first; llama-server's `timings` count in `prompt_n` only
        the tokens it evaluated (not those its cache held: `cache_n`), so without usage
        they are added; the streamed chunks last."""
        prompt = self.prompt_tokens
        if prompt is None and _count(self.timings.get("prompt_n")):
            cached = self.timings.get("cache_n")
            prompt = self.timings["prompt_n"] + (cached if _count(cached) else 0)
        generated = self.completion_tokens
        if generated is None and _count(self.timings.get("predicted_n")):
            generated = self.timings["predicted_n"]
        return prompt or 0, generated if generated is not None else self.chunks

    def final(self, now: float) -> dict[str, Any]:
        """The timing and count fields of Ollama's last line (nanoseconds)."""
        admitted = self.admitted or now
        first = self.first_token or now
        prompt_ms = self.timings.get("prompt_ms")
        eval_ms = self.timings.get("predicted_ms")
        prompt_n, eval_n = self.counts()
        return {
            "total_duration": _ns(now - self.started),
            "load_duration": _ns(admitted - self.started) if self.loaded_for_it else 0,
            "prompt_eval_count": prompt_n,
            "prompt_eval_duration": _ns(prompt_ms / 1000) if isinstance(prompt_ms, int | float)
            and _real(prompt_ms) else _ns(first - admitted),
            "eval_count": eval_n,
            "eval_duration": _ns(eval_ms / 1000) if isinstance(eval_ms, int | float)
            and _real(eval_ms) else _ns(now - first),
        }


def _count(value: object) -> bool:
    """A token count a worker may report: a non-negative int (not a bool), bounded."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def text_of(answer: Mapping[str, Any], delta: bool) -> tuple[str, object]:
    """The text and the tool calls of a worker's answer (`delta`: of one streamed chunk),
    chat or completion alike."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None
    choice = choices[0]
    if "text" in choice:  # a completion
        text = choice.get("text")
        return (text if isinstance(text, str) else ""), None
    message = choice.get("delta" if delta else "message")
    if not isinstance(message, dict):
        return "", None
    content = message.get("content")
    return (content if isinstance(content, str) else ""), message.get("tool_calls")


def merge_tool_deltas(gathered: list[dict[str, Any]], deltas: object) -> None:
    """Streamed tool calls come in pieces (a name, then arguments bit by bit), by index."""
    for delta in deltas if isinstance(deltas, list) else []:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index", len(gathered))
        if not isinstance(index, int) or not 0 <= index <= len(gathered):
            index = len(gathered)
        if index == len(gathered):
            gathered.append({"function": {"name": "", "arguments": ""}})
        function = delta.get("function")
        if isinstance(function, dict):
            target = gathered[index]["function"]
            if isinstance(function.get("name"), str):
                target["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                target["arguments"] += function["arguments"]


def line(kind: str, name: str, now_unix: float, text: str, done: bool,
         tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One of Ollama's answer objects: `kind` "chat" (a message) or "generate" (a
    response)."""
    out: dict[str, Any] = {"model": name, "created_at": timestamp(now_unix)}
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        out["message"] = message
    else:
        out["response"] = text
    out["done"] = done
    return out


def ndjson(obj: dict[str, Any]) -> bytes:
    """One line of Ollama's streams."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def normalized(vector: Sequence[float]) -> list[float]:
    """L2-normalized, as Ollama's /api/embed answers (its /api/embeddings does not)."""
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm > 0 else list(vector)
