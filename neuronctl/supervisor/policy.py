"""The restart policy: what to do when a worker exits that nobody asked to stop.

Pure: `RestartPolicy.decide(history, exit_code, now)` returns `Restart(after_s)` or
`GiveUp(reason)` and touches nothing; the model's lifecycle does the sleeping (on its own
injected clock) and records what it did with `History.restarted`. So backoff doubling, the
cap, the reset after a healthy run and the flapping guard are all tested with plain
numbers, no processes and no real time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import ModelSpec, NeuronConfig
from .worker import describe_exit


@dataclass(frozen=True)
class Restart:
    after_s: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


Decision = Restart | GiveUp


@dataclass(frozen=True)
class History:
    """What the policy needs to know about a model's past. Monotonic seconds throughout."""

    restart_times: tuple[float, ...] = ()  # when each restart attempt began
    consecutive: int = 0  # restarts since the worker last stayed up for `reset_s`
    ready_since: float | None = None  # the running worker became ready then; None: not up

    def ready(self, now: float) -> History:
        return replace(self, ready_since=now)

    def restarted(self, policy: RestartPolicy, crashed_at: float, now: float) -> History:
        """After a restart attempt that began at `now`, for an exit seen at `crashed_at`."""
        recent = tuple(t for t in self.restart_times if now - t <= policy.window_s)
        return History(
            restart_times=(*recent, now),
            consecutive=policy.consecutive(self, crashed_at) + 1,
            ready_since=None,
        )


@dataclass(frozen=True)
class RestartPolicy:
    mode: str  # "on-failure" | "always" | "never"
    max_restarts: int  # within window_s; then the model is given up on
    window_s: float
    delay_s: float  # the first delay; doubles per consecutive restart
    delay_max_s: float
    reset_s: float  # ready this long: the next crash starts over at delay_s

    @classmethod
    def for_model(cls, config: NeuronConfig, spec: ModelSpec) -> RestartPolicy:
        return cls(
            spec.restart or config.restart,
            config.max_restarts if spec.max_restarts is None else spec.max_restarts,
            config.restart_window_s, config.restart_delay_s, config.restart_delay_max_s,
            config.restart_reset_s,
        )

    def consecutive(self, history: History, now: float) -> int:
        up = history.ready_since
        return 0 if up is not None and now - up >= self.reset_s else history.consecutive

    def decide(self, history: History, exit_code: int | None, now: float) -> Decision:
        """A ready worker exited with `exit_code` (history.ready_since set), or a restart
        attempt failed (ready_since None: counted whatever its code, as a failure to start).
        """
        if history.ready_since is not None and exit_code is not None:
            wanted = self.mode == "always" or (self.mode == "on-failure" and exit_code != 0)
            if not wanted:
                return GiveUp(f"worker {describe_exit(exit_code)}; restart = {self.mode}")
        recent = [t for t in history.restart_times if now - t <= self.window_s]
        if len(recent) >= self.max_restarts:
            # No exit code (a restart that never spawned a worker): the caller adds why.
            last = "" if exit_code is None else f"; last exit code {exit_code}"
            return GiveUp(f"gave up after {len(recent)} restarts within {self.window_s:g} s{last}")
        streak = self.consecutive(history, now)
        return Restart(min(self.delay_max_s, self.delay_s * 2 ** streak))
