"""Worker processes watched through a pidfd (supervisor/childproc.py), on both loops the
daemon may run on: the exit is noticed by the loop itself, however the process ends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from neuronctl.supervisor import childproc

LOOPS: dict[str, Callable[[Awaitable[None]], None]] = {
    "asyncio": asyncio.run,  # type: ignore[dict-item]
    "uvloop": uvloop.run,  # type: ignore[dict-item]
}


def started(*command: str) -> childproc.PidfdProcess:
    proc = childproc.spawn(command, dict(os.environ), subprocess.DEVNULL, subprocess.DEVNULL,
                           subprocess.DEVNULL)
    assert proc is not None, "this kernel has pidfds (Linux 5.3+)"
    return proc


@pytest.mark.parametrize("loop", LOOPS)
def test_exit_codes_and_signals_as_asyncio_reports_them(loop: str) -> None:
    async def main() -> None:
        ok = started("sh", "-c", "exit 3")
        assert await asyncio.wait_for(ok.wait(), 10) == 3 and ok.returncode == 3
        killed = started("sleep", "30")
        assert killed.returncode is None
        assert os.getsid(killed.pid) == killed.pid  # a session (and group) of its own
        os.killpg(killed.pid, signal.SIGKILL)
        assert await asyncio.wait_for(killed.wait(), 10) == -signal.SIGKILL

    LOOPS[loop](main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_cancelled_waiter_leaves_the_exit_to_the_others(loop: str) -> None:
    async def main() -> None:
        proc = started("sleep", "30")
        impatient = asyncio.ensure_future(proc.wait())
        patient = asyncio.ensure_future(proc.wait())
        await asyncio.sleep(0.05)
        impatient.cancel()
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(patient, 10) == -signal.SIGTERM
        assert await proc.wait() == -signal.SIGTERM  # asked again after the exit

    LOOPS[loop](main())


def test_a_program_that_cannot_start_raises_and_leaves_nothing(tmp_path: object) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            childproc.spawn(["/nonexistent/llama-server"], {}, subprocess.DEVNULL,
                            subprocess.DEVNULL, subprocess.DEVNULL)

    asyncio.run(main())
