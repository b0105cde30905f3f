"""Model and worker states, shared by the registry, the API and the CLI.

This module imports nothing from the package so every layer can use it.
"""

from __future__ import annotations

import enum


class ModelStatus(str, enum.Enum):
    """The `status` of one model in `GET /models`.

    The values are wire-compatible with the original service; never rename one.
    """

    DOWNLOADING = "downloading"  # fetching its GGUF from Hugging Face
    LOADING = "loading"
    LOADED = "loaded"
    RESTARTING = "restarting"
    UNLOADING = "unloading"
    FAILED = "failed"
    # In the catalogue, no worker: loaded by id or by the first /v1 request naming it.
    UNLOADED = "unloaded"

    def __str__(self) -> str:
        return self.value


class WorkerState(str, enum.Enum):
    """Where one model's worker is in its life (finer than ModelStatus)."""

    PENDING = "pending"  # waiting for its turn: loads are serialized node-wide
    DOWNLOADING = "downloading"  # resolving or fetching its file; no process yet
    STARTING = "starting"  # spawned, not answering yet
    READY = "ready"
    BACKOFF = "backoff"  # exited unexpectedly; restarting after a delay
    STOPPING = "stopping"
    STOPPED = "stopped"  # gone on request; the model is no longer listed
    FAILED = "failed"  # gone for good until loaded again

    def __str__(self) -> str:
        return self.value

    @property
    def status(self) -> ModelStatus:
        return _STATUS[self]


_STATUS = {
    WorkerState.PENDING: ModelStatus.LOADING,
    WorkerState.DOWNLOADING: ModelStatus.DOWNLOADING,
    WorkerState.STARTING: ModelStatus.LOADING,
    WorkerState.READY: ModelStatus.LOADED,
    WorkerState.BACKOFF: ModelStatus.RESTARTING,
    WorkerState.STOPPING: ModelStatus.UNLOADING,
    WorkerState.STOPPED: ModelStatus.UNLOADING,
    WorkerState.FAILED: ModelStatus.FAILED,
}

def journal_transition(old: WorkerState, new: WorkerState) -> str:
    """An edge in the API's words (`loaded -> restarting`), so the journal greps like
    `/models`; the worker's finer step is added only where the status itself stays
    (`loading: pending -> starting`)."""
    before, after = _journal_name(old), _journal_name(new)
    if before != after:
        return f"{before} -> {after}"
    return f"{after}: {old} -> {new}"


def _journal_name(state: WorkerState) -> str:
    # STOPPED leaves /models (or shows the catalogue's `unloaded`): say where it ends.
    return ModelStatus.UNLOADED.value if state is WorkerState.STOPPED else state.status.value


# Every edge a model's lifecycle may take; anything else is a bug and raises.
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.PENDING: frozenset({
        WorkerState.STARTING,  # PENDING -> STARTING: its turn came
        WorkerState.DOWNLOADING,  # PENDING -> DOWNLOADING: its file is on Hugging Face
        WorkerState.STOPPED,  # PENDING -> STOPPED: unloaded or shut down before its turn
        WorkerState.FAILED,  # PENDING -> FAILED: refused before its turn (no such harness)
    }),
    WorkerState.DOWNLOADING: frozenset({
        WorkerState.PENDING,  # DOWNLOADING -> PENDING: the file is here; wait for the turn
        WorkerState.FAILED,  # DOWNLOADING -> FAILED: no such file, or the fetch failed
        WorkerState.STOPPED,  # DOWNLOADING -> STOPPED: unloaded or shut down mid-fetch
    }),
    WorkerState.STARTING: frozenset({
        WorkerState.READY,  # STARTING -> READY: the probe answered
        WorkerState.BACKOFF,  # STARTING -> BACKOFF: a restart attempt failed; try again
        WorkerState.FAILED,  # STARTING -> FAILED: the first start failed
        WorkerState.STOPPING,  # STARTING -> STOPPING: unloaded while starting
    }),
    WorkerState.READY: frozenset({
        WorkerState.BACKOFF,  # READY -> BACKOFF: crashed, will restart
        WorkerState.FAILED,  # READY -> FAILED: crashed, no restart
        WorkerState.STOPPING,  # READY -> STOPPING: unload or shutdown
    }),
    WorkerState.BACKOFF: frozenset({
        WorkerState.STARTING,  # BACKOFF -> STARTING: the delay is over
        WorkerState.FAILED,  # BACKOFF -> FAILED: out of restarts
        WorkerState.STOPPING,  # BACKOFF -> STOPPING: unloaded during the delay
    }),
    WorkerState.STOPPING: frozenset({
        WorkerState.STOPPED,  # STOPPING -> STOPPED: the process is gone
    }),
    WorkerState.STOPPED: frozenset(),
    WorkerState.FAILED: frozenset({
        WorkerState.STOPPED,  # FAILED -> STOPPED: unloaded
    }),
}

# States in which a process may exist and must be stopped on shutdown.
LIVE_STATES = frozenset({WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPING})
class InvalidTransition(RuntimeError):
    pass
