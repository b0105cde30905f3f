"""Per-model log files: naming, the header written at each start, reading the tail, and
following it like `tail -F` (`FollowedLog`, for the CLI and the API alike).

`log_dir` may be shared or group-writable (a custom one), so a log path is never trusted:
every open here goes through `open_log`, which never follows a symlink (a planted
`<model>.log -> /etc/shadow` must not be served, nor a worker's output appended to its
target) and never blocks (a FIFO or a device at a log path is refused, not waited on).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .fsutil import NotRegularFile, open_regular

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")  # `+` is kept out: it marks hashed names
_MAX_STEM = 120


def safe_name(model_id: str) -> str:
    """A file-name stem for `model_id` that cannot leave its directory.

    `Qwen/Qwen3-0.6B-GGUF` becomes `Qwen--Qwen3-0.6B-GGUF`, as in the Hugging Face cache.
    Any id that does not map back from its stem that simply (other characters, `--` of its
    own, a leading `.` or `-`, great length) gets `_` for unsafe characters and a `+hash`
    suffix; `+` never occurs in a plain stem, so two ids never share a file.
    """
    stem = model_id.replace("/", "--")
    plain = (
        not _UNSAFE.search(stem)
        and stem.replace("--", "/") == model_id
        and not stem.startswith((".", "-"))
        and 0 < len(stem) <= _MAX_STEM
    )
    if plain:
        return stem
    digest = hashlib.sha256(model_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', stem).lstrip('.-')[:_MAX_STEM]}+{digest}"


def log_path(log_dir: Path, model_id: str) -> Path:
    return log_dir / f"{safe_name(model_id)}.log"


def previous_path(path: Path, generation: int = 1) -> Path:
    """`<model>.log.1` is the log of the start before the current one."""
    return path.with_name(f"{path.name}.{generation}")


class UnsafeLog(OSError):
    """A log path holding a symlink, a FIFO, a device or a directory: never opened
    through, read or written. `strerror` says what it is, for `cannot write the log ...`."""


def open_log(path: Path, flags: int = os.O_RDONLY, mode: int = 0o640) -> int:
    """`os.open(path, flags)` for a log: never through a symlink, never blocking, and only
    a regular file (UnsafeLog otherwise; FileNotFoundError when absent). The descriptor
    is blocking again when returned (the worker inherits it as its stdout)."""
    try:
        return open_regular(path, flags, mode)
    except NotRegularFile as exc:
        raise UnsafeLog(exc.errno, f"{exc.strerror} (not opened)", str(path)) from None


def stamped(line: str) -> bytes:
    """`=== TIME line`: how neuronctl's own lines in a model's log look (a header, how a
    worker ended, download progress), so `excerpt` can tell them from the worker's."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S%z")
    return f"=== {stamp} {line}\n".encode("utf-8", "backslashreplace")


def rotate(path: Path, keep: int) -> None:
    """Shift `path` to `.1`, `.1` to `.2`, ... keeping `keep` previous logs, so the log
    from before a crash survives the restart that follows it. Renames never follow a
    symlink: a planted one is moved along like a file, and never read."""
    if keep <= 0 or not os.path.lexists(path):
        return
    previous_path(path, keep).unlink(missing_ok=True)
    for generation in range(keep - 1, 0, -1):
        older = previous_path(path, generation)
        if os.path.lexists(older):
            older.rename(previous_path(path, generation + 1))
    path.rename(previous_path(path))


# `<stem>.log` and its earlier starts, `<stem>.log.1`, `.log.2`, ...
_LOG_NAME = re.compile(r"(?P<stem>.+)\.log(?:\.\d{1,4})?")
_HEADER = b"=== "  # every log this module writes starts with a stamped header line


