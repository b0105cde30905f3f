"""Telling systemd what the daemon is doing (sd_notify(3)), without libsystemd.

The protocol is one datagram of newline-separated `KEY=VALUE` lines to the socket named in
`$NOTIFY_SOCKET` (a path, or an abstract socket when it starts with `@`). Without that
variable every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

from ..config import ModelSpec
from ..events import ModelEvent
from ..sdnotify import Notifier
from ..states import ModelStatus, WorkerState
from ..supervisor.activation import ActivationResult

log = logging.getLogger(__name__)

# While a load makes progress, ask for this much more start time at each heartbeat. Only
# matters once activation runs past TimeoutStartSec=: a load that keeps making progress goes
# on; one that stops (no output, no CPU, no I/O) is killed within this window.
EXTEND_TIMEOUT_S = 30.0
HEARTBEAT_S = 10.0


class ActivationStatus:
    """An activation observer that keeps `systemctl status` and the start timeout current."""

    def __init__(self, notifier: Notifier, progress: Callable[[], Hashable],
                 on_status: Callable[[str], None] | None = None) -> None:
        self._notifier = notifier
        self._progress = progress
        self._on_status = on_status  # the same line, for `neuronctl status` (StartingNote)
        self._heartbeat: asyncio.Task[None] | None = None
        self.failed: list[str] = []

    def before(self, index: int, total: int, spec: ModelSpec) -> None:
        self._notifier.status(f"loading {index}/{total}: {spec.model_id}")
        if self._on_status is not None:
            self._on_status(f"loading {index}/{total} {spec.model_id}")
        if self._notifier.enabled and self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def after(self, index: int, total: int, result: ActivationResult) -> None:
        if result.ok:
            self._notifier.status(
                f"loaded {index}/{total}: {result.model_id} in {result.elapsed_s:.1f}s"
            )
        else:
            self.failed.append(result.model_id)
            self._notifier.status(f"failed {index}/{total}: {result.model_id}")

    async def _beat(self) -> None:
        # Starting a load is progress; after that, only a change in what `progress` reports.
        last: Hashable = object()
        while True:
            current = self._progress()
            if current != last:
                self._notifier.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_TIMEOUT_S * 1e6)}")
                last = current
            await asyncio.sleep(HEARTBEAT_S)

    async def finish(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat


async def watchdog(notifier: Notifier) -> None:
    """Ping from the event loop itself, so a wedged loop is what systemd notices."""
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


def summary(results: list[ActivationResult]) -> str:
    """The STATUS= line once activation is over: `2/3 models loaded, 1 failed: MODEL`."""
    if not results:
        return "no default models"
    loaded = sum(r.ok for r in results)
    text = f"{loaded}/{len(results)} models loaded"
    failed = [r.model_id for r in results if not r.ok]
    if failed:
        text += f", {len(failed)} failed: {', '.join(failed)}"
    return text


class _HasState(Protocol):
    @property
    def state(self) -> WorkerState: ...


class NodeStatus:
    """An event subscriber, once the node serves: `systemctl status` then shows what the
    models are doing now (`2 loaded, 1 restarting`), not how activation ended."""

    def __init__(self, notifier: Notifier, models: Callable[[], Iterable[_HasState]]) -> None:
        self._notifier = notifier
        self._models = models

    def __call__(self, event: ModelEvent) -> None:
        if event.old.status is event.new.status and event.new is not WorkerState.STOPPED:
            return  # not a change anyone reading the status line would see
        # A stopped model is on its way out of the table: not counted.
        counts = Counter(m.state.status for m in self._models()
                         if m.state is not WorkerState.STOPPED)
        parts = [f"{counts[s]} {s.value}" for s in ModelStatus if counts[s]]
        self._notifier.status(", ".join(parts) if parts else "no models")
