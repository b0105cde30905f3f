"""Workers a crashed supervisor left behind, found and stopped by the next one.

`workers.json` (statefile.py) names each worker's process group and token (a random
`NEURON_WORKER_TOKEN` in its environment, which anything it starts inherits). Every
process of a recorded group that carries the recorded token is one of ours, so a recycled
pid is never touched and a wrapper script's child is found after the wrapper died. An
entry from before tokens is checked by start time and command line instead.

psutil is imported where first used, after the first worker has been spawned: start-up
time is activation time (bench/activation.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from .statefile import WorkerEntry
from .worker import TOKEN_ENV

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

# psutil's create_time is derived from boot time and clock ticks; allow for rounding.
_START_TIME_TOLERANCE_S = 0.05


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
