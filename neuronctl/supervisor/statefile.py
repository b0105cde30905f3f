"""What survives a supervisor crash: which workers it started, and who holds the node.

`workers.json` in `state_dir` lists every live worker with its pid, process group, start
time, command line and token (a random `NEURON_WORKER_TOKEN` in its environment, which
anything it starts inherits), rewritten atomically at each spawn and exit. A supervisor
that starts over it stops whatever a crashed predecessor left behind: every process of a
recorded group that carries the recorded token, so a recycled pid is never touched and a
wrapper script's child is found after the wrapper died. `neuron.lock` (an flock, released
by the kernel when its holder dies, however it dies) keeps two supervisors off one state
directory.

Nothing here is fatal: `state_dir` may be full, read-only or tampered with, and the node
must still serve. A file that is not what this supervisor writes is set aside (renamed,
not deleted) with one warning; a write that fails is one warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import stat
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .worker import TOKEN_ENV

if TYPE_CHECKING:
    import psutil

# psutil is imported where first used, after the first worker has been spawned: start-up
# time is activation time (bench/activation.py).

log = logging.getLogger(__name__)

STATE_FILE = "workers.json"
LOCK_FILE = "neuron.lock"
PID_FILE = "neuron.pid"
# A real file is a few hundred bytes a worker; anything this big was not written by us.
MAX_STATE_BYTES = 1 << 20
_PID_MAX = 1 << 22  # PID_MAX_LIMIT of 64-bit Linux: no pid or pgid is above it
# psutil's create_time is derived from boot time and clock ticks; allow for rounding.
_START_TIME_TOLERANCE_S = 0.05
_LISTED_PROBLEMS = 3  # a warning names this many invalid entries, then counts the rest


@dataclass(frozen=True)
class WorkerEntry:
    model_id: str
    pid: int
    create_time: float
    cmdline: list[str]
    # The worker's process group (its pid: it leads its own session) and its token. An
    # entry from a file older than both has neither and is checked by start time and
    # command line instead.
    pgid: int = 0
    token: str = ""


class BadStateFile(ValueError):
    """What is wrong with a state file or one of its entries, in words for the journal."""


class AlreadyRunning(Exception):
    def __init__(self, state_dir: Path, pid: str) -> None:
        super().__init__(
            f"another neuronctl start (pid {pid or '?'}) is running on state_dir {state_dir}; "
            "stop it first (systemctl stop neuron)"
        )


class SupervisorLock:
    """Held for the supervisor's whole life; a second one on the same state_dir fails.

    A plain flock on an open descriptor: the kernel drops it when the process dies, however
    it dies, so a crash never leaves a stale lock behind. A lock file that cannot be opened
    at all (a read-only state_dir without one) is a warning: the models can still be
    served, only a second supervisor is no longer kept off."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._fd: int | None = None
        self._wrote_pid = False

    def acquire(self) -> None:
        path = self.state_dir / LOCK_FILE
        try:
            fd = _open_lock_file(path)
        except OSError as exc:
            log.warning("cannot open the supervisor lock %s: %s; a second neuronctl start "
                        "on this state_dir will not be refused", path, _reason(exc))
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self.state_dir, self._holder()) from None
        except OSError as exc:  # ENOLCK: a file system without locks
            os.close(fd)
            log.warning("cannot lock %s: %s; a second neuronctl start on this state_dir "
                        "will not be refused", path, _reason(exc))
            return
        self._fd = fd
        pid_path = self.state_dir / PID_FILE
        try:
            write_atomically(pid_path, f"{os.getpid()}\n".encode(), durable=False)
        except OSError as exc:
            log.warning("cannot write %s: %s (a second neuronctl start is still refused, "
                        "without naming this pid)", pid_path, _reason(exc))
        else:
            self._wrote_pid = True

    def _holder(self) -> str:
        try:
            pid = read_regular_file(self.state_dir / PID_FILE, 32).decode().strip()
        except (OSError, BadStateFile, ValueError):
            return ""
        return pid if pid.isdigit() else ""

    def release(self) -> None:
        if self._wrote_pid:
            with contextlib.suppress(OSError):
                (self.state_dir / PID_FILE).unlink()
            self._wrote_pid = False
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _open_lock_file(path: Path) -> int:
    # O_NOFOLLOW: a root supervisor must not create or open files through a planted
    # symlink; O_NONBLOCK: opening a FIFO planted here must not wait for a writer.
    flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS):
            raise
        # An existing lock file in a read-only state_dir: flock needs no write access.
        try:
            return os.open(path, os.O_RDONLY | flags)
        except OSError:
            raise exc from None


