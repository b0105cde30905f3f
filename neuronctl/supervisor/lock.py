"""Who holds the node: `neuron.lock` keeps two supervisors off one `state_dir`.

An flock (filelock's `UnixFileLock`) on `state_dir/neuron.lock`, taken without waiting:
the kernel drops it when its holder dies, however it dies, so a crash never leaves a stale
lock behind. `neuron.pid` beside it names the holder, for the refusal of the next one.
Neither is fatal to the holder: a lock that cannot be taken at all (a read-only state_dir
without a lock file, a file system without locks) is a warning, and the models are served.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

from filelock import Timeout, UnixFileLock

from ..fsutil import read_regular, write_atomically

log = logging.getLogger(__name__)

LOCK_FILE = "neuron.lock"
PID_FILE = "neuron.pid"


class AlreadyRunning(Exception):
    def __init__(self, state_dir: Path, pid: str) -> None:
        super().__init__(
            f"another neuronctl start (pid {pid or '?'}) is running on state_dir {state_dir}; "
            "stop it first (systemctl stop neuron)"
        )


class SupervisorLock:
    """Held for the supervisor's whole life; a second one on the same state_dir fails at
    once with AlreadyRunning, naming the holder's pid when `neuron.pid` says it.

    filelock opens the lock file with O_NOFOLLOW (since 3.20.1: a planted symlink is
    refused, never truncated through). What it cannot do is lock a file it may only read:
    an existing lock file in a read-only state_dir is locked here, read-only (flock needs
    no write access), so a second supervisor is still kept off."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._lock: UnixFileLock | None = None
        self._read_only_fd: int | None = None
        self._wrote_pid = False

    def acquire(self) -> None:
        path = self.state_dir / LOCK_FILE
        lock = UnixFileLock(path, timeout=0, mode=0o644)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            raise AlreadyRunning(self.state_dir, self._holder()) from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS) and self._lock_read_only(path):
                self._write_pid()
                return
            log.warning("cannot open the supervisor lock %s: %s; a second neuronctl start "
                        "on this state_dir will not be refused", path, _reason(exc))
            return
        self._lock = lock
        self._write_pid()

    def _lock_read_only(self, path: Path) -> bool:
        """True once an existing lock file is locked through a read-only descriptor;
        AlreadyRunning when another holds it; False when there is none to lock."""
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self.state_dir, self._holder()) from None
        except OSError:
            os.close(fd)
            return False
        self._read_only_fd = fd
        return True

    def _write_pid(self) -> None:
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
            pid = read_regular(self.state_dir / PID_FILE, 32).decode().strip()
        except (OSError, ValueError):  # absent, planted (a FIFO), or not digits
            return ""
        return pid if pid.isdigit() else ""

    def release(self) -> None:
        if self._wrote_pid:
            with contextlib.suppress(OSError):
                (self.state_dir / PID_FILE).unlink()
            self._wrote_pid = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._read_only_fd is not None:
            os.close(self._read_only_fd)  # closing the descriptor releases the flock
            self._read_only_fd = None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
