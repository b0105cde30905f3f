"""While activation runs the API does not answer yet; `neuronctl status` says what the
daemon is doing instead of "not running"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from neuronctl import __version__
from neuronctl.notes import StartingNote, read_starting

from .fakes import FAKE_LLAMA_SERVER
from .gpu_fakes import wrapper
from .helpers import NEURONCTL, clean_env, free_port, kill_quietly, poll_until


def test_the_note_names_a_live_neuronctl_only(tmp_path: Path) -> None:
    assert read_starting(tmp_path) is None
    StartingNote(tmp_path).write("loading 2/3 qwen")  # by this pid: pytest, not a neuronctl
    assert read_starting(tmp_path) is None
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "neuronctl"])
    try:
        (tmp_path / "starting").write_text(f"{daemon.pid}: loading 2/3 qwen\n")
        # poll: until its exec is done, /proc shows the parent's command line
        assert poll_until(lambda: read_starting(tmp_path), 10) == (daemon.pid, "loading 2/3 qwen")
    finally:
        daemon.kill()
        daemon.wait()
    assert read_starting(tmp_path) is None  # no such process any more
    (tmp_path / "starting").unlink()
    os.mkfifo(tmp_path / "starting")  # a FIFO is never opened
    assert read_starting(tmp_path) is None


def test_status_during_activation_says_starting_and_what_it_loads(
    tmp_path: Path, tiny_gguf: Path,
) -> None:
    binary = wrapper(tmp_path / "llama-server", FAKE_LLAMA_SERVER)
    config = tmp_path / "neuron.toml"
    port = free_port()
    config.write_text(
        f'host = "127.0.0.1"\nport = {port}\nlog_dir = "log"\nstate_dir = "state"\n'
        f'stop_timeout_s = 2.0\n[harness.llama-server]\nbinary = "{binary}"\n'
        f'[[default_models]]\nmodel_id = "tiny"\nharness = "llama-server"\n'
        f'path = "{tiny_gguf}"\nargs = ["--fake-load-s", "6"]\n')
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        node = subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until((tmp_path / "log" / "tiny.log").exists, 30)  # loading
        status = subprocess.run([NEURONCTL, "status", "--config", str(config)],
                                env=clean_env(), capture_output=True, text=True, timeout=30)
        assert status.returncode == 1
        assert f"neuron is starting (pid {node.pid}): loading 1/1 tiny" in status.stderr
        # --url naming where this config's daemon listens: the same; another URL: not.
        for url, starting in ((f"http://127.0.0.1:{port}", True),
                              (f"http://127.0.0.1:{free_port()}", False)):
            status = subprocess.run(
                [NEURONCTL, "status", "--config", str(config), "--url", url],
                env=clean_env(), capture_output=True, text=True, timeout=30)
            assert status.returncode == 1
            assert ("neuron is starting" in status.stderr) is starting, status.stderr
        poll_until(lambda: b"listening" in log.read_bytes(), 30)
        assert not (tmp_path / "state" / "starting").exists()  # gone once it serves
        journal = log.read_text()
        # uvloop: installed with neuronctl, and event_loop = "auto" takes it.
        assert f"neuronctl {__version__} starting (uvloop): config {config}, 1 default model," \
            in journal
        assert "API key not set" in journal
        status = subprocess.run([NEURONCTL, "status", "--config", str(config)],
                                env=clean_env(), capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "tiny" in status.stdout
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        finally:
            kill_quietly(node.pid)
