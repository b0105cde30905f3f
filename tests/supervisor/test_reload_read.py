"""A config file that blocks when read (a FIFO, a hung mount) never freezes the API."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from neuronctl.api.app import create_app
from neuronctl.supervisor.reload import Reloader

from ..helpers import MakeRegistry, poll_until_async


async def test_a_reload_of_a_fifo_times_out_while_the_api_answers(
    make_registry: MakeRegistry, tmp_path: Path
) -> None:
    fifo = tmp_path / "neuron.toml"
    os.mkfifo(fifo)
    registry = make_registry()
    reloader = Reloader(registry, fifo, build=lambda c: dict(registry.harnesses),
                        read_timeout_s=0.5)
    app = create_app(registry, reloader=reloader)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        reload = asyncio.ensure_future(client.post("/reload"))
        await poll_until_async(lambda: reloader._read is not None)  # the read has begun
        started = time.monotonic()
        models = await client.get("/models")  # answered while the read blocks
        assert models.status == 200
        assert time.monotonic() - started < 0.4
        answer = await reload
        assert answer.status == 400
        body = await answer.json()
        assert body["code"] == "invalid_config"
        assert "did not finish within 0.5 s" in body["error"]
        # The stuck read still holds its thread: another reload is refused at once.
        again = await client.post("/reload")
        assert again.status == 400
        assert "still being read by an earlier reload" in (await again.json())["error"]
    # Unblock the thread (a writer arrives) so the test leaves nothing behind.
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)
    assert isinstance(reloader._read, asyncio.Future)
    done, _ = await asyncio.wait({reloader._read}, timeout=5)
    assert done  # the read finished (an empty file: the defaults), its thread is gone
