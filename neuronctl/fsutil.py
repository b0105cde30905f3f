"""The two ways this package touches a file someone else may have planted.

`state_dir` and `log_dir` may be shared, group-writable or tampered with, and a root
supervisor must neither write through a symlink put there nor hang on a FIFO. So every
file that is replaced goes through `write_atomically` (a temporary file created afresh,
then renamed over), and every file that is read or appended to is opened by
`open_regular` (never blocking, only a regular file). The daemon and the CLI share this
module: it imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

_NO_SURPRISES = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class NotRegularFile(OSError):
    """A path that holds a symlink, a FIFO, a device, a socket or a directory: never
    opened through, read or written. `kind` says what it is ("a FIFO"), `strerror`
    "is a FIFO, not a regular file"."""

    def __init__(self, path: Path | str, kind: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, f"is {kind}, not a regular file", str(path))
        self.kind = kind


class FileTooLarge(OSError):
    """A file longer than a reader allows: nothing this package wrote is that long."""

    def __init__(self, path: Path | str, limit: int) -> None:
        super().__init__(errno.EFBIG, f"is larger than {limit} bytes", str(path))


def file_kind(mode: int) -> str:
    """What `mode` (an `st_mode`) is, in words: "a directory", "a FIFO", ..."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644, *,
                 follow_symlinks: bool = False) -> int:
    """`os.open(path, flags, mode)`, only for a regular file: never blocking (a FIFO
    nobody writes, a device), never through a symlink unless `follow_symlinks` (a model
    file may be one; a log or a state file never is). NotRegularFile otherwise, and the
    other OSErrors of open(2) as they come. The descriptor is blocking again when
    returned: a worker inherits a log's as its stdout."""
    flags |= _NO_SURPRISES | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegularFile(path, "a symlink", exc.errno) from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads, a socket, a device
            raise NotRegularFile(path, "a FIFO, socket or device", exc.errno) from None
        raise
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise NotRegularFile(path, file_kind(st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, limit: int,
                 check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes (NotRegularFile,
    FileTooLarge otherwise); `check` may refuse the file by its fstat (its owner, say)
    before anything is read. What is at the path is named exactly ("is a socket"): it is
    looked at before it is opened."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, file_kind(st.st_mode))
    fd = open_regular(path)
    try:
        if check is not None:
            check(os.fstat(fd))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise FileTooLarge(path, limit)
    return b"".join(chunks)


def write_atomically(path: Path, data: bytes, *, durable: bool = True,
                     mode: int = 0o644) -> None:
    """Replace `path` with `data`: readers see the old file or the new, never half. The
    temporary file `.NAME.tmp` is created afresh (O_EXCL, O_NOFOLLOW), so nothing planted
    under its name (a symlink, a FIFO) is ever written through; `durable` fsyncs it
    before the rename. Raises OSError, leaving no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crash, or whatever was put there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
