"""Every model on this node: load, unload, watch, shut down.

Loads are serialized node-wide (VRAM contention makes parallel loads risky) and
single-flight per model: concurrent loads of one model share one attempt and one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import logfiles
from .config import ModelSpec, NeuronConfig
from .harness import Harness, LoadError, UnknownHarness
from .states import ModelStatus
from .worker import Worker, describe_exit, free_port

log = logging.getLogger(__name__)

WorkerFactory = Callable[..., Worker]


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


@dataclass
class ModelRecord:
    spec: ModelSpec
    log_path: Path
    status: ModelStatus = ModelStatus.LOADING
    since: float = field(default_factory=time.time)  # wall clock: shown to people
    worker: Worker | None = None
    error: str | None = None
    exit_code: int | None = None
    load_ms: int | None = None
    restarts: int = 0

    def set_status(self, status: ModelStatus) -> None:
        self.status = status
        self.since = time.time()

    def to_json(self) -> dict[str, Any]:
        worker = self.worker
        live = worker is not None and self.status is not ModelStatus.FAILED
        loaded = self.status is ModelStatus.LOADED
        return {
            "id": self.spec.model_id,
            "harness": self.spec.harness,
            "status": self.status.value,
            "devices": list(self.spec.devices),
            "vram_used_mb": None,
            "pid": worker.pid if live and worker else None,
            "port": worker.port if live and worker else None,
            "endpoint": worker.endpoint if loaded and worker else None,
            "load_ms": self.load_ms,
            "restarts": self.restarts,
            "error": self.error,
            "exit_code": self.exit_code,
            "log_path": str(self.log_path),
            "since": self.since,
            "uptime_s": round(time.time() - self.since, 3) if loaded else None,
        }


class ModelRegistry:
    def __init__(
        self,
        config: NeuronConfig,
        harnesses: Mapping[str, Harness],
        *,
        worker_factory: WorkerFactory = Worker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.harnesses = harnesses
        self._worker_factory = worker_factory
        self._clock = clock
        self._records: dict[str, ModelRecord] = {}
        self._inflight: dict[str, asyncio.Task[ModelRecord]] = {}
        self._load_lock = asyncio.Lock()
        self._watchers: set[asyncio.Task[None]] = set()

    def models(self) -> list[ModelRecord]:
        return list(self._records.values())

    def get(self, model_id: str) -> ModelRecord | None:
        return self._records.get(model_id)

    def load_progress(self) -> tuple[object, ...]:
        """What the loads in progress are doing; see Worker.progress_token."""
        return tuple(
            (r.spec.model_id, r.worker.progress_token())
            for r in self._records.values()
            if r.status is ModelStatus.LOADING and r.worker is not None
        )

    async def load(self, spec: ModelSpec) -> ModelRecord:
        """Load `spec` and return once its worker is ready; raise LoadError otherwise.

        An unknown harness fails before anything is listed or spawned.
        """
        harness = self.harnesses.get(spec.harness)
        if harness is None:
            raise UnknownHarness(spec.harness)
        model_id = spec.model_id
        inflight = self._inflight.get(model_id)
        if inflight is None:
            record = self._records.get(model_id)
            if record is not None and record.status is ModelStatus.LOADED:
                if record.spec != spec:
                    raise Conflict(f"{model_id} is loaded with different settings; unload it first")
                return record
            if record is not None and record.status is ModelStatus.UNLOADING:
                raise Conflict(f"{model_id} is being unloaded; try again when it is gone")
            record = ModelRecord(spec, logfiles.log_path(self.config.log_dir, model_id))
            self._records[model_id] = record  # listed as `loading` while it waits its turn
            inflight = asyncio.create_task(self._load(record, harness), name=f"load {model_id}")
            self._inflight[model_id] = inflight
            inflight.add_done_callback(lambda _t: self._inflight.pop(model_id, None))
        elif self._records[model_id].spec != spec:
            raise Conflict(f"{model_id} is already loading with different settings")
        # Shielded: a client that goes away must not cancel a load others may be waiting on.
        return await asyncio.shield(inflight)

    async def _load(self, record: ModelRecord, harness: Harness) -> ModelRecord:
        spec = record.spec
        async with self._load_lock:
            started = self._clock()
            try:
                port = free_port()
                plan = harness.plan(spec, port)
                worker = self._worker_factory(
                    spec.model_id, plan, port, record.log_path, self.config.stop_timeout_s
                )
                record.worker = worker
                await worker.start()
            except LoadError as exc:
                record.error, record.exit_code = exc.message, exc.exit_code
                record.set_status(ModelStatus.FAILED)
                raise
            except asyncio.CancelledError:
                record.error = "load cancelled"
                record.set_status(ModelStatus.FAILED)
                raise
            except Exception as exc:  # the log directory unwritable, say, or a bug
                log.exception("%s: load failed unexpectedly", spec.model_id)
                record.error = f"cannot start worker: {exc}"
                record.set_status(ModelStatus.FAILED)
                raise LoadError(record.error) from exc
            record.load_ms = round((self._clock() - started) * 1000)
            record.set_status(ModelStatus.LOADED)
        watcher = asyncio.create_task(self._watch(record, worker), name=f"watch {spec.model_id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return record

    async def _watch(self, record: ModelRecord, worker: Worker) -> None:
        """Notice at once when a ready worker exits without being asked to."""
        code = await worker.wait_exit()
        if record.worker is worker and record.status is ModelStatus.LOADED:
            record.exit_code = code
            record.error = f"worker {describe_exit(code)} unexpectedly; see {record.log_path}"
            record.set_status(ModelStatus.FAILED)
            log.warning("%s: %s", record.spec.model_id, record.error)

    async def unload(self, model_id: str) -> None:
        record = self._records.get(model_id)
        if record is None:
            raise NotFound(f"model not loaded: {model_id}")
        if record.status is ModelStatus.LOADING:
            raise Conflict(f"{model_id} is still loading; unload it once the load has finished")
        if record.status is ModelStatus.UNLOADING:
            raise Conflict(f"{model_id} is already being unloaded")
        if record.status is ModelStatus.LOADED and record.worker is not None:
            record.set_status(ModelStatus.UNLOADING)
            await record.worker.stop()
            log.info("unloaded %s", model_id)
        if self._records.get(model_id) is record:
            del self._records[model_id]

    async def shutdown(self) -> None:
        """Cancel loads in progress and stop every worker, all in parallel."""
        for task in list(self._inflight.values()):
            task.cancel()
        for task in list(self._inflight.values()):
            with contextlib.suppress(asyncio.CancelledError, LoadError):
                await task
        for watcher in list(self._watchers):
            watcher.cancel()
        workers = [r.worker for r in self._records.values() if r.worker is not None]
        await asyncio.gather(*(w.stop() for w in workers))
