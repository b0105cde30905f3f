"""Idle unload: a model with a `ttl_s` is unloaded after that long without a /v1 request
(or after the `keep_alive` its latest Ollama request asked for: `Activity.keep_alive_s`).

Idle is what `/models` shows as `idle_until`, computed once (`listing.with_traffic`) from
the router's counters (`RouterStats.activity`: nothing in flight or queued, and when the
last request arrived or finished) and from when the model became loaded, whichever is
later; the router needs no clock of its own and nothing here is on its hot path. Which
TTL applies is the config's (`ttl_for`): a default model idles out only by a `ttl_s` on
its own entry, since the operator listed it to be up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..errors import Conflict, ModelNotFound
from ..states import ModelStatus
from ..supervisor.eviction import Activity
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.listing import with_traffic
from ..supervisor.registry import ModelRegistry

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


def idle_until(model: ModelLifecycle, ttl_s: float | None, activity: Activity
               ) -> float | None:
    """The Unix time `model` is unloaded unless a request comes: `/models`' `idle_until`,
    by the same computation (None without a TTL, unless loaded, or while busy)."""
    entry = {"ttl_s": ttl_s, "since": model.since, "status": model.status.value}
    until: float | None = with_traffic(entry, activity)["idle_until"]
    return until


class IdleReaper:
    """Unloads the loaded models past their TTL. `activity`: the router's counters
    (`RouterStats.activity`), which the registry reads too; `clock`: the Unix time."""

    def __init__(
        self,
        registry: ModelRegistry,
        activity: Callable[[str], Activity],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.activity = activity
        self._clock = clock

    def ttl_for(self, model: ModelLifecycle) -> float | None:
        return self.registry.config.ttl_for(model.spec)

    def idle(self) -> list[tuple[ModelLifecycle, float, float]]:
        """Loaded models past their TTL, with how long they have been idle and the TTL
        that applied (the config's, or the keep_alive a client asked for)."""
        now = self._clock()
        due = []
        for model in self.registry.models():
            if model.status is not ModelStatus.LOADED:
                continue
            activity = self.activity(model.model_id)
            ttl = self.ttl_for(model)
            if activity.keep_alive_s is not None:  # a client's keep_alive (Ollama's API)
                ttl = activity.keep_alive_s if activity.keep_alive_s >= 0 else None
            until = idle_until(model, self.ttl_for(model), activity)
            if ttl is not None and until is not None and now >= until:
                due.append((model, now - until + ttl, ttl))
        return due

    async def reap(self) -> None:
        for model, idle_s, ttl in self.idle():
            if self.registry.get(model.model_id) is not model:
                continue  # reloaded or unloaded meanwhile
            if self.activity(model.model_id).busy:
                continue  # a request came while an earlier one was being unloaded
            # The reason its events carry: a TTL unload reads apart from one by hand.
            what = "ttl_s" if self.activity(model.model_id).keep_alive_s is None else "keep_alive"
            why = f"idle: no request for {idle_s:.0f} s ({what} {ttl:g})"
            log.info("%s: %s; unloading", model.model_id, why)
            with contextlib.suppress(ModelNotFound, Conflict):  # someone else unloaded it first
                await self.registry.unload(model.model_id, why)

    async def run(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        while True:
            await self.reap()
            await asyncio.sleep(interval_s)

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the reaper runs while the app serves."""
        task = asyncio.create_task(self.run(), name="idle unload")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
