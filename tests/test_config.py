"""The config loader: defaults, the shipped files, env overrides, and one-line errors."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest

from neuronctl.config import (
    DEFAULT_HARNESS,
    ConfigError,
    HarnessConfig,
    KeySpec,
    ModelSpec,
    NeuronConfig,
    load_config,
)
from neuronctl.supervisor.harness import build_harnesses

from .helpers import NEURONCTL, clean_env

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "neuron.example.toml"
DEMO = REPO / "config" / "neuron.demo.toml"
EX_CONFIG = 78


def write_config(tmp_path: Path, text: str, name: str = "neuron.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return info.value


# --- defaults and the shipped files ---------------------------------------------------------


def test_neuron_config_defaults() -> None:
    config = NeuronConfig()
    assert config.port == 13131
    assert config.host == "0.0.0.0"
    assert config.log_dir == Path("/var/log/neuron")
    assert config.state_dir == Path("/var/lib/neuron")
    assert config.stop_timeout_s == 10.0
    assert config.default_models == ()
    assert dict(config.harness) == {}
    assert config.harness_config(DEFAULT_HARNESS) == HarnessConfig()


def test_model_spec_defaults() -> None:
    spec = ModelSpec(model_id="m")
    assert spec.harness == "llama-cpp-python"
    assert spec.path is None
    assert spec.quant is None
    assert spec.devices == ()
    assert spec.args == ()
    assert spec.n_ctx is None
    assert spec.ready_timeout_s is None


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, ""), {}) == NeuronConfig()


def test_example_config_parses() -> None:
    config = load_config(EXAMPLE, {})
    assert config.port == 13131
    assert config.log_dir == Path("/var/log/neuron")
    assert config.default_models == ()
    assert set(config.harness) <= {DEFAULT_HARNESS}
    build_harnesses(config)


def test_example_config_commented_keys_are_valid(tmp_path: Path) -> None:
    """Uncommenting every `# key = value` line of the example must give a valid config."""
    commented = re.compile(r"^# ?((\[\[?[\w.-]+\]\]?)|([a-z_][a-z0-9_]* = .*))$")
    lines = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = commented.match(line)
        lines.append(match.group(1) if match else line)
    config = load_config(write_config(tmp_path, "\n".join(lines) + "\n"), {})
    (spec,) = config.default_models
    assert spec.model_id == "Qwen/Qwen3-0.6B-GGUF"
    assert spec.devices == (0,)
    assert spec.args == ("--n_batch", "1024")
    harness = config.harness_config(DEFAULT_HARNESS)
    assert harness.python == "/opt/llama/bin/python"
    assert harness.ready_timeout_s == 600.0
    build_harnesses(config)


def test_demo_config_parses() -> None:
    config = load_config(DEMO, {})
    assert config.host == "127.0.0.1"
    (spec,) = config.default_models
    assert spec.model_id == "gemma-3-270m"
    # Relative paths in the demo point into the checkout, not the working directory.
    assert config.log_dir == REPO / ".cache" / "demo" / "log"
    assert spec.path == REPO / ".cache" / "demo" / "models" / "gemma-3-270m-q4_k_m.gguf"


@pytest.mark.parametrize(
    "cls", [NeuronConfig, HarnessConfig, ModelSpec, KeySpec], ids=lambda c: c.__name__
)
def test_example_documents_every_key(cls: type) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = []
    for f in dataclasses.fields(cls):
        # A key (maybe commented out) or a table header naming it.
        pattern = rf"^#?\s*(\[\[?{re.escape(f.name)}[\].]|{re.escape(f.name)}\s*=)"
        if not re.search(pattern, text, re.MULTILINE):
            missing.append(f.name)
    assert missing == [], f"keys not documented in {EXAMPLE.name}: {missing}"


def test_full_config_round_trip(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        port = 14000
        host = "127.0.0.1"
        stop_timeout_s = 3
        [harness.llama-cpp-python]
        n_ctx = 4096
        args = ["--n_threads", "2"]
        [[default_models]]
        model_id = "a"
        devices = [0, 1]
        ready_timeout_s = 30
        [[default_models]]
        model_id = "b"
        quant = "Q4_K_M"
        """,
    )
    config = load_config(path, {})
    assert config.port == 14000
    assert config.stop_timeout_s == 3.0
    assert isinstance(config.stop_timeout_s, float)
    assert [s.model_id for s in config.default_models] == ["a", "b"]
    assert config.default_models[0].devices == (0, 1)
    assert config.default_models[0].ready_timeout_s == 30.0
    assert config.default_models[1].quant == "Q4_K_M"
    harness = config.harness_config(DEFAULT_HARNESS)
    assert harness.n_ctx == 4096
    assert harness.args == ("--n_threads", "2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    path = write_config(
        etc,
        """
        log_dir = "log"
        state_dir = "../state"
        [harness.llama-cpp-python]
        hf_cache = "cache/hf"
        [[default_models]]
        model_id = "m"
        path = "models/m.gguf"
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (path, Path(os.path.relpath(path, elsewhere))):
        config = load_config(given, {})
        assert config.log_dir == etc / "log"
        assert config.state_dir == tmp_path / "state"
        assert config.harness_config(DEFAULT_HARNESS).hf_cache == etc / "cache" / "hf"
        assert config.default_models[0].path == etc / "models" / "m.gguf"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, 'log_dir = "/srv/log"\n'), {})
    assert config.log_dir == Path("/srv/log")


# --- environment overrides ------------------------------------------------------------------


def test_env_port_is_an_integer(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "port = 1\n"), {"NEURON_PORT": "14000"})
    assert config.port == 14000


def test_env_log_dir_is_a_plain_string(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""), {"NEURON_LOG_DIR": "/x"})
    assert config.log_dir == Path("/x")


def test_env_nested_harness_key(tmp_path: Path) -> None:
    environ = {"NEURON_HARNESS__LLAMA_CPP_PYTHON__HF_CACHE": "/c"}
    config = load_config(write_config(tmp_path, ""), environ)
    assert config.harness["llama-cpp-python"].hf_cache == Path("/c")


def test_env_nested_key_merges_with_the_file_table(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[harness.llama-cpp-python]\nhf_cache = "/file"\n')
    config = load_config(path, {"NEURON_HARNESS__LLAMA_CPP_PYTHON__N_CTX": "4096"})
    assert set(config.harness) == {"llama-cpp-python"}
    assert config.harness["llama-cpp-python"].hf_cache == Path("/file")
    assert config.harness["llama-cpp-python"].n_ctx == 4096


def test_client_variables_and_others_are_ignored(tmp_path: Path) -> None:
    environ = {
        "NEURON_URL": "http://127.0.0.1:1",
        "NEURON_CONFIG": "/nope.toml",
        "NEURON_API_KEY": "secret",
        "PORT": "1",
        "XNEURON_PORT": "1",
    }
    assert load_config(write_config(tmp_path, ""), environ) == NeuronConfig()


def test_process_environment_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEURON_PORT", "14001")
    assert load_config(write_config(tmp_path, "")).port == 14001


@pytest.mark.parametrize(
    ("var", "value"),
    [("NEURON_PORT", "abc"), ("NEURON_PORT", "0"), ("NEURON_BOGUS", "1")],
)
def test_env_error_names_the_variable(tmp_path: Path, var: str, value: str) -> None:
    error = load_error(tmp_path, "", {var: value})
    assert var in str(error)
    assert error.source == f"environment {var}"


def test_env_error_in_nested_key_names_the_variable(tmp_path: Path) -> None:
    var = "NEURON_HARNESS__LLAMA_CPP_PYTHON__N_CTX"
    error = load_error(tmp_path, "", {var: "abc"})
    assert var in str(error)


# --- errors name the key --------------------------------------------------------------------


MODEL = '[[default_models]]\nmodel_id = "m"\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ('[[default_models]]\nmodel_id = "m"\nbogus = 1\n', "default_models[0].bogus"),
        ("[harness.llama-cpp-python]\nbogus = 1\n", "harness.llama-cpp-python.bogus"),
        ('port = "x"\n', "port"),
        ("port = 1.5\n", "port"),
        ("host = 1\n", "host"),
        ("log_dir = 1\n", "log_dir"),
        ('stop_timeout_s = "5"\n', "stop_timeout_s"),
        ("stop_timeout_s = nan\n", "stop_timeout_s"),
        ('event_loop = "trio"\n', "event_loop"),
        ("event_loop = 1\n", "event_loop"),
        ("default_models = 1\n", "default_models"),
        ("harness = 1\n", "harness"),
        (MODEL + "n_ctx = true\n", "default_models[0].n_ctx"),
        (MODEL + 'devices = ["a"]\n', "default_models[0].devices[0]"),
        (MODEL + "devices = 0\n", "default_models[0].devices"),
        (MODEL + "args = [1]\n", "default_models[0].args[0]"),
        ('[[default_models]]\nquant = "Q4_K_M"\n', "default_models[0].model_id"),
        ("port = 0\n", "port"),
        ("port = 65536\n", "port"),
        ('host = ""\n', "host"),
        ("stop_timeout_s = 0\n", "stop_timeout_s"),
        (MODEL + "n_ctx = -1\n", "default_models[0].n_ctx"),
        (MODEL + "ready_timeout_s = 0\n", "default_models[0].ready_timeout_s"),
        (MODEL + "devices = [-1]\n", "default_models[0].devices[0]"),
        (MODEL + 'harness = ""\n', "default_models[0].harness"),
        ('[[default_models]]\nmodel_id = " "\n', "default_models[0].model_id"),
        ('[[default_models]]\nmodel_id = "a\\u0001b"\n', "default_models[0].model_id"),
        (f'[[default_models]]\nmodel_id = "{"x" * 257}"\n', "default_models[0].model_id"),
        (MODEL + MODEL, "default_models[1].model_id"),
    ],
)
def test_error_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert f"{key}:" in str(error)
    assert str(tmp_path / "neuron.toml") in str(error)
    assert "\n" not in str(error)


def test_duplicate_model_error_names_the_model(tmp_path: Path) -> None:
    error = load_error(tmp_path, MODEL + MODEL)
    assert "duplicate" in str(error)
    assert "'m'" in str(error)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path, {})
    assert str(path) in str(info.value)


def test_invalid_toml_names_the_path(tmp_path: Path) -> None:
    error = load_error(tmp_path, "port = \n")
    assert "invalid TOML" in str(error)
    assert str(tmp_path / "neuron.toml") in str(error)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_bytes(b"host = \"caf\xe9\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in str(info.value)


def test_unknown_harness_table_is_rejected_by_build_harnesses(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "[harness.nope]\nn_ctx = 1\n"), {})
    with pytest.raises(ConfigError) as info:
        build_harnesses(config)
    assert info.value.key == "harness.nope"
    assert "harness.nope" in str(info.value)
    assert "llama-cpp-python" in str(info.value)  # the known names are listed


def test_build_harnesses_knows_the_default_harness() -> None:
    assert set(build_harnesses(NeuronConfig())) == {DEFAULT_HARNESS, "llama-server"}


# --- the CLI contract: a bad config is one line on stderr and exit 78 -----------------------


def run_start(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert NEURONCTL.exists(), f"console script missing: {NEURONCTL}"
    return subprocess.run(
        [str(NEURONCTL), "start", "--config", str(config)],
        cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=30,
    )


BAD_CONFIGS = {
    "unknown-key": ("bogus = 1\n", "bogus"),
    "bad-type": ('port = "x"\n', "port"),
    "missing-file": (None, None),
    "invalid-toml": ("port = \n", None),
    "unknown-harness": ("[harness.nope]\n", "harness.nope"),
}


def bad_config(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """Write the case's config under a realistically long directory; return the path and
    what stderr must name."""
    text, key = BAD_CONFIGS[case]
    path = tmp_path / "etc-neuron-config-directory-with-a-realistic-length" / "neuron.toml"
    path.parent.mkdir(parents=True)
    if text is not None:
        path.write_text(text, encoding="utf-8")
    return path, [str(path)] + ([key] if key else [])


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_start_with_bad_config_exits_78(tmp_path: Path, case: str) -> None:
    path, named = bad_config(tmp_path, case)
    result = run_start(path, tmp_path)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().startswith("neuronctl: config error:")
    for needle in named:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["unknown-key", "bad-type", "missing-file", "invalid-toml"])
def test_start_with_bad_config_prints_one_line(tmp_path: Path, case: str) -> None:
    path, named = bad_config(tmp_path, case)
    result = run_start(path, tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in named:
        assert needle in lines[0]


def test_start_with_non_utf8_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_bytes(b"host = \"caf\xe9\"\n")
    result = run_start(path, tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == EX_CONFIG


def test_a_relative_program_is_next_to_the_config_file(tmp_path: Path) -> None:
    """`binary = "./x"` is the file beside the config, whatever the daemon's working
    directory (/ under systemd); a bare name is still looked up on PATH."""
    path = tmp_path / "neuron.toml"
    path.write_text('[harness.llama-server]\nbinary = "./slow-llama-server"\n'
                    '[harness.llama-cpp-python]\npython = "python3"\n', encoding="utf-8")
    config = load_config(path, environ={})
    assert config.harness_config("llama-server").binary == str(tmp_path / "slow-llama-server")
    assert config.harness_config("llama-cpp-python").python == "python3"


def test_an_unknown_key_names_the_nearest_one(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text('hots = "0.0.0.0"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key == "hots"
    assert caught.value.message == "unknown key (did you mean host?)"
