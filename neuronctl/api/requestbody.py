"""What the router needs of a `/v1` request body, and no more: the `model` it names and
whether it asks for a stream.

A body waits in its model's queue as bytes, never as parsed JSON: parsed, a 16 MiB body of
`[{},{},...]` is about 400 MiB of Python objects. A body up to `PARSE_BYTES` is parsed in
full (at most ~25x that, at once freed) so a JSON mistake is a 400 here; a larger one is
only scanned for its top-level `model` and `stream`, in passes over its bytes that build
nothing bigger than a copy of it. Its other JSON mistakes are the worker's to report.

Imports nothing of the node's but its errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from aiohttp import StreamReader

from .. import errors
from .traffic import QueuedBytes

# Bodies up to this size are parsed with json.loads (a 400 names a JSON mistake).
PARSE_BYTES = 1024 * 1024
# Scanned bodies: at most this many `"model":`/`"stream":` keys at any depth. A real
# request has one or two; a body made of them would cost a pass each.
MAX_ROUTING_KEYS = 64
# The scan counts brackets window by window, so its lists stay small whatever the body.
_WINDOW = 256 * 1024
_BRACES_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_ROUTING_KEY = re.compile(rb'"(model|stream)"[ \t\r\n]*:[ \t\r\n]*')
_STRING = re.compile(rb'"[^"]*"')
_END_OF_VALUE = re.compile(rb"[ \t\r\n]*[,\]]")
_NOT_A_STRING = object()


@dataclass(frozen=True)
class Routing:
    model: str | None  # None: the body names no model
    stream: bool  # `"stream": true`, as OpenAI's servers read it


async def read_limited(content: StreamReader, length: int | None, limit: int,
                       budget: QueuedBytes | None = None,
                       max_bytes: int | None = None) -> bytes | None:
    """The whole body, or None once it is over `limit` (without reading the rest).

    While it is read, what has arrived counts against the node-wide `budget` (QueuedBytes
    against `max_bytes`): a client that sends most of a body and trickles the rest holds
    those bytes as surely as one waiting in a queue (QueueBytesFull past the budget). The
    count is given back when reading ends; a queue counts the body again while it waits."""
    if length is not None and length > limit:
        return None
    parts: list[bytes] = []
    size = 0
    try:
        while chunk := await content.readany():
            if budget is not None:
                budget.take(len(chunk), max_bytes)
            size += len(chunk)  # counted against the budget from here on
            if size > limit:  # a chunked body has no length to check up front
                return None
            parts.append(chunk)
    finally:
        if budget is not None:
            budget.give_back(size)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def routing(body: bytes) -> Routing:
    """Raises InvalidJson (not JSON, not an object) or InvalidValue (`model` not a string)."""
    if len(body) <= PARSE_BYTES:
        return _parsed(body)
    return _scanned(body)


def _parsed(body: bytes) -> Routing:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
        raise errors.InvalidJson("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise errors.InvalidJson("request body must be a JSON object")
    return Routing(_model(payload.get("model")), payload.get("stream") is True)


def _model(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise errors.InvalidValue("model: expected a string", param="model")


def _scanned(body: bytes) -> Routing:
    text = _structure(body)
    start = len(text) - len(text.lstrip(b" \t\r\n"))
    end = len(text.rstrip(b" \t\r\n"))
    if body[start:start + 1] != b"{" or body[end - 1:end] != b"}":
        raise errors.InvalidJson("request body must be a JSON object")
    depth = _Depth(text)
    found: dict[bytes, int] = {}
    for count, key in enumerate(_ROUTING_KEY.finditer(text), 1):
        if count > MAX_ROUTING_KEYS:
            raise errors.InvalidJson(
                f"request body has more than {MAX_ROUTING_KEYS} 'model' or 'stream' keys")
        depth.advance(key.start())
        if not depth.in_string and depth.depth == 1:  # a key of the body's own object
            found[key.group(1)] = key.end()  # the last one counts, as in json.loads
    depth.advance(len(text))
    if depth.in_string or depth.depth != 0:
        raise errors.InvalidJson("request body is not valid JSON")
    model: object = None
    if b"model" in found:
        model = _string_at(body, text, found[b"model"])
    stream = b"stream" in found and text.startswith(b"true", found[b"stream"]) \
        and _END_OF_VALUE.match(text, found[b"stream"] + 4) is not None
    return Routing(_model(model), stream)


def _structure(body: bytes) -> bytes:
    """`body`, byte for byte as long, with the escapes inside its strings blanked (so every
    remaining `"` opens or closes a string) and braces made brackets (so depth is one
    count)."""
    text = body
    if b"\\" in text:  # left to right, as JSON reads them: `\\` first, then `\"`
        text = text.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    return text.translate(_BRACES_AS_BRACKETS)


def _string_at(body: bytes, text: bytes, at: int) -> object:
    """The JSON value at `at` if it is a string (decoded from the body itself, escapes and
    all); anything else is returned as a non-string marker."""
    found = _STRING.match(text, at)
    if found is None:
        return _NOT_A_STRING  # _model refuses it
    try:
        return json.loads(body[at:found.end()])
    except ValueError:  # a bad escape, or not UTF-8
        raise errors.InvalidJson("request body is not valid JSON") from None


class _Depth:
    """Nesting depth and whether inside a string, walked forward through `text` (from
    `_structure`), a window at a time: split on quotes, the brackets outside strings are
    counted in C."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.at = 0
        self.depth = 0
        self.in_string = False

    def advance(self, to: int) -> None:
        for start in range(self.at, to, _WINDOW):
            parts = self.text[start:min(start + _WINDOW, to)].split(b'"')
            outside = b"".join(parts[1::2] if self.in_string else parts[0::2])
            self.depth += outside.count(b"[") - outside.count(b"]")
            if len(parts) % 2 == 0:  # an odd number of quotes in this window
                self.in_string = not self.in_string
        self.at = max(self.at, to)
