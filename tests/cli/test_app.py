"""The `neuronctl` client commands, run as the console script against a stub or nothing."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from neuronctl import __version__
from neuronctl.cli.models import _loading_what
from neuronctl.client import Client
from neuronctl.logfiles import log_path

from ..helpers import NEURONCTL, clean_env, free_port


def neuronctl(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    assert NEURONCTL.exists(), f"console script missing: {NEURONCTL}"
    return subprocess.run(
        [str(NEURONCTL), *args],
        env=env or clean_env(), cwd=cwd, capture_output=True, text=True, timeout=30,
    )


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def squash(text: str) -> str:
    return "".join(text.split())


# --- a stub daemon ---------------------------------------------------------------------------


class Stub:
    """Canned answers by (method, path); records every request it gets."""

    def __init__(self) -> None:
        self.url = ""
        self.routes: dict[tuple[str, str], tuple[int, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.headers: list[dict[str, str]] = []


def stub_handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            stub.requests.append((method, self.path, json.loads(raw) if raw else None))
            stub.headers.append(dict(self.headers.items()))
            status, body = stub.routes.get((method, self.path), (404, {"error": "no such route"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.answer("GET")

        def do_POST(self) -> None:
            self.answer("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), stub_handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(
        target=server.serve_forever, args=(0.02,), name="stub daemon", daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


MODELS: list[dict[str, Any]] = [
    {
        "id": "Qwen/Qwen3-0.6B-GGUF", "harness": "llama-cpp-python", "status": "loaded",
        "devices": [0], "vram_used_mb": None, "pid": 4242, "port": 40001,
        "endpoint": "http://127.0.0.1:40001", "load_ms": 1500, "restarts": 0, "error": None,
        "exit_code": None, "log_path": "/var/log/neuron/Qwen--Qwen3-0.6B-GGUF.log",
        "since": 1.0, "uptime_s": 75.0,
    },
    {
        "id": "gemma-3-270m", "harness": "llama-cpp-python", "status": "failed",
        "devices": [], "vram_used_mb": None, "pid": None, "port": None, "endpoint": None,
        "load_ms": None, "restarts": 0, "error": "worker exited with code 3 while starting\nx",
        "exit_code": 3, "log_path": "/var/log/neuron/gemma-3-270m.log", "since": 1.0,
        "uptime_s": None,
    },
    {
        "id": "tiny", "harness": "llama-cpp-python", "status": "loading", "devices": [],
        "vram_used_mb": None, "pid": 99, "port": 40002, "endpoint": None, "load_ms": None,
        "restarts": 0, "error": None, "exit_code": None, "log_path": "/var/log/neuron/tiny.log",
        "since": 1.0, "uptime_s": None,
    },
]


# --- no daemon --------------------------------------------------------------------------------


def test_version() -> None:
    result = neuronctl("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"neuronctl {__version__}"


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["load", "m"], ["unload", "m"]],
    ids=" ".join,
)
def test_client_commands_without_a_daemon(command: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = neuronctl(*command, "--url", url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert stderr_lines(result) == [f"neuronctl: neuron is not running at {url}"]


def test_neuron_url_is_honoured_without_a_daemon() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = neuronctl("status", env=clean_env(NEURON_URL=url))
    assert result.returncode == 1
    assert stderr_lines(result) == [f"neuronctl: neuron is not running at {url}"]


def test_url_comes_from_the_config_port(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(f"port = {port}\n", encoding="utf-8")
    result = neuronctl("status", "--config", str(config))
    assert result.returncode == 1
    assert f"http://127.0.0.1:{port}" in result.stderr


# --- logs ---------------------------------------------------------------------------------------


def test_logs_prints_the_last_lines(tmp_path: Path) -> None:
    path = log_path(tmp_path, "Qwen/Qwen3-0.6B-GGUF")
    assert path == tmp_path / "Qwen--Qwen3-0.6B-GGUF.log"
    path.write_text("".join(f"line {i}\n" for i in range(200)), encoding="utf-8")
    result = neuronctl("logs", "Qwen/Qwen3-0.6B-GGUF", "--log-dir", str(tmp_path), "-n", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line 197\nline 198\nline 199\n"
    default = neuronctl("logs", "Qwen/Qwen3-0.6B-GGUF", "--log-dir", str(tmp_path))
    assert default.stdout.splitlines() == [f"line {i}" for i in range(100, 200)]


def test_logs_reads_the_log_dir_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text('log_dir = "logs"\n', encoding="utf-8")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "m.log").write_text("hello\n", encoding="utf-8")
    result = neuronctl("logs", "m", "--config", str(config), cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"


def test_logs_without_a_log_file(tmp_path: Path) -> None:
    result = neuronctl("logs", "no-such-model", "--log-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert squash("neuronctl: no log for no-such-model") in squash(result.stderr)
    assert squash(str(tmp_path / "no-such-model.log")) in squash(result.stderr)


# --- against the stub daemon ----------------------------------------------------------------


def test_status_json_prints_the_models_list(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, MODELS)
    result = neuronctl("status", "--json", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == MODELS
    assert stub.requests == [("GET", "/models", None)]


def test_status_json_honours_neuron_url(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, MODELS)
    result = neuronctl("status", "--json", env=clean_env(NEURON_URL=stub.url + "/"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == MODELS


def test_url_option_beats_neuron_url(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, [])
    dead = f"http://127.0.0.1:{free_port()}"
    result = neuronctl("status", "--json", "--url", stub.url, env=clean_env(NEURON_URL=dead))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_status_table(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, MODELS)
    result = neuronctl("status", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["MODEL"][:2] == ["MODEL", "STATUS"]
    # Fields this listing lacks (rss_bytes, n_ctx, ...) show as "-".
    assert rows["MODEL"] == ["MODEL", "STATUS", "MEMORY", "DEVICES", "CTX", "UNTIL", "Q/RUN",
                             "UPTIME", "RESTARTS"]
    assert rows["Qwen/Qwen3-0.6B-GGUF"][1:] == ["loaded", "-", "GPU", "0", "-", "-", "-",
                                               "1m15s", "0"]
    assert rows["gemma-3-270m"][1] == "failed"
    assert rows["tiny"][1] == "loading"
    # A failed model's error, first line only, goes to stderr.
    assert stderr_lines(result) == ["gemma-3-270m: worker exited with code 3 while starting"]


def test_status_with_no_models(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, [])
    result = neuronctl("status", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no models"


def test_status_api_error_is_one_line(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (500, {"error": "internal error; see the log"})
    result = neuronctl("status", "--url", stub.url)
    assert result.returncode == 1
    assert stderr_lines(result) == ["neuronctl: internal error; see the log"]
    assert "Traceback" not in result.stderr


def test_logs_asks_the_daemon_where_the_log_is(stub: Stub, tmp_path: Path) -> None:
    elsewhere = tmp_path / "srv-logs" / "m.log"  # not where this shell's config says
    elsewhere.parent.mkdir()
    elsewhere.write_text("from the daemon's log_dir\n", encoding="utf-8")
    stub.routes[("GET", "/models")] = (200, [{"id": "m", "log_path": str(elsewhere)}])
    result = neuronctl("logs", "m", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from the daemon's log_dir\n"


def test_load_sends_the_spec(stub: Stub, tmp_path: Path) -> None:
    stub.routes[("POST", "/models/load")] = (
        200, {"status": "loaded", "model": {"endpoint": "http://127.0.0.1:40009"}},
    )
    model = tmp_path / "m.gguf"
    result = neuronctl(
        "load", "m", "--path", str(model), "--n-ctx", "512", "--device", "0", "--device", "1",
        "--arg=--mode", "--arg=crash", "--harness", "fake", "--url", stub.url,
    )
    assert result.returncode == 0, result.stderr
    assert "m loaded in" in result.stdout
    # What clients use: the node's /v1 base URL and the model name, not the worker's port.
    assert f"model 'm' at {stub.url}/v1" in result.stdout
    assert "40009" not in result.stdout
    assert stub.requests == [(
        "POST", "/models/load",
        {"model_id": "m", "path": str(model), "harness": "fake", "n_ctx": 512,
         "devices": [0, 1], "args": ["--mode", "crash"]},
    )]


def test_load_failure_names_the_model(stub: Stub) -> None:
    stub.routes[("POST", "/models/load")] = (400, {"error": "unknown harness: nope"})
    result = neuronctl("load", "m", "--harness", "nope", "--url", stub.url)
    assert result.returncode == 1
    assert stderr_lines(result) == ["neuronctl: m: unknown harness: nope"]


def test_unload(stub: Stub) -> None:
    stub.routes[("POST", "/models/unload")] = (200, {"status": "unloaded", "model_id": "m"})
    result = neuronctl("unload", "m", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "m unloaded"
    assert stub.requests == [("POST", "/models/unload", {"model_id": "m"})]


def test_unload_unknown_model(stub: Stub) -> None:
    stub.routes[("POST", "/models/unload")] = (404, {"error": "model not loaded: m"})
    result = neuronctl("unload", "m", "--url", stub.url)
    assert result.returncode == 1
    assert stderr_lines(result) == ["neuronctl: model not loaded: m"]


def test_load_by_id_with_the_catalogue_overrides(stub: Stub) -> None:
    stub.routes[("POST", "/models/load")] = (200, {"status": "loaded", "model": {}})
    only_id = neuronctl("load", "cat", "--url", stub.url)
    assert only_id.returncode == 0, only_id.stderr
    result = neuronctl("load", "cat", "--ttl", "90", "--file", "m-Q4_K_M.gguf",
                       "--revision", "v2", "--force", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert [body for _, path, body in stub.requests if path == "/models/load"] == [
        {"model_id": "cat"},  # the server takes the catalogue's entry
        {"model_id": "cat", "ttl_s": 90.0, "file": "m-Q4_K_M.gguf", "revision": "v2",
         "force": True},
    ]


def test_the_load_spinner_shows_a_download(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, [
        {**MODELS[2], "id": "other", "status": "downloading"},
        {**MODELS[2], "id": "m", "status": "downloading", "download": {
            "file": "m-Q4_K_M.gguf", "done_bytes": 123 << 20, "total_bytes": 396 << 20}},
    ])
    client = Client(stub.url)
    assert _loading_what(client, "m") == "downloading m-Q4_K_M.gguf 123 MiB / 396 MiB"
    stub.routes[("GET", "/models")] = (200, [{**MODELS[2], "id": "m"}])
    assert _loading_what(client, "m") == "loading m"  # done downloading: starting
    stub.routes[("GET", "/models")] = (500, {"error": "boom"})
    assert _loading_what(client, "m") is None  # the spinner keeps what it said


def test_unload_all(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, [
        MODELS[0], MODELS[1], {**MODELS[2], "id": "cat", "status": "unloaded"}])
    stub.routes[("POST", "/models/unload")] = (200, {"status": "unloaded"})
    result = neuronctl("unload", "--all", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Qwen/Qwen3-0.6B-GGUF unloaded", "gemma-3-270m unloaded"]
    assert [body for method, _, body in stub.requests if method == "POST"] == [
        {"model_id": "Qwen/Qwen3-0.6B-GGUF"}, {"model_id": "gemma-3-270m"}]  # not `cat`


def test_unload_all_exits_1_when_one_fails(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, MODELS[:2])
    stub.routes[("POST", "/models/unload")] = (409, {"error": "already being unloaded"})
    result = neuronctl("unload", "--all", "--url", stub.url)
    assert result.returncode == 1
    assert stderr_lines(result) == ["Qwen/Qwen3-0.6B-GGUF: already being unloaded",
                                    "gemma-3-270m: already being unloaded"]
    stub.routes[("GET", "/models")] = (200, [{**MODELS[0], "status": "unloaded"}])
    nothing = neuronctl("unload", "--all", "--url", stub.url)
    assert (nothing.returncode, nothing.stdout.strip()) == (0, "no models loaded")


@pytest.mark.parametrize("args", [[], ["m", "--all"]], ids=["neither", "both"])
def test_unload_takes_an_id_or_all(stub: Stub, args: list[str]) -> None:
    result = neuronctl("unload", *args, "--url", stub.url)
    assert result.returncode == 2
    assert len(stderr_lines(result)) == 1 and "--all" in result.stderr
    assert stub.requests == []


def test_ps_is_status(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, MODELS)
    ps, status = neuronctl("ps", "--url", stub.url), neuronctl("status", "--url", stub.url)
    assert ps.returncode == 0, ps.stderr
    assert (ps.stdout, ps.stderr) == (status.stdout, status.stderr)
    assert "  ps      The same as status." in neuronctl("--help").stdout  # listed


# --- known bugs -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["lab[test]/model", "x[/]"])
def test_status_table_shows_ids_with_brackets(stub: Stub, model_id: str) -> None:
    stub.routes[("GET", "/models")] = (200, [{**MODELS[2], "id": model_id}])
    result = neuronctl("status", "--url", stub.url)
    assert "Traceback" not in result.stderr
    assert result.returncode == 0
    assert model_id in result.stdout


@pytest.mark.parametrize("model_id", ["a[red]b", "x[/]"])
def test_unload_prints_ids_with_brackets(stub: Stub, model_id: str) -> None:
    stub.routes[("POST", "/models/unload")] = (200, {"status": "unloaded", "model_id": model_id})
    result = neuronctl("unload", model_id, "--url", stub.url)
    assert "Traceback" not in result.stderr
    assert result.returncode == 0
    assert result.stdout.strip() == f"{model_id} unloaded"


def test_status_table_shows_long_ids_in_full(stub: Stub) -> None:
    model_id = "unsloth/Qwen3-30B-A3B-Instruct-2507-GGUF"
    stub.routes[("GET", "/models")] = (200, [{**MODELS[0], "id": model_id}])
    result = neuronctl("status", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert model_id in result.stdout


def test_logs_without_a_log_file_is_one_line(tmp_path: Path) -> None:
    log_dir = tmp_path / "var-log-neuron-with-a-realistic-length"
    log_dir.mkdir()
    result = neuronctl("logs", "Qwen/Qwen3-0.6B-GGUF", "--log-dir", str(log_dir))
    assert result.returncode == 1
    assert len(stderr_lines(result)) == 1, result.stderr


def test_start_help_and_bad_port_without_a_daemon(tmp_path: Path) -> None:
    exe = str(NEURONCTL)
    env = clean_env()
    shown = subprocess.run([exe, "start", "--help"], capture_output=True, text=True,
                           timeout=30, env=env)
    assert shown.returncode == 0
    for option in ("--config", "--port", "--log-level"):
        assert option in shown.stdout
    config = tmp_path / "neuron.toml"
    config.write_text(f'log_dir = "{tmp_path}/log"\nstate_dir = "{tmp_path}/state"\n')
    bad = subprocess.run([exe, "start", "--config", str(config), "--port", "70000"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 78
    assert bad.stderr == "neuronctl: --port must be between 1 and 65535, got 70000\n"


def test_start_reports_a_port_in_use_before_loading_anything(tmp_path: Path) -> None:
    exe = str(NEURONCTL)
    env = clean_env()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "neuron.toml"
        config.write_text(
            f'host = "127.0.0.1"\nport = {port}\nlog_dir = "log"\nstate_dir = "state"\n'
            '[[default_models]]\nmodel_id = "m"\npath = "/nonexistent.gguf"\n'
        )
        result = subprocess.run([exe, "start", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "default model" not in result.stderr  # nothing was loaded first


def test_logs_previous_prints_the_log_from_before_the_last_start(tmp_path: Path) -> None:
    exe = str(NEURONCTL)
    env = clean_env()
    current = log_path(tmp_path, "org/m")
    current.write_text("after the restart\n")
    current.with_name(current.name + ".1").write_text("before the crash\n")
    shown = subprocess.run([exe, "logs", "org/m", "--previous", "--log-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=30, env=env)
    assert (shown.returncode, shown.stdout) == (0, "before the crash\n")
    current.with_name(current.name + ".1").unlink()
    missing = subprocess.run([exe, "logs", "org/m", "-p", "--log-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=30, env=env)
    assert missing.returncode == 1 and "no previous log for org/m" in missing.stderr


def test_client_reads_the_config_leniently(stub: Stub, tmp_path: Path) -> None:
    """A running daemon stays reachable when the config has a mistake elsewhere (the
    daemon reports those itself on reload), and the key file is only a fallback."""
    stub.routes[("GET", "/models")] = (200, [])
    port = stub.url.rsplit(":", 1)[1]
    key_file = tmp_path / "api-key"
    key_file.write_text("from-file\n")
    config = tmp_path / "neuron.toml"
    config.write_text(f'port = {port}\nhost = "127.0.0.1"\nbogus_key = 1\n'
                      f'api_key_file = "{key_file}"\n')
    result = neuronctl("status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert stub.headers[-1].get("Authorization") == "Bearer from-file"
    # NEURON_CONFIG names the config, and NEURON_API_KEY wins over the key file.
    result = neuronctl("status", env=clean_env(NEURON_CONFIG=str(config),
                                               NEURON_API_KEY="from-env"))
    assert result.returncode == 0, result.stderr
    assert stub.headers[-1].get("Authorization") == "Bearer from-env"


def test_help_text_is_shown_as_written() -> None:
    result = neuronctl("status", "-h")  # -h as well as --help, on every command
    assert result.returncode == 0, result.stderr
    help_text = squash(result.stdout)
    # Env vars and defaults the same way on every option: typer's own brackets.
    assert squash("--url URL Daemon URL. [env var: NEURON_URL; default: (the port in the "
                  "config)]") in help_text
    assert squash("-c, --config FILE Config file. [env var: NEURON_CONFIG; default: "
                  "(/etc/neuron/neuron.toml)]") in help_text
    assert "<bool>" not in result.stdout  # flags take no value
    assert "--install-completion" in neuronctl("--help").stdout
    # Arguments by the names docs/cli.md uses.
    assert "neuronctl load [OPTIONS] [MODEL_ID]" in neuronctl("load", "-h").stdout
    assert "neuronctl chat [OPTIONS] MODEL_ID [PROMPT]" in neuronctl("chat", "-h").stdout


COMMANDS = ["start", "check", "status", "ps", "events", "load", "unload", "reload", "chat",
            "logs", "pull", "models", "ls", "show", "rm", "fleet", "key"]


def test_help_reads_like_one_tool() -> None:
    """No Python types or typer braces as value names, every summary whole in the command
    list, `ps` listed, `start` in the same style as the others."""
    top = neuronctl("--help").stdout
    listed = [line.split()[0] for line in top.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == COMMANDS
    assert "..." not in top.split("Commands:")[1]  # no summary cut short
    for command in [*COMMANDS, "fleet status", "fleet litellm-config", "key new"]:
        text = neuronctl(*command.split(), "--help").stdout
        assert text.startswith(f"Usage: neuronctl {command} "), (command, text)
        for leak in (r"<[a-z]", r"\{", r"list\[", r" range", r"\[default: \$",
                     r" (INTEGER|FLOAT)\b"):
            assert not re.search(leak, text), (command, leak, text)
        # Values and arguments by upper-case names (MODEL_ID, FILE), never a parameter's
        # own lower-case name (`[models]...`, `model`).
        usage = text.splitlines()[0].removeprefix(f"Usage: neuronctl {command} ")
        assert not re.search(r"\b[a-z_]+\b", usage.replace("[OPTIONS]", "")), (command, usage)
        for line in text.splitlines():
            found = re.match(r"\s+(?:-\w, )?--[\w-]+(?:/--[\w-]+)? ([^ ]+)", line)
            if found and found.group(1)[0].isalpha():
                assert not found.group(1).islower(), (command, line)
    key = neuronctl("key", "new", "--help").stdout
    assert "--role ROLE" in key and "--model MODEL" in key and "--rpm N" in key
    assert "neuronctl pull [OPTIONS] [MODEL]..." in neuronctl("pull", "--help").stdout
    start = neuronctl("start", "--help").stdout
    assert "-c, --config FILE" in start and "--log-level LEVEL" in start
    load = neuronctl("load", "--help").stdout
    assert "--device GPU" in load and "--ttl SECONDS" in load
    assert load.index("\n  --file ") < load.index("\n  --harness ") < load.index("\n  --ttl ")


def test_the_cli_reference_names_every_option_of_every_command() -> None:
    """docs/cli.md's table row of each command lists what its --help offers (--url and
    --config are said once for all of them, below the table)."""
    rows = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    for command in ["check", "start", "status", "events", "load", "unload", "reload", "chat",
                    "logs", "pull", "models", "show", "rm", "fleet litellm-config",
                    "fleet status", "key new"]:
        row = next(line for line in rows.splitlines()
                   if line.startswith(f"| `neuronctl {command} ")
                   or line.startswith(f"| `neuronctl {command}`"))
        text = neuronctl(*command.split(), "--help").stdout
        for option in re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z-]*)", text, re.M):
            if option in ("--help", "--url", "--config", "--watch"):  # --watch: its own row
                continue
            assert option in row, (command, option)


@pytest.mark.parametrize(("verb", "hint"), [
    ("list", "use `neuronctl status` (the models this node runs, its catalogue too) or "
             "`neuronctl models` (the model files it has)"),
    ("run", "use `neuronctl chat MODEL` (a prompt, or an interactive chat)"),
    ("version", "use `neuronctl --version`"),
])
def test_ollama_verbs_are_answered_with_the_equivalent(verb: str, hint: str) -> None:
    result = neuronctl(verb, "gemma")
    assert result.returncode == 2
    assert stderr_lines(result) == [f"neuronctl: no command {verb!r} (that is Ollama's); {hint}"]


def test_ctrl_c_during_load_says_the_daemon_goes_on(tmp_path: Path) -> None:
    silent = socket.socket()  # accepts connections (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    proc = subprocess.Popen([str(NEURONCTL), "load", "m", "--url", url], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conn: socket.socket | None = None
    try:
        silent.settimeout(15)
        conn, _ = silent.accept()  # the load request is under way
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 130
        assert squash("interrupted: the daemon goes on loading m") in squash(stderr)
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if conn is not None:
            conn.close()
        silent.close()


def test_load_of_an_unknown_id_says_so_once(stub: Stub) -> None:
    message = ("no model 'tyni' in the catalogue (did you mean tiny?); to fetch a Hugging "
               "Face repo give --repo/--quant/--file")
    stub.routes[("POST", "/models/load")] = (404, {"error": message, "code": "model_not_found"})
    result = neuronctl("load", "tyni", "--url", stub.url)
    assert result.returncode == 1
    assert stderr_lines(result) == [f"neuronctl: {message}"]  # the id once, not `tyni: `


def test_load_says_already_loaded_and_what_it_evicted(stub: Stub) -> None:
    stub.routes[("POST", "/models/load")] = (
        200, {"status": "loaded", "model": {}, "already_loaded": True, "evicted": []})
    result = neuronctl("load", "gemma", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"gemma is already loaded: model 'gemma' at {stub.url}/v1"]
    stub.routes[("POST", "/models/load")] = (
        200, {"status": "loaded", "model": {}, "already_loaded": False,
              "evicted": ["tiny-native"]})
    result = neuronctl("load", "fifth", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("fifth loaded in ") and line.endswith(
        f"s (unloaded tiny-native to make room): model 'fifth' at {stub.url}/v1"), line


def test_load_sends_every_model_key_the_api_takes(stub: Stub) -> None:
    stub.routes[("POST", "/models/load")] = (200, {"status": "loaded", "model": {}})
    result = neuronctl(
        "load", "p2", "--harness", "llama-server", "--repo", "org/r", "--quant", "Q4_K_M",
        "--parallel", "2", "--max-queue", "8", "--queue-timeout", "30", "--pinned",
        "--device", "0", "--device", "1", "--tensor-split", "3", "--tensor-split", "1",
        "--restart", "never", "--max-restarts", "2", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert stub.requests[-1][2] == {
        "model_id": "p2", "harness": "llama-server", "repo": "org/r", "quant": "Q4_K_M",
        "parallel": 2, "max_queue": 8, "queue_timeout_s": 30.0, "pinned": True,
        "devices": [0, 1], "tensor_split": [3.0, 1.0], "restart": "never",
        "max_restarts": 2}


def test_load_defaults_brings_the_default_models_back(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, [
        {"id": "gemma", "status": "unloaded", "default": True},
        {"id": "native", "status": "loaded", "default": True},
        {"id": "tiny", "status": "unloaded", "default": False}])
    stub.routes[("POST", "/models/load")] = (200, {"status": "loaded", "model": {}})
    result = neuronctl("load", "--defaults", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gemma loaded"]
    assert [body for method, _, body in stub.requests if method == "POST"] == [
        {"model_id": "gemma"}]
    both = neuronctl("load", "gemma", "--defaults", "--url", stub.url)
    assert both.returncode == 2
    assert stderr_lines(both) == ["neuronctl: give a MODEL_ID or --defaults, not both"]


def test_a_config_that_is_not_valid_toml_does_not_blind_the_cli(
    stub: Stub, tmp_path: Path
) -> None:
    """The operator is editing the file (`ttl_s = 60s`): status still reaches the node the
    file names, with a warning; reload still asks it, and its refusal is what is said."""
    port = int(stub.url.rsplit(":", 1)[1])
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\nttl_s = 60s\n'
                      f'state_dir = "{tmp_path}/state"\n', encoding="utf-8")
    stub.routes[("GET", "/models")] = (200, [])
    result = neuronctl("status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert stderr_lines(result) == [
        f"neuronctl: warning: {config}: cannot read config file: Expected newline or end of "
        f"document after a statement (at line 3, column 11); asking the node at {stub.url} "
        "anyway (a reload would refuse this file)"]
    refusal = (f"reload refused, nothing changed: {config}: cannot read config file: "
               "Expected newline or end of document after a statement (at line 3, column 11)")
    stub.routes[("POST", "/reload")] = (400, {"error": refusal, "code": "invalid_config"})
    reload = neuronctl("reload", "--config", str(config))
    assert reload.returncode == 1
    assert stderr_lines(reload)[-1] == f"neuronctl: {refusal}"
    assert ("POST", "/reload", None) in stub.requests


def test_reload_names_each_model_and_a_dry_run_asks_for_one(stub: Stub) -> None:
    answer = {"status": "reloaded", "dry_run": True,
              "summary": "would reload config: 0 added, 0 removed, 1 reloaded",
              "details": ["gemma: n_ctx 2048 → 1024, reloaded"]}
    stub.routes[("POST", "/reload?dry_run=1")] = (200, answer)
    result = neuronctl("reload", "--dry-run", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "would reload config: 0 added, 0 removed, 1 reloaded",
        "  gemma: n_ctx 2048 → 1024, reloaded"]


def test_status_says_why_a_model_restarts_and_check_exits_1(stub: Stub) -> None:
    stub.routes[("GET", "/models")] = (200, [
        {**MODELS[0], "id": "victim", "status": "restarting", "restarts": 3,
         "last_error": "worker was killed by SIGKILL unexpectedly\nmore"},
        {**MODELS[1], "id": "ok", "status": "loaded", "error": None, "last_error": None}])
    result = neuronctl("status", "--url", stub.url)
    assert result.returncode == 0, result.stderr
    assert stderr_lines(result) == [
        "victim: restarting after: worker was killed by SIGKILL unexpectedly"]
    checked = neuronctl("status", "--check", "--url", stub.url)
    assert checked.returncode == 1
    stub.routes[("GET", "/models")] = (200, [{**MODELS[1], "id": "ok", "status": "loaded",
                                              "error": None}])
    assert neuronctl("status", "--check", "--url", stub.url).returncode == 0


def test_logs_previous_says_when_no_worker_started_since(stub: Stub, tmp_path: Path) -> None:
    log = tmp_path / "victim.log"
    log.write_text("=== worker pid 7 was killed by SIGKILL\n", encoding="utf-8")
    stub.routes[("GET", "/models")] = (200, [
        {"id": "victim", "status": "failed", "log_path": str(log),
         "last_error": "model file not found or not readable: /m/victim.gguf"}])
    result = neuronctl("logs", "victim", "--previous", "--url", stub.url)
    assert result.returncode == 1
    assert stderr_lines(result) == [
        f"neuronctl: no previous log for victim at {log}.1: no worker started after the "
        "one in its current log (`neuronctl logs victim`); its last error: model file not "
        "found or not readable: /m/victim.gguf"]


def test_a_key_file_that_gives_no_key_names_where_it_was_named_and_why(
    stub: Stub, tmp_path: Path
) -> None:
    stub.routes[("GET", "/models")] = (200, [])
    missing, shared, empty = tmp_path / "none", tmp_path / "shared", tmp_path / "empty"
    shared.write_text("nk-a-key\n")
    shared.chmod(0o644)
    empty.write_text("\n")
    empty.chmod(0o600)
    for path, why in [
        (missing, "no such file"),
        (tmp_path, "cannot read it: Is a directory"),
        (shared, f"readable by every user (mode 644), so the key is no secret; "
                 f"chmod o-rwx {shared}"),
        (empty, "the file is empty"),
    ]:
        by_option = neuronctl("--key-file", str(path), "status", "--url", stub.url)
        assert by_option.returncode == 78
        assert stderr_lines(by_option) == [f"neuronctl: --key-file {path}: {why}"]
        by_env = neuronctl("status", "--url", stub.url,
                           env=clean_env(NEURON_API_KEY_FILE=str(path)))
        assert by_env.returncode == 78
        assert stderr_lines(by_env) == [f"neuronctl: NEURON_API_KEY_FILE={path}: {why}"]
    assert stub.requests == []  # nothing was sent without the key meant


def test_the_key_file_option_wins_over_an_exported_key(stub: Stub, tmp_path: Path) -> None:
    stub.routes[("GET", "/models")] = (200, [])
    key = tmp_path / "key"
    key.write_text("nk-from-the-file\n")
    key.chmod(0o600)
    result = neuronctl("--key-file", str(key), "status", "--url", stub.url,
                       env=clean_env(NEURON_API_KEY="nk-exported"))
    assert result.returncode == 0, result.stderr
    assert stub.headers[-1]["Authorization"] == "Bearer nk-from-the-file"
