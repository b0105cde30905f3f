"""What this host is and which GPUs it has, as nvidia-smi reports them.

No nvidia-smi (a CPU-only host) means no devices, never an error. Three readings:
`--query-gpu=... --format=csv,noheader,nounits` (one line per GPU), the plain `nvidia-smi`
header (`CUDA Version: 12.2`, the highest the driver supports) and
`--query-compute-apps=pid,used_memory` (VRAM per process, for `vram_used_mb`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..aio import bounded

log = logging.getLogger(__name__)

GPU_QUERY_FIELDS = (
    "index", "name", "memory.total", "memory.used", "memory.free",
    "utilization.gpu", "temperature.gpu", "driver_version",
)
_NVIDIA_SMI_TIMEOUT_S = 5.0
_CACHE_S = 5.0
_CUDA_VERSION = re.compile(r"CUDA Version:\s*([0-9.]+)")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mb: int | None
    memory_used_mb: int | None
    memory_free_mb: int | None
    utilization_pct: int | None
    temperature_c: int | None
    driver_version: str


def _number(text: str) -> int | None:
    # nvidia-smi prints "[N/A]" or "[Not Supported]" for readings a board lacks.
    try:
        return int(float(text))
    except ValueError:
        return None


def parse_gpu_csv(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=<GPU_QUERY_FIELDS> --format=csv,noheader,nounits`.

    Lines that do not have the expected shape are skipped rather than guessed at.
    """
    gpus = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != len(GPU_QUERY_FIELDS) or not cols[0].isdigit():
            continue
        index, name, total, used, free, util, temp, driver = cols
        gpus.append(Gpu(int(index), name, _number(total), _number(used), _number(free),
                        _number(util), _number(temp), driver))
    return gpus


def parse_cuda_version(text: str) -> str | None:
    match = _CUDA_VERSION.search(text)
    return match.group(1) if match else None


def parse_compute_apps(text: str) -> dict[int, int | None]:
    """Parse `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`:
    MiB per process (summed over its GPUs); None where the driver does not say."""
    used: dict[int, int | None] = {}
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 2 or not cols[0].isdigit():
            continue
        pid, mib = int(cols[0]), _number(cols[1])
        before = used.get(pid)
        used[pid] = mib if before is None else before + (mib or 0)
    return used


async def _run(*args: str) -> str | None:
    """stdout of a successful run; None when the program is missing, fails or hangs."""
    exe = shutil.which(args[0])
    if exe is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, *args[1:], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        out, _ = await bounded(proc.communicate(), _NVIDIA_SMI_TIMEOUT_S)
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()  # reaped, never left behind
        if isinstance(exc, asyncio.CancelledError):
            raise
        return None
    return out.decode("utf-8", "replace") if proc.returncode == 0 else None


class Discovery:
    """GPU readings, refreshed in the background every `poll_interval_s` once first asked for,
    so `/health` answers from memory: nvidia-smi can take a second on a busy host."""

    def __init__(self, poll_interval_s: float = _CACHE_S) -> None:
        self.poll_interval_s = poll_interval_s
        self._gpus: list[Gpu] = []
        self._apps: dict[int, int | None] | None = None  # pid -> MiB; None: not known
        self._cuda_version: str | None = None
        self._read_at: float | None = None
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    async def refresh(self) -> list[Gpu]:
        """Read nvidia-smi now (a load deciding on free VRAM wants no stale reading)."""
        self._start_polling()
        async with self._lock:
            query = f"--query-gpu={','.join(GPU_QUERY_FIELDS)}"
            csv = await _run("nvidia-smi", query, "--format=csv,noheader,nounits")
            self._gpus = parse_gpu_csv(csv) if csv else []
            apps = None
            if self._gpus:
                apps = await _run("nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits")
                if self._cuda_version is None:  # the driver does not change under us
                    self._cuda_version = parse_cuda_version(await _run("nvidia-smi") or "")
            self._apps = parse_compute_apps(apps) if apps is not None else None
            self._read_at = time.monotonic()
            return self._gpus

    async def gpus(self) -> list[Gpu]:
        read_at = self._read_at
        if read_at is None or time.monotonic() - read_at >= 2 * self.poll_interval_s:
            return await self.refresh()
        return self._gpus

    def cached_gpus(self) -> list[Gpu]:
        return self._gpus

    def process_vram_mb(self, pids: Iterable[int]) -> int | None:
        """VRAM the processes `pids` hold, from the last reading of nvidia-smi's per-process
        accounting; None when none of them is listed (or the driver does not tell, as in
        many containers)."""
        if not self._apps:
            return None
        listed = [self._apps[p] for p in pids if p in self._apps]
        if not listed or all(v is None for v in listed):
            return None
        return sum(v or 0 for v in listed)

    def listed_pids(self) -> set[int] | None:
        return set(self._apps) if self._apps is not None else None

    def set_poll_interval(self, seconds: float) -> None:
        """A reload's new interval, from now on: a poller asleep on the old one starts over."""
        if seconds == self.poll_interval_s:
            return
        self.poll_interval_s = seconds
        if self._poller is not None and not self._poller.done():
            self._poller.cancel()
            self._poller = None
            self._start_polling()

    def _start_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(), name="nvidia-smi poll"
            )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # a reading is never worth the poller
                log.exception("reading nvidia-smi failed")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def host(self, harness_names: list[str]) -> dict[str, Any]:
        gpus = await self.gpus()
        import platform  # here, not at import: the registry imports this module at start-up

        uname = platform.uname()
        return {
            "hostname": socket.gethostname(),
            "os": _os_name(),
            "kernel": uname.release,
            "arch": uname.machine,
            "cpu_count": os.cpu_count(),
            "cuda_version": self._cuda_version,
            "driver_version": gpus[0].driver_version if gpus else None,
            "devices": [asdict(g) for g in gpus],
            "harnesses": harness_names,
        }


def _os_name() -> str:
    import platform

    with contextlib.suppress(OSError):
        info = platform.freedesktop_os_release()
        return info.get("PRETTY_NAME") or info.get("NAME") or platform.system()
    return platform.system()
