"""What this host is and which GPUs it has, as nvidia-smi reports them.

No nvidia-smi (a CPU-only host) means no devices, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from .aio import bounded

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


async def _run(*args: str) -> str | None:
    exe = shutil.which(args[0])
    if exe is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, *args[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError:
        return None
    try:
        out, _ = await bounded(proc.communicate(), _NVIDIA_SMI_TIMEOUT_S)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None
    return out.decode("utf-8", "replace") if proc.returncode == 0 else None


class Discovery:
    """Cached GPU readings: nvidia-smi can take a noticeable time on a busy host."""

    def __init__(self) -> None:
        self._gpus: list[Gpu] = []
        self._cuda_version: str | None = None
        self._read_at = -_CACHE_S
        self._lock = asyncio.Lock()

    async def gpus(self) -> list[Gpu]:
        async with self._lock:
            if time.monotonic() - self._read_at >= _CACHE_S:
                query = f"--query-gpu={','.join(GPU_QUERY_FIELDS)}"
                csv = await _run("nvidia-smi", query, "--format=csv,noheader,nounits")
                self._gpus = parse_gpu_csv(csv) if csv else []
                if self._gpus and self._cuda_version is None:
                    self._cuda_version = parse_cuda_version(await _run("nvidia-smi") or "")
                self._read_at = time.monotonic()
            return self._gpus

    async def host(self, harness_names: list[str]) -> dict[str, Any]:
        gpus = await self.gpus()
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
    with contextlib.suppress(OSError):
        info = platform.freedesktop_os_release()
        return info.get("PRETTY_NAME") or info.get("NAME") or platform.system()
    return platform.system()
