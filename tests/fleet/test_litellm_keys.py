"""A LiteLLM gateway with a key of its own (docs/security.md): the node gives the gateway's
key inference (and read, for `fleet litellm-config`) on the models it serves, nothing
else; requests through the proxy are counted under the key's name. One node, the proxy
from .ci/litellm.sh; skipped with the reason without it."""

from __future__ import annotations

import importlib.util
import json
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from neuronctl.keys import sha256_hex

from ..helpers import (
    LITELLM,
    LITELLM_ENV,
    NEURONCTL,
    clean_env,
    find_llama_server,
    fleet_node_toml,
    free_port,
    spawn,
    stop_group,
    wait_http,
)

pytestmark = [
    pytest.mark.litellm,
    pytest.mark.skipif(not LITELLM.is_file(),
                       reason=f"LiteLLM's proxy is not installed at {LITELLM} (.ci/litellm.sh)"),
    pytest.mark.skipif(find_llama_server() is None
                       and importlib.util.find_spec("llama_cpp") is None,
                       reason="needs llama-server or llama-cpp-python[server]"),
]

GATEWAY_KEY = "nk-litellm-gateway-key"
ADMIN_KEY = "nk-litellm-admin-key"


def call(url: str, key: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_a_gateway_key_serves_through_litellm_and_nothing_else(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    port = free_port()
    keys = (f'[[keys]]\nname = "litellm"\nroles = ["inference", "read"]\nmodels = ["tiny"]\n'
            f'sha256 = "{sha256_hex(GATEWAY_KEY)}"\n'
            f'[[keys]]\nname = "ops"\nroles = ["admin"]\nsha256 = "{sha256_hex(ADMIN_KEY)}"\n')
    (tmp_path / "neuron.toml").write_text(
        fleet_node_toml(port, "node-a", tiny_gguf, find_llama_server()) + keys)
    node_url = f"http://127.0.0.1:{port}"
    node = spawn([str(NEURONCTL), "start", "--config", "neuron.toml", "--log-level", "warning"],
                 tmp_path / "daemon.log", clean_env(), cwd=tmp_path)
    proxy = None
    try:
        wait_http(node, f"{node_url}/health", 120, tmp_path / "daemon.log")
        out = tmp_path / "litellm.yaml"
        made = subprocess.run(
            [str(NEURONCTL), "fleet", "litellm-config", node_url, "--api-key", GATEWAY_KEY,
             "--out", str(out)], env=clean_env(), capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        master = "sk-" + secrets.token_hex(16)
        proxy_port = free_port()
        proxy = spawn([str(LITELLM), "--config", str(out), "--host", "127.0.0.1",
                       "--port", str(proxy_port)], tmp_path / "proxy.log",
                      clean_env(**LITELLM_ENV, LITELLM_MASTER_KEY=master), cwd=tmp_path)
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        wait_http(proxy, f"{proxy_url}/health/liveliness", 120, tmp_path / "proxy.log")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "temperature": 0}
        for _ in range(3):
            status, answer = call(f"{proxy_url}/v1/chat/completions", master, chat)
            assert status == 200, answer
        # The gateway's key changes nothing on the node, nor reads its usage.
        assert call(f"{node_url}/models/unload", GATEWAY_KEY, {"model_id": "tiny"})[0] == 403
        assert call(f"{node_url}/keys/usage", GATEWAY_KEY)[0] == 403
        status, usage = call(f"{node_url}/keys/usage", ADMIN_KEY)
        assert status == 200
        counted = usage["keys"]["litellm"]
        assert counted["requests"]["tiny"]["200"] == 3
        assert counted["tokens"]["tiny"]["completion"] > 0
        assert GATEWAY_KEY not in (tmp_path / "daemon.log").read_text()
    finally:
        if proxy is not None:
            stop_group(proxy)
        stop_group(node)
