"""Reading a GGUF header in a bounded child process: the parent side of gguf.py.

The child runs gguf.py by path under memory, CPU and wall-clock limits, so a header crafted
to cost gigabytes or minutes costs that child, never the supervisor or its load lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence

from ..aio import bounded
from . import gguf
from .gguf import (
    _EXIT_MEMORY,
    _EXIT_REFUSED,
    _OUTPUT_LIMIT,
    CPU_S,
    MEMORY_BYTES,
    TIMEOUT_S,
    BadHeader,
    CannotEstimate,
    Header,
)


def child_command(memory_bytes: int = MEMORY_BYTES, cpu_s: int = CPU_S) -> list[str]:
    """gguf.py run by path: -I -S keep the start to the bare interpreter (no site)."""
    return [sys.executable, "-I", "-S", os.path.abspath(gguf.__file__),
            "--memory", str(memory_bytes), "--cpu", str(cpu_s), "--"]


async def read_bounded(
    paths: Sequence[os.PathLike[str] | str],
    *,
    timeout_s: float = TIMEOUT_S,
    memory_bytes: int = MEMORY_BYTES,
    cpu_s: int = CPU_S,
    command: Sequence[str] | None = None,
) -> Header:
    """`gguf.read_model(paths)` in a child process under `memory_bytes` of address space, `cpu_s`
    of CPU and `timeout_s` on the wall clock (then killed). Raises BadHeader (a header that
    lies, or a reading that broke a bound) or CannotEstimate. Cancelling kills the child.
    `command` replaces the child's (the paths are appended), for tests."""
    argv = [*(command or child_command(memory_bytes, cpu_s)), *(os.fspath(p) for p in paths)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise CannotEstimate(f"cannot start the header reader: {exc}") from exc
    try:
        assert proc.stdout is not None and proc.stderr is not None
        reading = asyncio.gather(_head(proc.stdout, _OUTPUT_LIMIT),
                                 _tail(proc.stderr, 4096), proc.wait())
        try:
            out, err, code = await bounded(reading, timeout_s)
        except asyncio.TimeoutError:
            raise BadHeader(f"reading the header took over {timeout_s:g} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()  # reaped, never left behind
    if code == -signal.SIGXCPU:
        raise BadHeader(f"reading the header used over {cpu_s} s of CPU")
    if code == -signal.SIGKILL:  # past the hard CPU limit, or the kernel's OOM killer
        raise BadHeader(f"the header reader was killed (over {cpu_s} s of CPU, or out of "
                        "memory)")
    if code == _EXIT_MEMORY:
        raise BadHeader(f"reading the header needed over {memory_bytes >> 20} MiB of memory")
    try:
        answer = json.loads(out)
        if code == 0:
            return Header.from_json(answer["header"])
        refused, unknown = answer.get("refused"), answer.get("unknown")
    except (ValueError, KeyError, TypeError, AttributeError):
        refused = unknown = None  # not the child's answer: said below
    if code == _EXIT_REFUSED and isinstance(refused, str):
        raise BadHeader(refused)
    if code == _EXIT_REFUSED and isinstance(unknown, str):
        raise CannotEstimate(unknown)
    lines = err.decode("utf-8", "replace").strip().splitlines()
    said = f": {lines[-1][:200]}" if lines else ""
    raise CannotEstimate(f"the header reader exited with code {code}{said}")


async def _head(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Read to the end, keeping the first `limit` bytes."""
    kept = bytearray()
    while chunk := await stream.read(1 << 16):
        kept += chunk[:max(0, limit - len(kept))]
    return bytes(kept)


async def _tail(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Read to the end, keeping the last `limit` bytes."""
    kept = b""
    while chunk := await stream.read(1 << 16):
        kept = (kept + chunk)[-limit:]
    return kept
