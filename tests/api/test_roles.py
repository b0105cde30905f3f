"""Every route of the app's own router against every role: generated from
`app.router.routes()`, so a route added without a line in api/roles.py fails here."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.api.roles import OPEN, ROUTE_ROLES
from neuronctl.config import KeySpec, NeuronConfig
from neuronctl.keys import ADMIN, ANY_KEY, INFERENCE, READ, sha256_hex

from ..helpers import MakeRegistry

KEYS = {role: f"nk-test-{role}-key" for role in (INFERENCE, READ, ADMIN)}
# What a pattern's variables become in a request that reaches the handler.
SAMPLE = {"model_id": "m", "path": "chat/completions"}


def keyed_config(node_config: NeuronConfig, **extra: Any) -> NeuronConfig:
    keys = tuple(KeySpec(role, (role,), sha256=sha256_hex(key)) for role, key in KEYS.items())
    both = KeySpec("inference-read", (INFERENCE, READ), sha256=sha256_hex("nk-test-both"))
    return dataclasses.replace(node_config, keys=(*keys, both), **extra)


def app_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, canonical path) of every route the app serves; HEAD goes with GET."""
    found = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        assert route.resource is not None
        found.append((route.method, route.resource.canonical))
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE[m.group(1)], path)


def test_every_route_of_the_app_has_a_role(node_config: NeuronConfig,
                                           make_registry: MakeRegistry) -> None:
    app = create_app(make_registry(keyed_config(node_config)))
    missing = [f"{m} {p}" for m, p in app_routes(app) if p not in ROUTE_ROLES]
    assert missing == [], "routes without a role in api/roles.py"


def test_routes_other_branches_add_are_classified_already() -> None:
    for name in ("chat", "generate", "embed", "embeddings", "show", "tags", "ps", "version"):
        assert ROUTE_ROLES[f"/api/{name}"] == INFERENCE
    for name in ("pull", "delete", "create", "copy", "push"):
        assert ROUTE_ROLES[f"/api/{name}"] == ADMIN
    assert ROUTE_ROLES["/v1/messages"] == ROUTE_ROLES["/v1/messages/count_tokens"] == INFERENCE
    assert ROUTE_ROLES["/health"] is OPEN


async def test_every_route_against_every_role(node_config: NeuronConfig,
                                              make_registry: MakeRegistry) -> None:
    app = create_app(make_registry(keyed_config(node_config)))
    routes = app_routes(app)

    async def ask(client: TestClient[Any, Any], method: str, path: str,
                  key: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        method = "POST" if method == "*" else method
        async with client.request(method, path, json={}, headers=headers) as resp:
            # The events stream answers its head at once; nothing more is read of it.
            body = await resp.json() if resp.status in (401, 403) else None
            return resp.status, body

    async with TestClient(TestServer(app)) as client:
        for method, pattern in routes:
            role = ROUTE_ROLES[pattern]
            path = concrete(pattern)
            status, body = await ask(client, method, path, None)
            assert (status == 401) == (role is not OPEN), (method, path, status)
            for holder, key in (*KEYS.items(), ("inference-read", "nk-test-both")):
                status, body = await ask(client, method, path, key)
                roles = {"inference-read": {INFERENCE, READ}}.get(holder, {holder})
                allowed = role in (OPEN, ANY_KEY) or ADMIN in roles or role in roles
                assert status not in (401, 403) if allowed else status == 403, \
                    (method, path, holder, status, body)
                if not allowed:
                    error = body["error"]
                    if path.startswith("/v1/messages"):  # Anthropic's for Anthropic's
                        assert error["type"] == "permission_error"
                        error = error["message"]
                    elif path.startswith("/v1/"):  # OpenAI's shape for OpenAI's clients
                        assert error["code"] == "insufficient_role"
                        error = error["message"]
                    else:
                        assert body["code"] == "insufficient_role"
                    assert f"lacks the {role!r} role" in error and holder in error
                    assert key not in str(body)


async def test_unmatched_routes_need_a_key_and_no_role(
    node_config: NeuronConfig, make_registry: MakeRegistry
) -> None:
    app = create_app(make_registry(keyed_config(node_config)))
    async with TestClient(TestServer(app)) as client:
        async with client.get("/no/such/route") as resp:
            assert resp.status == 401
        read = {"Authorization": f"Bearer {KEYS[READ]}"}
        async with client.get("/no/such/route", headers=read) as resp:
            assert resp.status == 404
        async with client.delete("/models", headers=read) as resp:
            assert resp.status == 405


@pytest.mark.parametrize("holder", [INFERENCE, READ, ADMIN])
async def test_keys_self_says_who_asks(node_config: NeuronConfig,
                                       make_registry: MakeRegistry, holder: str) -> None:
    app = create_app(make_registry(keyed_config(node_config)))
    async with TestClient(TestServer(app)) as client:
        headers = {"x-api-key": KEYS[holder]}
        async with client.get("/keys/self", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["roles"] == [holder]
