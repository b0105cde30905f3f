"""Bodies still being read count against the node's `max_queued_bytes`: connections that
send most of a body and trickle the rest (the guard only asks for 1 KiB per
`body_timeout_s`) cannot hold `max_connections x max_request_bytes` of memory."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from neuronctl.api.app import create_app
from neuronctl.api.v1 import ROUTER_STATS
from neuronctl.config import NeuronConfig

from ..helpers import MakeRegistry, poll_until_async

MIB = 1 << 20


@contextlib.asynccontextmanager
async def _partial_bodies(port: int, path: str, count: int, length: int,
                          sent: int) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """`count` connections that each declare `length` bytes, send `sent`, and wait."""
    writers = []
    try:
        for _ in range(count):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
                         .encode() + b"[" * sent)
            await writer.drain()
            writers.append(writer)
        yield writers
    finally:
        for writer in writers:
            writer.close()


async def _post(port: int, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


@pytest.mark.parametrize(("path", "length"), [
    ("/v1/completions", 2 * MIB), ("/models/load", MIB),
])
async def test_partly_sent_bodies_count_against_the_nodes_budget(
    node_config: NeuronConfig, make_registry: MakeRegistry, path: str, length: int,
) -> None:
    config = dataclasses.replace(node_config, max_request_bytes=4 * MIB,
                                 max_queued_bytes=4 * MIB)
    registry = make_registry(config)
    async with TestServer(create_app(registry)) as server:
        assert server.port is not None
        app = server.app
        assert app is not None
        stats = app[ROUTER_STATS]
        sent = length - 1024  # all but the last KiB: the rest would trickle
        holders = (4 * MIB) // sent
        async with _partial_bodies(server.port, path, holders, length, sent):
            budget = stats.queued_bytes
            await poll_until_async(lambda: budget.held >= holders * sent, 10)
            status, answer = await _post(server.port, path, b"{" + b" " * (MIB - 2) + b"}")
            assert status == 429
            error = answer["error"]
            code = error["code"] if isinstance(error, dict) else answer["code"]
            assert code == "queue_bytes_full"
        await poll_until_async(lambda: budget.held == 0, 10)  # given back once they left
