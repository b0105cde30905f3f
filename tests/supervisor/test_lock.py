"""The supervisor lock in a hostile or read-only state_dir: a second supervisor is kept
off whenever it can be, the first one always starts."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from neuronctl.supervisor import lock as lockmod
from neuronctl.supervisor.lock import AlreadyRunning, SupervisorLock


def test_a_second_supervisor_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    first = SupervisorLock(tmp_path)
    first.acquire()
    try:
        assert (tmp_path / "neuron.pid").read_text() == f"{os.getpid()}\n"
        with pytest.raises(AlreadyRunning) as refused:
            SupervisorLock(tmp_path).acquire()
        assert str(refused.value) == (
            f"another neuronctl start (pid {os.getpid()}) is running on state_dir "
            f"{tmp_path}; stop it first (systemctl stop neuron)")
    finally:
        first.release()
    assert not (tmp_path / "neuron.pid").exists()
    again = SupervisorLock(tmp_path)
    again.acquire()  # released: the next one gets it
    again.release()


def test_a_symlink_as_the_lock_file_is_never_opened_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "neuron.lock").symlink_to(victim)
    lock = SupervisorLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.lock"):
        lock.acquire()
    lock.release()
    assert victim.read_text() == "precious"
    [warning] = [r.getMessage() for r in caplog.records]
    assert "cannot open the supervisor lock" in warning and "will not be refused" in warning


def test_a_lock_file_that_cannot_be_created_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(lockmod.os, "open", read_only)
    lock = SupervisorLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.lock"):
        lock.acquire()
    lock.release()
    [warning] = [r.getMessage() for r in caplog.records]
    assert "cannot open the supervisor lock" in warning and "Read-only file system" in warning
    assert "will not be refused" in warning


def test_an_existing_lock_file_in_a_read_only_state_dir_still_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "neuron.lock").touch()
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(lockmod.os, "open", read_only)
    first = SupervisorLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(AlreadyRunning, match=r"pid \?"):
            SupervisorLock(tmp_path).acquire()
    finally:
        first.release()


def test_a_pid_file_that_cannot_be_written_still_keeps_a_second_supervisor_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "neuron.pid").mkdir()  # real: replacing a directory fails, as root too
    first = SupervisorLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.lock"):
        first.acquire()
    try:
        assert "cannot write" in caplog.records[0].getMessage()
        with pytest.raises(AlreadyRunning, match=r"another neuronctl start \(pid \?\)"):
            SupervisorLock(tmp_path).acquire()
    finally:
        first.release()
    assert (tmp_path / "neuron.pid").is_dir()  # not ours to remove


@pytest.mark.timeout(30)
def test_a_fifo_as_the_pid_file_does_not_hang_the_second_supervisor(tmp_path: Path) -> None:
    first = SupervisorLock(tmp_path)
    first.acquire()
    try:
        os.replace(tmp_path / "neuron.pid", tmp_path / "pid.bak")
        os.mkfifo(tmp_path / "neuron.pid")
        errors: list[BaseException] = []

        def second() -> None:
            try:
                SupervisorLock(tmp_path).acquire()
            except AlreadyRunning as exc:
                errors.append(exc)

        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive() and "pid ?" in str(errors[0])
    finally:
        first.release()
