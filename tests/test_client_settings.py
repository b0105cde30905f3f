"""The CLI reads the config file with the daemon's own converter, leniently."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronctl.client import client_settings
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