def prune_logs(log_dir: Path, candidates: set[str], keep_stems: set[str],
               keep_others: int) -> list[Path]:
    """Remove the logs of `candidates` (`safe_name`s: models outside the catalogue this
    daemon ran) except `keep_stems` (the models it knows now), all but the `keep_others`
    most recently written. Nothing else in `log_dir` is considered (another node's logs
    there, say), and only files this module wrote are removed: regular files (a symlink is
    someone's evidence) whose first line is our header. Returns what was removed."""
    stems: dict[str, list[tuple[Path, float]]] = {}
    try:
        entries = list(os.scandir(log_dir))
    except OSError:
        return []
    for entry in entries:
        match = _LOG_NAME.fullmatch(entry.name)
        if match is None or match["stem"] not in candidates or match["stem"] in keep_stems:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stems.setdefault(match["stem"], []).append((Path(entry.path), mtime))
    by_age = sorted(stems.values(), key=lambda files: max(m for _, m in files), reverse=True)
    removed = []
    for files in by_age[keep_others:]:
        for path, _ in files:
            if _ours(path):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def _ours(path: Path) -> bool:
    try:
        fd = open_log(path)
    except OSError:
        return False
    try:
        return os.read(fd, len(_HEADER)) == _HEADER
    finally:
        os.close(fd)


# Appending, created when absent. A symlink there is refused, never written through nor
# removed (log_dir may be shared: the link is someone's evidence); the worker's output then
# goes to the journal, which says why (worker.py).
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def open_for_worker(path: Path, command: Sequence[str], keep: int = 0) -> int:
    """Rotate the last start's log away, open a fresh one and write the start header;
    return the raw fd (append mode, for the child's stdout and stderr).

    The header is written before the child exists, so the pid is filled in by
    `write_pid_line` once it is known. With `keep` = 0 the one file is appended to.
    Raises OSError (UnsafeLog for what `open_log` refuses) when it cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rotate(path, keep)
    fd = open_log(path, _APPEND)
    try:
        # A blank line parts this start from an earlier one appended to (keep = 0); a
        # fresh file starts with its header.
        gap = b"\n" if os.fstat(fd).st_size else b""
        os.write(fd, gap + stamped(f"neuronctl starting: {shlex.join(command)}"))
    except BaseException:
        os.close(fd)  # a full disk must not leak a descriptor per attempt
        raise
    return fd


def write_pid_line(fd: int, pid: int) -> None:
    os.write(fd, f"=== worker pid {pid}\n".encode())


def append_line(path: Path, line: str, *, create: bool = False) -> None:
    """One `=== TIME line` to a log, never through a symlink; created only with `create`.
    Never raises: a full disk has already been reported when the log was opened."""
    data = stamped(line)
    try:
        fd = open_log(path, _APPEND if create else os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_end_line(path: Path, line: str) -> None:
    """The last line of a worker's log: how it ended. Never raises."""
    append_line(path, line)


