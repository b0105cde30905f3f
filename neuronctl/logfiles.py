"""Per-model log files: naming, the header written at each start, reading the tail."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

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


def rotate(path: Path, keep: int) -> None:
    """Shift `path` to `.1`, `.1` to `.2`, ... keeping `keep` previous logs, so the log
    from before a crash survives the restart that follows it."""
    if keep <= 0 or not path.exists():
        return
    previous_path(path, keep).unlink(missing_ok=True)
    for generation in range(keep - 1, 0, -1):
        older = previous_path(path, generation)
        if older.exists():
            older.rename(previous_path(path, generation + 1))
    path.rename(previous_path(path))


def open_for_worker(path: Path, command: Sequence[str], keep: int = 0) -> int:
    """Rotate the last start's log away, open a fresh one and write the start header;
    return the raw fd (append mode, for the child's stdout and stderr).

    The header is written before the child exists, so the pid is filled in by
    `write_pid_line` once it is known. With `keep` = 0 the one file is appended to.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rotate(path, keep)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S%z")
        header = f"\n=== {stamp} neuronctl starting: {shlex.join(command)}\n"
        os.write(fd, header.encode("utf-8", "backslashreplace"))
    except BaseException:
        os.close(fd)  # a full disk must not leak a descriptor per attempt
        raise
    return fd


def write_pid_line(fd: int, pid: int) -> None:
    os.write(fd, f"=== worker pid {pid}\n".encode())


def write_end_line(path: Path, line: str) -> None:
    """The last line of a worker's log: how it ended. Never raises (a full disk has
    already been reported when the log was opened)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S%z")
    try:
        # O_NONBLOCK: a FIFO put where the log was would otherwise hang the event loop.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
                     | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        os.write(fd, f"=== {stamp} {line}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass
    finally:
        os.close(fd)


def tail_lines(path: Path, n: int, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` lines of `path`, reading at most `max_bytes` from its end (more when
    many lines are asked for)."""
    max_bytes = max(max_bytes, n * 512)
    try:
        # Opened without blocking and read only when a regular file: the log path is in a
        # directory an operator (or a mistake) may have put a FIFO or a device in.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - max_bytes))
        data = fh.read()
    lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and len(lines) > 1:
        lines = lines[1:]  # the first line is probably cut in the middle
    return lines[-n:] if n > 0 else []


# A line that says what went wrong, in the words of the servers we run (argparse, Python
# tracebacks, llama.cpp's loaders).
_ERRORISH = re.compile(
    r"error|exception|unrecognized|invalid|fail|cannot|can't|could not|unable|not found|"
    r"no such|denied|fatal|abort|out of memory", re.IGNORECASE)
_HEADLINE_MAX = 300


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
    headline = next((ln for ln in reversed(said) if _ERRORISH.search(ln)),
                    said[-1] if fallback else None)
    if headline is not None and len(headline) > _HEADLINE_MAX:
        headline = headline[: _HEADLINE_MAX - 3] + "..."
    return headline, f"last lines of {path}:\n" + "\n".join(lines[-n:])


def follow(path: Path, poll_s: float = 0.25, from_start: bool = False) -> Iterator[str]:
    """Yield text appended to `path` from now on, like `tail -F`: when a restart rotates
    the file away, finish the old one and go on with the new one."""
    fh = path.open("rb")
    try:
        if not from_start:
            fh.seek(0, os.SEEK_END)
        while True:
            chunk = fh.read()
            if chunk:
                yield chunk.decode("utf-8", "replace")
                continue
            try:
                current = path.stat()
            except FileNotFoundError:  # between rotation and the new file
                time.sleep(poll_s)
                continue
            if current.st_ino != os.fstat(fh.fileno()).st_ino:
                fh.close()
                fh = path.open("rb")  # rotated: the new file, from its start
                continue
            if current.st_size < fh.tell():
                fh.seek(0)  # truncated
                continue
            time.sleep(poll_s)
    finally:
        fh.close()
