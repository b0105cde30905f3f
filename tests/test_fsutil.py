"""The file primitives every planted-file defence goes through: the atomic replace and the
safe open of a regular file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from neuronctl.fsutil import (
    FileTooLarge,
    NotRegularFile,
    open_regular,
    read_regular,
    write_atomically,
)


def test_an_atomic_replace_never_writes_through_what_was_planted(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".f.tmp").symlink_to(victim)
    write_atomically(tmp_path / "f", b"new", mode=0o600)
    assert victim.read_text() == "precious"
    assert (tmp_path / "f").read_bytes() == b"new"
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "victim"]


def test_a_failed_replace_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")  # replacing a non-empty directory fails
    with pytest.raises(OSError):
        write_atomically(tmp_path / "d", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.timeout(30)
def test_only_a_regular_file_is_opened_and_what_is_there_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        expected = {"link": "a symlink", "dir": "a directory", "fifo": "a FIFO",
                    "sock": "a FIFO, socket or device"}
        for name, kind in expected.items():
            with pytest.raises(NotRegularFile, match=f"is {kind}, not a regular file"):
                os.close(open_regular(tmp_path / name))
        os.close(open_regular(tmp_path / "link", follow_symlinks=True))
        # Looked at before it is opened: what is there is named exactly.
        with pytest.raises(NotRegularFile, match="is a socket, not a regular file"):
            read_regular(tmp_path / "sock", 10)
    with pytest.raises(NotRegularFile, match="is a FIFO, not a regular file"):
        read_regular(tmp_path / "fifo", 10)  # never waits for a writer


def test_a_read_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 11)
    assert read_regular(tmp_path / "f", 11) == b"x" * 11
    with pytest.raises(FileTooLarge, match="is larger than 10 bytes"):
        read_regular(tmp_path / "f", 10)
