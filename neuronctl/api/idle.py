"""Idle unload: a model with a `ttl_s` is unloaded after that long without a /v1 request.

Activity is read from the router's own counters (a request counted, or one still in
flight), so the router needs no clock of its own and nothing here is on its hot path.
Default models are pinned: only a `ttl_s` on their own entry lets them idle out, since the
operator listed them to be up.
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
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.registry import ModelRegistry
from .v1 import ROUTER_STATS, RouterStats

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


class IdleReaper:
    def __init__(
        self,
        registry: ModelRegistry,
        stats: RouterStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.stats = stats
        self._clock = clock
        # Per loaded record (a reload makes a new one): request count last seen, and when
        # the model was last busy.
        self._seen: dict[ModelLifecycle, tuple[int, float]] = {}

    def ttl_for(self, record: ModelLifecycle) -> float | None:
        return self.registry.config.ttl_for(record.spec)

    def idle(self) -> list[tuple[ModelLifecycle, float]]:
        """Loaded models past their TTL, with how long they have been idle."""
        now = self._clock()
        due = []
        live = {r for r in self.registry.models() if r.status is ModelStatus.LOADED}
        for record in list(self._seen):
            if record not in live:
                del self._seen[record]
        for record in live:
            ttl = self.ttl_for(record)
            if ttl is None:
                continue
            counters = self.stats.models.get(record.model_id)
            requests = counters.requests if counters else 0
            busy = counters is not None and (counters.in_flight > 0 or counters.queue.queued > 0)
            seen = self._seen.get(record)
            if seen is None or seen[0] != requests or busy:
                self._seen[record] = (requests, now)
            elif now - seen[1] >= ttl:
                due.append((record, now - seen[1]))
        return due

    async def reap(self) -> None:
        for record, idle_s in self.idle():
            if self.registry.get(record.model_id) is not record:
                continue  # reloaded or unloaded meanwhile
            if self.registry.activity(record.model_id).busy:
                continue  # a request came while an earlier one was being unloaded
            log.info("%s: no request for %.0f s (ttl_s %g); unloading",
                     record.model_id, idle_s, self.ttl_for(record) or 0)
            with contextlib.suppress(ModelNotFound, Conflict):  # someone else unloaded it first
                await self.registry.unload(record.model_id)

    async def run(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        while True:
            await self.reap()
            await asyncio.sleep(interval_s)


def idle_unload_ctx(
    registry: ModelRegistry,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context: the reaper runs while the app serves."""

    async def run_reaper(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(IdleReaper(registry, app[ROUTER_STATS]).run(),
                                   name="idle unload")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return run_reaper
