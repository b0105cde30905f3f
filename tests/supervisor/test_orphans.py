"""Orphans behind a wrapper script: found by process group and token, never a process
that merely shares a group or a pid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from neuronctl.supervisor.orphans import stop_orphans
from neuronctl.supervisor.statefile import WorkerEntry
from neuronctl.supervisor.worker import TOKEN_ENV

from ..helpers import clean_env, kill_quietly, pid_alive, poll_until


def group_of(tmp_path: Path, name: str, token: str, *, child_token: str | None = None,
             ) -> tuple[subprocess.Popen[bytes], int]:
    """A wrapper shell (its own session, `token` in its environment) that runs a sleeping
    Python child without exec, as a wrapper script does; the shell and the child's pid."""
    pid_file = tmp_path / f"{name}.pid"
    override = f"{TOKEN_ENV}={child_token} " if child_token is not None else ""
    script = tmp_path / f"{name}.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"{override}\"{sys.executable}\" -c 'import os, time; "
        f"open(\"{pid_file}\", \"w\").write(str(os.getpid())); time.sleep(600)'\n")
    script.chmod(0o755)
    shell = subprocess.Popen([str(script)], start_new_session=True,
                             env={**clean_env(), TOKEN_ENV: token})
    child = int(poll_until(lambda: pid_file.exists() and pid_file.read_text(), 10))
    return shell, child


def recorded(shell: subprocess.Popen[bytes], token: str) -> WorkerEntry:
    info = psutil.Process(shell.pid)
    return WorkerEntry("m", shell.pid, info.create_time(), info.cmdline(), shell.pid, token)


def test_orphans_are_found_by_group_and_token_after_the_wrapper_died(tmp_path: Path) -> None:
    shell, child = group_of(tmp_path, "wrapper", "ab" * 16)
    try:
        entry = recorded(shell, "ab" * 16)
        shell.kill()  # the parent-death signal reaches only the wrapper
        shell.wait(10)
        assert pid_alive(child)
        assert stop_orphans([entry], 2.0) == [child]
        poll_until(lambda: not pid_alive(child), 10)
    finally:
        kill_quietly(child)
        kill_quietly(shell.pid)
        shell.wait(10)


def test_a_process_without_the_token_is_never_touched(tmp_path: Path) -> None:
    token = "ab" * 16
    shell, ours = group_of(tmp_path, "ours", token)
    # The token, in a group no entry names.
    elsewhere_shell, elsewhere = group_of(tmp_path, "elsewhere", token)
    # A recorded group whose processes carry another token: the group id was recycled.
    recycled_shell, recycled = group_of(tmp_path, "recycled", "ef" * 16)
    # The recorded group and token, but a child that set a token of its own.
    mixed_shell, impostor = group_of(tmp_path, "mixed", token, child_token="00" * 16)
    shells = (shell, elsewhere_shell, recycled_shell, mixed_shell)
    try:
        entries = [recorded(shell, token), recorded(recycled_shell, token),
                   recorded(mixed_shell, token)]
        stopped = stop_orphans(entries, 2.0)
        assert sorted(stopped) == sorted([shell.pid, ours, mixed_shell.pid])
        shell.wait(10)
        mixed_shell.wait(10)
        poll_until(lambda: not pid_alive(ours), 10)
        assert elsewhere_shell.poll() is None and recycled_shell.poll() is None
        assert pid_alive(elsewhere) and pid_alive(recycled) and pid_alive(impostor)
    finally:
        for pid in (ours, elsewhere, recycled, impostor):
            kill_quietly(pid)
        for proc in shells:
            kill_quietly(proc.pid)
            proc.wait(10)
