"""What every model on the node shares (`Shared`): the config and harnesses a reload
replaces, the VRAM gate, the event bus, the load lock, the state file, the prompt caches,
and the registry's hooks a load calls back (`make_room`, `settle_stops`). Made once by the
registry, handed to each `ModelLifecycle`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import NeuronConfig
from ..errors import NotEnoughVram
from ..events import EventBus
from ..models import files as modelfiles
from ..models.admission import VramGate
from .harness import Harness
from .loadlock import LoadLock, RoomSignal
from .promptcache import PromptCaches
from .statefile import StateFile
from .worker import Worker

if TYPE_CHECKING:
    from .lifecycle import ModelLifecycle

WorkerFactory = Callable[..., Worker]


@dataclass(eq=False)
class Shared:
    """What every model on the node shares. `config` and `harnesses` are replaced by a
    reload; a lifecycle reads them at each start, so a restart uses the new settings."""

    config: NeuronConfig
    harnesses: Mapping[str, Harness]
    vram_gate: VramGate
    events: EventBus = field(default_factory=EventBus)
    load_lock: LoadLock = field(default_factory=LoadLock)  # one start at a time
    state: StateFile | None = None
    worker_factory: WorkerFactory = Worker
    fetcher_factory: modelfiles.FetcherFactory = modelfiles.default_fetcher
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # Under the load lock, before a start: unload idle models so it fits (the registry's
    # `make_room`); False means wait and ask again. None: nothing is ever evicted.
    make_room: Callable[[ModelLifecycle, NotEnoughVram | None], Awaitable[bool]] | None = None
    # Wait for the evictions still stopping (the registry's `settle_stops`); True when
    # there were any. None: none is ever left to stop on its own.
    settle_stops: Callable[[], Awaitable[bool]] | None = None
    room: RoomSignal = field(default_factory=RoomSignal)  # the router notifies it
    prompt_caches: PromptCaches | None = None  # None: no worker keeps a prompt cache
