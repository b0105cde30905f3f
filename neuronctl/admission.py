"""The VRAM gate in front of every worker start: will the model fit, and is the memory of
the workers stopped before it free again?

It owns the GPU-side bookkeeping the load pipeline needs (vram.py has the arithmetic):
the estimate from the GGUF header against the devices' free memory, a tensor split for
several devices, and the releases of stopped workers that the next load waits out. A CPU
host (no nvidia-smi, or a model with no layers offloaded) passes through untouched.

The header is read in two steps so that the load lock is never held while a file is
parsed: `read_header`, before the lock, runs ggufinfo's bounded child and keeps what it
read (by the files' identity); `admit`, under the lock, only compares. A header that lies
about its sizes is refused there and then, as a ModelFileError.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import ggufinfo, vram
from .config import HarnessConfig, ModelSpec, effective, gpu_layers
from .discovery import Discovery
from .errors import ModelFileError, NotEnoughVram

log = logging.getLogger(__name__)

POLL_S = 0.25  # while waiting for a stopped worker's memory to be released
_HEADERS_KEPT = 32  # headers read, by file identity; a restart reads none again

HeaderReader = Callable[[Sequence[Path]], Awaitable[ggufinfo.Header]]
_FileKey = tuple[tuple[str, int, int, int, int], ...]


@dataclass(frozen=True)
class Admitted:
    spec: ModelSpec  # with the tensor split filled in for several devices
    estimate_mb: int | None  # what the GGUF header says it needs; None when not judged


@dataclass(frozen=True)
class StopReading:
    """Taken while a worker still runs, right before it is stopped."""

    pids: frozenset[int]
    used_before_mb: int | None  # its devices' used memory


class Admission:
    def __init__(
        self,
        discovery: Discovery,
        release_timeout_s: Callable[[], float],
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        header_reader: HeaderReader = ggufinfo.read_bounded,
    ) -> None:
        self.discovery = discovery
        self._release_timeout_s = release_timeout_s  # read at each wait: reload changes it
        self._clock = clock
        self._sleep = sleep
        self._releases: list[vram.Release] = []  # stopped workers' VRAM not yet seen free
        self._read_header = header_reader
        # What each model file's header said; None: it cannot be sized (harmlessly).
        self._headers: dict[_FileKey, ggufinfo.Header | None] = {}

    async def read_header(
        self, spec: ModelSpec, parts: Sequence[Path], defaults: HarnessConfig
    ) -> None:
        """Before the load lock: read the header `admit` will need, when it will need one
        (layers on a GPU this host has). Raises ModelFileError for a header that lies."""
        if not parts or not gpu_layers(spec, defaults) or not await self.discovery.gpus():
            return
        await self._header(spec.model_id, parts)

    async def _header(self, model_id: str, parts: Sequence[Path]) -> ggufinfo.Header | None:
        """The header of `parts`, read once per version of the files (in a bounded child)."""
        try:
            key = _file_key(parts)
        except OSError as exc:
            raise ModelFileError(f"{model_id}: cannot read {exc.filename}: {exc.strerror}",
                                 param="path") from exc
        if key in self._headers:
            return self._headers[key]
        try:
            header: ggufinfo.Header | None = await self._read_header(parts)
        except ggufinfo.BadHeader as exc:
            raise ModelFileError(
                f"{model_id}: refused: the GGUF header of {parts[0]} cannot be trusted: {exc}",
                param="path") from None
        except ggufinfo.CannotEstimate as exc:  # the worker will say more, if anything
            log.warning("%s: cannot estimate its VRAM from %s: %s", model_id, parts[0], exc)
            header = None
        while len(self._headers) >= _HEADERS_KEPT:
            del self._headers[next(iter(self._headers))]
        self._headers[key] = header
        return header

    async def admit(
        self,
        spec: ModelSpec,
        parts: Sequence[Path],
        defaults: HarnessConfig,
        default_n_ctx: int | None,
        slots: int = 1,
    ) -> Admitted:
        """Raise NotEnoughVram when the devices cannot hold the model (unless `force`).
        Each of its `slots` has a KV cache of n_ctx tokens. The caller holds the load lock:
        the header was read before it (`read_header`), unless the files changed since."""
        n_gpu_layers = gpu_layers(spec, defaults)
        if not n_gpu_layers:
            return Admitted(spec, None)  # on the CPU, as far as the settings say
        gpus = await self.discovery.refresh()
        if not gpus:
            return Admitted(spec, None)  # no nvidia-smi: nothing to check against
        if len(spec.devices) > 1 and not spec.tensor_split:
            spec = dataclasses.replace(spec, tensor_split=vram.split_by_free(spec.devices, gpus))
        if not parts:
            return Admitted(spec, None)
        n_ctx = effective(spec, defaults, "n_ctx")
        if n_ctx is None:
            n_ctx = default_n_ctx
        if n_ctx and slots > 1:
            n_ctx *= slots
        header = await self._header(spec.model_id, parts)
        if header is None:
            return Admitted(spec, None)
        need = vram.estimate(header, n_ctx, n_gpu_layers)
        devices = list(spec.devices) or [g.index for g in gpus]
        try:
            vram.admit(spec.model_id, need, gpus, devices)
        except NotEnoughVram as exc:
            if not spec.force:
                raise
            log.warning("%s (loading anyway: force = true)", exc.message)
        return Admitted(spec, need.total_mb)

    def used_mb(self, pid: int | None) -> int | None:
        """VRAM the driver says the process tree of `pid` holds; None when it cannot say."""
        if pid is None or self.discovery.listed_pids() is None:
            return None
        return self.discovery.process_vram_mb(process_tree(pid))

    async def before_stop(self, pid: int | None, devices: Sequence[int]) -> StopReading | None:
        """A fresh reading while the worker still runs; None on a host with no GPUs."""
        if pid is None or not self.discovery.cached_gpus():
            return None
        tree = process_tree(pid)
        gpus = await self.discovery.refresh()
        names = devices or tuple(g.index for g in gpus)
        used = [g.memory_used_mb for g in gpus if g.index in names]
        total = sum(u for u in used if u is not None) if used else None
        return StopReading(frozenset(tree), total)

    def released(
        self,
        model_id: str,
        pid: int | None,
        devices: Sequence[int],
        estimate_mb: int | None,
        reading: StopReading | None = None,
    ) -> None:
        """Remember that the worker `pid` (gone now) may have held VRAM the next load must
        see free."""
        gpus = self.discovery.cached_gpus()
        if pid is None or not gpus:
            return
        tree = frozenset({pid, *(reading.pids if reading else ())})
        listed = self.discovery.listed_pids()
        accounted = listed is not None and bool(tree & listed)
        held = self.discovery.process_vram_mb(tree) if accounted else estimate_mb
        names = tuple(devices) or tuple(g.index for g in gpus)
        used_before = reading.used_before_mb if reading else None
        self._releases.append(vram.Release(model_id, tree, names, accounted, held, used_before))

    async def await_release(self) -> None:
        """Before a start: wait (bounded) until the driver reports the memory of workers
        stopped since the last start free again. The caller holds the load lock."""
        if not self._releases:
            return
        timeout = self._release_timeout_s()
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
            await self._sleep(POLL_S)


def _file_key(parts: Sequence[Path]) -> _FileKey:
    """Which version of each file: a file replaced at the same path is read again."""
    stats = [(os.fspath(p), os.stat(p)) for p in parts]
    return tuple((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats)


def process_tree(pid: int) -> set[int]:
    """`pid` and its descendants: the process holding the GPU may be a child."""
    import psutil  # not at import: `neuronctl start` reaches its first spawn sooner

    pids = {pid}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
    return pids
