"""`workers.json`: which workers this supervisor started, for the next one after a crash.

It lists every live worker with its pid, process group, start time, command line and
token, rewritten atomically at each spawn and exit; orphans.py stops what a crashed
predecessor's file names, lock.py keeps two supervisors off one state_dir.

Nothing here is fatal: `state_dir` may be full, read-only or tampered with, and the node
must still serve. A file that is not what this supervisor writes is set aside (renamed,
not deleted) with one warning; a write that fails is one warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..fsutil import FileTooLarge, NotRegularFile, read_regular, write_atomically

# psutil is imported where first used, after the first worker has been spawned: start-up
# time is activation time (bench/activation.py).

log = logging.getLogger(__name__)

STATE_FILE = "workers.json"
# A real file is a few hundred bytes a worker; anything this big was not written by us.
MAX_STATE_BYTES = 1 << 20
_PID_MAX = 1 << 22  # PID_MAX_LIMIT of 64-bit Linux: no pid or pgid is above it
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
            data = read_regular(self.path, MAX_STATE_BYTES, _ours)
        except FileNotFoundError:
            return []
        except (NotRegularFile, FileTooLarge) as exc:
            self._set_aside(_reason(exc))
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


def _ours(st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        # Only what this supervisor's user wrote can tell it which processes to kill.
        raise BadStateFile(f"is owned by uid {st.st_uid}, not by this supervisor's "
                           f"uid {os.geteuid()}")


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


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
