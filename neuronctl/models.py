"""One model as the registry tracks it (ModelRecord), and its restart policy.

Plain data plus the one state-transition method; the registry does the work.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import resolve
from .config import ModelSpec, NeuronConfig
from .states import LIVE_STATES, TRANSITIONS, InvalidTransition, ModelStatus, WorkerState
from .worker import Worker

log = logging.getLogger("neuronctl.registry")  # transitions read as the registry's


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
    stop_task: asyncio.Task[None] | None = None  # set once, by the first unload or shutdown
    supervisor: asyncio.Task[None] | None = None  # watches and restarts once ready
    resolved: resolve.Resolved | None = None  # the local file(s) its workers load
    download: resolve.Progress | None = None  # while DOWNLOADING
    log_started: bool = False  # the download began a fresh log: the first start appends
    vram_estimate_mb: int | None = None  # from the GGUF header, at admission
    vram_of: Callable[[Worker], int | None] = lambda worker: None  # per-process, nvidia-smi

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
            "vram_used_mb": self.vram_of(worker) if worker else None,
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
            "download": (self.download.as_json()
                         if self.download and self.state is WorkerState.DOWNLOADING else None),
            "since": self.since,
            "uptime_s": round(time.time() - self.since, 3) if ready else None,
        }
