"""Journal lines any client can cause, bounded: the first is logged at once, the next ones
within `window_s` are counted, and one line when the window ends says how many there were.
Without it a client sending wrong API keys (or refused reloads) in a loop fills the disk."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

WINDOW_S = 60.0
# Distinct reasons logged at once within one window (`key`): a second, different refused
# reload is said, not only counted; a client cycling reasons is still bounded.
MAX_KEYS = 8


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, what: str, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 level: int = logging.WARNING) -> None:
        self._log = logger
        self._what = what  # "requests refused for their API key", for the summary line
        self.window_s = window_s
        self._clock = clock
        self._level = level
        self._logged_at: float | None = None
        self._since = 0
        self._flush: asyncio.TimerHandle | None = None
        self._keys: set[str] = set()  # the reasons said in this window

    def log(self, message: str, *args: object, key: str | None = None) -> None:
        """Log now, or count it. `key`: what sets this line apart (a refusal's reason); a
        key not yet said in this window is logged at once too, up to MAX_KEYS of them."""
        now = self._clock()
        began = self._logged_at
        within = began is not None and now - began < self.window_s
        if within and key is not None and key not in self._keys \
                and len(self._keys) < MAX_KEYS:
            self._keys.add(key)
            self._log.log(self._level, message, *args)
            return
        if began is not None and within:
            self._since += 1
            if self._flush is None:
                self._schedule(began + self.window_s - now)
            return
        self._log.log(self._level, message, *args)
        self._logged_at = now
        self._keys = {key} if key is not None else set()

    def _schedule(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): the next line reports the count
            return
        self._flush = loop.call_later(max(delay, 0.0), self._summary)

    def _summary(self) -> None:
        self._flush = None
        if self._since:
            self._log.log(self._level, "%d more %s in the last %g s", self._since, self._what,
                          self.window_s)
            self._since = 0
            self._logged_at = self._clock()
