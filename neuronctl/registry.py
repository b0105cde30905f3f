"""Every model on this node: load, unload, restart after crashes, shut down.

Loads (and restarts) are serialized node-wide: VRAM contention makes parallel loads risky.
They are single-flight per model: concurrent loads of one model share one attempt and one
process, and nothing a client sends can make two workers for one model.
"""

from __future__ import annotations

import asyncio
import collections
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
from .statefile import StateFile
from .states import LIVE_STATES, TRANSITIONS, InvalidTransition, ModelStatus, WorkerState
from .worker import Worker, describe_exit, free_port

log = logging.getLogger(__name__)

WorkerFactory = Callable[..., Worker]


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


@dataclass(frozen=True)
class RestartPolicy:
    mode: str  # "on-failure" | "always" | "never"
    max_restarts: int  # within window_s
    window_s: float
    delay_s: float
    delay_max_s: float
    reset_s: float

    @classmethod
    def for_model(cls, config: NeuronConfig, spec: ModelSpec) -> RestartPolicy:
        return cls(
            spec.restart or config.restart,
            config.max_restarts if spec.max_restarts is None else spec.max_restarts,
            config.restart_window_s, config.restart_delay_s, config.restart_delay_max_s,
            config.restart_reset_s,
        )

    def restarts_after(self, exit_code: int | None) -> bool:
        return self.mode == "always" or (self.mode == "on-failure" and exit_code != 0)


