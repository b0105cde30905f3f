"""What operators look for in `neuronctl status`: the fields of GET /models behind it, the
table (at 80 columns, long ids included), and the commands against a real daemon."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer
from aiohttp.test_utils import TestClient, TestServer
from rich.console import Console

from neuronctl.api.app import create_app
from neuronctl.api.traffic import RouterStats
from neuronctl.api.v1 import ROUTER_STATS
from neuronctl.cli.formats import status_table
from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig

from ..helpers import (
    NEURONCTL,
    MakeRegistry,
    clean_env,
    free_port,
    kill_quietly,
    llama_required,
    poll_until,
)

# --- the API fields ---------------------------------------------------------------------------


async def test_models_lists_context_memory_ttl_and_traffic(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    config = dataclasses.replace(
        node_config, ttl_s=300.0,
        default_models=(ModelSpec("default", harness="fake"),),
        models=(ModelSpec("cat", harness="fake", n_ctx=512, pinned=True),),
        harness={"fake": HarnessConfig(n_ctx=1024)},
    )
    counters = RouterStats()  # the app's, and what the registry reads for `/models`
    registry = make_registry(config, activity=counters.activity)
    await registry.load(ModelSpec("default", harness="fake"))
    await registry.load(ModelSpec("by-hand", harness="fake", ttl_s=60.0))
    app = create_app(registry, stats=counters)
    async with TestClient(TestServer(app)) as client:
        async with client.get("/models") as resp:
            by_id = {m["id"]: m for m in await resp.json()}
        default, by_hand, cat = by_id["default"], by_id["by-hand"], by_id["cat"]
        # A default model idles out only by its own ttl_s; the others by theirs or the node's.
        assert (default["ttl_s"], by_hand["ttl_s"], cat["ttl_s"]) == (None, 60.0, 300.0)
        assert (default["pinned"], by_hand["pinned"], cat["pinned"]) == (True, False, True)
        # The spec's n_ctx, else the harness table's.
        assert (by_hand["n_ctx"], cat["n_ctx"]) == (1024, 512)
        assert by_hand["rss_bytes"] > 1_000_000 and cat["rss_bytes"] is None
        assert (by_hand["in_flight"], by_hand["queued"]) == (0, 0)
        assert cat["status"] == "unloaded" and cat["idle_until"] is None
        assert default["idle_until"] is None  # no TTL
        # Idle since it became loaded: unloaded ttl_s after that.
        assert abs(by_hand["idle_until"] - (by_hand["since"] + 60.0)) < 0.01

        stats = app[ROUTER_STATS].model("by-hand")
        stats.in_flight, stats.last_used = 2, time.monotonic()
        async with client.get("/models") as resp:
            busy = {m["id"]: m for m in await resp.json()}["by-hand"]
        assert (busy["in_flight"], busy["idle_until"]) == (2, None)  # no countdown while busy

        stats.in_flight = 0
        async with client.get("/models") as resp:
            idle: dict[str, Any] = {m["id"]: m for m in await resp.json()}["by-hand"]
        # The countdown runs from its last request.
        assert abs(idle["idle_until"] - (time.time() + 60.0)) < 5
        assert idle["idle_until"] > by_hand["idle_until"]


# --- the table ----------------------------------------------------------------------------------

NOW = 1_800_000_000.0
LONG_ID = "org-with-a-long-name/" + "Qwen3-30B-A3B-Instruct-2507-GGUF-" * 3
LONG_ID += "x" * (120 - len(LONG_ID))


def entry(model_id: str, status: str = "loaded", **fields: Any) -> dict[str, Any]:
    """A /models entry as the daemon lists it, `fields` overriding."""
    loaded = status == "loaded"
    return {
        "id": model_id, "harness": "llama-server", "status": status, "devices": [],
        "vram_used_mb": None, "pid": 4242 if loaded else None, "port": None, "endpoint": None,
        "load_ms": 1500, "restarts": 0, "error": None, "exit_code": None, "pinned": False,
        "n_ctx": None, "rss_bytes": 412 << 20 if loaded else None, "ttl_s": None,
        "in_flight": 0, "queued": 0, "idle_until": None, "download": None,
        "since": NOW - 75, "uptime_s": 75.0 if loaded else None, **fields,
    }


def render(models: list[dict[str, Any]], width: int | None = 80) -> list[str]:
    console = Console(width=width or 1000, record=True, color_system=None)
    console.print(status_table(models, width=width, now=NOW))
    return [line.rstrip() for line in console.export_text().splitlines()]


def cell(lines: list[str], column: str, line: int = 1) -> str:
    """A left-aligned column's text on `line`: from its header to the next one's."""
    header = lines[0]
    start = header.index(column)
    following = HEADER[HEADER.index(column) + 1]
    return lines[line][start:header.index(following)].strip()


def row(lines: list[str], model_id: str) -> list[str]:
    (found,) = [line.split() for line in lines if line.split()[:1] == [model_id]]
    return found[1:]


HEADER = ["MODEL", "STATUS", "MEMORY", "DEVICES", "CTX", "UNTIL", "Q/RUN", "UPTIME", "RESTARTS"]


def test_a_long_id_folds_and_every_other_column_stays_whole_at_80_columns() -> None:
    gpu = entry(LONG_ID, devices=[0, 1], vram_used_mb=1229, n_ctx=32768, ttl_s=300.0,
                idle_until=NOW + 240, queued=2, in_flight=1, uptime_s=3900.0, restarts=3)
    downloading = entry("dl", "downloading", n_ctx=4096, queued=1, download={
        "file": "m.gguf", "done_bytes": 123 << 20, "total_bytes": 396 << 20})
    lines = render([gpu, entry("small"), downloading])
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == HEADER
    # The id whole, folded over the MODEL column's lines; the other cells on its first.
    model_width = lines[0].index("STATUS") - 1
    folded = [line for line in lines[1:] if not line.startswith(("small", "dl", " "))]
    assert "".join(line[:model_width].strip() for line in folded) == LONG_ID
    assert lines[1].split()[1:] == ["loaded", "412", "MiB", "GPU", "0,1", "32768", "in", "4m",
                                    "2/1", "1h05m", "3"]
    assert lines[2].split()[1:] == ["1.2", "GiB", "VRAM"]  # VRAM under RSS
    assert row(lines, "small") == ["loaded", "412", "MiB", "CPU", "-", "-", "0/0", "1m15s",
                                   "0"]
    # A download's bytes in the MEMORY column, the total under them.
    assert row(lines, "dl") == ["downloading", "123", "MiB", "CPU", "4096", "-", "1/0", "-",
                                "0"]
    dl = next(i for i, line in enumerate(lines) if line.startswith("dl "))
    assert lines[dl + 1].split() == ["of", "396", "MiB"]


def test_short_ids_are_not_folded_when_they_fit() -> None:
    lines = render([entry("Qwen/Qwen3-0.6B-GGUF"), entry("gemma-3-270m", "unloaded")])
    assert lines[0].split() == HEADER
    assert row(lines, "Qwen/Qwen3-0.6B-GGUF")[0] == "loaded"
    assert row(lines, "gemma-3-270m")[0] == "unloaded"
    assert len(lines) == 3


def test_without_a_width_ids_stay_on_one_line() -> None:
    lines = render([entry(LONG_ID), entry("small")], width=None)
    assert row(lines, LONG_ID)[0] == "loaded"
    assert len(lines) == 3


def test_an_unloaded_catalogue_model_is_dim() -> None:
    console = Console(width=80, record=True, color_system="standard", force_terminal=True)
    console.print(status_table([entry("cat", "unloaded", n_ctx=4096, ttl_s=600.0)],
                                width=80, now=NOW))
    text = console.export_text(styles=True)
    (line,) = [line for line in text.splitlines() if "cat" in line]
    assert "\x1b[2m" in line  # dim
    lines = render([entry("cat", "unloaded", n_ctx=4096, ttl_s=600.0)])
    # No worker: no memory, no devices yet, no traffic; its TTL as it will count.
    assert row(lines, "cat") == ["unloaded", "-", "-", "4096", "ttl", "10m", "-", "-", "0"]


@pytest.mark.parametrize(("fields", "until"), [
    ({"pinned": True}, "pinned"),
    ({}, "-"),  # evictable, no TTL
    ({"ttl_s": 300.0, "idle_until": NOW + 240.4}, "in 4m"),
    ({"ttl_s": 300.0, "idle_until": NOW + 30}, "in 30s"),
    ({"ttl_s": 300.0, "idle_until": NOW - 1}, "in 0s"),  # due: the reaper's next tick
    ({"ttl_s": 300.0, "in_flight": 1}, "ttl 5m"),  # busy: the countdown has not begun
    ({"ttl_s": 90.0, "pinned": True}, "ttl 90s"),  # pinned against eviction, not the TTL
    ({"ttl_s": 7500.0, "idle_until": NOW + 7500}, "in 2h05m"),
], ids=["pinned", "none", "minutes", "seconds", "due", "busy", "pinned-ttl", "hours"])
def test_until(fields: dict[str, Any], until: str) -> None:
    assert cell(render([entry("m", **fields)]), "UNTIL") == until


@pytest.mark.parametrize(("fields", "memory", "devices"), [
    ({"rss_bytes": 412 << 20}, "412 MiB", "CPU"),
    ({"rss_bytes": 5 << 30, "devices": [1]}, "5.0 GiB", "GPU 1"),
    ({"rss_bytes": 900 << 10}, "900 KiB", "CPU"),
    ({"rss_bytes": None, "vram_used_mb": 1229}, "1.2 GiB VRAM", "GPU"),  # devices unnamed
    ({"rss_bytes": None}, "-", "CPU"),
    # A saved prompt cache's bytes on disk, an unloaded model's too.
    ({"rss_bytes": None, "prompt_cache_bytes": 12 << 20}, "12 MiB cache", "CPU"),
])
def test_memory_units_and_devices(fields: dict[str, Any], memory: str, devices: str) -> None:
    lines = render([entry("m", **fields)])
    assert (cell(lines, "MEMORY"), cell(lines, "DEVICES")) == (memory, devices)


# --- against a real daemon ----------------------------------------------------------------------


def cli(*args: str, columns: int = 80, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NEURONCTL), *args], env=clean_env(COLUMNS=str(columns)),
                          capture_output=True, text=True, timeout=timeout)


def listed(url: str) -> dict[str, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(url + "/models", timeout=5) as resp:
            return {m["id"]: m for m in json.loads(resp.read())}
    except (urllib.error.URLError, ConnectionError):
        return None  # not serving yet


@pytest.mark.llama
@llama_required
def test_status_load_by_id_ps_and_unload_all_against_a_real_daemon(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(f"""
port = {port}
host = "127.0.0.1"
log_dir = "log"
state_dir = "state"
stop_timeout_s = 5.0

