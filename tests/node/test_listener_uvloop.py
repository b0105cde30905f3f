"""The listener's guard on uvloop, the daemon's default loop: its transports derive from
none of asyncio's classes (a refusal once asserted asyncio.Transport, and on uvloop every
connection over the cap got a reset and a traceback instead of the 503). The same tests
as test_listener.py's, run on a uvloop loop of their own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from neuronctl.config import NeuronConfig
from neuronctl.supervisor.registry import ModelRegistry

from ..fakes import FakeHarness
from .test_listener import (
    test_at_the_cap_the_oldest_connection_without_a_request_head_makes_room as makes_room,
)
from .test_listener import (
    test_beyond_max_connections_new_ones_are_refused_at_once as refused_at_once,
)


@pytest.mark.parametrize("scenario", [refused_at_once, makes_room], ids=lambda f: f.__name__)
def test_the_connection_cap_on_uvloop(
    scenario: Callable[[Any], Awaitable[None]], node_config: NeuronConfig,
    fake_harness: FakeHarness,
) -> None:
    async def main() -> None:
        registry = ModelRegistry(node_config, {"fake": fake_harness})
        try:
            await scenario(lambda *args, **kwargs: registry)
        finally:
            await registry.shutdown()

    uvloop.run(main())
