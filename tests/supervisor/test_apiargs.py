"""`args` from the API are an allow-list (neuronctl/supervisor/apiargs.py): the flags that made one
request run shell commands, read or clobber files and fetch URLs are refused over the API,
and still run when the operator writes them in the config."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.config import ConfigError, HarnessConfig, ModelSpec, NeuronConfig, load_config
from neuronctl.supervisor.apiargs import (
    LLAMA_CPP_PYTHON_API_FLAGS,
    LLAMA_SERVER_API_FLAGS,
    check_api_args,
)
from neuronctl.supervisor.harness import LlamaCppPythonHarness, LlamaServerHarness, build_harnesses

from ..fakes import FakeHarness
from ..helpers import MakeRegistry

# The four attacks of the takeover report, each one load away from its effect.
ATTACKS = {
    "code execution": ["--tools", "all", "--api-prefix", "(/v1)?"],
    "file read": ["--chat-template-file", "/etc/shadow", "--verbose"],
    "file write": ["--log-file", "/var/lib/neuron/workers.json"],
    "ssrf": ["-mmu", "http://127.0.0.1:9/internal"],
}


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


async def _client(make_registry: MakeRegistry, config: NeuronConfig,
                  fake: FakeHarness) -> TestClient[Any, Any]:
    harnesses = {"fake": fake,
                 "llama-cpp-python": LlamaCppPythonHarness(config.harness_config(
                     "llama-cpp-python")),
                 "llama-server": LlamaServerHarness(config.harness_config("llama-server"))}
    return TestClient(TestServer(create_app(make_registry(config, harnesses))))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_the_takeover_flags_are_refused_over_the_api(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    model_file: Path, attack: str,
) -> None:
    args = ATTACKS[attack]
    async with await _client(make_registry, node_config, fake_harness) as client:
        body = {"model_id": "x", "harness": "llama-server", "path": str(model_file),
                "n_ctx": 256, "args": args}
        async with client.post("/models/load", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 400, answer
        assert answer["code"] == "arg_not_allowed"
        assert args[0] in answer["error"] and "args[0]" in answer["error"]
        assert "config" in answer["error"]  # says who can set it
        async with client.get("/models") as resp:
            assert await resp.json() == []  # nothing listed, nothing started


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_the_same_flags_written_by_the_operator_still_run(
    tmp_path: Path, model_file: Path, attack: str,
) -> None:
    path = tmp_path / "neuron.toml"
    args = ", ".join(f'"{a}"' for a in ATTACKS[attack])
    path.write_text(f'[[default_models]]\nmodel_id = "x"\nharness = "llama-server"\n'
                    f'path = "{model_file}"\nargs = [{args}]\n')
    config = load_config(path, {})
    harness = build_harnesses(config)["llama-server"]  # no ConfigError
    assert isinstance(harness, LlamaServerHarness)
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    harness = LlamaServerHarness(HarnessConfig(binary=str(binary)))
    plan = harness.plan(config.default_models[0], 4242)
    assert list(plan.command[-len(ATTACKS[attack]):]) == ATTACKS[attack]


@pytest.mark.parametrize("args", [
    ["-t", "2", "--threads-batch", "2", "-b", "512", "--ubatch-size=256"],
    ["--flash-attn", "on", "-ctk", "q8_0", "--cache-type-v", "q8_0", "--swa-full"],
    ["--temp", "0.7", "--top-k", "40", "--seed", "-1", "--samplers", "top_k;top_p;temperature"],
    ["--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "8192"],
    ["--embedding", "--pooling", "mean", "--no-context-shift", "-ngl", "99"],
])
def test_performance_and_sampling_flags_pass(args: list[str]) -> None:
    check_api_args(args, LLAMA_SERVER_API_FLAGS)


@pytest.mark.parametrize(("args", "element", "says"), [
    (["-t", "two"], "args[1]", "integer"),
    (["--threads-http", "3000"], "args[1]", "from -1 to 256"),  # 3,006 threads once
    (["-cram", "-1"], "args[1]", "from 0 to"),  # no limit on the prompt cache's RAM
    (["-ctxcp", "2147483647"], "args[1]", "from 0 to 256"),
    (["-b", "0"], "args[1]", "from 1 to"),
    (["--flash-attn", "maybe"], "args[1]", "one of auto, off, on"),
    (["--temp", "nan"], "args[1]", "finite"),
    (["--swa-full=1"], "args[0]", "takes no value"),
    (["-t"], "args[0]", "needs a value"),
    (["-t", "2", "stray"], "args[2]", "not a flag"),
    (["--samplers", "top_k;$(id)"], "args[1]", "sampler names"),
    (["--threads", "2", "--slot-save-path", "/tmp"], "args[2]", "--slot-save-path"),
    (["--models-dir", "/"], "args[0]", "--models-dir"),
    (["--webui-config-file", "/etc/passwd"], "args[0]", "--webui-config-file"),
    (["-ag"], "args[0]", "-ag"),
    (["--grammar-file", "/etc/shadow"], "args[0]", "--grammar-file"),
])
def test_bad_values_and_unlisted_flags_name_the_element(
    args: list[str], element: str, says: str,
) -> None:
    with pytest.raises(ConfigError) as refused:
        check_api_args(args, LLAMA_SERVER_API_FLAGS)
    assert refused.value.key == element
    assert says in refused.value.message


@pytest.mark.parametrize("args", [
    ["--rpc_servers", "10.0.0.1:50052"],
    ["--hf_model_repo_id", "org/repo"],
    ["--lora_path", "/etc/shadow"],
    ["--cache", "true", "--cache_type", "disk"],
    ["--root_path", "/v1"],
    ["--model_al", "other"],  # argparse would take an abbreviation: the list never does
    ["--ho", "0.0.0.0"],
    ["--verbose", "true"],
])
def test_llama_cpp_python_refuses_what_is_not_a_knob(args: list[str]) -> None:
    with pytest.raises(ConfigError, match="may not be set through the API"):
        check_api_args(args, LLAMA_CPP_PYTHON_API_FLAGS)


def test_llama_cpp_python_knobs_pass() -> None:
    check_api_args(["--n_threads", "2", "--flash_attn", "true", "--type_k", "8",
                    "--rope_freq_base", "10000", "--pooling", "mean"],
                   LLAMA_CPP_PYTHON_API_FLAGS)


async def test_the_operator_widens_the_list_but_never_to_reserved_flags(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    model_file: Path,
) -> None:
    widened = HarnessConfig(api_args=("--override-kv", "--host"))
    config = dataclasses.replace(node_config, harness={"llama-server": widened})
    async with await _client(make_registry, config, fake_harness) as client:
        base = {"model_id": "x", "harness": "llama-server", "path": str(model_file)}
        body = {**base, "args": ["--override-kv", "tokenizer.ggml.add_bos_token=bool:false",
                                 "--host", "0.0.0.0"]}
        async with client.post("/models/load", json=body) as resp:
            answer = await resp.json()
        assert resp.status == 400
        # --override-kv passed the list; --host is the harness's own, whoever allows it.
        assert "args[2]" in answer["error"] and "--host cannot be set" in answer["error"]


def test_api_args_in_the_config_must_be_flags(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text('[harness.llama-server]\napi_args = ["override-kv"]\n')
    with pytest.raises(ConfigError, match=r"harness\.llama-server\.api_args\[0\]"):
        load_config(path, {})


async def test_a_catalogue_id_keeps_its_trusted_args_and_api_args_are_checked(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    model_file: Path,
) -> None:
    entry = ModelSpec("cat", harness="llama-server", path=model_file,
                      args=("--log-file", "/dev/null"))
    config = dataclasses.replace(node_config, models=(entry,))
    async with await _client(make_registry, config, fake_harness) as client:
        body = {"model_id": "cat", "args": ["--log-file", "/tmp/x"]}
        async with client.post("/models/load", json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == "arg_not_allowed"


async def test_the_journal_shows_the_whole_worker_command(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with await _client(make_registry, node_config, fake_harness) as client:
        body = {"model_id": "m", "harness": "fake", "args": ["--delay", "0.01"]}
        async with client.post("/models/load", json=body) as resp:
            assert resp.status == 200, await resp.text()
    lines = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.INFO and "m: running" in r.getMessage()]
    assert lines and "--delay 0.01" in lines[0] and "fake_worker.py" in lines[0]


def test_amx_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from neuronctl.supervisor.harness import cpu_has_amx

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_has_amx.__wrapped__(str(amx)) is True
    assert cpu_has_amx.__wrapped__(str(plain)) is False
    assert cpu_has_amx.__wrapped__(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("amx", [True, False])
def test_workers_run_without_extra_buffers_on_amx_cpus(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch, amx: bool,
) -> None:
    from neuronctl.supervisor import harness

    monkeypatch.setattr(harness, "cpu_has_amx", lambda: amx)
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    spec = ModelSpec("m", path=model_file)
    python_plan = LlamaCppPythonHarness(HarnessConfig()).plan(spec, 4242)
    server_plan = LlamaServerHarness(HarnessConfig(binary=str(binary))).plan(spec, 4242)
    assert ("--no_extra_bufts" in python_plan.command) is amx
    assert ("--no-repack" in server_plan.command) is amx


async def test_a_catalogue_models_args_are_checked_against_its_own_harness(
    node_config: NeuronConfig, fake_harness: FakeHarness, make_registry: MakeRegistry,
    model_file: Path,
) -> None:
    entry = ModelSpec("cat", harness="llama-server", path=model_file)
    config = dataclasses.replace(node_config, models=(entry,))
    async with await _client(make_registry, config, fake_harness) as client:
        # llama-cpp-python's flags (the default harness) are not llama-server's.
        body = {"model_id": "cat", "args": ["--flash_attn", "off"]}
        async with client.post("/models/load", json=body) as resp:
            assert resp.status == 400
            assert "--flash_attn" in (await resp.json())["error"]
        # llama-server's own -t passes the list (the load then fails: no binary here).
        body = {"model_id": "cat", "args": ["-t", "1"]}
        async with client.post("/models/load", json=body) as resp:
            assert (await resp.json()).get("code") != "arg_not_allowed"