[[models]]
model_id = "{LONG_ID}"
path = "{tiny_gguf}"
n_ctx = 128
""")
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "daemon.log").open("wb") as daemon_log:
        daemon = subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                  env=clean_env(), stdout=subprocess.DEVNULL, stderr=daemon_log)
    try:
        poll_until(lambda: listed(url), timeout=60)
        # The catalogue model, unloaded, in an 80-column table.
        shown = cli("status", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert lines[0].split() == HEADER
        assert lines[1].split()[1:] == ["unloaded", "-", "-", "128", "-", "-", "-", "0"]
        # On a terminal the table is headed by the node that answered (piped: not, above).
        on_tty = subprocess.run([str(NEURONCTL), "status", "--config", str(config)],
                                env=clean_env(COLUMNS="80", TTY_COMPATIBLE="1"),
                                capture_output=True, text=True, timeout=120)
        head = re.sub(r"\x1b\[[0-9;]*m", "", on_tty.stdout).splitlines()
        assert re.fullmatch(rf"node \S+ at {re.escape(url)}", head[0]), head
        assert head[1].split() == HEADER

        # Loaded by its id alone (the catalogue's entry), with a TTL for this load.
        loaded = cli("load", LONG_ID, "--ttl", "600", "--config", str(config))
        assert loaded.returncode == 0, loaded.stderr
        assert f"{LONG_ID} loaded in" in loaded.stdout
        model = (listed(url) or {})[LONG_ID]
        assert (model["status"], model["ttl_s"], model["n_ctx"]) == ("loaded", 600.0, 128)
        assert model["rss_bytes"] > 1 << 20
        other = cli("load", "other", "--path", str(tiny_gguf), "--n-ctx", "64", "--url", url)
        assert other.returncode == 0, other.stderr

        # `ps` is `status`.
        ps = cli("ps", "--url", url)
        assert ps.returncode == 0, ps.stderr
        lines = ps.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert lines[0].split() == HEADER
        assert lines[1].startswith(LONG_ID[:10])  # folded, the other cells on its first line
        assert (cell(lines, "STATUS"), cell(lines, "DEVICES"), cell(lines, "Q/RUN")) == (
            "loaded", "CPU", "0/0")
        assert cell(lines, "MEMORY").endswith(" MiB") and "128" in lines[1].split()
        assert cell(lines, "UNTIL") in ("in 10m", "in 9m")
        status, size, unit, devices = row(lines, "other")[:4]
        assert (status, size.isdigit(), unit, devices) == ("loaded", True, "MiB", "CPU")

        # Every loaded model unloaded, one line each; the catalogue's is listed again.
        unloaded = cli("unload", "--all", "--url", url)
        assert unloaded.returncode == 0, unloaded.stderr
        assert sorted(unloaded.stdout.splitlines()) == sorted(
            [f"{LONG_ID} unloaded", "other unloaded"])
        after = listed(url) or {}
        assert list(after) == [LONG_ID] and after[LONG_ID]["status"] == "unloaded"
        nothing = cli("unload", "--all", "--url", url)
        assert (nothing.returncode, nothing.stdout.strip()) == (0, "no models loaded")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                kill_quietly(daemon.pid)
                daemon.wait(10)
    assert daemon.returncode == 0


def test_a_harness_column_when_two_harnesses_run_side_by_side() -> None:
    lines = render([entry("gemma", harness="llama-cpp-python"), entry("native")])
    assert lines[0].split() == ["MODEL", "HARNESS", *HEADER[1:]]
    assert row(lines, "gemma")[:2] == ["llama-cpp-python", "loaded"]
    assert row(lines, "native")[:2] == ["llama-server", "loaded"]
    assert max(len(line) for line in lines) <= 80
    # One harness: no column that says the same on every row.
    assert render([entry("native")])[0].split() == HEADER


def test_watch_waits_through_activation_instead_of_exiting() -> None:
    """`status --watch` while the daemon activates: what it says, then the table once its
    API answers (the stream's snapshot); not `neuron is starting` and exit 1."""
    from neuronctl.cli.status import _follow
    from neuronctl.client import Client, DaemonNotRunning

    class Activating(Client):
        tries = 0

        def events(self, read_timeout_s: float = 45.0) -> Any:
            Activating.tries += 1
            if Activating.tries <= 2:
                raise DaemonNotRunning(self.url, (4711, f"loading {Activating.tries}/2 slow"))
            yield "snapshot", {"models": []}
            raise KeyboardInterrupt  # the operator's Ctrl-C ends the watch

    said: list[str] = []
    shown: list[str] = []
    with pytest.raises(typer.Exit) as ended:
        _follow(Activating("http://127.0.0.1:1"), lambda name, data: shown.append(name),
                said.append, sleep=lambda s: None)
    assert ended.value.exit_code == 0
    assert said == [
        "neuron is starting (pid 4711): loading 1/2 slow; http://127.0.0.1:1 answers once "
        "its default models are loaded",
        "neuron is starting (pid 4711): loading 2/2 slow; http://127.0.0.1:1 answers once "
        "its default models are loaded"]
    assert shown == ["snapshot"]


def test_spans_read_as_the_table_says_them_whatever_the_node_sent() -> None:
    from neuronctl.cli.formats import fmt_span

    assert [fmt_span(s) for s in (45, 300, 7500)] == ["45s", "5m", "2h05m"]
    # A huge keep_alive (or a value no node should send) never breaks the table.
    assert [fmt_span(s) for s in (1e12, float("inf"), float("nan"), -3)] == \
        ["long", "long", "0s", "0s"]
