"""A worker's process, started with `subprocess.Popen` and watched through a pidfd.

asyncio's own subprocesses cost a worker's start more than the worker needs: on the
default loop each one gets a thread that blocks in waitpid() (ThreadedChildWatcher, the
only watcher left in Python 3.12+), and on uvloop libuv forks the whole supervisor where
`Popen` vforks (a copy of a 100 MB process: about 10 ms more to a first answer, measured
with bench/peers.py). A pidfd (Linux 5.3+) turns readable when the process exits, so the
event loop itself notices the exit, whichever loop it is: no thread, no signal handler.
Where there is no pidfd, `spawn` answers None and the caller uses asyncio's.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol


class ChildProcess(Protocol):
    """What a worker needs of its process: asyncio's Process has it too."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class PidfdProcess:
    """A started process whose exit the running loop learns from its pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int) -> None:
        self._popen = popen
        self._pidfd: int | None = pidfd
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._reap)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Negative for a signal, as asyncio's: -9 for SIGKILL."""
        return self._popen.returncode

    async def wait(self) -> int:
        # Shielded: a cancelled waiter must not cancel the exit every other waiter awaits.
        return await asyncio.shield(self._exited)

    def _reap(self) -> None:
        code = self._popen.poll()  # waitpid(WNOHANG): the pidfd says it has exited
        if code is None:
            return
        self._close()
        if not self._exited.done():
            self._exited.set_result(code)

    def _close(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


@functools.cache
def _have_pidfd() -> bool:
    """Whether this Python and kernel give pidfds (asked once, of this very process)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return False
    try:
        os.close(pidfd_open(os.getpid()))
    except OSError:  # ENOSYS: a kernel before 5.3
        return False
    return True


def spawn(
    command: Sequence[str], env: Mapping[str, str], stdin: int, stdout: int, stderr: int,
    preexec_fn: Callable[[], None] | None = None,
) -> PidfdProcess | None:
    """The process started in a session of its own, or None where there are no pidfds
    (nothing was started then). Raises what Popen raises."""
    if not _have_pidfd():
        return None
    popen = subprocess.Popen(
        list(command), stdin=stdin, stdout=stdout, stderr=stderr, env=dict(env),
        start_new_session=True, preexec_fn=preexec_fn)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:  # out of descriptors: the process must not run unwatched
        os.killpg(popen.pid, signal.SIGKILL)  # its own session: its group is its pid
        popen.wait()
        raise
    return PidfdProcess(popen, pidfd)
