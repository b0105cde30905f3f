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
