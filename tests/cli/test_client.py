"""The CLI reads the config file with the daemon's own converter, leniently."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronctl.client import ApiError, client_settings, connect, normalize_url
from neuronctl.config import load_config


def test_relative_and_home_paths_resolve_as_the_daemon_resolves_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    etc = tmp_path / "etc"
    etc.mkdir()
    for log_dir in ("logs", "../var/log/neuron", "~/neuron-logs"):
        path = etc / "neuron.toml"
        path.write_text(f'log_dir = "{log_dir}"\nport = 14000\n')
        daemon = load_config(path, environ={})
        client = client_settings(path)
        assert client.log_dir == daemon.log_dir, log_dir
        assert client.port == daemon.port == 14000
    assert client_settings(path).log_dir == tmp_path / "home" / "neuron-logs"


def test_a_mistake_elsewhere_leaves_the_keys_a_client_needs(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    path.write_text('port = "not a port"\nhost = "127.0.0.2"\nbogus_key = 1\n'
                    'api_key_file = "key"\n[[default_models]]\nquant = 3\n')
    settings = client_settings(path)
    assert settings.port == 13131  # the bad value falls back to the default
    assert settings.host == "127.0.0.2"
    assert settings.api_key == "s3cret"  # relative to the config file, as the daemon reads it


@pytest.mark.parametrize(("typed", "url"), [
    ("127.0.0.1:13131", "http://127.0.0.1:13131"),
    ("localhost", "http://localhost:13131"),  # as OLLAMA_HOST is written
    (":14000", "http://127.0.0.1:14000"),
    ("http://node-3:14000/v1", "http://node-3:14000"),  # the OpenAI base URL
    ("http://node-3:14000/v1/", "http://node-3:14000"),
    ("https://gw.example/neuron/", "https://gw.example/neuron"),
    ("http://[::1]:14000", "http://[::1]:14000"),
])
def test_url_forms_an_operator_types(typed: str, url: str) -> None:
    assert normalize_url(typed) == url


@pytest.mark.parametrize("bad", ["ftp://x", "http://", "http://h:99999"])
def test_urls_that_are_no_node_address_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(bad)


def test_neuron_port_reaches_client_commands_as_it_reaches_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text("port = 14000\n")
    monkeypatch.delenv("NEURON_URL", raising=False)
    assert connect(None, path).url == "http://127.0.0.1:14000"
    monkeypatch.setenv("NEURON_PORT", "14555")
    assert connect(None, path).url == "http://127.0.0.1:14555"
    assert connect("127.0.0.1:1", path).url == "http://127.0.0.1:1"  # --url wins


def test_another_http_server_is_named_as_such(tmp_path: Path) -> None:
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = connect(f"127.0.0.1:{server.server_address[1]}", None)
        with pytest.raises(ApiError, match="not as a neuron node does"):
            client.models()
    finally:
        server.shutdown()
        server.server_close()
