"""One model's whole life, owned by one object: first start, ready, crash, backoff,
restart, give up, stop.

A `ModelLifecycle` owns its state, every transition (one `_set_state`, which publishes the
event), its restart history and its worker. A load is a row of plain calls into the
modules that own each stage: the files (modelfiles), the VRAM gate (models/admission.py), the
harness's plan, and the worker's spawn. What it shares with the other models on the node
(the load lock, the event bus, the config a reload replaces) comes in as `Shared`.

The first start is never retried: a model that cannot start at all fails at once, so
activation moves on to the next one. Restarts follow the restart policy (policy.py) once
a worker has been ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import logfiles
from ..config import ModelSpec, effective
from ..errors import (
    HarnessUnavailable,
    InternalError,
    LoadCancelled,
    LoadError,
    ModelFileError,
    NoRoom,
    NoSuchGpu,
    NotEnoughRam,
    NotEnoughVram,
    SpawnFailed,
    UnknownHarness,
    clip,
)
from ..events import ModelEvent
from ..models import files as modelfiles
from ..models import hub as resolve
from ..models.admission import StopReading
from ..states import (
    LIVE_STATES,
    TRANSITIONS,
    InvalidTransition,
    ModelStatus,
    WorkerState,
    journal_transition,
)
from . import listing, liveness
from .harness import Harness, WorkerPlan
from .loadlock import Hold
from .policy import GiveUp, History, RestartPolicy
from .promptcache import Session
from .shared import Shared
from .worker import Worker, describe_exit, free_port

# Not __name__: every state change is a journal line under this name ("INFO
# neuronctl.models: m: loading -> loaded ..."), which operators and tests read.
log = logging.getLogger("neuronctl.models")

# A ready worker's answer to its harness's `slots_path`, waited for at most this long.
SLOTS_TIMEOUT_S = 2.0
# Its /props is asked beside the first requests: a worker whose HTTP threads are all busy
# with them answers a later try (0.5, 1, 2 s apart).
SLOTS_TRIES = 4
SLOTS_RETRY_S = 0.5
# While every model that could make room is busy, a load asks again this often.
ROOM_POLL_S = 0.25  # (a VRAM retry reads nvidia-smi)


class ModelLifecycle:
    def __init__(self, spec: ModelSpec, shared: Shared, *, ad_hoc: bool = False,
                 strict_n_ctx: bool = False) -> None:
        self.spec = spec
        self._shared = shared
        # Not a catalogue model: a client's, counted against max_api_models.
        self.ad_hoc = ad_hoc
        # A client chose its n_ctx: above the model's trained context it is refused.
        self.strict_n_ctx = strict_n_ctx
        self.log_path = logfiles.log_path(shared.config.log_dir, spec.model_id)
        self.state = WorkerState.PENDING
        self.since = time.time()  # wall clock: shown to people
        self.worker: Worker | None = None
        self.failure_code: str | None = None  # the error code of why it is `failed`
        self.load_ms: int | None = None
        self.restarts = 0
        self.history = History()
        # The latest failure ever (kept after a restart succeeds, so a crash is not lost):
        # one line, the worker's last log lines, its exit code.
        self.last_error: str | None = None
        self.last_detail: str | None = None
        self.last_exit_code: int | None = None
        self.resolved: resolve.Resolved | None = None  # the local file(s) its workers load
        self.download: resolve.Progress | None = None  # while DOWNLOADING
        self.vram_estimate_mb: int | None = None  # from the GGUF header, at the VRAM gate
        self.slots = 1  # requests its worker serves at once (the harness says, at each start)
        self.served_n_ctx: int | None = None  # each request's context, as its worker says
        self.serves_metrics = False  # its worker answers GET /metrics (llama-server)
        self.prompt_cache: Session | None = None  # its worker's, restored and saved by it
        self.evicted: list[str] = []  # the models unloaded to make room for it (load says)
        self._log_started = False  # a download began a fresh log: the first start appends
        self._run_task: asyncio.Task[None] | None = None
        self._loaded: asyncio.Future[None] | None = None  # the first start's outcome
        self._stop_task: asyncio.Task[None] | None = None
        self._recording: asyncio.Future[None] | None = None  # the worker's workers.json entry
        self._reading_slots: asyncio.Future[None] | None = None  # its worker's /props, once ready

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def status(self) -> ModelStatus:
        return self.state.status

    @property
    def serving_worker(self) -> Worker | None:
        """The worker that may take requests now; None unless the model is ready."""
        worker = self.worker
        ready = self.state is WorkerState.READY and not self.stopping
        return worker if ready and worker is not None and worker.returncode is None else None

    def queue_limits(self) -> tuple[int, float]:
        """(max_queue, queue_timeout_s): its own, else the node's (a reload applies)."""
        config = self._shared.config
        max_queue = config.max_queue if self.spec.max_queue is None else self.spec.max_queue
        timeout = self.spec.queue_timeout_s or config.queue_timeout_s
        return max_queue, timeout

    @property
    def holds_a_slot(self) -> bool:
        """Counts against max_loaded_models: it has a worker, or is restarting one. A first
        start still waiting for room (no worker yet) does not."""
        if self.state is WorkerState.STARTING:
            return self.worker is not None
        return self.state in (WorkerState.READY, WorkerState.BACKOFF)

    @property
    def stopping(self) -> bool:
        return self._stop_task is not None

    @property
    def stopping_task(self) -> asyncio.Task[None] | None:
        """The stop under way or done; None before `begin_stop`."""
        return self._stop_task

    @property
    def loading(self) -> bool:
        """The first start is under way (a caller may join it)."""
        return self._loaded is not None and not self._loaded.done()

    # --- driving it --------------------------------------------------------------------

    def start(self) -> None:
        """Begin the first start, in a task of its own; `wait_loaded` for its outcome."""
        assert self._run_task is None, "a lifecycle is started once"
        self._loaded = asyncio.get_running_loop().create_future()
        self._run_task = asyncio.create_task(self._run(), name=f"model {self.model_id}")
        # A task cancelled before its first step never runs `_run`'s handlers: its waiters
        # must still get an answer.
        self._run_task.add_done_callback(lambda _: self._settle(LoadCancelled(
            "load cancelled: the model was unloaded or the node is stopping")))

    async def wait_loaded(self) -> None:
        """Return once the first start is ready; raise its LoadError otherwise."""
        assert self._loaded is not None, "lifecycle not started"
        # asyncio.wait, not shield: a caller that goes away (a client disconnecting) must
        # not cancel a load others may be waiting on.
        await asyncio.wait({self._loaded})
        self._loaded.result()

    async def stop(self, reason: str, release_vram: bool = True) -> None:
        """Stop whatever it is doing: a load in progress is cancelled and its process
        killed; a backoff ends with no restart. Done once: a second caller (an unload racing
        a shutdown) waits for the first stop rather than stopping it again."""
        await asyncio.shield(self.begin_stop(reason, release_vram))

    def begin_stop(self, reason: str, release_vram: bool = True) -> asyncio.Task[None]:
        """The stop, started now (synchronously: from this call on it is `stopping` and
        takes no request) or joined if under way already."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(
                self._stop_now(reason, release_vram), name=f"stop {self.model_id}")
        return self._stop_task

    def cancel_load(self) -> None:
        """Make waiters of a first start answer now (the node is stopping)."""
        if self.loading and self._run_task is not None:
            self._run_task.cancel()

    # --- the life of it ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            with self._bug_barrier("load"):
                await self._first_start()
        except asyncio.CancelledError:
            self._settle(LoadCancelled(
                "load cancelled: the model was unloaded or the node is stopping"))
            raise
        except LoadError as error:
            try:
                # A LoadError from Worker.start comes with its process gone already; after
                # a bug, no process may outlive the failed model.
                if isinstance(error, InternalError):
                    await self._kill_worker()
                self._failed(error)
            finally:
                self._settle(error)  # whatever happens, the waiters get their answer
            return
        self._settle(None)
        try:
            # Every exception here is a bug, a LoadError too: supervision only ends by
            # giving up or being stopped.
            with self._bug_barrier("supervising the worker", expected=()):
                await self._supervise()
        except InternalError as error:  # never leave it `loaded` with nobody watching
            await self._kill_worker()
            self._failed(error)

    async def _first_start(self) -> None:
        harness = self._harness()
        if harness.needs_model_file and resolve.from_hub(self.spec):
            # Outside the load lock: a long download must not hold up other loads.
            self._set_state(WorkerState.DOWNLOADING)  # PENDING -> DOWNLOADING
            await self._download()
            self._set_state(WorkerState.PENDING, "model file ready")  # DOWNLOADING -> PENDING
        await self._read_header(harness)
        waiting_since: float | None = None  # since room was first refused, not queued
        while True:
            freed = self._shared.room.waiter()
            try:
                if await self._start_once(harness):
                    return
                # Only busy models could make room: wait outside the lock, so restarts and
                # other loads go on meanwhile, and never cut their requests.
                if waiting_since is None:
                    waiting_since = self._shared.clock()
                elif self._shared.clock() - waiting_since >= \
                        self._shared.config.eviction_wait_s:
                    raise NoRoom(f"{self.model_id}: no room: every model that could be "
                                 f"unloaded for it stayed busy for eviction_wait_s "
                                 f"({self._shared.config.eviction_wait_s:g} s)")
                # Until a request ends somewhere (the busy model may be idle now), or the
                # poll (a VRAM shortage may end with no request ending).
                polled = asyncio.ensure_future(self._shared.sleep(ROOM_POLL_S))
                try:
                    await asyncio.wait({polled, freed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    polled.cancel()
            finally:
                freed.cancel()

    async def _start_once(self, harness: Harness) -> bool:
        """One try under the load lock: True once the worker is ready, False when only busy
        models could make room."""
        async with self._shared.load_lock.hold() as hold:
            ready_s = await self._start_with_room(harness, hold)
            if ready_s is None:
                return False
            self.history = History().ready(self._shared.clock())
            self._set_state(WorkerState.READY, ready_s=ready_s,
                            journal=self._ready_summary(ready_s))  # STARTING -> READY
            return True

    async def _start_with_room(self, harness: Harness, hold: Hold) -> float | None:
        """Holding the load lock: make room (evicting idle models), then start; seconds to
        ready, or None when the room is held by busy models."""
        shortage: NotEnoughVram | None = None
        settled = False
        while True:
            make_room = self._shared.make_room
            if make_room is not None and not await make_room(self, shortage):
                return None
            if self.state is WorkerState.PENDING:
                self._set_state(WorkerState.STARTING)  # PENDING -> STARTING
            started = self._shared.clock()
            try:
                ready_s = await self._start_worker(harness, hold)
            except NoSuchGpu:
                raise  # no eviction makes a missing device appear
            except NotEnoughRam:
                # An evicted worker may still be exiting with its memory: judge once more
                # when it is gone.
                settle = self._shared.settle_stops
                if settled or settle is None or not await settle():
                    raise
                settled = True
                continue
            except NotEnoughVram as exc:
                # Each pass evicts one model (or raises): a shortage that reads the same
                # after an eviction means the memory did not come back.
                if self._shared.make_room is None or (shortage is not None
                                                 and shortage.message == exc.message):
                    raise
                shortage = exc
                continue
            self.load_ms = round((self._shared.clock() - started) * 1000)
            return ready_s

    async def _read_header(self, harness: Harness) -> None:
        """Outside the load lock: the GGUF header the VRAM check needs, read by a bounded
        child process (the VRAM gate keeps it for the start under the lock). A header that lies
        about its sizes fails the load here, with nothing held."""
        spec, _, parts = modelfiles.run_spec(self.spec, self.resolved,
                                             harness.needs_model_file)
        await self._shared.vram_gate.read_header(
            spec, parts, self._shared.config.harness_config(spec.harness), self.strict_n_ctx)

    async def _download(self) -> None:
        config = self._shared.config
        path = self.log_path
        self.download = resolve.Progress(log=lambda line: modelfiles.append_line(path, line))
        self.resolved = await modelfiles.download(
            self.spec, self._shared.fetcher_factory, config.harness_config(self.spec.harness),
            self.log_path, config.log_keep, self.download)
        self._log_started = True

    async def _supervise(self) -> None:
        """While ready: notice an exit at once (the process's own wait, not a poll), kill a
        worker that stops answering, and restart under the model's policy until it gives
        up."""
        while True:
            worker = self.worker
            assert worker is not None
            hung: list[str] = []  # why liveness killed it, if it did
            liveness = asyncio.create_task(self._liveness_or_log(worker, hung),
                                           name=f"liveness {self.model_id}")
            try:
                code = await worker.wait_exit()
            finally:
                liveness.cancel()
                # asyncio.wait never raises: a stop that cancels this task meanwhile must
                # not be swallowed here (a suppress would eat it and restart the worker).
                await asyncio.wait({liveness})
            crashed_at = self._shared.clock()
            # An exit we asked for cancels this task before the worker is signalled.
            await self._worker_gone(worker)
            headline, detail = worker.log_excerpt(fallback=False)
            if hung:
                self._note(f"worker {hung[0]}; killed", detail, code)
            else:
                said = f": {headline}" if headline else ""
                self._note(f"worker {describe_exit(code)} unexpectedly{said}", detail, code)
            if not await self._restart(code, crashed_at):
                return

    async def _liveness_or_log(self, worker: Worker, hung: list[str]) -> None:
        try:
            await liveness.watch(self.model_id, worker, lambda: self._shared.config,
                                 self._shared.sleep, self.log_path, hung)
        except Exception:  # a bug: the worker goes on unwatched rather than killed
            log.exception("%s: liveness probing failed; the worker is no longer probed",
                          self.model_id)

    async def _restart(self, exit_code: int | None, crashed_at: float) -> bool:
        """Back off and start again until a worker is ready (True) or the policy gives up."""
        while True:
            # Read at each exit: a reload's new policy applies here too.
            policy = RestartPolicy.for_model(self._shared.config, self.spec)
            decision = policy.decide(self.history, exit_code, crashed_at)
            if isinstance(decision, GiveUp):
                # READY/STARTING -> FAILED: out of restarts, or restart = never. The cause
                # stays in the line: "last exit code none" alone says nothing.
                why = f"{decision.reason}; last error: {self.last_error}" \
                    if self.last_error else decision.reason
                self._set_state(WorkerState.FAILED, why, logging.WARNING)
                return False
            self._set_state(  # READY or STARTING -> BACKOFF
                WorkerState.BACKOFF,
                f"{self.last_error}; restart {self.restarts + 1} in {decision.after_s:g} s",
                logging.WARNING,
            )
            await self._shared.sleep(decision.after_s)
            self.history = self.history.restarted(policy, crashed_at, self._shared.clock())
            self.restarts += 1
            try:
                async with self._shared.load_lock.hold(restart=True) as hold:
                    self._set_state(WorkerState.STARTING)  # BACKOFF -> STARTING
                    ready_s = await self._start_worker(self._harness(), hold)
            except LoadError as exc:
                self._note(exc.message, exc.detail, exc.exit_code)
                if isinstance(exc, (ModelFileError, HarnessUnavailable)):
                    # Nothing a restart changes (the file is gone, the program missing):
                    # failed at once rather than after max_restarts tries.
                    self.failure_code = exc.code
                    self._set_state(WorkerState.FAILED,  # STARTING -> FAILED
                                    f"{exc.message}; not restarted: a restart cannot fix it",
                                    logging.WARNING)
                    return False
                exit_code, crashed_at = exc.exit_code, self._shared.clock()
                continue
            self.history = self.history.ready(self._shared.clock())
            self._set_state(WorkerState.READY, f"restart {self.restarts}", ready_s=ready_s,
                            journal=self._ready_summary(ready_s))
            return True

    async def _start_worker(self, harness: Harness, hold: Hold) -> float:
        """Start one worker and wait until it answers; seconds from spawn to ready.
        The caller holds the load lock (`hold`), and lends it to restarts once the worker
        has spawned. Raises LoadError, with the process gone."""
        s = self._shared
        with self._bug_barrier("preparing the worker"):
            await s.vram_gate.await_release()
            spec, self.resolved, parts = modelfiles.run_spec(self.spec, self.resolved,
                                                             harness.needs_model_file)
            self.slots = harness.slots(spec)
            self.served_n_ctx = None  # this worker's, once it says (_read_slots)
            self.serves_metrics = harness.serves_metrics
            passed = await s.vram_gate.check(
                spec, parts, s.config.harness_config(spec.harness), harness.default_n_ctx,
                harness.kv_contexts(spec))
            self.vram_estimate_mb = passed.estimate_mb
            port = free_port()
            plan = await self._with_prompt_cache(harness.plan(passed.spec, port), harness,
                                                 spec, parts)
            # The first start after a download appends to the log the download began.
            keep = 0 if self._log_started else s.config.log_keep
            self._log_started = False
            worker = s.worker_factory(
                self.model_id, plan, port, self.log_path, s.config.stop_timeout_s,
                log_keep=keep, on_spawn=lambda worker: self._on_spawn(worker, hold))
        self.worker = worker
        started = s.clock()
        try:
            # A bug while starting: the worker killed itself on the way out.
            with self._bug_barrier("starting the worker"):
                try:
                    await worker.start()
                    try:
                        await self._recorded()
                    except BaseException:
                        await worker.kill()  # no model is failed with its worker running
                        raise
                except OSError as exc:
                    raise SpawnFailed(f"cannot start worker: {exc}") from exc
        finally:
            if worker.returncode is not None:
                await self._worker_gone(worker)
        if harness.slots_path is not None:
            # Read beside the first requests, not before them: the guess (harness.slots) is
            # the worker's own rule, and waiting for GET /props cost every load's first
            # answer about a millisecond (bench/peers.py). The router's queue takes the
            # answer at its next request (api/v1.py).
            self._reading_slots = asyncio.ensure_future(
                self._read_slots(worker, harness.slots_path))
        if self.prompt_cache is not None:  # before `loaded`: the first answer may use it
            await self.prompt_cache.restore(worker.port)
        return s.clock() - started

    async def _read_slots(self, worker: Worker, path: str) -> None:
        """What the ready worker says it serves (`total_slots`) replaces what its harness
        expected: the router's admission and /models follow the worker, not a guess. A
        task of its own: a bug in it is logged here, never left unretrieved."""
        try:
            await self._ask_slots(worker, path)
        except Exception:
            log.exception("%s: reading what its worker serves (GET %s) failed", self.model_id,
                          path)

    async def _ask_slots(self, worker: Worker, path: str) -> None:
        answer = None
        for attempt in range(SLOTS_TRIES):
            if attempt:
                await self._shared.sleep(SLOTS_RETRY_S * 2 ** (attempt - 1))
            answer = await worker.get_json(path, SLOTS_TIMEOUT_S)
            if self.worker is not worker or worker.returncode is not None:
                return  # stopped meanwhile: what it said no longer matters
            if isinstance(answer, dict):
                break
        reported = answer.get("total_slots") if isinstance(answer, dict) else None
        # The context each request gets (llama-server's default: the model's own context,
        # shared by its slots): what `/models` says when the config left it to the server.
        settings = answer.get("default_generation_settings") if isinstance(answer, dict) \
            else None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        self.served_n_ctx = n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) \
            and n_ctx > 0 else None
        if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
            if reported != self.slots:
                log.info("%s: its worker serves %d slots (expected %d)", self.model_id,
                         reported, self.slots)
            self.slots = reported
        else:
            log.info("%s: its worker did not say how many slots it serves (GET %s); "
                     "assuming %d", self.model_id, path, self.slots)

    async def _with_prompt_cache(self, plan: WorkerPlan, harness: Harness, spec: ModelSpec,
                                 parts: Sequence[Path]) -> WorkerPlan:
        """The plan with what a prompt cache needs (promptcache.py), when the model's
        worker keeps one and it can have one here; as it is otherwise."""
        caches = self._shared.prompt_caches
        self.prompt_cache = None
        if caches is None or not parts or not caches.wanted(spec, harness.keeps_prompt_cache):
            return plan
        header = await self._shared.vram_gate.header(self.model_id, parts)
        self.prompt_cache = caches.session(spec, parts, self.slots, harness.name,
                                           header.sliding_window if header else None)
        if self.prompt_cache is None:
            return plan
        return dataclasses.replace(plan, command=(*plan.command, *self.prompt_cache.args))

    def _ready_summary(self, ready_s: float) -> str:
        """What a load ended with, for the journal line of every load (activation, API,
        on demand, restart): the file, the context, the process, where it runs."""
        parts = [f"in {ready_s:.2f} s"]
        if self.resolved is not None:
            parts.append(clip(self.resolved.source))
        elif self.spec.path is not None:
            parts.append(clip(self.spec.path))
        n_ctx = effective(self.spec, self._shared.config.harness_config(self.spec.harness), "n_ctx")
        if n_ctx is not None:
            parts.append(f"n_ctx {n_ctx}")
        worker = self.worker
        if worker is not None:
            parts.append(f"pid {worker.pid} on port {worker.port}")
        parts.append("GPU " + ",".join(map(str, self.spec.devices)) if self.spec.devices
                     else "CPU")
        return ", ".join(parts)

    async def _on_spawn(self, worker: Worker, hold: Hold) -> None:
        # Its memory check is done: while it warms up (up to its ready_timeout_s), a
        # crashed model's restart must not wait for it.
        hold.lend()
        if self._shared.state is not None and worker.pid is not None:
            # The token proves, after a crash of this supervisor, which processes of the
            # worker's group are ours (a wrapper script's child outlives the wrapper).
            # Written (an fsync, in a thread) while the worker loads, not before: a load
            # never waits for the disk. It is done before the model is ready
            # (`_recorded`); if the supervisor dies meanwhile, the worker dies of its
            # parent-death signal or, a router child, of its stdin's end (once loaded).
            self._recording = asyncio.ensure_future(
                self._shared.state.add(self.model_id, worker.pid, worker.token))

    async def _recorded(self, *, quietly: bool = False) -> None:
        """The worker's record in workers.json is written (a disk problem is add()'s to
        say); a bug in writing it raises here, unless `quietly` (then it is logged)."""
        recording, self._recording = self._recording, None
        if recording is None:
            return
        await asyncio.wait({recording})
        if recording.cancelled() or recording.exception() is None:
            return
        if not quietly:
            recording.result()
        log.error("%s: recording its worker failed", self.model_id,
                  exc_info=recording.exception())

    async def _worker_gone(self, worker: Worker, reading: StopReading | None = None) -> None:
        """Bookkeeping once a worker's process has exited, however it ended."""
        if self._reading_slots is not None:
            self._reading_slots.cancel()
            self._reading_slots = None
        await self._recorded(quietly=True)  # an entry being written is removed after it
        if self._shared.state is not None and worker.pid is not None:
            await self._shared.state.remove(worker.pid)
        self._shared.vram_gate.released(
            self.model_id, worker.pid, self.spec.devices, self.vram_estimate_mb, reading)

    async def _kill_worker(self) -> None:
        """After a bug: make sure no process is left running behind a failed model."""
        worker = self.worker
        if worker is None or worker.pid is None or worker.returncode is not None:
            return
        try:
            await worker.kill()
            await self._worker_gone(worker)
        except Exception:  # a second bug must not keep the model from being failed
            log.exception("%s: cannot kill worker pid %s", self.model_id, worker.pid)

    async def _stop_now(self, reason: str, release_vram: bool) -> None:
        task = self._run_task
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait, not await: whatever the task ends with (a bug included), the
            # worker below must still be stopped.
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: its task failed while stopping", self.model_id,
                          exc_info=task.exception())
        if self.state in (WorkerState.PENDING, WorkerState.DOWNLOADING, WorkerState.FAILED):
            self._set_state(WorkerState.STOPPED, reason)  # PENDING/DOWNLOADING/FAILED -> STOPPED
            return
        was_ready = self.state is WorkerState.READY
        if self.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.BACKOFF):
            self._set_state(WorkerState.STOPPING, reason)  # -> STOPPING
        worker = self.worker
        if self.state is WorkerState.STOPPING and worker is not None:
            # A shutdown loads nothing next: no need to watch the VRAM come back.
            reading = None
            if release_vram and worker.returncode is None:
                reading = await self._shared.vram_gate.before_stop(worker.pid, self.spec.devices)
            running = worker.returncode is None
            if running and was_ready and self.prompt_cache is not None:
                await self.prompt_cache.save(worker.port)  # bounded; never raises
            await worker.stop()
            if running:
                await self._worker_gone(worker, reading if release_vram else None)
        if self.state is WorkerState.STOPPING:
            self._set_state(WorkerState.STOPPED)  # STOPPING -> STOPPED

    # --- state -----------------------------------------------------------------------------

    def _set_state(self, new: WorkerState, reason: str = "", level: int = logging.INFO,
                   ready_s: float | None = None, journal: str = "") -> None:
        """The one place a model changes state: checked, timestamped, logged, published.
        `journal`: more for the log line only (what a load ended with), not the event."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise InvalidTransition(f"{self.model_id}: {old} -> {new}")
        self.state = new
        self.since = time.time()
        said = ", ".join(part for part in (reason, journal) if part)
        log.log(level, "%s: %s%s", self.model_id, journal_transition(old, new),
                f" ({said})" if said else "")
        self._shared.events.publish(
            ModelEvent(self.model_id, old, new, reason, self.since, ready_s))

    def _note(self, message: str, detail: str | None, exit_code: int | None) -> None:
        self.last_error, self.last_detail, self.last_exit_code = message, detail, exit_code

    def _failed(self, error: LoadError) -> None:
        self._note(error.message, error.detail, error.exit_code)
        self.failure_code = error.code
        if self.state is not WorkerState.FAILED:
            self._set_state(WorkerState.FAILED, error.message, logging.WARNING)

    def _settle(self, error: LoadError | None) -> None:
        if self._loaded is not None and not self._loaded.done():
            if error is None:
                self._loaded.set_result(None)
            else:
                self._loaded.set_exception(error)
                self._loaded.exception()  # retrieved: nobody may be waiting on it

    @contextlib.contextmanager
    def _bug_barrier(self, doing: str, expected: tuple[type[Exception], ...] = (LoadError,),
                     ) -> Iterator[None]:
        """What a model is told when this code has a bug: an `expected` exception passes as
        it is; any other (never a cancellation) is logged with its traceback, once, and
        raised as an InternalError saying what was being done."""
        try:
            yield
        except expected:
            raise
        except Exception as exc:
            log.error("%s: internal error %s", self.model_id, doing, exc_info=exc)
            raise InternalError(
                f"internal error {doing}: {exc!r}; see the neuron service log") from exc

    def _harness(self) -> Harness:
        harness = self._shared.harnesses.get(self.spec.harness)
        if harness is None:
            raise UnknownHarness(self.spec.harness)
        return harness

    # --- what others read ------------------------------------------------------------------

    def progress_token(self) -> tuple[object, ...] | None:
        """What a load in progress is doing (see Worker.progress_token); None otherwise."""
        if self.state is WorkerState.STARTING and self.worker is not None:
            return (self.worker.progress_token(),)
        if self.state is WorkerState.DOWNLOADING and self.download is not None:
            return ("download", self.download.done_bytes)
        return None

    @property
    def log_problem(self) -> str | None:
        """Why the live worker's log file could not be written; None when it can."""
        worker = self.worker if self.state in LIVE_STATES else None
        return worker.log_problem if worker is not None else None

    def rss_bytes(self) -> int | None:
        """Resident memory of its worker's process tree; None without a running worker."""
        return listing.rss_bytes(self.worker if self.state in LIVE_STATES else None)

    def to_json(self) -> dict[str, Any]:
        """Its `/models` entry (listing.py)."""
        return listing.of_model(self, self._shared.config, self._shared.vram_gate.used_mb
                                ).as_json()
