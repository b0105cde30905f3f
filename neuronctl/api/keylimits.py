"""Per-key limits: `rpm` (requests a minute, over a sliding minute) and `max_concurrent`
(requests in flight), checked when a model-serving request arrives, before it reads its
body or takes a place in a model's queue, so a key over its limits costs the node nothing
but the refusal (a 429 with Retry-After).

State per key name, bounded by the configured keys: a reload that removes a key drops its
state, one that keeps the name keeps its count (rotating a key's secret does not reset
its minute).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import errors
from ..keys import Principal

WINDOW_S = 60.0


@dataclass
class _KeyState:
    started: collections.deque[float] = field(default_factory=collections.deque)
    in_flight: int = 0


class KeyLimits:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def in_flight(self, name: str) -> int:
        state = self._keys.get(name)
        return state.in_flight if state is not None else 0

    def keep_only(self, names: set[str]) -> None:
        """Forget the keys a reload removed (their requests in flight still release)."""
        for name in list(self._keys):
            if name not in names and not self._keys[name].in_flight:
                del self._keys[name]

    def take(self, key: Principal) -> Callable[[], None]:
        """One request of `key`, until the function returned is called; raises
        KeyRateLimited (or KeyConcurrencyLimited) when it would pass the key's limits."""
        if key.rpm is None and key.max_concurrent is None:
            return _nothing
        state = self._keys.setdefault(key.name, _KeyState())
        now = self._clock()
        if key.max_concurrent is not None and state.in_flight >= key.max_concurrent:
            raise errors.KeyConcurrencyLimited(
                f"key {key.name!r} has {state.in_flight} requests in flight "
                f"(max_concurrent {key.max_concurrent}); retry when one has finished",
                headers={"Retry-After": "1"})
        if key.rpm is not None:
            started = state.started
            while started and started[0] <= now - WINDOW_S:
                started.popleft()
            while len(started) > key.rpm:  # a reload lowered rpm: the oldest go
                started.popleft()
            if len(started) >= key.rpm:
                wait = max(1, math.ceil(started[0] + WINDOW_S - now))
                raise errors.KeyRateLimited(
                    f"key {key.name!r} sent {len(started)} requests in the last minute "
                    f"(rpm {key.rpm}); retry in {wait} s", headers={"Retry-After": str(wait)})
            started.append(now)
        state.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.in_flight -= 1

        return release


def _nothing() -> None:
    pass
