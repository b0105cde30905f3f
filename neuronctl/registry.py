"""Every model on this node, by id: the table, single-flight loads, and the node-wide lock.

Each model's life is its own `ModelLifecycle` (lifecycle.py); the registry only finds it.
Loads (and restarts) are serialized node-wide by the lock all lifecycles share: VRAM
contention makes parallel loads risky. They are single-flight per model: concurrent loads
of one model share one attempt and one process, and nothing a client sends can make two
workers for one model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from . import modelfiles
from .admission import Admission
from .config import ConfigError, ModelSpec, NeuronConfig
from .discovery import Discovery
from .errors import Conflict, InvalidSpec, ModelNotFound, UnknownHarness
from .events import EventBus
from .harness import Harness, check_spec_args
from .lifecycle import ModelLifecycle, Services, WorkerFactory
from .statefile import StateFile
from .states import WorkerState
from .worker import Worker

log = logging.getLogger(__name__)

# Kept importable from here: callers catch the registry's refusals by these names.
NotFound = ModelNotFound
__all__ = ["Conflict", "ModelRegistry", "NotFound"]


class ModelRegistry:
    def __init__(
        self,
        config: NeuronConfig,
        harnesses: Mapping[str, Harness],
        *,
        state: StateFile | None = None,
        worker_factory: WorkerFactory = Worker,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        discovery: Discovery | None = None,
        fetcher_factory: modelfiles.FetcherFactory | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.discovery = discovery or Discovery(config.gpu_poll_interval_s)
        admission = Admission(self.discovery, lambda: self.config.vram_release_timeout_s,
                              clock, sleep)
        self.services = Services(
            config, harnesses, admission, events or EventBus(), state=state,
            worker_factory=worker_factory,
            fetcher_factory=fetcher_factory or modelfiles.default_fetcher,
            clock=clock, sleep=sleep,
        )
        self._models: dict[str, ModelLifecycle] = {}

    @property
    def config(self) -> NeuronConfig:
        return self.services.config

    @property
    def harnesses(self) -> Mapping[str, Harness]:
        return self.services.harnesses

    @property
    def events(self) -> EventBus:
        return self.services.events

    def reconfigure(self, config: NeuronConfig, harnesses: Mapping[str, Harness]) -> None:
        """New node settings and harnesses for loads and restarts from now on (reload)."""
        self.services.config = config
        self.services.harnesses = harnesses
        self.discovery.set_poll_interval(config.gpu_poll_interval_s)

    def models(self) -> list[ModelLifecycle]:
        return list(self._models.values())

    def get(self, model_id: str) -> ModelLifecycle | None:
        return self._models.get(model_id)

    def load_progress(self) -> tuple[object, ...]:
        """What the loads in progress are doing, downloads included: bytes arriving are
        progress, so the start-up heartbeat keeps going."""
        return tuple((m.model_id, *token) for m in self._models.values()
                     if (token := m.progress_token()) is not None)

    async def load(self, spec: ModelSpec) -> ModelLifecycle:
        """Load `spec` and return once its worker is ready; raise LoadError otherwise.

        An unknown harness fails before anything is listed or spawned.
        """
        if spec.harness not in self.harnesses:
            raise UnknownHarness(spec.harness)
        try:
            check_spec_args(self.harnesses, spec)
        except ConfigError as exc:
            raise InvalidSpec(str(exc), param=exc.key) from None
        model = self._models.get(spec.model_id)
        if model is not None and model.stopping:
            raise Conflict(f"{spec.model_id} is being unloaded; load it again when it is done")
        if model is None or model.state is WorkerState.FAILED:
            # New, or failed before: a fresh attempt replaces the failed entry.
            model = ModelLifecycle(spec, self.services)
            self._models[spec.model_id] = model  # listed as `loading` while it waits its turn
            model.start()
        elif model.spec != spec:
            raise Conflict(f"{spec.model_id} is {model.status.value} with different settings; "
                           "unload it first")
        elif model.state is WorkerState.READY:
            return model
        elif not model.loading:
            raise Conflict(f"{spec.model_id} is {model.status.value}; "
                           "try again when it is done")
        await model.wait_loaded()  # single flight: every caller waits on the one attempt
        return model

    async def unload(self, model_id: str) -> None:
        """Stop the model whatever it is doing (a load in progress, a backoff)."""
        model = self._models.get(model_id)
        if model is None:
            raise NotFound(f"model not loaded: {model_id}")
        if model.stopping:
            raise Conflict(f"{model_id} is already being unloaded")
        await self._stop(model, "unloaded")
        log.info("unloaded %s", model_id)

    async def _stop(self, model: ModelLifecycle, reason: str, release_vram: bool = True) -> None:
        try:
            await model.stop(reason, release_vram)
        finally:
            if self._models.get(model.model_id) is model:
                del self._models[model.model_id]

    def cancel_loads(self) -> None:
        """Make pending load requests answer now (the node is stopping)."""
        for model in self._models.values():
            model.cancel_load()

    async def shutdown(self) -> None:
        """Stop every model, all in parallel: cancel loads and restarts, then SIGTERM,
        a bounded wait and SIGKILL for each worker."""
        models = list(self._models.values())
        outcomes = await asyncio.gather(
            *(self._stop(m, "shutting down", False) for m in models), return_exceptions=True)
        for model, outcome in zip(models, outcomes, strict=True):
            if isinstance(outcome, BaseException):  # the others are still stopped
                log.error("%s: stopping failed", model.model_id, exc_info=outcome)
        await self.discovery.close()
