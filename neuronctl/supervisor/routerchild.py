"""llama.cpp's router-child protocol, spoken by the llama-server builds that have a router.

llama-server's router mode runs each model as a child llama-server with
`LLAMA_SERVER_ROUTER_PORT` in its environment. Such a child (tools/server/server-models.cpp):
* says on its stdout when it is ready (`cmd_child_to_router:state:{"state": "ready", ...}`),
  at the moment its /health turns 200, and writes its own output to stderr instead;
* once loaded, reads its stdin: a line `cmd_router_to_child:exit` stops it as SIGTERM does,
  and end-of-file (its parent died) makes it exit at once.

A worker that speaks it needs neither a parent-death signal (set by a `preexec_fn`, which
makes Python fork the whole supervisor instead of vfork: ~3 ms of every spawn) nor
readiness polls: the node then starts and notices a worker the way the router itself does.
A binary speaks it when both its messages are in it; a wrapper script does not, and keeps
the parent-death signal and the polls.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
from pathlib import Path
from typing import BinaryIO

ENV = "LLAMA_SERVER_ROUTER_PORT"
STATE_PREFIX = b"cmd_child_to_router:state:"
EXIT_COMMAND = b"cmd_router_to_child:exit\n"
# A child's lines are short (its state and the model's name and sizes); anything longer is
# not one of them.
MAX_LINE = 64 * 1024

_MARKERS = (STATE_PREFIX, EXIT_COMMAND.rstrip())
_MAX_REMEMBERED = 16
# (device, inode, size, mtime) of a binary: whether it speaks the protocol. Read once per
# file, as the GGUF header verdicts are: a new build is a new identity.
_verdicts: dict[tuple[int, int, int, int], bool] = {}


def speaks(binary: Path) -> bool:
    """Whether `binary` is a llama-server that speaks the router-child protocol; False for
    anything that cannot be read. Scans the file once per identity (~15 ms for a 16 MB
    static build, page cache warm)."""
    try:
        with open(binary, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            known = _verdicts.get(key)
            if known is not None:
                return known
            verdict = _contains_markers(f) if st.st_size > 0 else False
    except OSError:
        return False
    if len(_verdicts) >= _MAX_REMEMBERED:
        _verdicts.pop(next(iter(_verdicts)))
    _verdicts[key] = verdict
    return verdict


def _contains_markers(f: BinaryIO) -> bool:
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return all(m.find(marker) >= 0 for marker in _MARKERS)


def state_of(line: bytes) -> str | None:
    """The state a child's stdout line reports (`loading`, `ready`, ...), or None for a line
    that is not one."""
    if not line.startswith(STATE_PREFIX):
        return None
    try:
        data = json.loads(line[len(STATE_PREFIX):])
    except (ValueError, RecursionError):  # RecursionError: nested past Python's limit
        return None
    state = data.get("state") if isinstance(data, dict) else None
    return state if isinstance(state, str) else None


class Channel:
    """The supervisor's ends of a router child's stdin and stdout, plain pipes rather than
    asyncio's: the child's exit is then the process's alone (on Python 3.11 an asyncio
    `Process.wait()` also waits for its pipes to close, which a stuck reader or a
    grandchild holding them would delay without end).

    `ready` is set when the child says so; `send_exit()` writes its exit command; `close()`,
    once it is gone, closes our ends. While it lives we hold its stdin open: our death is
    the end of its stdin."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        stdin_r, self._stdin = os.pipe()
        self._stdout, stdout_w = os.pipe()
        # What the child gets as its stdin and stdout, closed here once it has them.
        self.child_ends: tuple[int, int] | None = (stdin_r, stdout_w)
        os.set_blocking(self._stdin, False)
        os.set_blocking(self._stdout, False)
        self._buffer = bytearray()
        self._reading = False

    def spawned(self) -> None:
        """The child holds its ends: ours of them closed, its stdout read as it comes (all
        of it, so it never blocks on a full pipe)."""
        self._close_child_ends()
        asyncio.get_running_loop().add_reader(self._stdout, self._readable)
        self._reading = True

    def send_exit(self) -> bool:
        """Its exit command, written (the pipe is empty but for it: never blocks); False
        when it could not be (the child is gone, or we closed)."""
        if self._stdin < 0:
            return False
        try:
            return os.write(self._stdin, EXIT_COMMAND) == len(EXIT_COMMAND)
        except OSError:
            return False

    def close(self) -> None:
        self._close_child_ends()
        self._stop_reading()
        if self._stdin >= 0:
            os.close(self._stdin)
            self._stdin = -1

    def _readable(self) -> None:
        try:
            data = os.read(self._stdout, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading()
            return
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end + 1])
            del self._buffer[:end + 1]
            if state_of(line) == "ready":
                self.ready.set()
        if len(self._buffer) > MAX_LINE:  # a line this long is none of its states
            self._buffer.clear()

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._stdout)
            self._reading = False
        if self._stdout >= 0:
            os.close(self._stdout)
            self._stdout = -1

    def _close_child_ends(self) -> None:
        if self.child_ends is not None:
            for fd in self.child_ends:
                os.close(fd)
            self.child_ends = None
