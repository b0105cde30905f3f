"""Who is listening on a local port: the proof that a probe was answered by our worker.

A worker's port is picked free, released, and bound again by the worker only once its model
has loaded (llama-cpp-python) or once it starts (llama-server). In between, any local
process may bind it and answer the readiness probe; users' prompts would then go to it. So
"ready" needs both a 200 and this: every socket listening where 127.0.0.1:PORT connects
belongs to a process in the worker's process group (its own session, so wrappers and their
children count as the worker).

Plain /proc reads, no psutil: this runs once per worker start, during activation, where
start-up time is measured (bench/activation.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
# Local addresses (as /proc/net/tcp{,6} spell them) that a connect to 127.0.0.1 can reach.
_REACHABLE = frozenset({
    "0100007F",  # 127.0.0.1
    "00000000",  # 0.0.0.0
    "0" * 32,  # :: (dual-stack)
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
})


def _listeners(port: int, proc: Path) -> set[int]:
    """Socket inodes listening on `port` at an address 127.0.0.1 reaches."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and address in _REACHABLE:
                inodes.add(int(fields[9]))
    return inodes


def _pids(proc: Path) -> Iterator[int]:
    for entry in proc.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _pgid(pid: int, proc: Path) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[2]) if len(fields) > 2 else None


def _sockets(pid: int, proc: Path) -> set[int]:
    found: set[int] = set()
    fd_dir = proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def holders(port: int, proc: Path = _PROC) -> dict[int, int]:
    """{socket inode: pid} for what listens on `port` where 127.0.0.1 reaches; pids that
    cannot be read (another user's) are missing."""
    inodes = _listeners(port, proc)
    owners: dict[int, int] = {}
    if not inodes:
        return owners
    for pid in _pids(proc):
        for inode in _sockets(pid, proc) & inodes:
            owners[inode] = pid
    return owners


def owned_by_group(port: int, pgid: int, proc: Path = _PROC) -> bool | None:
    """True when something listens on `port` (where 127.0.0.1 reaches) and every such
    socket belongs to a process of group `pgid`; False otherwise; None on a host without
    /proc/net (nothing to tell by: the probe alone decides)."""
    if not (proc / "net" / "tcp").exists():
        return None
    inodes = _listeners(port, proc)
    if not inodes:
        return False
    # The usual case first: the group's leader (the worker itself) holds the socket, and
    # no scan of every process is needed.
    ours = _sockets(pgid, proc) & inodes if _pgid(pgid, proc) == pgid else set()
    if ours == inodes:
        return True
    for pid in _pids(proc):
        if _pgid(pid, proc) == pgid:
            ours |= _sockets(pid, proc) & inodes
    return ours == inodes


def describe_holder(port: int, proc: Path = _PROC) -> str:
    """"pid N (name)" for who else listens on `port`, as far as /proc tells."""
    pids = sorted(set(holders(port, proc).values()))
    if not pids:
        return "a process this supervisor cannot see"
    names = []
    for pid in pids[:3]:
        try:
            comm = (proc / str(pid) / "comm").read_text().strip()
        except OSError:
            comm = "?"
        names.append(f"pid {pid} ({comm})")
    return ", ".join(names)
