"""`state_dir/starting`: what a supervisor is doing while its API does not answer yet.

The daemon writes "PID: loading 2/3 MODEL" at each step of activation and removes it once
it listens; `neuronctl status` reads it to say "starting (pid N): ..." rather than "not
running". Its own module, importing nothing heavy: the CLI reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)
STARTING_FILE = "starting"


class StartingNote:
    """`state_dir/starting`: "PID: what activation is doing", while the API does not answer
    yet, so `neuronctl status` can say "starting (pid N): loading 2/3 MODEL" rather than
    "not running". Written atomically; a failure to write only loses the note."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STARTING_FILE

    def write(self, doing: str) -> None:
        tmp = self.path.with_name(f".{STARTING_FILE}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # never written through: created fresh, like workers.json
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}: {doing}\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.path, exc)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def read_starting(state_dir: Path) -> tuple[int, str] | None:
    """(pid, what it is doing) of a supervisor that is starting, if one is: its note is
    there and its pid alive. Read without blocking (a FIFO planted there is no note)."""
    path = state_dir / STARTING_FILE
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        text = path.read_text(encoding="utf-8", errors="replace")[:500]
        pid_text, _, doing = text.strip().partition(": ")
        pid = int(pid_text)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid, doing