@dataclass(eq=False)
class ModelRecord:
    spec: ModelSpec
    log_path: Path
    state: WorkerState = WorkerState.PENDING
    since: float = field(default_factory=time.time)  # wall clock: shown to people
    worker: Worker | None = None
    load_ms: int | None = None
    restarts: int = 0
    last_error: str | None = None
    last_exit_code: int | None = None
    ready_at: float | None = None  # monotonic
    consecutive_crashes: int = 0
    restart_times: collections.deque[float] = field(default_factory=collections.deque)
    load_task: asyncio.Task[ModelRecord] | None = None  # the first start
    supervisor: asyncio.Task[None] | None = None  # watches and restarts once ready

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def status(self) -> ModelStatus:
        return self.state.status

    def set_state(self, new: WorkerState, reason: str = "", level: int = logging.INFO) -> None:
        """The one place a model changes state: checked, timestamped, logged."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise InvalidTransition(f"{self.model_id}: {old} -> {new}")
        self.state = new
        self.since = time.time()
        log.log(level, "%s: %s -> %s%s", self.model_id, old, new, f" ({reason})" if reason else "")

    def note_failure(self, message: str, exit_code: int | None) -> None:
        self.last_error, self.last_exit_code = message, exit_code

    def to_json(self) -> dict[str, Any]:
        worker = self.worker if self.state in LIVE_STATES else None
        ready = self.state is WorkerState.READY
        failed = self.state is WorkerState.FAILED
        return {
            "id": self.model_id,
            "harness": self.spec.harness,
            "status": self.status.value,
            "devices": list(self.spec.devices),
            "vram_used_mb": None,
            "pid": worker.pid if worker else None,
            "port": worker.port if worker else None,
            "endpoint": worker.endpoint if worker and ready else None,
            "load_ms": self.load_ms,
            "restarts": self.restarts,
            # `error`/`exit_code`: why it is failed now; `last_*`: the latest failure ever,
            # kept after a successful restart so a crash is not forgotten.
            "error": self.last_error if failed else None,
            "exit_code": self.last_exit_code if failed else None,
            "last_error": self.last_error,
            "last_exit_code": self.last_exit_code,
            "log_path": str(self.log_path),
            "since": self.since,
            "uptime_s": round(time.time() - self.since, 3) if ready else None,
        }


class ModelRegistry:
    def __init__(
        self,
        config: NeuronConfig,
        harnesses: Mapping[str, Harness],
        *,
        state: StateFile | None = None,
        worker_factory: WorkerFactory = Worker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.harnesses = harnesses
        self._state = state
        self._worker_factory = worker_factory
        self._clock = clock
        self._records: dict[str, ModelRecord] = {}
        self._load_lock = asyncio.Lock()

    def models(self) -> list[ModelRecord]:
        return list(self._records.values())

    def get(self, model_id: str) -> ModelRecord | None:
        return self._records.get(model_id)

    def load_progress(self) -> tuple[object, ...]:
        """What the loads in progress are doing; see Worker.progress_token."""
        return tuple(
            (r.model_id, r.worker.progress_token())
            for r in self._records.values()
            if r.state is WorkerState.STARTING and r.worker is not None
        )

    # --- load -------------------------------------------------------------------------------

    async def load(self, spec: ModelSpec) -> ModelRecord:
        """Load `spec` and return once its worker is ready; raise LoadError otherwise.

        An unknown harness fails before anything is listed or spawned.
        """
        harness = self.harnesses.get(spec.harness)
        if harness is None:
            raise UnknownHarness(spec.harness)
        record = self._records.get(spec.model_id)
        if record is not None and record.state is not WorkerState.FAILED:
            return await self._join(record, spec)
        # New, or failed before: a fresh attempt replaces the failed entry.
        record = ModelRecord(spec, logfiles.log_path(self.config.log_dir, spec.model_id))
        self._records[spec.model_id] = record  # listed as `loading` while it waits its turn
        record.load_task = asyncio.create_task(
            self._first_start(record, harness), name=f"load {spec.model_id}"
        )
        return await self._wait_for(record.load_task)

    async def _join(self, record: ModelRecord, spec: ModelSpec) -> ModelRecord:
        if record.spec != spec:
            raise Conflict(
                f"{spec.model_id} is {record.status.value} with different settings; "
                "unload it first"
            )
        if record.state is WorkerState.READY:
            return record
        if record.load_task is not None and not record.load_task.done():
            return await self._wait_for(record.load_task)  # single flight
        raise Conflict(f"{spec.model_id} is {record.status.value}; try again when it is done")

    @staticmethod
    async def _wait_for(task: asyncio.Task[ModelRecord]) -> ModelRecord:
        # asyncio.wait, not shield: a caller that goes away (a client disconnecting) must not
        # cancel a load that others may be waiting on, and a load cancelled by an unload
        # must reach its waiters as an error rather than as their own cancellation.
        await asyncio.wait({task})
        if task.cancelled():
            raise LoadError("load cancelled: the model was unloaded or the node is stopping")
        return task.result()

    async def _first_start(self, record: ModelRecord, harness: Harness) -> ModelRecord:
        try:
            async with self._load_lock:
                record.set_state(WorkerState.STARTING)  # PENDING -> STARTING
                started = self._clock()
                await self._spawn_until_ready(record, harness)
        except asyncio.CancelledError:
            self._stopped(record, "load cancelled")
            raise
        except LoadError as exc:
            record.note_failure(exc.message, exc.exit_code)
            record.set_state(WorkerState.FAILED, "load failed")  # STARTING -> FAILED
            raise
        record.load_ms = round((self._clock() - started) * 1000)
        self._ready(record, harness)
        return record

    async def _spawn_until_ready(self, record: ModelRecord, harness: Harness) -> None:
        """Start one worker for `record` and wait until it answers; LoadError otherwise.
        The caller holds the load lock."""
        try:
            port = free_port()
            plan = harness.plan(record.spec, port)
            worker = self._worker_factory(
                record.model_id, plan, port, record.log_path, self.config.stop_timeout_s,
                log_keep=self.config.log_keep, on_spawn=self._on_spawn,
            )
        except LoadError:
            raise
        except Exception as exc:  # a bug, or the log directory unwritable
            log.exception("%s: cannot prepare worker", record.model_id)
            raise LoadError(f"cannot start worker: {exc}") from exc
        record.worker = worker
        try:
            await worker.start()
        except OSError as exc:
            raise LoadError(f"cannot start worker: {exc}") from exc
        finally:
            if worker.returncode is not None:
                self._forget(worker)

    def _ready(self, record: ModelRecord, harness: Harness) -> None:
        record.ready_at = self._clock()
        record.set_state(WorkerState.READY)  # STARTING -> READY
        record.supervisor = asyncio.create_task(
            self._supervise(record, harness), name=f"supervise {record.model_id}"
        )

    def _on_spawn(self, worker: Worker) -> None:
        if self._state is not None and worker.pid is not None:
            try:
                self._state.record(worker.model_id, worker.pid)
            except OSError as exc:  # a full disk must not fail the load itself
                log.warning("cannot record worker pid %s: %s", worker.pid, exc)

    def _forget(self, worker: Worker) -> None:
        if self._state is not None and worker.pid is not None:
            try:
                self._state.forget(worker.pid)
            except OSError as exc:
                log.warning("cannot update %s: %s", self._state.path, exc)

    # --- crashes and restarts ---------------------------------------------------------------

    async def _supervise(self, record: ModelRecord, harness: Harness) -> None:
        """Runs while the model is ready: notices an exit at once (the process's own wait,
        not a poll) and restarts it under the model's restart policy."""
        policy = RestartPolicy.for_model(self.config, record.spec)
        while True:
            worker = record.worker
            assert worker is not None
            code = await worker.wait_exit()
            self._forget(worker)
            # An exit we asked for cancels this task before signalling the worker.
            record.note_failure(
                f"worker {describe_exit(code)} unexpectedly; {worker.log_tail()}", code
            )
            if not policy.restarts_after(code):
                record.set_state(WorkerState.FAILED, f"worker {describe_exit(code)}; "
                                 f"restart = {policy.mode}", logging.WARNING)
                return
            if self._ready_long_enough(record, policy):
                record.consecutive_crashes = 0
            while True:  # until a restart attempt is ready, or the limit is reached
                if not self._may_restart(record, policy):
                    return
                delay = min(policy.delay_max_s,
                            policy.delay_s * 2 ** record.consecutive_crashes)
                record.consecutive_crashes += 1
                record.set_state(  # READY or STARTING -> BACKOFF
                    WorkerState.BACKOFF,
                    f"{record.last_error.splitlines()[0] if record.last_error else 'exited'}; "
                    f"restart {record.restarts + 1} in {delay:g} s",
                    logging.WARNING,
                )
                await asyncio.sleep(delay)
                record.restarts += 1
                record.restart_times.append(self._clock())
                try:
                    async with self._load_lock:
                        record.set_state(WorkerState.STARTING)  # BACKOFF -> STARTING
                        await self._spawn_until_ready(record, harness)
                except LoadError as exc:
                    record.note_failure(exc.message, exc.exit_code)
                    continue
                record.ready_at = self._clock()
                record.set_state(WorkerState.READY, f"restart {record.restarts}")
                break

    def _ready_long_enough(self, record: ModelRecord, policy: RestartPolicy) -> bool:
        return record.ready_at is not None and self._clock() - record.ready_at >= policy.reset_s

    def _may_restart(self, record: ModelRecord, policy: RestartPolicy) -> bool:
        now = self._clock()
        while record.restart_times and now - record.restart_times[0] > policy.window_s:
            record.restart_times.popleft()
        if len(record.restart_times) < policy.max_restarts:
            return True
        record.set_state(
            WorkerState.FAILED,
            f"gave up after {len(record.restart_times)} restarts within "
            f"{policy.window_s:g} s; last exit code {record.last_exit_code}",
            logging.WARNING,
        )
        return False

    # --- unload and shutdown ----------------------------------------------------------------

    async def unload(self, model_id: str) -> None:
        """Stop the model whatever it is doing: a load in progress is cancelled and its
        process killed; a restart backoff ends with no further restarts."""
        record = self._records.get(model_id)
        if record is None:
            raise NotFound(f"model not loaded: {model_id}")
        if record.state is WorkerState.STOPPING:
            raise Conflict(f"{model_id} is already being unloaded")
        await self._stop(record, "unloaded")
        log.info("unloaded %s", model_id)

    async def _stop(self, record: ModelRecord, reason: str) -> None:
        for task in (record.load_task, record.supervisor):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, LoadError):
                    await task
        if record.state is WorkerState.FAILED:
            record.set_state(WorkerState.STOPPED, reason)  # FAILED -> STOPPED
        self._stopped(record, reason)
        if record.state is WorkerState.STOPPING:
            if record.worker is not None:
                await record.worker.stop()
                self._forget(record.worker)
            record.set_state(WorkerState.STOPPED)  # STOPPING -> STOPPED
        if self._records.get(record.model_id) is record:
            del self._records[record.model_id]

    def _stopped(self, record: ModelRecord, reason: str) -> None:
        """Leave PENDING for good, or enter STOPPING, on the way out."""
        if record.state is WorkerState.PENDING:
            record.set_state(WorkerState.STOPPED, reason)  # PENDING -> STOPPED
        elif record.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.BACKOFF):
            record.set_state(WorkerState.STOPPING, reason)

    def cancel_loads(self) -> None:
        """Make pending load requests answer now (the node is stopping)."""
        for record in self._records.values():
            if record.load_task is not None and not record.load_task.done():
                record.load_task.cancel()

    async def shutdown(self) -> None:
        """Stop every model, all in parallel: cancel loads and restarts, then SIGTERM,
        a bounded wait and SIGKILL for each worker."""
        records = list(self._records.values())
        await asyncio.gather(*(self._stop(r, "shutting down") for r in records))