def tail_lines(path: Path, n: int, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` lines of `path`, reading at most `max_bytes` from its end (more when
    many lines are asked for); none when it is absent or not a regular file (see
    `read_tail` to tell those apart)."""
    try:
        return read_tail(path, n, max_bytes)
    except (FileNotFoundError, UnsafeLog):
        return []


def read_tail(path: Path, n: int, max_bytes: int = 64 * 1024) -> list[str]:
    """`tail_lines`, raising FileNotFoundError or UnsafeLog (a symlink, a FIFO...)."""
    with os.fdopen(open_log(path), "rb") as fh:
        return _last_lines(fh, n, max_bytes)


def _last_lines(fh: BinaryIO, n: int, max_bytes: int) -> list[str]:
    """The last `n` lines of the open file, reading at most `max_bytes` (more when many
    lines are asked for) up to its size now, where `fh` is left."""
    max_bytes = max(max_bytes, n * 512)
    size = os.fstat(fh.fileno()).st_size
    fh.seek(max(0, size - max_bytes))
    lines = fh.read(size - fh.tell()).decode("utf-8", "replace").splitlines()
    if size > max_bytes and len(lines) > 1:
        lines = lines[1:]  # the first line is probably cut in the middle
    return lines[-n:] if n > 0 else []


# A line that says what went wrong, in the words of the servers we run (argparse, Python
# tracebacks, llama.cpp's loaders).
_ERRORISH = re.compile(
    r"error|exception|unrecognized|invalid|fail|cannot|can't|could not|unable|not found|"
    r"no such|denied|fatal|abort|out of memory", re.IGNORECASE)
# Lines that say *why* (memory, context, the file), over the generic ones after them
# (`Failed to create llama_context`, `exiting due to model loading error`): the first of
# them in the tail is the root cause.
_CAUSE = re.compile(
    r"insufficient memory|failed to allocate|out of memory|unable to allocate|cannot allocate|"
    r"exceeds? (the )?(available )?context|context window|no space left|"
    r"failed to open gguf|invalid magic|unknown model architecture", re.IGNORECASE)
_HEADLINE_MAX = 300
# How many of a log's last lines are shown by default, the same everywhere: `neuronctl
# logs`, `GET /models/{id}/logs` and the dashboard's log view.
DEFAULT_TAIL_LINES = 100


def excerpt(path: Path, n: int, fallback: bool = True) -> tuple[str | None, str]:
    """What a worker's log says about its end: (the one line that says what went wrong,
    the last `n` lines with the file named). The headline is the last line that reads like
    an error (a traceback's last line, argparse's complaint), never one of neuronctl's own
    `===` header lines; without one, the last line (or None, without `fallback`: a worker
    killed while serving has only access-log lines, which explain nothing)."""
    lines = [ln for ln in tail_lines(path, n * 2) if ln.strip()]
    said = [ln.strip() for ln in lines if not ln.startswith("=== ")]
    if not said:
        return (f"it wrote nothing to its log {path}" if fallback else None,
                f"log {path} has no output")
    headline = next((ln for ln in said if _CAUSE.search(ln)), None) or \
        next((ln for ln in reversed(said) if _ERRORISH.search(ln)),
             said[-1] if fallback else None)
    if headline is not None and len(headline) > _HEADLINE_MAX:
        headline = headline[: _HEADLINE_MAX - 3] + "..."
    return headline, f"last lines of {path}:\n" + "\n".join(lines[-n:])


class FollowedLog:
    """A log followed like `tail -F`, one step at a time: `read()` returns what was appended
    since the last call (b"" when nothing was). When a restart rotates the file away
    (`<model>.log` to `.1`), the old one is read to its end and then the new one from its
    start; a truncated file is read again from its start. Every call is a few non-blocking
    file operations (`open_log`), and raises UnsafeLog when what is at the path is no
    regular file; the caller waits between empty reads (the CLI sleeps, the API awaits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO | None = None

    def open(self, *, at_end: bool) -> None:
        """Open the file now, to follow from its end or its start (FileNotFoundError when
        it is absent)."""
        self._fh = os.fdopen(open_log(self.path), "rb")
        if at_end:
            self._fh.seek(0, os.SEEK_END)

    def tail(self, n: int, max_bytes: int = 64 * 1024) -> list[str]:
        """Open the file; its last `n` lines up to where following begins, so nothing is
        lost or sent twice between the tail and what follows. None yet when the file is
        absent: `read` opens it from its start once it appears."""
        try:
            self._fh = os.fdopen(open_log(self.path), "rb")
        except FileNotFoundError:
            return []
        return _last_lines(self._fh, n, max_bytes)

    def read(self, max_bytes: int = -1) -> bytes:
        """What was appended since the last read (at most `max_bytes` of it)."""
        if self._fh is None:
            try:  # it appeared: read it from its start
                self._fh = os.fdopen(open_log(self.path), "rb")
            except FileNotFoundError:
                return b""
        chunk = self._fh.read(max_bytes)
        if chunk:
            return chunk
        try:
            current = self.path.lstat()
        except FileNotFoundError:  # between a rotation and the new file
            return b""
        if current.st_ino != os.fstat(self._fh.fileno()).st_ino:
            rest = self._fh.read(max_bytes)
            if rest:  # written to the old file after the read above, before the rotation
                return rest
            try:
                fresh = os.fdopen(open_log(self.path), "rb")  # rotated: the new file
            except FileNotFoundError:
                return b""
            self._fh.close()
            self._fh = fresh  # read from its start
        elif current.st_size < self._fh.tell():
            self._fh.seek(0)  # truncated
        else:
            return b""
        return self._fh.read(max_bytes)

    def close(self) -> None:
        """Never blocks: a read-only regular file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def follow(path: Path, poll_s: float = 0.25, from_start: bool = False) -> Iterator[str]:
    """Yield text appended to `path` from now on (`FollowedLog`), polling every `poll_s`.
    Raises FileNotFoundError when it is absent now, UnsafeLog (a symlink, a FIFO...) at
    the path, then or after a rotation."""
    followed = FollowedLog(path)
    followed.open(at_end=not from_start)
    try:
        while True:
            chunk = followed.read()
            if chunk:
                yield chunk.decode("utf-8", "replace")
            else:
                time.sleep(poll_s)
    finally:
        followed.close()
