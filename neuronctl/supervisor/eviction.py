"""Which loaded model to unload so another fits: the least recently used one that is idle
and not pinned. Pure: the registry gathers the facts, this decides, the registry acts.

Idle means nothing in flight to its worker and nothing waiting in its queue, as the router
counts them at the moment of the decision; the registry unloads the choice without
yielding to the event loop in between, so no request can reach it after it was judged
idle (a request arriving later finds it unloading, and waits for its next load).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Activity:
    """What the router knows of one model's traffic."""

    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0  # monotonic time of its last request; 0: never
    # The idle time its latest request asked for, over the config's ttl_s (Ollama's
    # keep_alive: seconds, negative for never); None: the config's.
    keep_alive_s: float | None = None

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queued > 0


IDLE = Activity()


@dataclass(frozen=True)
class Candidate:
    model_id: str
    activity: Activity
    pinned: bool
    devices: tuple[int, ...]  # () for a CPU model, or one that may use any device
    on_gpu: bool = True  # it offloads layers to a GPU: unloading it frees VRAM


@dataclass(frozen=True)
class Choice:
    """`victim` to unload now; or None, with `busy` saying whether waiting may help (some
    candidate is busy now and may be idle later) or not (all pinned: it never will)."""

    victim: Candidate | None
    busy: bool


def shares_devices(candidate: Candidate, devices: Sequence[int]) -> bool:
    """Whether unloading `candidate` frees memory on `devices` (() means all)."""
    return not candidate.devices or not devices or bool(set(candidate.devices) & set(devices))


def choose(candidates: Iterable[Candidate], devices: Sequence[int] | None = None) -> Choice:
    """The least recently used idle, unpinned candidate; with `devices` (a VRAM shortage
    there), only one holding memory on them."""
    pool = [c for c in candidates if not c.pinned
            and (devices is None or (c.on_gpu and shares_devices(c, devices)))]
    idle = [c for c in pool if not c.activity.busy]
    if idle:
        return Choice(min(idle, key=lambda c: (c.activity.last_used, c.model_id)), False)
    return Choice(None, busy=bool(pool))
