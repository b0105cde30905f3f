"""Every model on this node, by id: the table, single-flight loads, and the node-wide lock.

Each model's life is its own `ModelLifecycle` (lifecycle.py); the registry only finds it.
Loads (and restarts) are serialized node-wide by the lock all lifecycles share: VRAM
contention makes parallel loads risky. They are single-flight per model: concurrent loads
of one model share one attempt and one process, and nothing a client sends can make two
workers for one model.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from .. import logfiles
from ..config import (
    ConfigError,
    ModelSpec,
    NeuronConfig,
    gpu_layers,
    same_worker,
    shown_setting,
)
from ..errors import (
    ApiModelsRefused,
    Conflict,
    InvalidSpec,
    ModelNotFound,
    NoRoom,
    NotEnoughVram,
    UnknownHarness,
    clip,
)
from ..events import EventBus
from ..models import files as modelfiles
from ..models import pulls
from ..models.admission import VramGate
from ..models.discovery import Discovery
from ..models.pulls import Pulls
from ..states import WorkerState
from ..suggest import did_you_mean
from . import listing
from .eviction import IDLE, Activity, Candidate, choose, shares_devices
from .harness import Harness, check_spec_args
from .lifecycle import ModelLifecycle
from .promptcache import PromptCaches
from .shared import Shared, WorkerFactory
from .statefile import StateFile
from .worker import Worker

log = logging.getLogger(__name__)

# Keys that say where a model's file comes from: a load request with one of them is a
# model of its own, not the catalogue entry of the same id.
_SOURCE_KEYS = frozenset({"path", "repo", "file", "quant", "revision", "harness"})
# Keys that say where a file comes from: without one, an id outside the catalogue is a
# typo far more often than a Hugging Face repo, and is refused rather than fetched.
_FETCH_KEYS = frozenset({"path", "repo", "file", "quant", "revision"})


# A model whose last load failed for one of these reasons is loaded again by the next /v1
# request naming it: the cause was the node's state at the time, not the model.
_RETRIED_ON_DEMAND = frozenset({"no_room", "load_cancelled", "insufficient_vram",
                                "insufficient_ram"})
# Failed models outside the catalogue stay listed (with why) until this many have piled
# up; then the oldest goes. The catalogue's own are bounded by the config.
MAX_FAILED_AD_HOC = 32
# The logs of models outside the catalogue outlive them (`neuronctl logs ID` after the
# fact), those of this many at most: the oldest go when another one is unloaded.
MAX_AD_HOC_LOGS = 32


def _log_failure(task: asyncio.Task[None]) -> None:
    """For a stop nobody awaits: its failure (a bug) in the journal, not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("stopping a model failed", exc_info=task.exception())


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
        activity: Callable[[str], Activity] = lambda model_id: IDLE,
        prompt_caches: PromptCaches | None = None,
    ) -> None:
        """`activity`: the router's counts of a model's traffic (eviction takes only idle
        models, `listing()` shows them), made before the registry by whoever makes both;
        every model is idle without it (a registry with no router)."""
        self.discovery = discovery or Discovery(config.gpu_poll_interval_s)
        vram_gate = VramGate(self.discovery, lambda: self.config.vram_release_timeout_s,
                              clock, sleep)
        self.services = Shared(
            config, harnesses, vram_gate, events or EventBus(), state=state,
            worker_factory=worker_factory,
            fetcher_factory=fetcher_factory or modelfiles.default_fetcher,
            clock=clock, sleep=sleep, make_room=self.make_room, settle_stops=self.settle_stops,
            prompt_caches=prompt_caches or PromptCaches(lambda: self.config),
        )
        self._models: dict[str, ModelLifecycle] = {}
        # Downloads without a load (POST /models/pull, prefetch), through the same fetcher.
        self.pulls = Pulls(lambda name: self.config.harness_config(name),
                           fetcher_factory or modelfiles.default_fetcher)
        self.activity = activity
        self.evictions: collections.Counter[tuple[str, str]] = collections.Counter()
        # Log stems of the models outside the catalogue this daemon ran (_prune_logs).
        self._ad_hoc_logs: set[str] = set()

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

    # --- the catalogue ---------------------------------------------------------------------

    @property
    def catalogue(self) -> Mapping[str, ModelSpec]:
        return self.config.catalogue()

    def in_catalogue(self, spec: ModelSpec) -> bool:
        """Whether `spec` is its id's catalogue entry, as far as where its file comes from
        (a request may set other keys of it, `ttl_s` say): not a client's own model."""
        entry = self.catalogue.get(spec.model_id)
        return entry is not None and all(
            getattr(entry, key) == getattr(spec, key) for key in _SOURCE_KEYS)

    def listing(self) -> list[dict[str, Any]]:
        """What `GET /models` lists (and an event stream's snapshot): the catalogue's models
        in the config's order, loaded or not (`unloaded`), then the others in the order they
        were loaded, each with the router's counts. A row keeps its place as its model
        loads and unloads (`status --watch`, the dashboard)."""
        catalogue = self.catalogue
        listed = [self._models[model_id].to_json() if model_id in self._models
                  else listing.of_spec(spec, self.config).as_json()
                  for model_id, spec in catalogue.items()]
        listed += [m.to_json() for model_id, m in self._models.items()
                   if model_id not in catalogue]
        # `autoload`: a /v1 request naming it loads it when it is not loaded (a gateway may
        # send it requests while it is unloaded; docs/fleet.md).
        # `catalogue`: whether the config lists it; a failed model that is not can only be
        # loaded again as it was, or removed (the dashboard's Remove).
        return [{**listing.with_traffic(entry, self.activity(entry["id"])),
                 "autoload": entry["id"] in catalogue
                 and self.config.autoloads(catalogue[entry["id"]]),
                 **self._prompt_cache_keys(entry["id"]),
                 "catalogue": entry["id"] in catalogue,
                 "default": self.config.is_default(entry["id"]),
                 # A download without a load of it (prefetch, POST /models/pull), if any.
                 "pull": self._pull_json(entry["id"])} for entry in listed]

    def _prompt_cache_keys(self, model_id: str) -> dict[str, Any]:
        """`prompt_cache` (whether its worker keeps one) and `prompt_cache_bytes` (what its
        saved cache holds on disk, loaded or not) of a `/models` entry."""
        caches = self.services.prompt_caches
        model = self._models.get(model_id)
        spec = model.spec if model is not None else self.catalogue.get(model_id)
        harness = self.harnesses.get(spec.harness) if spec is not None else None
        on = (caches is not None and spec is not None and harness is not None
              and caches.wanted(spec, harness.keeps_prompt_cache))
        if on and model is not None and model.worker is not None:
            # Wanted, but a worker runs without one when its directory could not be made
            # (read-only or full state_dir): say what it does, not what was asked.
            on = model.prompt_cache is not None
        return {"prompt_cache": on,
                "prompt_cache_bytes": caches.bytes_held(model_id) if caches is not None else 0}

    def _pull_json(self, model_id: str) -> dict[str, Any] | None:
        pull = self.pulls.get(model_id)
        if pull is None:
            return None
        if pull.state == pulls.DONE and pull.path and not os.path.exists(pull.path):
            return None  # removed since (`neuronctl rm`): the record would say it is there
        return pull.as_json()

    def spec_for(self, parsed: ModelSpec, keys: Collection[str]) -> ModelSpec:
        """The spec a load request means. A catalogue id without a source of its own (no
        path, repo, file, quant or revision) is the catalogue's entry, with whatever other
        keys the request sets (`ttl_s`, `force`, ...); a bare id outside the catalogue is
        the spec the node already has for it (a failed model loaded by `path` is loaded
        again from that path), and refused when it has none (ModelNotFound: a typo is
        never fetched from the Hub). Anything else is taken as written."""
        entry = self.catalogue.get(parsed.model_id)
        overrides = {k: getattr(parsed, k) for k in keys if k != "model_id"}
        if entry is None and not _FETCH_KEYS.intersection(keys):
            known = self._models.get(parsed.model_id)
            if known is not None:
                return dataclasses.replace(known.spec, **overrides)
            harness = self.harnesses.get(parsed.harness)
            if harness is not None and harness.needs_model_file:
                raise ModelNotFound(self.unknown_model(parsed.model_id))
        if entry is None or _SOURCE_KEYS.intersection(keys):
            return parsed
        return dataclasses.replace(entry, **overrides)

    def unknown_model(self, model_id: str) -> str:
        """Why a bare id that the node does not know is refused, with the nearest it
        knows."""
        hint = did_you_mean(model_id, [*self.catalogue, *self._models])
        return (f"no model {model_id!r} in the catalogue{hint}; to fetch a Hugging Face repo "
                "give --repo/--quant/--file")

    async def demand(self, model_id: str) -> ModelLifecycle | None:
        """A /v1 request names `model_id`: its lifecycle, or a load started for it when it
        is a catalogue model with autoload that is not loaded, or being unloaded (evicted,
        say: that stop is waited for first). The request then waits in its queue. None
        when it is neither loaded nor loadable on demand."""
        model = self._models.get(model_id)
        spec = self.catalogue.get(model_id)
        loadable = spec is not None and self.config.autoloads(spec)
        if spec is not None and loadable and model is not None \
                and model.state is WorkerState.FAILED and model.failure_code in _RETRIED_ON_DEMAND:
            log.info("%s: requested through /v1; loading it again (%s)", model_id,
                     model.last_error)
            return self._begin(spec)
        if model is not None and (not model.stopping or not loadable):
            return model
        if model is not None:
            await model.stop("")  # joins the stop under way (a stop is done once)
            while self._models.get(model_id) is model:  # its entry goes right after
                await asyncio.sleep(0)
            again = self._models.get(model_id)
            if again is not None:
                return again  # someone else loaded it meanwhile
        if spec is None or not loadable:
            return None
        log.info("%s: requested through /v1; loading it on demand", model_id)
        return self._begin(spec)

    def _begin(self, spec: ModelSpec, by_client: bool = False) -> ModelLifecycle:
        ad_hoc = not self.in_catalogue(spec)
        # The n_ctx is the client's unless it is what the catalogue entry says.
        entry = self.catalogue.get(spec.model_id)
        strict_n_ctx = by_client and spec.n_ctx is not None and (
            ad_hoc or entry is None or entry.n_ctx != spec.n_ctx)
        if ad_hoc:
            self._forget_failed(spec.model_id)
            self._ad_hoc_logs.add(logfiles.safe_name(spec.model_id))
        model = ModelLifecycle(spec, self.services, ad_hoc=ad_hoc, strict_n_ctx=strict_n_ctx)
        self._models[spec.model_id] = model  # listed as `loading` while it waits its turn
        model.start()
        return model

    def _forget_failed(self, incoming: str) -> None:
        """Before a model outside the catalogue begins: make room for it among the failed
        ones kept, dropping the oldest (each keeps its spec and its error)."""
        failed = sorted((m for m in self._models.values()
                         if m.ad_hoc and m.state is WorkerState.FAILED and not m.stopping
                         and m.model_id != incoming), key=lambda m: m.since)
        for model in failed[:max(0, len(failed) - MAX_FAILED_AD_HOC + 1)]:
            stopping = self._stop_soon(model, f"forgotten: over {MAX_FAILED_AD_HOC} failed "
                                              "models outside the catalogue")
            stopping.add_done_callback(_log_failure)

    def _api_room(self, spec: ModelSpec) -> None:
        """A client asks for a new worker of a model outside the catalogue: refused at
        `max_api_models` of them (failed and stopping ones do not count)."""
        limit = self.config.max_api_models
        if limit == 0:
            raise ApiModelsRefused(
                f"{spec.model_id}: this node loads only catalogue models for clients "
                "(max_api_models = 0); ask the operator to add it to the config")
        held = sorted(m.model_id for m in self._models.values()
                      if m.ad_hoc and m.state is not WorkerState.FAILED and not m.stopping)
        if len(held) >= limit:
            raise ApiModelsRefused(
                f"{spec.model_id}: {len(held)} models outside the catalogue are loaded or "
                f"loading ({clip(', '.join(held))}), the limit (max_api_models = {limit}); "
                "unload one first")

    # --- eviction -----------------------------------------------------------------------

    async def make_room(self, incoming: ModelLifecycle, shortage: NotEnoughVram | None) -> bool:
        """Under the load lock, before `incoming` starts: unload idle models until it fits
        `max_loaded_models` (and, after `shortage`, the VRAM of its devices). True: go on;
        False: only busy models could make room, wait and ask again. Raises when nothing
        ever could (every candidate pinned)."""
        limit = self.config.max_loaded_models
        while True:
            others = [m for m in self._models.values()
                      if m is not incoming and m.holds_a_slot and not m.stopping]
            # A model still in its first start cannot be unloaded without failing that
            # load: it holds its slot, but is no candidate (waiting for it may help).
            settled = [m for m in others
                       if m.state in (WorkerState.READY, WorkerState.BACKOFF)]
            if shortage is not None:
                devices: tuple[int, ...] | None = incoming.spec.devices
                why = f"VRAM for {incoming.model_id}"
            elif limit is not None and len(others) >= limit:
                devices, why = None, f"max_loaded_models {limit}, for {incoming.model_id}"
            else:
                return True
            if shortage is not None and not self._could_fit(shortage, settled, devices):
                raise shortage  # evicting every candidate would not make it fit
            choice = choose((self._candidate(m) for m in settled), devices)
            if choice.victim is None:
                if choice.busy or len(settled) < len(others):
                    return False
                if shortage is not None:
                    raise shortage
                raise NoRoom(f"{incoming.model_id}: max_loaded_models ({limit}) is taken by "
                             "pinned models; unload one or raise max_loaded_models")
            victim = self._models[choice.victim.model_id]
            log.info("%s: evicting it (least recently used, idle) to make room: %s",
                     victim.model_id, why)
            self.evictions[(victim.model_id, "vram" if shortage else "max_loaded_models")] += 1
            incoming.evicted.append(victim.model_id)
            # No await between the idle check and this call: stop() marks it stopping at
            # once, so no request can be admitted to it after it was judged idle.
            if shortage is None and not self._frees_vram(choice.victim):
                # Only the count forced it and no GPU memory comes back: the incoming
                # worker starts while this one saves its cache and exits (a swap costs
                # the longer of the two, not their sum). The host's RAM is judged again
                # once it has exited, should the start find too little (`settle_stops`).
                self._stop_soon(victim, f"evicted: {why}")
                continue
            await self._stop(victim, f"evicted: {why}")
            if shortage is not None:
                return True  # the caller waits for the memory and judges the fit again

    def _could_fit(self, shortage: NotEnoughVram, models: list[ModelLifecycle],
                   devices: tuple[int, ...] | None) -> bool:
        """Whether the memory the unpinned candidates hold (by their estimates) could cover
        the shortage; True when a size is unknown (nothing to judge by)."""
        if shortage.short_mb is None:
            return True
        held = 0
        for model in models:
            candidate = self._candidate(model)
            if candidate.pinned or not candidate.on_gpu or \
                    not shares_devices(candidate, devices or ()):
                continue
            if model.vram_estimate_mb is None:
                return True
            held += model.vram_estimate_mb
        return held >= shortage.short_mb

    def request_ended(self) -> None:
        """A request left a model (the router says so): a load waiting for a busy model to
        make room judges again now."""
        self.services.room.notify()

    def _frees_vram(self, candidate: Candidate) -> bool:
        """Whether unloading `candidate` gives GPU memory back that a start must wait for
        (nvidia-smi listed GPUs, and it offloads layers to one)."""
        return candidate.on_gpu and bool(self.discovery.cached_gpus())

    async def settle_stops(self) -> bool:
        """Wait for the stops in progress (evictions that did not hold up a start); True
        when there were any."""
        stopping = [m.stopping_task for m in self._models.values()
                    if m.stopping_task is not None and not m.stopping_task.done()]
        if stopping:
            await asyncio.wait(stopping)
        return bool(stopping)

    def _candidate(self, model: ModelLifecycle) -> Candidate:
        on_gpu = bool(gpu_layers(model.spec, self.config.harness_config(model.spec.harness)))
        return Candidate(model.model_id, self.activity(model.model_id),
                         self.config.pinned(model.spec), model.spec.devices, on_gpu)

    async def load(self, spec: ModelSpec, by_client: bool = False) -> ModelLifecycle:
        """Load `spec` and return once its worker is ready; raise LoadError otherwise.

        An unknown harness fails before anything is listed or spawned. `by_client`: the
        spec is a load request's, and the limits on what clients may start apply
        (`max_api_models`; an n_ctx of its own within the model's trained context).
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
            if by_client and not self.in_catalogue(spec):
                self._api_room(spec)
            model = self._begin(spec, by_client)
        elif not same_worker(model.spec, spec):
            differ = [f"{f.name} {clip(shown_setting(getattr(model.spec, f.name)))} → "
                      f"{clip(shown_setting(getattr(spec, f.name)))}"
                      for f in dataclasses.fields(spec) if f.name not in ("pinned", "autoload")
                      and getattr(model.spec, f.name) != getattr(spec, f.name)]
            raise Conflict(f"{spec.model_id} is {model.status.value} with different settings "
                           f"({'; '.join(differ)}); unload it first")
        elif model.state is WorkerState.READY:
            return model
        elif not model.loading:
            raise Conflict(f"{spec.model_id} is {model.status.value}; "
                           "try again when it is done")
        await model.wait_loaded()  # single flight: every caller waits on the one attempt
        return model

    async def unload(self, model_id: str, reason: str = "unloaded") -> None:
        """Stop the model whatever it is doing (a load in progress, a backoff); `reason`
        goes with its events and journal lines (`config changed: ...` for a reload)."""
        model = self._models.get(model_id)
        if model is None:
            if model_id in self.catalogue:  # known, just not running: nothing to do
                raise ModelNotFound(f"model not loaded: {model_id} (it is unloaded)")
            hint = did_you_mean(model_id, [*self.catalogue, *self._models])
            raise ModelNotFound(f"model not loaded: {model_id}: no model of that id on this "
                                f"node{hint}")
        if model.stopping:
            raise Conflict(f"{model_id} is already being unloaded")
        await self._stop(model, reason)
        if reason == "unloaded":
            log.info("unloaded %s", model_id)
        else:
            log.info("unloaded %s (%s)", model_id, reason)

    async def _stop(self, model: ModelLifecycle, reason: str, release_vram: bool = True) -> None:
        await asyncio.shield(self._stop_soon(model, reason, release_vram))

    def _stop_soon(self, model: ModelLifecycle, reason: str,
                   release_vram: bool = True) -> asyncio.Task[None]:
        """Begin stopping `model` now; its entry goes once the stop is over."""
        stopping = model.begin_stop(reason, release_vram)  # `stopping` from here on

        def drop(_: object) -> None:
            # An eviction that overlaps the next start is awaited by nobody: its failure
            # (a bug) is logged here rather than lost.
            if not stopping.cancelled() and stopping.exception() is not None:
                log.error("%s: its stop failed", model.model_id,
                          exc_info=stopping.exception())
            # Only once the stop is over, even when the caller was cancelled meanwhile (an
            # unloaded load that was evicting this one): a model still stopping stays
            # listed, so nothing loads a second worker for its id.
            if self._models.get(model.model_id) is model:
                del self._models[model.model_id]
                if model.ad_hoc:
                    self._prune_logs()

        stopping.add_done_callback(drop)
        return stopping

    def _prune_logs(self) -> None:
        """Logs of the models outside the catalogue this daemon ran, bounded
        (logfiles.prune_logs); those it knows now are kept."""
        known = {logfiles.safe_name(m) for m in (*self._models, *self.catalogue)}
        log_dir = self.config.log_dir
        for path in logfiles.prune_logs(log_dir, self._ad_hoc_logs, known, MAX_AD_HOC_LOGS):
            log.info("removed %s: the log of a model unloaded long ago (over %d kept)",
                     path, MAX_AD_HOC_LOGS)
        self._ad_hoc_logs = {stem for stem in self._ad_hoc_logs
                             if stem in known or (log_dir / f"{stem}.log").exists()}

    def cancel_loads(self) -> None:
        """Make pending load requests answer now (the node is stopping)."""
        for model in self._models.values():
            model.cancel_load()

    async def shutdown(self) -> None:
        """Stop every model, all in parallel: cancel loads and restarts, then SIGTERM,
        a bounded wait and SIGKILL for each worker."""
        await self.pulls.close()
        models = list(self._models.values())
        outcomes = await asyncio.gather(
            *(self._stop(m, "shutting down", False) for m in models), return_exceptions=True)
        for model, outcome in zip(models, outcomes, strict=True):
            if isinstance(outcome, BaseException):  # the others are still stopped
                log.error("%s: stopping failed", model.model_id, exc_info=outcome)
        await self.discovery.close()
