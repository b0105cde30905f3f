"""Journal lines any client can cause, bounded: the first is logged at once, the next ones
within `window_s` are counted, and one line when the window ends says how many there were.
Without it a client sending wrong API keys (or refused reloads) in a loop fills the disk."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

WINDOW_S = 60.0


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

    def log(self, message: str, *args: object) -> None:
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self.window_s:
            self._since += 1
            if self._flush is None:
                self._schedule(self._logged_at + self.window_s - now)
            return
        self._log.log(self._level, message, *args)
        self._logged_at = now

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
