"""Who is listening on a local port: the proof that a probe was answered by our worker.

A worker's port is picked free, released, and bound again by the worker only once its model
has loaded (llama-cpp-python) or once it starts (llama-server). In between, any local
process may bind it and answer the readiness probe; users' prompts would then go to it. So
"ready" needs both a 200 and this: every socket listening where 127.0.0.1:PORT connects
belongs to a process in the worker's process group (its own session, so wrappers and their
children count as the worker).

The listening sockets come from the kernel's sock_diag netlink interface, asked for
listeners only: a fraction of a millisecond, so the proof can run inline on every load (it
is on the path to a model's first answer). /proc/net/tcp, the fallback where netlink is not
available, lists every socket on the host, TIME_WAIT included: 1-3 ms on a busy one. The
owners come from /proc/PID/fd, no psutil: this also runs during activation, where start-up
time is measured (bench/activation.py).
"""

from __future__ import annotations

import os
import socket
import struct
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


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one dump request per address family.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN_MASK = 1 << 10  # idiag_states: TCP_LISTEN only, so the kernel skips the rest
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed 48-byte inet_diag_sockid
_DIAG_REQUEST = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans; sockid (sport, dport big-endian, src[16],
# dst[16], if, cookie[8]); expires, rqueue, wqueue, uid, inode
_DIAG_MESSAGE = struct.Struct("=BBBB2s2s16s16s4x8xIIIII")
_REACHABLE_BYTES = frozenset({
    bytes([127, 0, 0, 1]) + bytes(12), bytes(16),
    bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]),
})


def _listeners(port: int, proc: Path) -> set[int]:
    """Socket inodes listening on `port` at an address 127.0.0.1 reaches."""
    if proc == _PROC:
        try:
            return _netlink_listeners(port)
        except OSError:
            pass  # no sock_diag here (an old or restricted kernel): the slower table read
    return _proc_listeners(port, proc)


def _netlink_listeners(port: int) -> set[int]:
    inodes: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            payload = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, _TCP_LISTEN_MASK)
            nl.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(payload),
                                       _SOCK_DIAG_BY_FAMILY,
                                       _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + payload)
            inodes |= _read_dump(nl, port, seq)
    return inodes


def _read_dump(nl: socket.socket, port: int, seq: int) -> set[int]:
    """The inodes of the dump's sockets on `port` at a reachable address."""
    inodes: set[int] = set()
    while True:
        data = nl.recv(1 << 16)
        offset = 0
        while offset + _NLMSG_HEADER.size <= len(data):
            length, kind, _, got_seq, _ = _NLMSG_HEADER.unpack_from(data, offset)
            if length < _NLMSG_HEADER.size:
                raise OSError("sock_diag: malformed answer")
            body = offset + _NLMSG_HEADER.size
            if got_seq == seq:
                if kind == _NLMSG_DONE:
                    return inodes
                if kind == _NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, body)
                    raise OSError(-errno, "sock_diag refused the dump")
                if kind == _SOCK_DIAG_BY_FAMILY and length >= (
                        _NLMSG_HEADER.size + _DIAG_MESSAGE.size):
                    fields = _DIAG_MESSAGE.unpack_from(data, body)
                    sport, src, inode = fields[4], fields[6], fields[-1]
                    if int.from_bytes(sport, "big") == port and src in _REACHABLE_BYTES:
                        inodes.add(inode)
            offset += (length + 3) & ~3  # messages are 4-byte aligned
        if not data:
            raise OSError("sock_diag: the answer ended early")


def _proc_listeners(port: int, proc: Path) -> set[int]:
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
