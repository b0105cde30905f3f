"""Reload (POST /reload, neuronctl reload, SIGHUP) and the daemon's log formats."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.config import ConfigError, ModelSpec, NeuronConfig, load_config
from neuronctl.supervisor.activation import load_default_models
from neuronctl.supervisor.harness import Harness, build_harnesses
from neuronctl.supervisor.registry import ModelRegistry
from neuronctl.supervisor.reload import Reloader

from ..fakes import FakeHarness
from ..helpers import NEURONCTL, MakeRegistry, clean_env, free_port, poll_until


def write(path: Path, models: dict[str, list[str]], extra: str = "") -> None:
    entries = "".join(
        f'[[default_models]]\nmodel_id = "{m}"\nharness = "fake"\nargs = {json.dumps(a)}\n'
        for m, a in models.items()
    )
    path.write_text(f'host = "127.0.0.1"\nlog_dir = "log"\nstate_dir = "state"\n'
                    f'stop_timeout_s = 2.0\n{extra}\n{entries}')


def with_fake(config: NeuronConfig) -> dict[str, Harness]:
    return build_harnesses(config, {"fake": FakeHarness()})


def pids(registry: ModelRegistry) -> dict[str, int | None]:
    return {r.model_id: r.worker.pid if r.worker else None for r in registry.models()}


async def test_reload_adds_removes_and_changes_models_and_leaves_the_rest(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    path = tmp_path / "neuron.toml"
    write(path, {"a": [], "b": [], "same": []})

    config = load_config(path, {})
    registry = make_registry(config, with_fake(config))
    reloader = Reloader(registry, path, build=with_fake)
    await load_default_models(registry, config.default_models)
    await registry.load(ModelSpec("by-hand", harness="fake"))
    before = pids(registry)

    write(path, {"b": ["--delay", "0.1"], "same": [], "c": []}, extra="log_keep = 2")
    result = await reloader.reload()
    assert (result.added, result.removed, result.reloaded) == (["c"], ["a"], ["b"])
    assert result.failed == {} and result.needs_restart == []
    after = pids(registry)
    assert set(after) == {"b", "same", "c", "by-hand"}
    assert after["same"] == before["same"] and after["by-hand"] == before["by-hand"]
    assert after["b"] != before["b"]  # reloaded: a new process
    assert registry.config.log_keep == 2  # node settings apply from now on

    # Settings only a restart can apply are reported, not half-applied.
    write(path, {"b": ["--delay", "0.1"], "same": [], "c": []}, extra="port = 1")
    result = await reloader.reload()
    assert result.needs_restart == ["port"] and registry.config.port == 13131
    assert "needs a restart to apply: port" in result.summary()


async def test_a_broken_config_changes_nothing(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    path = tmp_path / "neuron.toml"
    write(path, {"a": []})

    config = load_config(path, {})
    registry = make_registry(config, with_fake(config))
    reloader = Reloader(registry, path, build=with_fake)
    await load_default_models(registry, config.default_models)
    before = pids(registry)
    path.write_text(path.read_text() + "\nbogus_key = 1\n")
    with pytest.raises(ConfigError, match="bogus_key: unknown key"):
        await reloader.reload()
    assert pids(registry) == before and registry.config is config
    app = create_app(registry, None, reloader)
    async with TestClient(TestServer(app)) as client, client.post("/reload") as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert "reload refused, nothing changed" in answer["error"]
    assert "bogus_key" in answer["error"]
    assert pids(registry) == before


def start_daemon(tmp_path: Path, config: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    with (tmp_path / "daemon.log").open("wb") as out:
        return subprocess.Popen([NEURONCTL, "start", "--config", str(config), *args],
                                env={**clean_env(), **env}, stdout=out, stderr=subprocess.STDOUT)


def test_sighup_and_neuronctl_reload_reread_the_config(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "neuron.toml"
    base = f'host = "127.0.0.1"\nport = {port}\nlog_dir = "log"\nstate_dir = "state"\n'
    config.write_text(base)
    daemon = start_daemon(tmp_path, config)
    log = tmp_path / "daemon.log"
    try:
        poll_until(lambda: b"listening" in log.read_bytes(), 30)
        # A model whose file is missing fails fast: enough to see reload load it.
        config.write_text(base + '[[default_models]]\nmodel_id = "new"\npath = "missing.gguf"\n')
        daemon.send_signal(signal.SIGHUP)
        poll_until(lambda: b"reloaded config: 1 added" in log.read_bytes(), 30)
        assert b"model file not found" in log.read_bytes()

        config.write_text(base)
        reload = subprocess.run([NEURONCTL, "reload", "--config", str(config)],
                                capture_output=True, text=True, timeout=60, env=clean_env())
        assert reload.returncode == 0, reload.stderr
        assert "0 added, 1 removed, 0 reloaded" in reload.stdout

        config.write_text(base + "nonsense = true\n")
        refused = subprocess.run([NEURONCTL, "reload", "--url", f"http://127.0.0.1:{port}"],
                                 capture_output=True, text=True, timeout=60, env=clean_env())
        assert refused.returncode == 1
        assert "reload refused, nothing changed" in refused.stderr
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


@pytest.mark.parametrize(("fmt", "journal"),
                         [("json", ""), ("text", "journal"), ("text", "stale"), ("text", "")])
def test_log_formats(tmp_path: Path, fmt: str, journal: str) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {free_port()}\nlog_dir = "log"\n'
                      'state_dir = "state"\n')
    log = tmp_path / "daemon.log"
    log.touch()
    # systemd names the stream it connected by device and inode; start_daemon reuses the file.
    st = log.stat()
    env = {"journal": {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
           "stale": {"JOURNAL_STREAM": "8:42"}}.get(journal, {})
    daemon = start_daemon(tmp_path, config, "--log-format", fmt, **env)
    try:
        poll_until(lambda: b"listening" in log.read_bytes(), 30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    lines = log.read_text().splitlines()
    listening = next(line for line in lines if "listening" in line)
    if fmt == "json":
        entries: list[dict[str, Any]] = [json.loads(line) for line in lines]
        entry = json.loads(listening)
        assert entry["level"] == "info" and entry["logger"] == "neuronctl"
        assert entry["ts"].endswith("Z") and len(entries) == len(lines)
    elif journal == "journal":  # the journal adds its own time stamps; <6> is "info"
        assert listening.startswith("<6>INFO neuronctl: listening on")
        assert all(line[:3] in {"<6>", "<4>", "<3>"} for line in lines), lines
    else:
        assert listening[:4].isdigit() and " INFO neuronctl: listening on" in listening


def write_catalogue(path: Path, defaults: dict[str, list[str]],
                    catalogue: dict[str, list[str]]) -> None:
    entries = "".join(
        f'[[{table}]]\nmodel_id = "{m}"\nharness = "fake"\nargs = {json.dumps(a)}\n'
        for table, models in (("default_models", defaults), ("models", catalogue))
        for m, a in models.items())
    path.write_text(f'host = "127.0.0.1"\nlog_dir = "log"\nstate_dir = "state"\n'
                    f'stop_timeout_s = 2.0\n{entries}')


async def test_reload_names_each_model_and_why_and_reloads_loaded_catalogue_models(
    tmp_path: Path, make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A loaded catalogue model changed is reloaded, one removed from the file unloaded, one
    not loaded takes its entry at its next load; each said per model, the reason in its
    events; a dry run says the same and changes nothing."""
    path = tmp_path / "neuron.toml"
    write_catalogue(path, {"gemma": []}, {"tiny": [], "gone": [], "idle": []})
    config = load_config(path, {})
    registry = make_registry(config, with_fake(config))
    reloader = Reloader(registry, path, build=with_fake)
    await load_default_models(registry, config.default_models)
    for model_id in ("tiny", "gone"):
        await registry.load(config.catalogue()[model_id])
    before = pids(registry)
    reasons: list[tuple[str, str]] = []
    registry.events.on_event(lambda e: reasons.append((e.model, e.reason)))

    write_catalogue(path, {"gemma": ["--delay", "0.1"]},
                    {"tiny": ["--delay", "0.2"], "idle": ["--delay", "0.3"]})
    dry = await reloader.reload(dry_run=True)
    expected = [
        "gemma: args [] → [--delay, 0.1], reloaded",
        "tiny: args [] → [--delay, 0.2], reloaded",
        "gone: removed from the config, unloaded",
        "idle: args [] → [--delay, 0.3], applies at its next load",
    ]
    assert dry.details == expected
    assert dry.summary() == "would reload config: 0 added, 1 removed, 2 reloaded"
    assert pids(registry) == before and registry.config == config  # nothing done

    with caplog.at_level(logging.INFO, "neuronctl.supervisor.activation"):
        result = await reloader.reload()
    assert result.details == expected
    assert (result.added, result.removed, result.reloaded) == ([], ["gone"], ["gemma", "tiny"])
    # The journal names a catalogue model as one, not as a default model.
    assert re.search(r"loaded default model gemma in ", caplog.text)
    assert re.search(r"loaded catalogue model tiny in ", caplog.text)
    after = pids(registry)
    assert set(after) == {"gemma", "tiny"}
    assert after["tiny"] != before["tiny"] and after["gemma"] != before["gemma"]
    assert registry.get("tiny").spec.args == ("--delay", "0.2")  # type: ignore[union-attr]
    assert ("tiny", "config changed: args [] → [--delay, 0.2]") in reasons
    assert ("gone", "config changed: removed from the config") in reasons
