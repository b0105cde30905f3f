"""llama-server's slot API, the few calls a prompt cache needs: which slots a worker has
(`GET /slots`) and saving or restoring one (`POST /slots/{id}?action=save|restore`).

Plain asyncio streams and HTTP/1.0, like the readiness probe (worker.py): the supervisor
layer has no HTTP client, and a prompt cache must not pull aiohttp into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

# An answer larger than this is no answer of the slot API (GET /slots of 256 slots with
# their sampling parameters is well under it).
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class SlotApiError(Exception):
    """The worker refused the call, answered nonsense, or did not answer in time."""


async def _call(port: int, method: str, path: str, body: Any = None) -> Any:
    data = b"" if body is None else json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
        writer.write(head.encode("ascii") + data)
        answer = b""  # HTTP/1.0: the answer ends where the worker closes the connection
        while len(answer) <= MAX_ANSWER_BYTES and (chunk := await reader.read(65536)):
            answer += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if len(answer) > MAX_ANSWER_BYTES:
        raise SlotApiError(f"{method} {path}: answer over {MAX_ANSWER_BYTES} bytes")
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    parts = status_line.split()
    try:
        decoded = json.loads(payload) if payload else None
    except ValueError:
        decoded = None
    if len(parts) < 2 or parts[1] != b"200":
        said = (decoded.get("error", {}).get("message") if isinstance(decoded, dict)
                and isinstance(decoded.get("error"), dict) else None)
        status = parts[1].decode("ascii", "replace") if len(parts) >= 2 else "no status"
        raise SlotApiError(f"{method} {path}: {status}" + (f" ({str(said)[:200]})" if said
                                                           else ""))
    if decoded is None:
        raise SlotApiError(f"{method} {path}: the answer is not JSON")
    return decoded


async def call(port: int, method: str, path: str, body: Any, timeout_s: float) -> Any:
    """One call, bounded; SlotApiError for anything but a 200 with JSON."""
    try:
        return await asyncio.wait_for(_call(port, method, path, body), timeout_s)
    except asyncio.TimeoutError:
        raise SlotApiError(f"{method} {path}: no answer in {timeout_s:g} s") from None
    except OSError as exc:
        raise SlotApiError(f"{method} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Slot:
    id: int
    # The tokens its cache holds as far as GET /slots says (an idle slot's n_prompt_tokens:
    # its last task's prompt and what it generated; 0 for a slot that ran none); None
    # where the answer does not say (busy, or another llama-server version's fields):
    # then only a save tells.
    tokens: int | None
    # False: the slot said nothing but its id (it ran no task), so `tokens` is 0, though a
    # slot restored from a file and not used since holds that file's tokens.
    reported: bool = True


# All a slot that never ran a task reports (llama-server b7000+); a version whose slots say
# more about themselves is never taken for empty.
_IDLE_FIELDS = frozenset({"id", "n_ctx", "speculative", "is_processing"})


async def slots(port: int, timeout_s: float) -> list[Slot]:
    """The worker's slots (however many `--parallel` made) and what each holds."""
    return parse_slots(await call(port, "GET", "/slots", None, timeout_s))


def parse_slots(answer: Any) -> list[Slot]:
    """GET /slots's answer read; SlotApiError when it is not a list."""
    if not isinstance(answer, list):
        raise SlotApiError("GET /slots: not a list")
    return [Slot(s["id"], _tokens(s), not set(s) <= _IDLE_FIELDS) for s in answer
            if isinstance(s, dict) and _count(s.get("id")) is not None]


def _tokens(slot: dict[str, Any]) -> int | None:
    if set(slot) <= _IDLE_FIELDS:
        return 0
    if slot.get("is_processing"):
        return None  # a save waits for its request to end: what it holds then is unknown
    # An idle slot's n_prompt_tokens counts what its last task generated too: it equals
    # what a save of it reports.
    return _count(slot.get("n_prompt_tokens"))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


async def save(port: int, slot: int, filename: str, timeout_s: float) -> tuple[int, int]:
    """Save slot `slot` as `filename` (in the worker's --slot-save-path): (tokens, bytes)."""
    answer = await call(port, "POST", f"/slots/{slot}?action=save", {"filename": filename},
                        timeout_s)
    return _counts(answer, "n_saved", "n_written")


async def restore(port: int, slot: int, filename: str, timeout_s: float) -> tuple[int, int]:
    """Restore slot `slot` from `filename`: (tokens, bytes)."""
    answer = await call(port, "POST", f"/slots/{slot}?action=restore",
                        {"filename": filename}, timeout_s)
    return _counts(answer, "n_restored", "n_read")


def _counts(answer: Any, tokens: str, size: str) -> tuple[int, int]:
    if not isinstance(answer, dict):
        raise SlotApiError(f"not an object: {str(answer)[:200]}")
    n, b = answer.get(tokens), answer.get(size)
    if not isinstance(n, int) or not isinstance(b, int):
        raise SlotApiError(f"no {tokens}/{size} in {str(answer)[:200]}")
    return n, b
