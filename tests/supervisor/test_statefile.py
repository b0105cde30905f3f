"""A hostile state_dir: broken or planted workers.json, a full or missing state_dir, and
workers hidden behind a wrapper script. None of it may stop the node from serving."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from neuronctl import fsutil
from neuronctl.node.daemon import _stop_orphans
from neuronctl.supervisor import statefile
from neuronctl.supervisor.statefile import MAX_STATE_BYTES, StateFile, WorkerEntry
from neuronctl.supervisor.worker import TOKEN_ENV

from ..fakes import FAKE_WORKER
from ..helpers import NEURONCTL, clean_env, free_port, kill_quietly, pid_alive, poll_until
from .test_orphans import group_of, recorded

GOOD = {"model_id": "good", "pid": 4_000_000, "create_time": 1.5e9, "cmdline": ["x"],
        "pgid": 4_000_000, "token": "ab" * 16}


def entry(**changes: Any) -> dict[str, Any]:
    return {**GOOD, "model_id": "bad", "pid": 4_000_001, "pgid": 4_000_001, **changes}


BAD_ENTRIES = {
    "pid negative": entry(pid=-1),
    "pid one": entry(pid=1),
    "pid a string": entry(pid="123"),
    "pid a float": entry(pid=123.0),
    "pid null": entry(pid=None),
    "pid a boolean": entry(pid=True),
    "pid out of range": entry(pid=2**40),
    "pid missing": {k: v for k, v in entry().items() if k != "pid"},
    "pgid a string": entry(pgid="7"),
    "create_time a string": entry(create_time="yesterday"),
    "create_time infinite": entry(create_time=1e999),
    "cmdline a string": entry(cmdline="llama-server -m x"),
    "cmdline not strings": entry(cmdline=["a", 1]),
    "model_id a list": entry(model_id=["m"]),
    "token not hex": entry(token="not hex; rm -rf /"),
    "entry a number": 42,
    "entry a list": [1, 2],
    "entry null": None,
}

BAD_FILES = {
    "workers an object": b'{"workers": {"pid": 1}}',
    "workers a string": b'{"workers": "none"}',
    "workers missing": b'{"supervisor_pid": 1}',
    "top level a list": b"[]",
    "not json": b"{workers: [",
    "not utf-8": b'{"workers": ["\xff\xfe"]}',
    "empty": b"",
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "nested in workers": b'{"workers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "too large": b'{"workers": [], "pad": "' + b"x" * MAX_STATE_BYTES + b'"}',
}


@pytest.fixture
def sleepers() -> Iterator[list[int]]:
    """Two processes, each in a session of its own, as workers are: something to record."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              start_new_session=True) for _ in range(2)]
    try:
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def set_aside(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("workers.json.bad-*"))


def warnings_about(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and str(path) in r.getMessage()]


@pytest.mark.parametrize("name", list(BAD_ENTRIES))
def test_an_invalid_entry_is_skipped_and_the_valid_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    content = json.dumps({"workers": [GOOD, BAD_ENTRIES[name]]})
    (tmp_path / "workers.json").write_text(content)
    state = StateFile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        entries = state.read()
    assert entries == [WorkerEntry(**GOOD)]
    [warning] = warnings_about(caplog, state.path)
    assert "1 of 2 entries skipped (entry 1: " in warning and "set aside as" in warning
    [aside] = set_aside(tmp_path)
    assert aside.read_text() == content  # kept for whoever investigates
    assert not state.path.exists()


