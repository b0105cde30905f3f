"""`neuronctl pull`, `models`/`ls`, `show` and `rm` as an operator runs them: without a
daemon (the store's child process) against a local Hub over HTTP, and through a daemon
that prefetches its catalogue after activation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from neuronctl.units import fmt_bytes

from ..fake_hub_server import FakeHubServer
from ..gpu_fakes import gpu, install_fake_smi, lay_out_hf_cache
from ..helpers import NEURONCTL, clean_env, free_port, poll_until, start_daemon

BIG = os.urandom(12 << 20)  # past huggingface_hub's 10 MiB write chunk: a partial is kept
SMALL = b"GGUF" + os.urandom(4000)


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def hub() -> Iterator[FakeHubServer]:
    with FakeHubServer({"org/big-GGUF": {"big-Q4_K_M.gguf": BIG},
                        "org/small-GGUF": {"small-Q8_0.gguf": SMALL},
                        "org/extra-GGUF": {"extra-Q5_K_M.gguf": SMALL + b"x"}}) as hub:
        yield hub


def node_config(tmp_path: Path, cache: Path, tiny: Path | None = None) -> Path:
    config = tmp_path / "neuron.toml"
    body = (f'port = {free_port()}\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/log"\n'
            f'[harness.llama-cpp-python]\nhf_cache = "{cache}"\n'
            '[[default_models]]\nmodel_id = "small"\nrepo = "org/small-GGUF"\nquant = "Q8_0"\n'
            '[[models]]\nmodel_id = "big"\nrepo = "org/big-GGUF"\nquant = "Q4_K_M"\n')
    if tiny is not None:
        body += f'[[models]]\nmodel_id = "mine"\npath = "{tiny}"\n'
    config.write_text(body)
    return config


def cli(*args: str, hub: FakeHubServer | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    # Wide enough that a progress row never wraps, whatever rate it shows.
    env = clean_env(COLUMNS="200", **({"HF_ENDPOINT": hub.url} if hub else {}))
    return subprocess.run([str(NEURONCTL), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_pull_without_a_daemon_shows_progress_and_a_summary(
        tmp_path: Path, hub: FakeHubServer) -> None:
    config = node_config(tmp_path, tmp_path / "hf")
    done = cli("pull", "big", "org/small-GGUF:Q8_0", "-c", str(config), hub=hub)
    assert done.returncode == 0, done.stderr
    assert "big: big-Q4_K_M.gguf" in done.stderr and "12.0/12.0 MiB" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("big: pulled 12 MiB in ") and "big-Q4_K_M.gguf" in lines[0]
    assert lines[1].startswith("org/small-GGUF:Q8_0: pulled 4 KiB")
    # Pulled: a second pull only finds it, and with --json says so in JSON lines.
    again = cli("pull", "--all", "--json", "-c", str(config), hub=hub)
    assert again.returncode == 0, again.stderr
    events = json_lines(again.stdout)
    assert [(e["event"], e["model"], e["cached"]) for e in events] == \
        [("done", "small", True), ("done", "big", True)]
    assert hub.gets("big-Q4_K_M.gguf") == [None]


def test_a_pull_killed_midway_resumes_where_it_stopped(tmp_path: Path,
                                                       hub: FakeHubServer) -> None:
    config = node_config(tmp_path, tmp_path / "hf")
    hub.hold_at = 11 << 20
    env = clean_env(HF_ENDPOINT=hub.url)
    first = subprocess.Popen([str(NEURONCTL), "pull", "big", "--json", "-c", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        assert hub.holding.wait(60)
        partial = poll_until(lambda: next(
            (p for p in (tmp_path / "hf").rglob("*.incomplete") if p.stat().st_size), None), 30)
        store_child = psutil.Process(first.pid).children(recursive=True)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the terminal closed: CLI and child at once
        first.wait(10)
        assert first.stdout is not None
        first.stdout.close()
    # The child dies once the write it is in returns: what it left is then what it wrote.
    _, alive = psutil.wait_procs(store_child, timeout=10)
    assert not alive
    kept = partial.stat().st_size
    assert 0 < kept < len(BIG)
    hub.release.set()
    second = cli("pull", "big", "--json", "-c", str(config), hub=hub)
    assert second.returncode == 0, second.stderr
    assert hub.gets("big-Q4_K_M.gguf") == [None, f"bytes={kept}-"]
    (done,) = [e for e in json_lines(second.stdout) if e["event"] == "done"]
    assert Path(done["path"]).read_bytes() == BIG
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


def test_a_pull_the_disk_cannot_hold_is_refused_with_both_numbers(
        tmp_path: Path, hub: FakeHubServer) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        config = node_config(tmp_path, disk / "hf")
        refused = cli("pull", "big", "-c", str(config), hub=hub)
        assert refused.returncode == 1
        assert f"not enough disk space for org/big-GGUF:big-Q4_K_M.gguf: it needs 12 MiB, " \
            f"the Hugging Face cache {disk}/hf has 4 MiB free" in refused.stderr
        assert hub.gets("big-Q4_K_M.gguf") == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_models_show_and_rm_without_a_daemon(tmp_path: Path, tiny_gguf: Path) -> None:
    cache = tmp_path / "hf"
    lay_out_hf_cache(cache, "org/small-GGUF", {"small-Q8_0.gguf": tiny_gguf.read_bytes()})
    lay_out_hf_cache(cache, "org/big-GGUF", {"big-Q4_K_M.gguf": b"GGUF" + b"\0" * 5000})
    config = node_config(tmp_path, cache, tiny_gguf)
    listed = cli("models", "--json", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    models = {m["file"] or m["path"]: m for m in json.loads(listed.stdout)["models"]}
    assert models["small-Q8_0.gguf"]["ids"] == ["small"]
    assert models["small-Q8_0.gguf"]["default"] is True
    assert models[str(tiny_gguf)]["ids"] == ["mine"]
    table = cli("ls", "-c", str(config))
    assert table.returncode == 0, table.stderr
    assert "org/big-GGUF/big-Q4_K_M.gguf" in table.stdout
    assert f"total {fmt_bytes(2 * tiny_gguf.stat().st_size + 5004)} in 3 model(s)" in \
        table.stdout
    shown = cli("show", "small", "--json", "-c", str(config))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["header"]["architecture"] == "llama"
    by_path = cli("show", str(tiny_gguf), "-c", str(config))
    assert "architecture    llama" in by_path.stdout and "chat template   yes" in by_path.stdout
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**32 - 1).to_bytes(8, "little")
                        + (1).to_bytes(8, "little") + b"\0" * 260)
    refused = cli("show", str(hostile), "-c", str(config))
    assert refused.returncode == 1 and "cannot read its GGUF header" in refused.stderr
    # A default model stays unless --force; another goes, and says what it freed.
    kept = cli("rm", "small", "-c", str(config))
    assert kept.returncode == 1
    assert "refusing to remove small: small is a default model" in kept.stderr
    gone = cli("rm", "big", "--json", "-c", str(config))
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["freed_bytes"] == 5004
    forced = cli("rm", "small", "--force", "-c", str(config))
    assert forced.returncode == 0 and forced.stdout.splitlines()[-1] == \
        f"freed {fmt_bytes(tiny_gguf.stat().st_size)}"
    assert json.loads(cli("models", "--json", "-c", str(config)).stdout)["models"][0][
        "source"] == "path"


def test_a_daemon_prefetches_after_activation_and_the_commands_go_through_it(
        tmp_path: Path, hub: FakeHubServer, tiny_gguf: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, free=30000, total=40960)])
    cache = tmp_path / "hf"
    lay_out_hf_cache(cache, "org/tiny-GGUF", {"tiny-Q8_0.gguf": tiny_gguf.read_bytes()})
    hub.hold_at = 11 << 20  # big's download stalls: activation must not wait for it
    daemon = start_daemon(tmp_path / "node", (
        # A repo pulled by name goes to the default harness's cache: the test's too.
        f'hf_cache = "{cache}"\n\n[harness.llama-cpp-python]\nhf_cache = "{cache}"\n\n'
        '[[default_models]]\nmodel_id = "tiny"\nharness = "llama-server"\n'
        'repo = "org/tiny-GGUF"\nquant = "Q8_0"\n\n'
        '[[models]]\nmodel_id = "big"\nharness = "llama-server"\nrepo = "org/big-GGUF"\n'
        'quant = "Q4_K_M"\n\n'
        '[[models]]\nmodel_id = "small"\nharness = "llama-server"\n'
        'repo = "org/small-GGUF"\nquant = "Q8_0"\n'), settings="prefetch = true\n",
        timeout=60)
    config = tmp_path / "node" / "neuron.toml"
    try:
        assert daemon.model("tiny")["status"] == "loaded"
        assert hub.holding.wait(60)
        big = poll_until(lambda: daemon.model("big")["pull"], 30)
        assert (big["state"], big["by"]) == ("downloading", "prefetch")
        assert daemon.model("small")["pull"]["state"] == "queued"  # one at a time
        status = cli("status", "-c", str(config))
        assert "big: prefetch download downloading" in status.stdout
        assert "small: prefetch download queued" in status.stdout
        hub.release.set()
        poll_until(lambda: daemon.model("small")["pull"]["state"] == "done", 60)
        assert daemon.model("big")["pull"]["state"] == "done"
        assert daemon.model("big")["status"] == "unloaded"  # downloaded, never loaded
        # `pull` through the daemon: already there, said at once.
        pulled = cli("pull", "small", "-c", str(config))
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.startswith("small: already in the cache")
        # A repo the daemon downloads, its progress read from /models/events.
        extra = cli("pull", "org/extra-GGUF:Q5_K_M", "--json", "-c", str(config))
        assert extra.returncode == 0, extra.stderr
        (done,) = [e for e in json_lines(extra.stdout) if e["event"] == "done"]
        assert (done["model"], done["by"], done["state"]) == \
            ("org/extra-GGUF:Q5_K_M", "client", "done")
        assert Path(done["path"]).read_bytes() == SMALL + b"x"
        assert hub.gets("extra-Q5_K_M.gguf") == [None]
        # `show` through the daemon, with its nvidia-smi.
        shown = cli("show", "tiny", "-c", str(config))
        assert shown.returncode == 0, shown.stderr
        assert "fits on GPU 0 with" in shown.stdout
        # `models` through the daemon knows what is loaded.
        listing = json.loads(cli("models", "--json", "-c", str(config)).stdout)
        loaded = {m["file"]: m["loaded"] for m in listing["models"]}
        assert loaded == {"tiny-Q8_0.gguf": True, "big-Q4_K_M.gguf": False,
                          "small-Q8_0.gguf": False, "extra-Q5_K_M.gguf": False}
        # `rm` refuses what is loaded, takes what is not.
        status_, _ = daemon.request("POST", "/models/load", {"model_id": "small"}, timeout=60)
        assert status_ == 200
        refused = cli("rm", "small", "-c", str(config))
        assert refused.returncode == 1
        assert "refusing to remove small: small is loaded" in refused.stderr
        freed = cli("rm", "big", "-c", str(config))
        assert freed.returncode == 0, freed.stderr
        assert freed.stdout.splitlines()[-1] == "freed 12 MiB"
    finally:
        hub.release.set()
        daemon.stop()
