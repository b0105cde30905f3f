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
import re
from dataclasses import dataclass
from pathlib import Path

from .fsutil import open_regular, write_atomically

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
        line = f"{os.getpid()}{self._sep}{text}\n"
        try:
            # A note is a hint for the CLI: not worth an fsync at every activation step.
            write_atomically(self.path, line.encode("utf-8"), durable=False)
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
    """`state_dir/listening`: "PID URL", then the config file it was started from."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, LISTENING_FILE, " ")

    def listening(self, url: str, config_path: Path | None) -> None:
        self.write(f"{url}\n{config_path.resolve() if config_path else ''}")


@dataclass(frozen=True)
class Listening:
    pid: int
    url: str
    config: str  # the absolute path of its config file; "" when it was started without one


# What local_url writes, and nothing else: no spaces, user info, paths or queries that a
# planted note could use to send the CLI (and its API key) somewhere strange.
_NOTE_URL = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
_NOTE_MAX_BYTES = 4096


def _read(path: Path, sep: str) -> tuple[int, str] | None:
    """(pid, text) when the note is there and its pid a live neuronctl. Read without
    blocking and bounded (a FIFO or a huge file planted there is no note)."""
    try:
        fd = open_regular(path)
    except OSError:  # absent, or not a regular file (a NotRegularFile)
        return None
    try:
        text = os.read(fd, _NOTE_MAX_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    pid_text, _, said = text.strip().partition(sep)
    try:
        pid = int(pid_text)
    except ValueError:
        return None
    if pid <= 0 or not _alive(pid) or not _is_neuronctl(pid):
        return None  # gone, or its pid went to something else
    return pid, said


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # the daemon runs as its own user: alive, not ours to signal
        return True
    except OSError:
        return False
    return True


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
    found = _read(state_dir / STARTING_FILE, ": ")
    if found is None:
        return None
    pid, doing = found
    first = doing.splitlines()[0][:200] if doing else ""
    return pid, "".join(c if c.isprintable() else "?" for c in first)  # no escapes to a tty


def read_listening(state_dir: Path) -> Listening | None:
    """The supervisor whose API answers, if one runs, and where."""
    found = _read(state_dir / LISTENING_FILE, " ")
    if found is None:
        return None
    url, _, config = found[1].partition("\n")
    if not _NOTE_URL.fullmatch(url):
        return None
    return Listening(found[0], url, config.strip())