def test_entries_naming_this_supervisor_are_skipped_as_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a reboot the new supervisor may have an old worker's pid: never a process to
    stop, and no sign of tampering either."""
    mine = [entry(pid=os.getpid(), pgid=4_000_002), entry(pid=4_000_003, pgid=os.getpgrp())]
    (tmp_path / "workers.json").write_text(json.dumps({"workers": [GOOD, *mine]}))
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert StateFile(tmp_path).read() == [WorkerEntry(**GOOD)]
    assert caplog.records == [] and set_aside(tmp_path) == []


def test_a_warning_lists_a_few_invalid_entries_and_counts_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "workers.json").write_text(json.dumps({"workers": [GOOD] + [None] * 500}))
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert len(StateFile(tmp_path).read()) == 1
    [warning] = warnings_about(caplog, tmp_path / "workers.json")
    assert "500 of 501 entries skipped" in warning and "; 497 more)" in warning
    assert len(warning) < 500


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_file_that_is_not_a_state_file_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    (tmp_path / "workers.json").write_bytes(BAD_FILES[name])
    state = StateFile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert state.read() == []
    [warning] = warnings_about(caplog, state.path)
    assert "set aside as workers.json.bad-" in warning
    [aside] = set_aside(tmp_path)
    assert aside.read_bytes() == BAD_FILES[name]


def read_in_thread(state: StateFile) -> list[WorkerEntry]:
    """`state.read()`, failing the test (rather than hanging it) if it blocks."""
    result: list[list[WorkerEntry]] = []
    reader = threading.Thread(target=lambda: result.append(state.read()), daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "read() blocked"
    return result[0]


@pytest.mark.timeout(30)
def test_a_fifo_in_place_of_the_file_is_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tmp_path / "workers.json")
    state = StateFile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert read_in_thread(state) == []
    [warning] = warnings_about(caplog, state.path)
    assert "is a FIFO, not a regular file" in warning
    [aside] = set_aside(tmp_path)
    assert stat.S_ISFIFO(aside.lstat().st_mode)


@pytest.mark.timeout(30)
def test_a_symlink_in_place_of_the_file_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "workers.json").symlink_to(tmp_path / "fifo")
    state = StateFile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert read_in_thread(state) == []
    assert "is a symlink" in warnings_about(caplog, state.path)[0]
    [aside] = set_aside(tmp_path)
    assert aside.is_symlink() and (tmp_path / "fifo").exists()


def test_a_directory_in_place_of_the_file_is_set_aside_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sleepers: list[int]
) -> None:
    (tmp_path / "workers.json" / "inside").mkdir(parents=True)
    state = StateFile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert state.read() == []
        state.reset()
    assert "is a directory" in warnings_about(caplog, state.path)[0]
    [aside] = set_aside(tmp_path)
    assert (aside / "inside").is_dir()
    state.record("m", sleepers[0], "cd" * 16)  # the next write makes a plain file again
    assert [e.token for e in StateFile(tmp_path).read()] == ["cd" * 16]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_a_file_of_another_user_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "workers.json").write_text(json.dumps({"workers": [GOOD]}))
    os.chown(tmp_path / "workers.json", 12345, 12345)
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert StateFile(tmp_path).read() == []
    assert "owned by uid 12345" in warnings_about(caplog, tmp_path / "workers.json")[0]


def test_files_set_aside_in_the_same_second_keep_apart(tmp_path: Path) -> None:
    for text in ("one", "two", "three"):
        (tmp_path / "workers.json").write_text(text)
        assert StateFile(tmp_path).read() == []
    assert sorted(p.read_text() for p in set_aside(tmp_path)) == ["one", "three", "two"]


def test_a_file_that_cannot_be_set_aside_is_only_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(src: Any, dst: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(statefile.os, "rename", read_only)
    (tmp_path / "workers.json").write_text("garbage")
    with caplog.at_level(logging.WARNING, logger="neuronctl.supervisor.statefile"):
        assert StateFile(tmp_path).read() == []
    [warning] = warnings_about(caplog, tmp_path / "workers.json")
    assert "is not JSON" in warning and "cannot set it aside: Read-only file system" in warning


# --- writes on a full disk ---------------------------------------------------------------


async def test_a_full_disk_is_one_warning_until_writes_succeed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    sleepers: list[int],
) -> None:
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    state = StateFile(tmp_path)
    monkeypatch.setattr(fsutil.os, "fsync", full)
    with caplog.at_level(logging.INFO, logger="neuronctl.supervisor.statefile"):
        await state.add("m", sleepers[0], "ab" * 16)
        await state.add("m", sleepers[1], "cd" * 16)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1
        assert "No space left on device" in messages[0]
        assert "will not be found" in messages[0]
        assert os.listdir(tmp_path) == []  # no temporary file left behind
        monkeypatch.setattr(fsutil.os, "fsync", real_fsync)
        await state.remove(sleepers[1])
    assert "up to date again" in caplog.records[-1].getMessage()
    assert [e.pid for e in StateFile(tmp_path).read()] == [sleepers[0]]


def test_the_temporary_file_is_never_written_through(
    tmp_path: Path, sleepers: list[int]
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".workers.json.tmp").symlink_to(victim)
    StateFile(tmp_path).record("m", sleepers[0], "ab" * 16)
    assert victim.read_text() == "precious"
    assert [e.pid for e in StateFile(tmp_path).read()] == [sleepers[0]]


def test_valid_entries_are_cleaned_up_beside_invalid_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shell, child = group_of(tmp_path, "wrapper", "ab" * 16)
    try:
        good = recorded(shell, "ab" * 16).__dict__
        content = {"workers": [BAD_ENTRIES["pid a string"], good, None]}
        (tmp_path / "workers.json").write_text(json.dumps(content))
        with caplog.at_level(logging.WARNING):
            _stop_orphans(StateFile(tmp_path), 2.0)
        shell.wait(10)
        poll_until(lambda: not pid_alive(child), 10)
        messages = [r.getMessage() for r in caplog.records]
        assert any("2 of 3 entries skipped" in m for m in messages)
        assert any(f"stopping orphaned worker pid {child} " in m for m in messages)
        assert len(set_aside(tmp_path)) == 1
    finally:
        kill_quietly(child)
        kill_quietly(shell.pid)
        shell.wait(10)


# --- end to end: neuronctl start ---------------------------------------------------------


def write_config(tmp_path: Path, state_dir: Path, model: Path | None) -> Path:
    """A node whose one default model runs through a wrapper script (no exec) around the
    fake worker, as llama-server."""
    wrapper = tmp_path / "llama-server-wrapper"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "{FAKE_WORKER}" --mode ready "$@"\n')
    wrapper.chmod(0o755)
    text = (f'host = "127.0.0.1"\nport = {free_port()}\nlog_dir = "{tmp_path}/log"\n'
            f'state_dir = "{state_dir}"\nstop_timeout_s = 2.0\n'
            f'[harness.llama-server]\nbinary = "{wrapper}"\n')
    if model is not None:
        text += (f'[[default_models]]\nmodel_id = "m"\nharness = "llama-server"\n'
                 f'path = "{model}"\n')
    config = tmp_path / "neuron.toml"
    config.write_text(text)
    return config


def port_of(config: Path) -> int:
    line = next(x for x in config.read_text().splitlines() if x.startswith("port = "))
    return int(line.split("=")[1])


def models(config: Path) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port_of(config)}/models"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    return list(body["models"] if isinstance(body, dict) else body)


def start_node(config: Path, log: Path, prefix: list[str] | None = None,
               ) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        node = subprocess.Popen([*(prefix or []), str(NEURONCTL), "start", "--config",
                                 str(config)], env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    poll_until(lambda: b"listening" in log.read_bytes() or node.poll() is not None, 60)
    assert node.poll() is None, log.read_text()
    return node


def stop_node(node: subprocess.Popen[bytes]) -> None:
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(30)
    finally:
        kill_quietly(node.pid)
        node.wait(10)


@pytest.mark.parametrize("planted", ["fifo", "directory"])
def test_a_node_starts_and_serves_over_a_planted_state_file(
    tmp_path: Path, tiny_gguf: Path, planted: str
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if planted == "fifo":
        os.mkfifo(state_dir / "workers.json")
    else:
        (state_dir / "workers.json").mkdir()
    config = write_config(tmp_path, state_dir, tiny_gguf)
    node = start_node(config, tmp_path / "daemon.log")
    try:
        [model] = models(config)
        assert model["id"] == "m" and model["status"] == "loaded"
        assert f"is a {'FIFO' if planted == 'fifo' else 'directory'}, not a regular file" \
            in (tmp_path / "daemon.log").read_text()
        assert len(set_aside(state_dir)) == 1
        # Recording works again: the worker is in a fresh file, with its group and token.
        [worker] = StateFile(state_dir).read()
        assert worker.pid == worker.pgid == model["pid"]
        assert psutil.Process(worker.pid).environ()[TOKEN_ENV] == worker.token
    finally:
        stop_node(node)


def test_a_state_dir_that_cannot_be_created_is_a_warning(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    config = write_config(tmp_path, tmp_path / "a-file" / "state", tiny_gguf)
    node = start_node(config, tmp_path / "daemon.log")
    try:
        assert [m["status"] for m in models(config)] == ["loaded"]
        log = (tmp_path / "daemon.log").read_text()
        assert "state_dir: cannot create" in log and "Not a directory" in log
        assert "Traceback" not in log
    finally:
        stop_node(node)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(),
                    reason="needs unshare -rm and tmpfs mounts (user namespaces)")
def test_a_full_state_dir_is_a_warning_not_a_node_that_will_not_start(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """A real ENOSPC: state_dir is a 16 KiB tmpfs, filled up before the node starts, in a
    mount namespace of the node's own."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = write_config(tmp_path, state_dir, tiny_gguf)
    fill = ('mount -t tmpfs -o size=16k tmpfs "$0" && '
            '{ head -c 1M /dev/zero > "$0/fill" 2>/dev/null; true; } && exec "$@"')
    node = start_node(config, tmp_path / "daemon.log",
                      ["unshare", "-rm", "sh", "-c", fill, str(state_dir)])
    try:
        assert [m["status"] for m in models(config)] == ["loaded"]
        log = (tmp_path / "daemon.log").read_text()
        assert "cannot write" in log and "neuron.pid: No space left on device" in log
        assert "cannot update" in log and "workers.json: No space left on device" in log
        assert "Traceback" not in log
    finally:
        stop_node(node)


