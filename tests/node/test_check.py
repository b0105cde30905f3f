"""`neuronctl check`: a config validated without starting anything, every problem at once."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..helpers import NEURONCTL, clean_env

BAD = '''hots = "127.0.0.1"
port = 99999
ttl_s = "1m"

[harness.llama-server]
binary = "./nope-llama-server"

[[default_models]]
model_id = "gemma"
n_ctx = "2k"
path = "models/gemma.gguf"

[[models]]
model_id = "tiny"
path = "models/tinyy.gguf"
harness = "llama-server"

[[models]]
model_id = "gemma"
path = "x.gguf"
'''


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NEURONCTL), "check", *args], env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(BAD, encoding="utf-8")
    result = check("--config", str(config))
    assert result.returncode == 78
    prefix = f"neuronctl: config error: {config}: "
    assert result.stderr.splitlines() == [prefix + line for line in [
        "hots: unknown key (did you mean host?)",
        "ttl_s: expected a number, got a string '1m'",
        "default_models[0].n_ctx: expected an integer, got a string '2k'",
        "port: must be between 1 and 65535, got 99999",
        "models[1].model_id: duplicate model 'gemma'",
        f"default_models[0].path: model file not found: {tmp_path}/models/gemma.gguf",
        f"models[0].path: model file not found: {tmp_path}/models/tinyy.gguf",
        f"models[0].harness: harness llama-server cannot run here: llama-server not found: "
        f"no executable {tmp_path}/nope-llama-server (binary = "
        f"'{tmp_path}/nope-llama-server' of [harness.llama-server])",
    ]]
    assert result.stdout == f"{config}: 8 problems\n"


def test_a_valid_config_exits_0_and_starts_nothing(tmp_path: Path, tiny_gguf: Path) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(f'port = 1\nlog_dir = "{tmp_path}/log"\n\n[[default_models]]\n'
                      f'model_id = "tiny"\npath = "{tiny_gguf}"\n', encoding="utf-8")
    result = check("-c", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: valid (1 default, 0 catalogue models)\n"
    assert result.stderr == ""
    assert not (tmp_path / "log").exists()  # nothing was started or made


def test_a_file_that_is_not_toml_or_not_there(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("ttl_s = 60s\n", encoding="utf-8")
    result = check("--config", str(broken))
    assert result.returncode == 78
    assert result.stderr.startswith(f"neuronctl: config error: {broken}: invalid TOML: ")
    missing = check("--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 78
    assert "config/neuron.example.toml shows every key" in missing.stderr


def lines(config: Path, *problems: str) -> list[str]:
    return [f"neuronctl: config error: {config}: {line}" for line in problems]


def test_files_and_programs_are_checked_whatever_else_is_wrong(tmp_path: Path) -> None:
    # Each of these stopped the round before (a relation to a default, a key two ways, a
    # harness's reserved flag): the missing file and program were never looked at.
    for name in ("k1", "k2"):
        (tmp_path / name).write_text("the same key\n", encoding="utf-8")
        (tmp_path / name).chmod(0o600)
    config = tmp_path / "neuron.toml"
    config.write_text('''api_key_file = "k1"
max_request_bytes = 999999999999

[harness.llama-server]
binary = "./nope-llama-server"
args = ["--port", "1"]

[[keys]]
name = "ops"
roles = ["admin"]
file = "k2"

[[models]]
model_id = "bad id!"
path = "models/a.gguf"

[[models]]
model_id = "tiny"
harness = "llama-server"
path = "models/tiny.gguf"
''', encoding="utf-8")
    result = check("--config", str(config))
    assert result.returncode == 78
    server = f"{tmp_path}/nope-llama-server"
    assert result.stderr.splitlines() == lines(
        config,
        "models[0].model_id: may hold only ASCII letters, digits and . _ - : + @ = /; "
        "got U+0020, '!'",
        "max_queued_bytes: must be at least max_request_bytes (999999999999), got 268435456",
        "api_key: is the same key as [[keys]] 'ops'; give each its own",
        "harness.llama-server.args[0]: --port cannot be set in args: neuronctl picks the "
        "worker's address (127.0.0.1 and a free port)",
        # models[1], as the file numbers it, though models[0] was set aside
        f"models[1].path: model file not found: {tmp_path}/models/tiny.gguf",
        f"models[1].harness: harness llama-server cannot run here: llama-server not found: "
        f"no executable {server} (binary = '{server}' of [harness.llama-server])",
    )
    assert result.stdout == f"{config}: 6 problems\n"


def test_a_key_file_every_user_may_read_is_one_problem(tmp_path: Path) -> None:
    key = tmp_path / "ops.key"
    key.write_text("a key\n", encoding="utf-8")
    key.chmod(0o644)
    config = tmp_path / "neuron.toml"
    config.write_text('[[keys]]\nname = "ops"\nroles = ["admin"]\nfile = "ops.key"\n\n'
                      '[[keys]]\nname = "ci"\nroles = ["read"]\n', encoding="utf-8")
    result = check("--config", str(config))
    assert result.returncode == 78
    assert result.stderr.splitlines() == lines(
        config,
        # the second entry's own problem (found first: files are read last)
        "keys[1]: set exactly one of sha256, file or credential, got none",
        f"keys[0].file: {key} is readable by every user (mode 644); chmod o-rwx {key}",
    )
    assert result.stdout == f"{config}: 2 problems\n"
