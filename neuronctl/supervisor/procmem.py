"""A worker's resident memory, its whole process tree (a wrapper's children count), read
from /proc for that tree only.

psutil's `children()` finds a process's children by reading the stat file of every process
on the host: 1.5 ms per loaded model with 68 processes here, ten times that on a host with
hundreds, on the event loop at every GET /models and metrics scrape. Linux lists each
task's children itself (/proc/PID/task/TID/children, 3.5+ with CONFIG_PROC_CHILDREN, which
the distributions enable), but one file per thread: 8 us each, 1.6 ms for a llama-server
with llama.cpp's threads on a large host. So the tree is walked at most every
`TREE_TTL_S` per worker, and in between only its processes' stat files are read (one each:
the resident pages, and the parent, which tells a pid taken over by another process since).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

TREE_TTL_S = 5.0
# A tree larger than this is no worker's (a fork bomb in a wrapper): counted this far.
MAX_TREE = 4096
_MAX_REMEMBERED = 256  # workers whose trees are remembered (the oldest forgotten first)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def lists_children() -> bool:
    """Whether this kernel lists each task's children."""
    pid = os.getpid()
    return os.path.exists(f"/proc/{pid}/task/{pid}/children")


class TreeMemory:
    """`rss(pid)`: the resident bytes of `pid` and its descendants; None once it is gone."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._trees: dict[int, tuple[float, tuple[int, ...]]] = {}  # root: (walked, tree)

    def rss(self, pid: int) -> int | None:
        known = self._trees.get(pid)
        now = self._clock()
        if known is None or now - known[0] > TREE_TTL_S:
            tree, fresh = _walk(pid), True
        else:
            tree, fresh = known[1], False
        total = self._sum(pid, tree)
        if total is None and not fresh:  # a process left or changed hands: walk again
            tree = _walk(pid)
            total = self._sum(pid, tree)
            fresh = True
        if total is None:
            self._trees.pop(pid, None)
            return None
        if fresh:
            self._trees.pop(pid, None)
            if len(self._trees) >= _MAX_REMEMBERED:
                self._trees.pop(next(iter(self._trees)))
            self._trees[pid] = (now, tree)
        return total

    @staticmethod
    def _sum(root: int, tree: tuple[int, ...]) -> int | None:
        """The tree's resident bytes; None when the root is gone or a remembered
        descendant is (or its parent is no longer in the tree: its pid was reused)."""
        members = set(tree)
        total = 0
        for pid in tree:
            read = _stat(pid)
            if read is None or (pid != root and read[0] not in members):
                return None
            total += read[1]
        return total


def _walk(root: int) -> tuple[int, ...]:
    """`root` and its descendants as the kernel lists them now."""
    found: list[int] = []
    pending = [root]
    while pending and len(found) < MAX_TREE:
        pid = pending.pop()
        found.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone: _sum says so
        for task in tasks:
            listed = _read(f"/proc/{pid}/task/{task}/children")  # None: the thread ended
            if listed:
                pending.extend(int(child) for child in listed.split() if child.isdigit())
    return tuple(found)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, resident bytes) of `pid`; None when it is gone."""
    data = _read(f"/proc/{pid}/stat")
    if data is None:
        return None
    # After the command's closing parenthesis (a name may hold spaces and parentheses):
    # state, ppid, ... rss is the 22nd field from there.
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[1]), int(fields[21]) * _PAGE_SIZE
    except (IndexError, ValueError):
        return None


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)
