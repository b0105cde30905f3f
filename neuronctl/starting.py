"""Notes a supervisor leaves in `state_dir` for its CLI.

`starting`: "PID: loading 2/3 MODEL" at each step of activation, removed once it listens;
`neuronctl status` reads it to say "starting (pid N): ..." rather than "not running".
`listening`: "PID URL" while its API answers, so a CLI whose config names another port (an
operator changed it; only a restart applies it) still finds the daemon that runs.
Its own module, importing nothing heavy: the CLI reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)
STARTING_FILE = "starting"
LISTENING_FILE = "listening"


def local_url(host: str, port: int) -> str:
    """Where a client on this host reaches a daemon listening on `host`: a wildcard
    listener on loopback, a specific address only on itself."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Note:
    """One line "PID<sep>TEXT" in `state_dir/NAME`, written atomically; a failure to write
    only loses the note."""

    def __init__(self, state_dir: Path, name: str, sep: str) -> None:
        self.path = state_dir / name
        self._sep = sep

    def write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # never written through: created fresh, like workers.json
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}{self._sep}{text}\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.path, exc)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class StartingNote(Note):
    """`state_dir/starting`: "PID: what activation is doing"."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, STARTING_FILE, ": ")


class ListeningNote(Note):
    """`state_dir/listening`: "PID URL", the address its clients reach it at."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, LISTENING_FILE, " ")


def _read(path: Path, sep: str) -> tuple[int, str] | None:
    """(pid, text) when the note is there and its pid alive. Read without blocking (a FIFO
    planted there is no note)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        text = path.read_text(encoding="utf-8", errors="replace")[:500]
        pid_text, _, said = text.strip().partition(sep)
        pid = int(pid_text)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    if not _is_neuronctl(pid):  # the daemon died and its pid went to something else
        return None
    return pid, said


def _is_neuronctl(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"neuronctl" in fh.read(4096)
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here, or not ours to read: the live pid is all we know
        return True


def read_starting(state_dir: Path) -> tuple[int, str] | None:
    """(pid, what it is doing) of a supervisor that is starting, if one is."""
    return _read(state_dir / STARTING_FILE, ": ")


def read_listening(state_dir: Path) -> tuple[int, str] | None:
    """(pid, URL) of the supervisor whose API answers, if one runs."""
    found = _read(state_dir / LISTENING_FILE, " ")
    if found is None or not found[1].startswith(("http://", "https://")):
        return None
    return found
