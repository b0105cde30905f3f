"""`neuronctl key new`, and the CLI against a node with named keys: which key it sends,
and a 403 that names the role it lacked. Real processes: the daemon and the CLI."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuronctl.config import load_config
from neuronctl.keys import ADMIN, INFERENCE, KeyRing, sha256_hex

from ..helpers import NEURONCTL, Daemon, clean_env, start_daemon

READ_KEY = "nk-cli-read-key"
ADMIN_KEY = "nk-cli-admin-key"


def neuronctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NEURONCTL), *args], capture_output=True, text=True,
                          timeout=60, env={**clean_env(), **env})


def test_key_new_prints_a_key_and_an_entry_that_holds_only_its_hash(tmp_path: Path) -> None:
    made = neuronctl("key", "new", "gateway", "--model", "qwen*", "--rpm", "600",
                     "--max-concurrent", "4")
    assert made.returncode == 0, made.stderr
    key, blank, *entry = made.stdout.splitlines()
    assert key.startswith("nk-") and blank == ""
    assert key not in "\n".join(entry) and sha256_hex(key) in "\n".join(entry)
    assert "shown once" in made.stderr
    (tmp_path / "neuron.toml").write_text("\n".join(entry) + "\n")
    principal = KeyRing(load_config(tmp_path / "neuron.toml", {})).identify(key)
    assert principal is not None and principal.name == "gateway"
    assert principal.roles == {INFERENCE} and principal.models == ("qwen*",)
    assert (principal.rpm, principal.max_concurrent) == (600, 4)
    other = neuronctl("key", "new", "ops", "-r", "read", "-r", "admin")
    assert other.stdout.splitlines()[0] != key
    assert 'roles = ["read", "admin"]' in other.stdout


@pytest.mark.parametrize(("args", "says"), [
    (["bad name"], "name: 'bad name'"),
    (["x", "--role", "root"], "roles[0]: 'root'"),
    (["x", "--model", "a b"], "models[0]"),
    (["x", "--rpm", "0"], "rpm: must be between 1"),
])
def test_key_new_refuses_what_the_node_would(args: list[str], says: str) -> None:
    refused = neuronctl("key", "new", *args)
    assert refused.returncode == 2 and says in refused.stderr and refused.stdout == ""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("keys-cli")
    admin_file = directory / "admin.key"
    admin_file.write_text(ADMIN_KEY + "\n")
    admin_file.chmod(0o600)
    settings = (f'[[keys]]\nname = "monitor"\nroles = ["read"]\n'
                f'sha256 = "{sha256_hex(READ_KEY)}"\n'
                f'[[keys]]\nname = "ops"\nroles = ["admin"]\nfile = "{admin_file}"\n')
    daemon = start_daemon(directory, "", settings=settings)
    try:
        yield daemon
    finally:
        daemon.stop()


def test_the_cli_says_which_role_a_403_lacked(node: Daemon) -> None:
    refused = neuronctl("unload", "m", "--url", node.url, NEURON_API_KEY=READ_KEY)
    assert refused.returncode == 1
    assert "lacks the 'admin' role" in refused.stderr and "'monitor'" in refused.stderr
    assert READ_KEY not in refused.stderr
    allowed = neuronctl("status", "--url", node.url, NEURON_API_KEY=READ_KEY)
    assert allowed.returncode == 0, allowed.stderr


def test_the_cli_uses_the_admin_key_it_can_read(node: Daemon, tmp_path: Path) -> None:
    config = node.directory / "neuron.toml"
    # No api_key in the config: the admin [[keys]] entry's file is the key it sends.
    reload = neuronctl("reload", "--config", str(config))
    assert reload.returncode == 0, reload.stderr
    key_file = tmp_path / "key"
    key_file.write_text(READ_KEY + "\n")
    key_file.chmod(0o600)
    via_file = neuronctl("reload", "--url", node.url, NEURON_API_KEY_FILE=str(key_file))
    assert via_file.returncode == 1 and "lacks the 'admin' role" in via_file.stderr
    assert ADMIN in via_file.stderr
    via_option = neuronctl("--key-file", str(key_file), "reload", "--url", node.url)
    assert via_option.returncode == 1 and "lacks the 'admin' role" in via_option.stderr
    missing = neuronctl("--key-file", str(tmp_path / "none"), "status", "--url", node.url)
    assert missing.returncode == 78
    assert missing.stderr == f"neuronctl: --key-file {tmp_path / 'none'}: no such file\n"


def test_the_daemon_log_names_keys_and_holds_none(node: Daemon) -> None:
    refused = neuronctl("unload", "m", "--url", node.url, NEURON_API_KEY=READ_KEY)
    assert refused.returncode == 1
    log = (node.directory / "daemon.log").read_text()
    assert "for key 'monitor'" in log and "2 named keys" in log
    for key in (READ_KEY, ADMIN_KEY, sha256_hex(READ_KEY)):
        assert key not in log


def test_a_half_edited_config_keeps_its_admin_key(node: Daemon, tmp_path: Path) -> None:
    """The operator is editing the node's config: a top-level line and a new [[models]]
    entry are half written. The [[keys]] tables still parse, so the CLI still finds the
    admin key's file and reaches the node, with a warning."""
    good = (node.directory / "neuron.toml").read_text()
    config = tmp_path / "neuron.toml"
    config.write_text(good.replace("stop_timeout_s = 2.0", "stop_timeout_s = 2s")
                      + '\n[[models]]\nmodel_id = "next\npath = \n')
    status = neuronctl("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert status.stderr.startswith(f"neuronctl: warning: {config}: cannot read config file: ")
    unload = neuronctl("unload", "--all", "--config", str(config))  # needs the admin role
    assert unload.returncode == 0, unload.stderr


def test_a_key_that_cannot_be_found_says_why(node: Daemon, tmp_path: Path) -> None:
    good = (node.directory / "neuron.toml").read_text()
    # The admin entry itself half written: no key to be had from this file.
    config = tmp_path / "neuron.toml"
    config.write_text(good.replace('name = "ops"', 'name = "ops'))
    refused = neuronctl("status", "--config", str(config))
    assert refused.returncode == 1
    line = good[:good.index('name = "ops"')].count("\n") + 1
    problem = (f"{config}: cannot read config file: Illegal character '\\n' (at line "
               f"{line}, column 12)")
    assert refused.stderr.splitlines() == [
        f"neuronctl: warning: {problem}; asking the node at {node.url} anyway (a reload "
        "would refuse this file)",
        f"neuronctl: API key required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' ("
        f"no key found: {problem}, and what could be read of it "
        "names no key this user can read; fix the file, or set NEURON_API_KEY or use "
        "`neuronctl --key-file FILE COMMAND`)"]
    # Read whole, but the key file is not this user's to read.
    (tmp_path / "gone.key").unlink(missing_ok=True)
    config.write_text(good.replace(str(node.directory / "admin.key"),
                                   str(tmp_path / "gone.key")))
    refused = neuronctl("status", "--config", str(config))
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"neuronctl: API key required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' ("
        f"{config} names no key this user can read (no such "
        f"file {tmp_path / 'gone.key'}): api_key, api_key_file or an admin [[keys]] entry's "
        "file; set NEURON_API_KEY or use `neuronctl --key-file FILE COMMAND`)"]
