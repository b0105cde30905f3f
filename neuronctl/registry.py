"""Every model on this node: load, unload, restart after crashes, shut down.

Loads (and restarts) are serialized node-wide: VRAM contention makes parallel loads risky.
They are single-flight per model: concurrent loads of one model share one attempt and one
process, and nothing a client sends can make two workers for one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import logfiles, resolve, vram
from .config import HarnessConfig, ModelSpec, NeuronConfig, effective
from .discovery import Discovery
from .harness import Harness, LoadError, UnknownHarness
from .models import ModelRecord, RestartPolicy
from .statefile import StateFile
from .states import WorkerState
from .worker import Worker, describe_exit, free_port

log = logging.getLogger(__name__)

WorkerFactory = Callable[..., Worker]
FetcherFactory = Callable[[HarnessConfig], resolve.Fetcher]
_VRAM_POLL_S = 0.25  # while waiting for a stopped worker's memory to be released


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class ModelRegistry:
    def __init__(
        self,
        config: NeuronConfig,
        harnesses: Mapping[str, Harness],
        *,
        state: StateFile | None = None,
        worker_factory: WorkerFactory = Worker,
        clock: Callable[[], float] = time.monotonic,
        discovery: Discovery | None = None,
        fetcher_factory: FetcherFactory | None = None,
    ) -> None:
        self.config = config
        self.harnesses = harnesses
        self._state = state
        self._worker_factory = worker_factory
        self._clock = clock
        self._records: dict[str, ModelRecord] = {}
        # Called with (record, seconds from spawn to ready) after every successful start.
        self.ready_observers: list[Callable[[ModelRecord, float], None]] = []
        self._load_lock = asyncio.Lock()
        self.discovery = discovery or Discovery(config.gpu_poll_interval_s)
        self._fetcher_factory = fetcher_factory or (lambda d: resolve.Fetcher(d.hf_cache))
        self._releases: list[vram.Release] = []  # stopped workers' VRAM not yet seen free

    def reconfigure(self, config: NeuronConfig, harnesses: Mapping[str, Harness]) -> None:
        """New node settings and harnesses for loads and restarts from now on (reload)."""
        self.config = config
        self.harnesses = harnesses

    def models(self) -> list[ModelRecord]:
        return list(self._records.values())

    def get(self, model_id: str) -> ModelRecord | None:
        return self._records.get(model_id)

    def load_progress(self) -> tuple[object, ...]:
        """What the loads in progress are doing (see Worker.progress_token), downloads
        included: bytes arriving are progress, so the start-up heartbeat keeps going."""
        progress: list[object] = []
        for r in self._records.values():
            if r.state is WorkerState.STARTING and r.worker is not None:
                progress.append((r.model_id, r.worker.progress_token()))
            elif r.state is WorkerState.DOWNLOADING and r.download is not None:
                progress.append((r.model_id, "download", r.download.done_bytes))
        return tuple(progress)

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
        record = ModelRecord(spec, logfiles.log_path(self.config.log_dir, spec.model_id),
                             vram_of=self._vram_used_mb)
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
            if getattr(harness, "needs_model_file", False) and resolve.needs_download(record.spec):
                # Outside the load lock: a long download must not hold up other loads.
                record.set_state(WorkerState.DOWNLOADING)  # PENDING -> DOWNLOADING
                record.resolved = await self._download(record)
                record.set_state(WorkerState.PENDING, "model file ready")  # DOWNLOADING -> PENDING
            async with self._load_lock:
                record.set_state(WorkerState.STARTING)  # PENDING -> STARTING
                started = self._clock()
                await self._spawn_until_ready(record, harness)
        except asyncio.CancelledError:
            self._stopped(record, "load cancelled")
            raise
        except LoadError as exc:
            record.note_failure(exc.message, exc.exit_code)
            record.set_state(WorkerState.FAILED, "load failed")  # STARTING/DOWNLOADING -> FAILED
            raise
        except Exception as exc:  # a bug: the model must not stay `loading` with no one on it
            log.exception("%s: load failed unexpectedly", record.model_id)
            record.note_failure(f"internal error: {exc!r}", None)
            if record.state is WorkerState.PENDING:
                record.set_state(WorkerState.STARTING)  # PENDING -> STARTING, to fail it
            record.set_state(WorkerState.FAILED, "load failed")
            raise LoadError(f"internal error while loading: {exc!r}") from exc
        record.load_ms = round((self._clock() - started) * 1000)
        self._ready(record, harness)
        return record

    async def _spawn_until_ready(self, record: ModelRecord, harness: Harness) -> None:
        """Start one worker for `record` and wait until it answers; LoadError otherwise.
        The caller holds the load lock."""
        try:
            await self._await_vram_release()
            run_spec = await self._prepare(record, harness)
            port = free_port()
            plan = harness.plan(run_spec, port)
            # The first start after a download appends to the log the download began.
            keep = 0 if record.log_started else self.config.log_keep
            record.log_started = False
            worker = self._worker_factory(
                record.model_id, plan, port, record.log_path, self.config.stop_timeout_s,
                log_keep=keep, on_spawn=self._on_spawn,
            )
        except LoadError:
            raise
        except Exception as exc:  # a bug, or the log directory unwritable
            log.exception("%s: cannot prepare worker", record.model_id)
            raise LoadError(f"cannot start worker: {exc}") from exc
        record.worker = worker
        started = self._clock()
        try:
            await worker.start()
        except OSError as exc:
            raise LoadError(f"cannot start worker: {exc}") from exc
        finally:
            if worker.returncode is not None:
                self._forget(worker)
                self._note_release(record, worker)
        for observe in self.ready_observers:  # the load duration histogram of /metrics
            observe(record, self._clock() - started)

    # --- model files and VRAM ---------------------------------------------------------------

    async def _download(self, record: ModelRecord) -> resolve.Resolved:
        """Resolve a Hugging Face model to local files, fetching what the cache lacks, in a
        thread; progress lines go to the model's log. Cancelling returns at once."""
        spec = record.spec
        try:
            fetcher = self._fetcher_factory(self.config.harness_config(spec.harness))
        except Exception as exc:  # a bug, or huggingface_hub missing
            log.exception("%s: cannot set up the download", spec.model_id)
            raise LoadError(f"cannot fetch {spec.model_id}: {exc}") from exc
        try:
            record.log_path.parent.mkdir(parents=True, exist_ok=True)
            logfiles.rotate(record.log_path, self.config.log_keep)
        except OSError as exc:
            raise LoadError(f"cannot write the log {record.log_path}: {exc.strerror}") from exc
        record.log_started = True
        progress = resolve.Progress(log=lambda line: _append_line(record.log_path, line))
        record.download = progress
        log.info("%s: finding its GGUF in the Hugging Face cache %s, or downloading it",
                 spec.model_id, fetcher.cache)
        try:
            resolved = await resolve.in_thread(
                lambda: fetcher.resolve(spec, progress), f"download {spec.model_id}"
            )
        except asyncio.CancelledError:
            progress.cancel()  # the thread stops at its next chunk
            raise
        except LoadError:
            raise
        except Exception as exc:  # a bug, or huggingface_hub surprising us
            log.exception("%s: download failed", spec.model_id)
            raise LoadError(f"cannot fetch {spec.model_id}: {exc}") from exc
        log.info("%s: model file %s", spec.model_id, resolved.path)
        return resolved

    async def _prepare(self, record: ModelRecord, harness: Harness) -> ModelSpec:
        """The spec a worker is planned from: its local file, its tensor split; and the
        VRAM check that refuses a model its devices cannot hold."""
        spec = record.spec
        if getattr(harness, "needs_model_file", False) and spec.path is not None:
            record.resolved = resolve.local_file(spec)  # checked again at every start
        if record.resolved is not None:
            spec = dataclasses.replace(spec, path=record.resolved.path)
            parts = record.resolved.parts
        else:
            parts = (spec.path,) if spec.path is not None and spec.path.is_file() else ()
        defaults = self.config.harness_config(spec.harness)
        n_gpu_layers = effective(spec, defaults, "n_gpu_layers")
        if n_gpu_layers is None and spec.devices:
            n_gpu_layers = -1
        if not n_gpu_layers:
            return spec  # on the CPU, as far as the settings say
        gpus = await self.discovery.refresh()
        if not gpus:
            return spec  # no nvidia-smi: nothing to check against
        if len(spec.devices) > 1 and not spec.tensor_split:
            spec = dataclasses.replace(spec, tensor_split=vram.split_by_free(spec.devices, gpus))
        if not parts:
            return spec
        n_ctx = effective(spec, defaults, "n_ctx")
        if n_ctx is None:
            n_ctx = getattr(harness, "default_n_ctx", None)
        try:
            need = await asyncio.to_thread(vram.estimate, parts, n_ctx, n_gpu_layers)
        except Exception as exc:  # not a GGUF we can read; the worker will say more
            log.warning("%s: cannot estimate its VRAM from %s: %s", record.model_id,
                        parts[0], exc)
            return spec
        record.vram_estimate_mb = need.total_mb
        devices = list(spec.devices) or [g.index for g in gpus]
        try:
            vram.admit(record.model_id, need, gpus, devices)
        except vram.NotEnoughVram as exc:
            if not spec.force:
                raise
            log.warning("%s (loading anyway: force = true)", exc.message)
        return spec

    def _vram_used_mb(self, worker: Worker) -> int | None:
        if worker.pid is None or self.discovery.listed_pids() is None:
            return None
        return self.discovery.process_vram_mb(_process_tree(worker.pid))

    def _note_release(self, record: ModelRecord, worker: Worker,
                      pids: Iterable[int] = (), used_before_mb: int | None = None) -> None:
        """Remember that `worker` (gone now) may have held VRAM the next load must see free."""
        gpus = self.discovery.cached_gpus()
        if worker.pid is None or not gpus:
            return
        tree = frozenset({worker.pid, *pids})
        listed = self.discovery.listed_pids()
        accounted = listed is not None and bool(tree & listed)
        held = self.discovery.process_vram_mb(tree) if accounted else record.vram_estimate_mb
        devices = record.spec.devices or tuple(g.index for g in gpus)
        self._releases.append(
            vram.Release(record.model_id, tree, devices, accounted, held, used_before_mb)
        )

    async def _before_stop(
        self, worker: Worker, record: ModelRecord
    ) -> tuple[set[int], int | None]:
        """A fresh reading while the worker still runs: its processes, its devices' use."""
        if worker.pid is None or not self.discovery.cached_gpus():
            return set(), None
        tree = _process_tree(worker.pid)
        gpus = await self.discovery.refresh()
        devices = record.spec.devices or tuple(g.index for g in gpus)
        used = [g.memory_used_mb for g in gpus if g.index in devices]
        return tree, (sum(u for u in used if u is not None) if used else None)

    async def _await_vram_release(self) -> None:
        """Before a load: wait (bounded) until the driver reports the memory of workers
        stopped since the last load free again. The caller holds the load lock."""
        if not self._releases:
            return
        timeout = self.config.vram_release_timeout_s
        deadline = self._clock() + timeout
        waited = False
        while True:
            gpus = await self.discovery.refresh()
            listed = self.discovery.listed_pids()
            self._releases = [r for r in self._releases if gpus and not r.freed(gpus, listed)]
            if not self._releases:
                return
            names = ", ".join(sorted({r.model_id for r in self._releases}))
            if self._clock() >= deadline:
                log.warning("VRAM of %s not reported free %g s after it stopped; loading anyway",
                            names, timeout)
                self._releases.clear()
                return
            if not waited:
                log.info("waiting for the driver to free the VRAM of %s", names)
                waited = True
            await asyncio.sleep(_VRAM_POLL_S)

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
        while True:
            worker = record.worker
            assert worker is not None
            code = await worker.wait_exit()
            # Read at each crash: a reload's new policy and harness defaults apply here too.
            policy = RestartPolicy.for_model(self.config, record.spec)
            harness = self.harnesses.get(record.spec.harness, harness)
            self._forget(worker)
            self._note_release(record, worker)
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
                except Exception as exc:  # a bug; counted like a failed attempt, not lost
                    log.exception("%s: restart failed unexpectedly", record.model_id)
                    record.note_failure(f"internal error: {exc!r}", None)
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
        if record.stop_task is not None:
            raise Conflict(f"{model_id} is already being unloaded")
        await self._stop(record, "unloaded")
        log.info("unloaded %s", model_id)

    async def _stop(self, record: ModelRecord, reason: str, release_vram: bool = True) -> None:
        """Stop `record` once: a second caller (an unload racing a shutdown or a reload)
        waits for the first stop rather than stopping it again."""
        if record.stop_task is None:
            record.stop_task = asyncio.create_task(
                self._stop_now(record, reason, release_vram), name=f"stop {record.model_id}"
            )
        await asyncio.shield(record.stop_task)

    async def _stop_now(self, record: ModelRecord, reason: str, release_vram: bool) -> None:
        for task in (record.load_task, record.supervisor):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, LoadError):
                    await task
        if record.state is WorkerState.FAILED:
            record.set_state(WorkerState.STOPPED, reason)  # FAILED -> STOPPED
        self._stopped(record, reason)
        if record.state is WorkerState.STOPPING:
            worker = record.worker
            if worker is not None:
                # A shutdown loads nothing next: no need to watch the VRAM come back.
                before = await self._before_stop(worker, record) if release_vram else None
                await worker.stop()
                self._forget(worker)
                if before is not None:
                    self._note_release(record, worker, *before)
            record.set_state(WorkerState.STOPPED)  # STOPPING -> STOPPED
        if self._records.get(record.model_id) is record:
            del self._records[record.model_id]

    def _stopped(self, record: ModelRecord, reason: str) -> None:
        """Leave PENDING for good, or enter STOPPING, on the way out."""
        if record.state in (WorkerState.PENDING, WorkerState.DOWNLOADING):
            record.set_state(WorkerState.STOPPED, reason)  # PENDING/DOWNLOADING -> STOPPED
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
        await asyncio.gather(*(self._stop(r, "shutting down", False) for r in records))
        await self.discovery.close()


def _append_line(path: Path, line: str) -> None:
    """One line to a model's log, from any thread (download progress)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S%z")
    with contextlib.suppress(OSError), path.open("a", encoding="utf-8") as fh:
        fh.write(f"=== {stamp} {line}\n")


def _process_tree(pid: int) -> set[int]:
    """`pid` and its descendants: the process holding the GPU may be a child."""
    import psutil  # not at import: `neuronctl start` reaches its first spawn sooner

    pids = {pid}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
    return pids