class StateFile:
    """`workers.json`. The daemon uses `add` and `remove`, which write in a thread (an
    fsync must not stall the event loop) one at a time, and never raise for a disk
    problem: a worker with no record still serves, it is only not cleaned up after a crash
    of the supervisor, and the journal says so (once, until a write succeeds again)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self._entries: dict[int, WorkerEntry] = {}
        self._writing: asyncio.Lock | None = None  # made on first use, inside the loop
        self._failing = False  # the last write failed, and the journal said so

    async def add(self, model_id: str, pid: int, token: str = "") -> None:
        await self._in_thread(self.record, model_id, pid, token)

    async def remove(self, pid: int) -> None:
        if pid in self._entries:
            await self._in_thread(self.forget, pid)

    async def _in_thread(self, fn: Any, *args: Any) -> None:
        if self._writing is None:
            self._writing = asyncio.Lock()
        async with self._writing:  # writes in the order they were asked for
            try:
                await asyncio.to_thread(fn, *args)
            except OSError as exc:
                if not self._failing:
                    log.warning("cannot update %s: %s (a worker left running by a crash of "
                                "this supervisor will not be found)", self.path, _reason(exc))
                self._failing = True
            else:
                if self._failing:
                    log.info("%s is up to date again", self.path)
                self._failing = False

    def read(self) -> list[WorkerEntry]:
        """The entries that pass validation. Never raises and never blocks: a file that is
        not what this supervisor writes is set aside (renamed `workers.json.bad-TIME`) with
        one warning saying what was wrong, and its valid entries are still returned."""
        # No lock needed: writers replace the file atomically, so it is old or new, whole.
        try:
            data = read_regular_file(self.path, MAX_STATE_BYTES)
        except FileNotFoundError:
            return []
        except BadStateFile as exc:
            self._set_aside(str(exc))
            return []
        except OSError as exc:
            self._set_aside(f"cannot be read: {_reason(exc)}")
            return []
        try:
            entries, problems = parse_state(data)
        except BadStateFile as exc:
            self._set_aside(str(exc))
            return []
        if problems:
            listed = "; ".join(problems[:_LISTED_PROBLEMS])
            more = len(problems) - _LISTED_PROBLEMS
            self._set_aside(f"{len(problems)} of {len(problems) + len(entries)} entries "
                            f"skipped ({listed}{f'; {more} more' if more > 0 else ''})")
        return entries

    def _set_aside(self, problem: str) -> None:
        """Rename the file out of the way, for whoever investigates, so that the next
        start does not meet it again."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        for n in range(1, 100):
            if not os.path.lexists(aside):
                break
            aside = self.path.with_name(f"{self.path.name}.bad-{stamp}-{n}")
        try:
            os.rename(self.path, aside)
        except OSError as exc:
            log.warning("%s: %s; cannot set it aside: %s", self.path, problem, _reason(exc))
            return
        log.warning("%s: %s; set aside as %s", self.path, problem, aside.name)

    def record(self, model_id: str, pid: int, token: str = "") -> None:
        import psutil

        try:
            proc = psutil.Process(pid)
            entry = WorkerEntry(model_id, pid, proc.create_time(), proc.cmdline(),
                                os.getpgid(pid), token)
        except (psutil.Error, ProcessLookupError):
            return  # already gone: nothing to clean up later
        self._entries[pid] = entry
        self._write()

    def forget(self, pid: int) -> None:
        if self._entries.pop(pid, None) is not None:
            self._write()

    def reset(self) -> None:
        self._entries.clear()
        if os.path.lexists(self.path):
            self._write()

    def _write(self) -> None:
        data = {"supervisor_pid": os.getpid(),
                "workers": [asdict(e) for e in self._entries.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)  # removed while we ran, say
        write_atomically(self.path, json.dumps(data, indent=1).encode())


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data`: readers see the old file or the new, never half. The
    temporary file is created afresh (O_EXCL, O_NOFOLLOW), so nothing planted under its
    name (a symlink, a FIFO) is ever written through."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crash, or whatever was put there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of `path`, which must be a regular file of this user's of at most `limit`
    bytes; anything else raises BadStateFile. Never blocks: a FIFO is refused before it
    is opened, and it is opened non-blocking in case one was swapped in meanwhile."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise BadStateFile(f"is {_file_kind(st.st_mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadStateFile(f"is {_file_kind(st.st_mode)}, not a regular file")
        if st.st_uid != os.geteuid():
            # Only what this supervisor's user wrote can tell it which processes to kill.
            raise BadStateFile(f"is owned by uid {st.st_uid}, not by this supervisor's "
                               f"uid {os.geteuid()}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise BadStateFile(f"is larger than {limit} bytes")
    return b"".join(chunks)


def parse_state(data: bytes) -> tuple[list[WorkerEntry], list[str]]:
    """The valid entries of a state file's contents, and what was wrong with each of the
    others; BadStateFile when the file as a whole is not a state file."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BadStateFile("is nested too deeply to be a state file") from None
    except ValueError as exc:  # also a UnicodeDecodeError
        raise BadStateFile(f"is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadStateFile(f"holds {_kind(doc)}, not an object")
    workers = doc.get("workers")
    if not isinstance(workers, list):
        raise BadStateFile(f'"workers" is {_kind(workers)}, not a list')
    entries: dict[int, WorkerEntry] = {}
    problems: list[str] = []
    for i, raw in enumerate(workers):
        try:
            entry = _entry(raw)
        except BadStateFile as exc:
            problems.append(f"entry {i}: {exc}")
        else:
            if entry.pid == os.getpid() or entry.pgid == os.getpgrp():
                # Left from before a reboot, with our pid now: stale, not forged, and
                # never a process to stop.
                log.debug("skipping entry %d of workers.json: it names this supervisor", i)
                continue
            entries.setdefault(entry.pid, entry)
    return list(entries.values()), problems


def _entry(raw: object) -> WorkerEntry:
    if not isinstance(raw, dict):
        raise BadStateFile(f"{_kind(raw)}, not an object")
    model_id = raw.get("model_id", "")
    if not isinstance(model_id, str):
        raise BadStateFile(f"model_id {_show(model_id)} is not a string")
    pid = _process_id(raw.get("pid"), "pid")
    create_time = raw.get("create_time")
    if (isinstance(create_time, bool) or not isinstance(create_time, (int, float))
            or not math.isfinite(create_time) or create_time < 0):
        raise BadStateFile(f"create_time {_show(create_time)} is not a time")
    cmdline = raw.get("cmdline")
    if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
        raise BadStateFile(f"cmdline {_show(cmdline)} is not a list of strings")
    pgid = 0
    if "pgid" in raw:
        pgid = _process_id(raw["pgid"], "pgid")
    token = raw.get("token", "")
    if not isinstance(token, str) or len(token) > 128 or not set(token) <= _HEX:
        raise BadStateFile(f"token {_show(token)} is not a hex string")
    if token and not pgid:
        raise BadStateFile("a token without a pgid")
    return WorkerEntry(model_id, pid, float(create_time), cmdline, pgid, token)


_HEX = set(string.hexdigits)


def _process_id(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 < value <= _PID_MAX:
        raise BadStateFile(f"{name} {_show(value)} is not a process id")
    return value


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else f"{shown[:37]}..."


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _oneline(text: str, limit: int = 200) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def is_same_process(entry: WorkerEntry) -> psutil.Process | None:
    """The live process `entry` describes, or None if its pid now belongs to another.
    Only for entries without a token (files from before tokens): start time and command
    line, both of which another user's process could imitate."""
    import psutil

    try:
        proc = psutil.Process(entry.pid)
        same = (
            abs(proc.create_time() - entry.create_time) <= _START_TIME_TOLERANCE_S
            and proc.cmdline() == entry.cmdline
        )
    except psutil.Error:
        return None
    return proc if same else None


def find_orphans(entries: list[WorkerEntry]) -> list[tuple[WorkerEntry, psutil.Process]]:
    """The live processes `entries` describe: for an entry with a token, every process in
    its group whose environment carries that token (the group's leader, a wrapper script,
    may be dead while the server it started lives on); for an old entry, its pid if start
    time and command line still match."""
    import psutil

    tokens: dict[int, dict[str, WorkerEntry]] = {}
    for entry in entries:
        if entry.token:
            tokens.setdefault(entry.pgid, {})[entry.token] = entry
    found: dict[int, tuple[WorkerEntry, psutil.Process]] = {}
    if tokens:
        me = os.getpid()
        for proc in psutil.process_iter():
            try:
                by_token = tokens.get(os.getpgid(proc.pid))
                if by_token is None or proc.pid == me:
                    continue
                entry_for = by_token.get(proc.environ().get(TOKEN_ENV, ""))
            except (psutil.Error, OSError):
                continue  # gone, a zombie, or not ours to read
            if entry_for is not None:
                found[proc.pid] = (entry_for, proc)
    for entry in entries:
        if not entry.token:
            old = is_same_process(entry)
            if old is not None:
                found.setdefault(old.pid, (entry, old))
    return list(found.values())


def stop_orphans(entries: list[WorkerEntry], timeout_s: float) -> list[int]:
    """Stop the processes that `entries` prove are ours (SIGTERM, `timeout_s`, SIGKILL);
    their pids."""
    if not entries:
        return []
    import psutil

    orphans = find_orphans(entries)
    for entry, proc in orphans:
        group = f", group {entry.pgid}" if entry.pgid and entry.pgid != proc.pid else ""
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            cmdline = " ".join(entry.cmdline)
        log.warning("stopping orphaned worker pid %d left by a previous supervisor "
                    "(model %s%s): %s", proc.pid, _oneline(entry.model_id, 100) or "?",
                    group, _oneline(cmdline))
        _signal(entry, proc, signal.SIGTERM)
    procs = [proc for _, proc in orphans]
    alive = _wait_gone(procs, timeout_s)
    for entry, proc in orphans:
        if proc in alive:
            log.warning("orphaned worker pid %d ignored SIGTERM for %g s; sending SIGKILL",
                        proc.pid, timeout_s)
            _signal(entry, proc, signal.SIGKILL)
    _wait_gone(alive, timeout_s)
    return [p.pid for p in procs]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `procs` still running after up to `timeout_s`. A zombie counts as gone:
    an orphan is not our child, and whoever reaps it (init, or a container's pid 1 that
    reaps slowly or never) is not ours to wait for."""
    deadline = time.monotonic() + timeout_s
    alive = procs
    while True:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _running(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(entry: WorkerEntry, proc: psutil.Process, sig: signal.Signals) -> None:
    import psutil

    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        if entry.token:
            # Each process proved itself by its token: signal exactly those (psutil checks
            # that the pid was not reused in between), never the rest of the group.
            proc.send_signal(sig)
        elif os.getpgid(proc.pid) == proc.pid:
            # An old entry's worker leads its own group: signal all of it, as a live
            # supervisor would.
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
