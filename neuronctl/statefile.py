"""What survives a supervisor crash: which workers it started, and who holds the node.

`workers.json` in `state_dir` lists every live worker with its pid, start time and command
line, rewritten atomically under a file lock at each spawn and exit. A supervisor that
starts over it stops whatever a crashed predecessor left behind, after checking all three
so a recycled pid is never touched. `neuron.lock` (an flock, released by the kernel when
its holder dies, however it dies) keeps two supervisors off one state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil
    from filelock import FileLock

# psutil and filelock are imported where first used, after the first worker has been
# spawned: start-up time is activation time (bench/activation.py).

log = logging.getLogger(__name__)

STATE_FILE = "workers.json"
LOCK_FILE = "neuron.lock"
PID_FILE = "neuron.pid"
# psutil's create_time is derived from boot time and clock ticks; allow for rounding.
_START_TIME_TOLERANCE_S = 0.05


@dataclass(frozen=True)
class WorkerEntry:
    model_id: str
    pid: int
    create_time: float
    cmdline: list[str]


class AlreadyRunning(Exception):
    def __init__(self, state_dir: Path, pid: str) -> None:
        super().__init__(
            f"another neuronctl start (pid {pid or '?'}) is running on state_dir {state_dir}; "
            "stop it first (systemctl stop neuron)"
        )


class SupervisorLock:
    """Held for the supervisor's whole life; a second one on the same state_dir fails.

    A plain flock on an open descriptor: the kernel drops it when the process dies, however
    it dies, so a crash never leaves a stale lock behind."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (self.state_dir / PID_FILE).read_text().strip()
            except OSError:
                holder = ""
            raise AlreadyRunning(self.state_dir, holder) from None
        self._fd = fd
        (self.state_dir / PID_FILE).write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            (self.state_dir / PID_FILE).unlink()
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class StateFile:
    """`workers.json`. The daemon uses `add` and `remove`, which write in a thread (an
    fsync and a file lock must not stall the event loop) one at a time, and never raise
    for a disk problem: a worker with no record still serves, it is only not cleaned up
    after a crash of the supervisor, and the journal says so."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self._lock_path = state_dir / f"{STATE_FILE}.lock"
        self._lock_obj: FileLock | None = None
        self._entries: dict[int, WorkerEntry] = {}
        self._writing: asyncio.Lock | None = None  # made on first use, inside the loop

    async def add(self, model_id: str, pid: int) -> None:
        await self._in_thread(self.record, model_id, pid)

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
                log.warning("cannot update %s: %s (a worker left running by a crash of "
                            "this supervisor will not be found)", self.path, exc)

    @property
    def _lock(self) -> FileLock:
        if self._lock_obj is None:
            from filelock import FileLock

            self._lock_obj = FileLock(self._lock_path)
        return self._lock_obj

    def read(self) -> list[WorkerEntry]:
        # No lock needed: writers replace the file atomically, so it is old or new, whole.
        try:
            data = json.loads(self.path.read_text())
            return [WorkerEntry(**e) for e in data.get("workers", [])]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return []

    def record(self, model_id: str, pid: int) -> None:
        import psutil

        try:
            proc = psutil.Process(pid)
            entry = WorkerEntry(model_id, pid, proc.create_time(), proc.cmdline())
        except psutil.Error:
            return  # already gone: nothing to clean up later
        self._entries[pid] = entry
        self._write()

    def forget(self, pid: int) -> None:
        if self._entries.pop(pid, None) is not None:
            self._write()

    def reset(self) -> None:
        self._entries.clear()
        if self.path.exists():
            self._write()

    def _write(self) -> None:
        data = {"supervisor_pid": os.getpid(),
                "workers": [asdict(e) for e in self._entries.values()]}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with self._lock:
            with tmp.open("w") as fh:
                json.dump(data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)  # readers see the old file or the new, never half


def is_same_process(entry: WorkerEntry) -> psutil.Process | None:
    """The live process `entry` describes, or None if its pid now belongs to another."""
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


def stop_orphans(entries: list[WorkerEntry], timeout_s: float) -> list[int]:
    """Stop the recorded workers that are still the processes we started; their pids."""
    if not entries:
        return []
    import psutil

    orphans = [p for p in (is_same_process(e) for e in entries) if p is not None]
    for proc in orphans:
        log.warning("stopping orphaned worker pid %d left by a previous supervisor: %s",
                    proc.pid, " ".join(proc.cmdline())[:200])
        _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(orphans, timeout=timeout_s)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=timeout_s)
    return [p.pid for p in orphans]


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    import psutil

    # A worker leads its own process group: signal all of it, as a live supervisor would.
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
