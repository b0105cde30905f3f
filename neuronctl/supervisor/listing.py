"""One `/models` entry, whatever it describes: a model with a lifecycle, or a catalogue
model without one (`unloaded`).

`ModelView` declares the entry's keys once, in the order the API sends them; a live model
fills them all (`of_model`), a catalogue entry only what its spec says (`of_spec`), the
rest keeping the defaults an unloaded model has. `with_traffic` adds what the router
counts. docs/api.md documents the shape; the CLI's and the dashboard's tables read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ModelSpec, NeuronConfig, effective
from ..states import LIVE_STATES, ModelStatus, WorkerState
from . import procmem
from .eviction import Activity

if TYPE_CHECKING:
    from .lifecycle import ModelLifecycle
    from .worker import Worker


@dataclass(frozen=True, kw_only=True)
class ModelView:
    id: str
    harness: str
    status: str
    devices: list[int]
    vram_used_mb: int | None = None
    pid: int | None = None
    port: int | None = None
    endpoint: str | None = None
    load_ms: int | None = None
    restarts: int = 0
    # `error`/`exit_code`: why it is failed now; `last_*`: the latest failure ever, kept
    # after a successful restart so a crash is not forgotten.
    error: str | None = None
    error_detail: str | None = None
    exit_code: int | None = None
    last_error: str | None = None
    last_exit_code: int | None = None
    log_path: str | None = None
    # Something wrong that does not stop it serving (its log cannot be written).
    warning: str | None = None
    pinned: bool
    # The context it runs with; None: the server's own default.
    n_ctx: int | None
    # Requests its worker serves at once (what a llama-server worker reports), while one
    # runs: more wait in the node's queue.
    slots: int | None = None
    rss_bytes: int | None = None
    ttl_s: float | None
    download: dict[str, Any] | None = None
    since: float | None = None
    uptime_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every value, two thirds of listing 8,000
        # catalogue models; each view's list and dict are its own already.
        return {name: getattr(self, name) for name in _VIEW_KEYS}


_VIEW_KEYS = tuple(f.name for f in dataclasses.fields(ModelView))


def _from_spec(spec: ModelSpec, config: NeuronConfig) -> dict[str, Any]:
    """The keys a spec and the config decide, live or not."""
    return {"id": spec.model_id, "harness": spec.harness, "devices": list(spec.devices),
            "pinned": config.pinned(spec),
            "n_ctx": effective(spec, config.harness_config(spec.harness), "n_ctx"),
            "ttl_s": config.ttl_for(spec)}


def of_spec(spec: ModelSpec, config: NeuronConfig) -> ModelView:
    """A catalogue model with no lifecycle."""
    return ModelView(status=ModelStatus.UNLOADED.value, **_from_spec(spec, config))


def of_model(model: ModelLifecycle, config: NeuronConfig,
             vram_used_mb: Callable[[int | None], int | None]) -> ModelView:
    """A model with a lifecycle, as it is now; `vram_used_mb`: what the driver says a
    process tree holds (the VRAM gate's reading)."""
    worker = model.worker if model.state in LIVE_STATES else None
    serving = model.serving_worker
    failed = model.state is WorkerState.FAILED
    downloading = model.download is not None and model.state is WorkerState.DOWNLOADING
    return ModelView(
        status=model.status.value,
        vram_used_mb=vram_used_mb(worker.pid) if worker else None,
        pid=worker.pid if worker else None,
        port=worker.port if worker else None,
        endpoint=serving.endpoint if serving else None,
        load_ms=model.load_ms,
        restarts=model.restarts,
        error=model.last_error if failed else None,
        error_detail=model.last_detail if failed else None,
        exit_code=model.last_exit_code if failed else None,
        last_error=model.last_error,
        last_exit_code=model.last_exit_code,
        log_path=str(model.log_path),
        warning=model.log_problem,
        rss_bytes=rss_bytes(worker),
        slots=model.slots if worker else None,
        download=model.download.as_json() if downloading and model.download else None,
        since=model.since,
        uptime_s=round(time.time() - model.since, 3) if serving else None,
        **_with_served_n_ctx(_from_spec(model.spec, config), model if worker else None),
    )


def _with_served_n_ctx(keys: dict[str, Any], model: ModelLifecycle | None) -> dict[str, Any]:
    """`n_ctx` left to the server (None) is, while its worker runs, what the worker says
    each request gets (llama-server's `/props`), when it says."""
    if keys["n_ctx"] is None and model is not None and model.served_n_ctx is not None:
        return {**keys, "n_ctx": model.served_n_ctx}
    return keys


# One per daemon: what it remembers of its workers' process trees (procmem.py).
_MEMORY = procmem.TreeMemory()


def rss_bytes(worker: Worker | None) -> int | None:
    """Resident memory of a running worker's process tree (a wrapper's child counts);
    None without one."""
    if worker is None or worker.pid is None or worker.returncode is not None:
        return None
    if procmem.lists_children():
        return _MEMORY.rss(worker.pid)
    import psutil  # not at import: `neuronctl start` reaches its first spawn sooner

    try:
        root = psutil.Process(worker.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in tree:
        with contextlib.suppress(psutil.Error):  # a child that just exited
            total += proc.memory_info().rss
    return total


def with_traffic(entry: dict[str, Any], activity: Activity) -> dict[str, Any]:
    """`entry` (a listing's) with what the router counts for it: `in_flight`, `queued`,
    and `idle_until`, the Unix time the idle reaper (idle.py) would unload it: `ttl_s`
    after its last /v1 request or its becoming loaded, whichever is later. None without
    a TTL, unless loaded, or while busy (the countdown starts when it is idle again)."""
    idle_until = None
    ttl, since = entry.get("ttl_s"), entry.get("since")
    if activity.keep_alive_s is not None:  # a client's keep_alive, over the config's
        ttl = activity.keep_alive_s if activity.keep_alive_s >= 0 else None
    if (ttl is not None and since is not None and not activity.busy
            and entry["status"] == ModelStatus.LOADED.value):
        last = since
        if activity.last_used:  # the router's clock is monotonic
            last = max(last, time.time() - (time.monotonic() - activity.last_used))
        idle_until = round(last + ttl, 3)
    return {**entry, "in_flight": activity.in_flight, "queued": activity.queued,
            "idle_until": idle_until}
