"""Liveness: probing a ready worker, and killing it when it stops answering.

A probe that times out says the worker did not answer in time, unless the loop that
should have read its answer was itself busy elsewhere (a huge listing, a slow callback):
then the timeout measured the supervisor, not the worker, and killing the worker for it
is a self-inflicted outage. So each probe runs under `lag_during`, which measures how late
the loop ran meanwhile, and a failed probe during a stalled loop is not counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ..config import NeuronConfig
from ..models import files as modelfiles
from .worker import Worker

log = logging.getLogger("neuronctl.models")

T = TypeVar("T")

TICK_S = 0.05  # how often the loop is asked to wake while it is measured
# A failed probe during which the loop ran this late (or half the probe's timeout, if
# less) in total is not held against the worker.
LOOP_LAG_TOLERANCE_S = 0.5
# After a failed probe the next one comes this soon (or at the interval, if sooner): a hung
# worker is then told from a slow answer without waiting out a whole interval again.
RETRY_AFTER_FAILURE_S = 0.5


async def lag_during(awaitable: Awaitable[T]) -> tuple[T, float]:
    """`awaitable`'s result, and the seconds the loop woke late meanwhile: summed over
    ticks every TICK_S, the last one (perhaps not yet woken after a stall) included."""
    loop = asyncio.get_running_loop()
    lag = 0.0
    due = loop.time() + TICK_S

    async def tick() -> None:
        nonlocal lag, due
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            lag += max(0.0, now - due)
            due = now + TICK_S

    ticker = asyncio.ensure_future(tick())
    try:
        result = await awaitable
    finally:
        ticker.cancel()
    return result, lag + max(0.0, loop.time() - due)


async def watch(
    model_id: str,
    worker: Worker,
    config: Callable[[], NeuronConfig],
    sleep: Callable[[float], Awaitable[None]],
    log_path: Path,
    hung: list[str],
) -> None:
    """Probe a ready worker; kill it (SIGKILL to its whole group, at once: no polite stop
    for a process that cannot answer) after `liveness_failures` probes in a row that fail
    or time out, saying why in `hung` first. A busy worker still answers: its probe route
    takes no lock (see the harnesses; llama-server answers /health from its HTTP threads
    while its slots generate). `config` is read at each probe: a reload applies."""
    failures = 0
    while True:
        interval = config().liveness_interval_s
        await sleep(min(interval, RETRY_AFTER_FAILURE_S) if failures else interval)
        settings = config()
        timeout = settings.liveness_timeout_s
        answered, lag = await lag_during(worker.answers(timeout))
        if answered:
            failures = 0
            continue
        if lag > min(LOOP_LAG_TOLERANCE_S, timeout / 2):
            log.info("%s: a health check of worker pid %s failed while the supervisor's "
                     "event loop was %.1f s late; not counted", model_id, worker.pid, lag)
            continue
        failures += 1
        if failures < settings.liveness_failures:
            continue
        why = (f"stopped answering health checks ({failures} probes in a row failed or "
               f"took over {timeout:g} s)")
        log.warning("%s: worker pid %s %s; killing it", model_id, worker.pid, why)
        modelfiles.append_line(log_path, f"neuronctl: worker {why}; killed")
        hung.append(why)  # before the kill: its exit wakes the supervisor at once
        await worker.kill()
        return