def test_kill_9_of_the_supervisor_then_a_restart_stops_the_wrapped_server(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    state_dir = tmp_path / "state"
    config = write_config(tmp_path, state_dir, tiny_gguf)
    first = start_node(config, tmp_path / "first.log")
    server = wrapper = None
    try:
        [wrapper] = psutil.Process(first.pid).children()
        [server] = poll_until(lambda: wrapper.children(), 10)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        poll_until(lambda: not pid_alive(wrapper.pid), 10)
        assert pid_alive(server.pid)  # the parent-death signal reached only the wrapper
        second = start_node(config, tmp_path / "second.log")
        try:
            assert not pid_alive(server.pid)
            log = (tmp_path / "second.log").read_text()
            assert f"stopping orphaned worker pid {server.pid} " in log
            assert f"group {wrapper.pid}" in log
            assert [m["status"] for m in models(config)] == ["loaded"]
        finally:
            stop_node(second)
    finally:
        for proc in (server, wrapper):
            if proc is not None:
                kill_quietly(proc.pid)
        kill_quietly(first.pid)
        first.wait(10)


def test_a_log_dir_that_cannot_be_created_sends_worker_output_to_the_journal(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    config = write_config(tmp_path, tmp_path / "state", tiny_gguf)
    config.write_text(config.read_text().replace(f'log_dir = "{tmp_path}/log"',
                                                 f'log_dir = "{tmp_path}/a-file/log"'))
    node = start_node(config, tmp_path / "daemon.log")
    try:
        [model] = models(config)
        assert model["status"] == "loaded"
        assert "cannot write the log" in model["warning"]
        log = (tmp_path / "daemon.log").read_text()
        assert "log_dir: cannot create" in log and "Traceback" not in log
        assert "fake worker pid" in log  # the worker's own output, here
    finally:
        stop_node(node)
