"""The memory gate in front of every worker start: will the model fit, and is the memory
of the workers stopped before it free again?

It owns the GPU-side bookkeeping the load pipeline needs (vram.py has the arithmetic):
the estimate from the GGUF header against the devices' free memory, a tensor split for
several devices, and the releases of stopped workers that the next load waits out. A
model with no layers offloaded is judged the same way against the host's available RAM;
one with layers offloaded on a host with no nvidia-smi passes through untouched.

The header is read in two steps so that the load lock is never held while a file is
parsed: `read_header`, before the lock, runs ggufinfo's bounded child and keeps what it
read (by the files' identity); `check`, under the lock, only compares. A header that lies
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

from ..config import HarnessConfig, ModelSpec, effective, gpu_layers
from ..errors import ContextTooLong, ModelFileError, NotEnoughRam, NotEnoughVram, clip
from . import gguf as ggufinfo
from . import vram
from .discovery import Discovery
from .headers import read_bounded

log = logging.getLogger(__name__)

POLL_S = 0.25  # while waiting for a stopped worker's memory to be released
_HEADERS_KEPT = 32  # headers read, by file identity; a restart reads none again

HeaderReader = Callable[[Sequence[Path]], Awaitable[ggufinfo.Header]]
AvailableRam = Callable[[], int | None]
_FileKey = tuple[tuple[str, int, int, int, int], ...]


@dataclass(frozen=True)
class Passed:
    """What passed the gate."""

    spec: ModelSpec  # with the tensor split filled in for several devices
    estimate_mb: int | None  # what the GGUF header says it needs; None when not judged


@dataclass(frozen=True)
class StopReading:
    """Taken while a worker still runs, right before it is stopped."""

    pids: frozenset[int]
    used_before_mb: int | None  # its devices' used memory


class VramGate:
    """The gate itself, one per node (the lifecycles share it); not to be confused with
    the router's request slots (api/traffic.py), which admit requests, not workers."""

    def __init__(
        self,
        discovery: Discovery,
        release_timeout_s: Callable[[], float],
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        header_reader: HeaderReader = read_bounded,
        available_ram: AvailableRam | None = None,
    ) -> None:
        self.discovery = discovery
        self._release_timeout_s = release_timeout_s  # read at each wait: reload changes it
        self._clock = clock
        self._sleep = sleep
        self._releases: list[vram.Release] = []  # stopped workers' VRAM not yet seen free
        self._read_header = header_reader
        self._available_ram = available_ram or host_available_ram  # bytes; None: unknown
        # What each model file's header said; None: it cannot be sized (harmlessly).
        self._headers: dict[_FileKey, ggufinfo.Header | None] = {}

    async def read_header(
        self, spec: ModelSpec, parts: Sequence[Path], defaults: HarnessConfig,
        strict_n_ctx: bool = False,
    ) -> None:
        """Before the load lock: read the header `check` will need (on a GPU or in RAM), and
        hold the context size against the one the model was trained for: above it,
        ContextTooLong when `strict_n_ctx` (a client chose it), else a warning (the operator
        did). Raises ModelFileError for a header that lies, where a GPU judges it (on the
        CPU the worker says what is wrong with the file, as it always did)."""
        if not parts:
            return
        on_gpu = bool(gpu_layers(spec, defaults)) and bool(await self.discovery.gpus())
        header = await self._header(spec.model_id, parts, on_gpu)
        n_ctx = effective(spec, defaults, "n_ctx")
        trained = header.context_length if header is not None else None
        if not n_ctx or not trained or n_ctx <= trained:
            return
        said = (f"{spec.model_id}: n_ctx {n_ctx} is above the context the model was trained "
                f"for ({trained} tokens)")
        if strict_n_ctx:
            raise ContextTooLong(f"{said}; ask for at most {trained}", param="n_ctx")
        log.warning("%s; loading it as configured", said)

    async def header(self, model_id: str, parts: Sequence[Path]) -> ggufinfo.Header | None:
        """What the header of `parts` says (read once per version of the files), for
        choices beside the memory check (a prompt cache's --swa-full); None: it cannot say."""
        return await self._header(model_id, parts, on_gpu=False)

    async def _header(self, model_id: str, parts: Sequence[Path],
                      on_gpu: bool = True) -> ggufinfo.Header | None:
        """The header of `parts`, read once per version of the files (in a bounded child).
        One that lies is refused `on_gpu`; for the CPU it only cannot size the model."""
        try:
            key = _file_key(parts)
        except OSError as exc:
            raise ModelFileError(
                f"{model_id}: cannot read {clip(exc.filename)}: {exc.strerror}",
                param="path") from exc
        if key in self._headers:
            return self._headers[key]
        try:
            header: ggufinfo.Header | None = await self._read_header(parts)
        except ggufinfo.BadHeader as exc:
            if not on_gpu:
                log.warning("%s: cannot size it from %s: %s", model_id, clip(parts[0]), exc)
                return None
            raise ModelFileError(
                f"{model_id}: refused: the GGUF header of {clip(parts[0])} cannot be "
                f"trusted: {exc}", param="path") from None
        except ggufinfo.CannotEstimate as exc:  # the worker will say more, if anything
            log.warning("%s: cannot estimate its memory from %s: %s", model_id,
                        clip(parts[0]), exc)
            header = None
        while len(self._headers) >= _HEADERS_KEPT:
            del self._headers[next(iter(self._headers))]
        self._headers[key] = header
        return header

    async def check(
        self,
        spec: ModelSpec,
        parts: Sequence[Path],
        defaults: HarnessConfig,
        default_n_ctx: int | None,
        slots: int = 1,
    ) -> Passed:
        """Raise NotEnoughVram when the devices cannot hold the model, NotEnoughRam when a
        model on the CPU does not fit the host's available memory (unless `force`). Each of
        its `slots` has a KV cache of n_ctx tokens. The caller holds the load lock: the
        header was read before it (`read_header`), unless the files changed since."""
        n_ctx = effective(spec, defaults, "n_ctx")
        if n_ctx is None:
            n_ctx = default_n_ctx
        if n_ctx and slots > 1:
            n_ctx *= slots
        n_gpu_layers = gpu_layers(spec, defaults)
        if not n_gpu_layers:  # on the CPU, as far as the settings say
            await self._check_ram(spec, parts, n_ctx)
            return Passed(spec, None)
        gpus = await self.discovery.refresh()
        if not gpus:
            return Passed(spec, None)  # no nvidia-smi: nothing to check against
        if len(spec.devices) > 1 and not spec.tensor_split:
            spec = dataclasses.replace(spec, tensor_split=vram.split_by_free(spec.devices, gpus))
        if not parts:
            return Passed(spec, None)
        header = await self._header(spec.model_id, parts)
        if header is None:
            return Passed(spec, None)
        need = vram.estimate(header, n_ctx, n_gpu_layers)
        devices = list(spec.devices) or [g.index for g in gpus]
        try:
            vram.check_fits(spec.model_id, need, gpus, devices)
        except NotEnoughVram as exc:
            if not spec.force:
                raise
            log.warning("%s (loading anyway: force = true)", exc.message)
        return Passed(spec, need.total_mb)

    async def _check_ram(self, spec: ModelSpec, parts: Sequence[Path], n_ctx: int | None) -> None:
        """A model on the CPU: its weights and KV cache against the memory the host has
        available now (page cache counts: the weights are mapped from the file)."""
        available = self._available_ram() if parts else None
        if available is None:
            return
        header = await self._header(spec.model_id, parts, on_gpu=False)
        if header is None:
            return
        need = vram.estimate(header, n_ctx, None)
        available_mb = available // vram.MIB
        if need.total_mb <= available_mb:
            return
        short = NotEnoughRam(
            f"{spec.model_id}: not enough free memory: needs about {need.total_mb} MiB "
            f"({need.describe()}) but the host has {available_mb} MiB available; "
            "set force = true to load anyway")
        if not spec.force:
            raise short
        log.warning("%s (loading anyway: force = true)", short.message)

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


def host_available_ram() -> int | None:
    """Bytes the host can give a new process without swapping (MemAvailable)."""
    import psutil  # not at import: `neuronctl start` reaches its first spawn sooner

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError):
        return None


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
