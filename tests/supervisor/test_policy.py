"""The restart policy, driven with plain numbers: no processes, no clock, no sleeping."""

from __future__ import annotations

import pytest

from neuronctl.config import ModelSpec, NeuronConfig
from neuronctl.supervisor.policy import GiveUp, History, Restart, RestartPolicy
from neuronctl.supervisor.worker import describe_exit


def policy(**kw: object) -> RestartPolicy:
    base: dict[str, object] = dict(mode="on-failure", max_restarts=5, window_s=600.0,
                                   delay_s=1.0, delay_max_s=60.0, reset_s=60.0)
    base.update(kw)
    return RestartPolicy(**base)  # type: ignore[arg-type]


def crash_loop(p: RestartPolicy, crashes: int, uptime_s: float = 0.1,
               start: float = 1000.0, exit_code: int | None = 1) -> list[Restart | GiveUp]:
    """`crashes` exits in a row, each after `uptime_s` of being ready; the decisions."""
    history = History().ready(start)
    now = start
    decisions: list[Restart | GiveUp] = []
    for _ in range(crashes):
        now += uptime_s
        decision = p.decide(history, exit_code, now)
        decisions.append(decision)
        if isinstance(decision, GiveUp):
            break
        restarted_at = now + decision.after_s
        history = history.restarted(p, now, restarted_at).ready(restarted_at)
        now = restarted_at
    return decisions


def delays(decisions: list[Restart | GiveUp]) -> list[float]:
    return [d.after_s for d in decisions if isinstance(d, Restart)]


def test_backoff_doubles_per_consecutive_crash() -> None:
    assert delays(crash_loop(policy(max_restarts=10, window_s=1e9), 5)) == [1, 2, 4, 8, 16]


def test_backoff_is_capped_at_restart_delay_max() -> None:
    got = delays(crash_loop(policy(max_restarts=20, window_s=1e9, delay_max_s=5.0), 6))
    assert got == [1, 2, 4, 5, 5, 5]


def test_a_healthy_run_of_reset_s_starts_the_backoff_over() -> None:
    p = policy(max_restarts=20, window_s=1e9, reset_s=60.0)
    history = History().ready(0.0)
    for crash in (1.0, 3.0, 8.0):  # three quick crashes: 1, 2, 4
        decision = p.decide(history, 1, crash)
        assert isinstance(decision, Restart)
        up = crash + decision.after_s
        history = history.restarted(p, crash, up).ready(up)
    assert history.ready_since == 12.0
    assert p.decide(history, 1, 13.0) == Restart(8.0)
    # Ready for reset_s, then a crash: back to the first delay.
    assert p.decide(history, 1, 12.0 + 60.0) == Restart(1.0)
    # Just short of reset_s: the streak goes on.
    assert p.decide(history, 1, 12.0 + 59.9) == Restart(8.0)


def test_max_restarts_within_the_window_gives_up_with_a_reason() -> None:
    decisions = crash_loop(policy(max_restarts=3, window_s=600.0), 10)
    assert delays(decisions) == [1, 2, 4]
    last = decisions[-1]
    assert isinstance(last, GiveUp)
    assert last.reason == "gave up after 3 restarts within 600 s; last exit code 1"


def test_giving_up_without_an_exit_code_says_no_none() -> None:
    """Restarts that never spawned a worker have no exit code: not `last exit code none`
    (the lifecycle adds the last error instead)."""
    last = crash_loop(policy(max_restarts=2, window_s=600.0), 10, exit_code=None)[-1]
    assert isinstance(last, GiveUp)
    assert last.reason == "gave up after 2 restarts within 600 s"


def test_restarts_older_than_the_window_do_not_count() -> None:
    p = policy(max_restarts=2, window_s=100.0, reset_s=1e9)
    history = History(restart_times=(0.0, 10.0), consecutive=2, ready_since=20.0)
    assert isinstance(p.decide(history, 1, 50.0), GiveUp)  # both within 100 s
    assert isinstance(p.decide(history, 1, 105.0), Restart)  # the first has aged out
    assert isinstance(p.decide(history, 1, 111.0), Restart)  # both have


def test_the_history_keeps_only_the_window() -> None:
    p = policy(window_s=100.0)
    history = History(restart_times=(0.0, 10.0, 200.0))
    assert history.restarted(p, 250.0, 251.0).restart_times == (200.0, 251.0)


@pytest.mark.parametrize(("mode", "code", "restarts"), [
    ("on-failure", 1, True), ("on-failure", -9, True), ("on-failure", 0, False),
    ("always", 0, True), ("always", 3, True), ("never", 1, False), ("never", 0, False),
])
def test_restart_modes(mode: str, code: int, restarts: bool) -> None:
    decision = policy(mode=mode).decide(History().ready(0.0), code, 5.0)
    assert isinstance(decision, Restart) is restarts
    if not restarts:
        assert isinstance(decision, GiveUp)
        assert decision.reason == f"worker {describe_exit(code)}; restart = {mode}"


def test_a_failed_restart_attempt_counts_whatever_its_exit_code() -> None:
    # Not ready since the last restart: an attempt that exited 0 while starting is still a
    # failure to start, retried under on-failure.
    p = policy()
    history = History().ready(0.0).restarted(p, 1.0, 2.0)
    assert history.ready_since is None
    assert p.decide(history, 0, 3.0) == Restart(2.0)
    assert p.decide(history, None, 3.0) == Restart(2.0)


def test_for_model_takes_per_model_values_over_the_node_defaults() -> None:
    config = NeuronConfig(restart="always", max_restarts=7, restart_window_s=30.0,
                          restart_delay_s=0.5, restart_delay_max_s=4.0, restart_reset_s=9.0)
    assert RestartPolicy.for_model(config, ModelSpec("m")) == RestartPolicy(
        "always", 7, 30.0, 0.5, 4.0, 9.0)
    own = RestartPolicy.for_model(config, ModelSpec("m", restart="never", max_restarts=0))
    assert (own.mode, own.max_restarts) == ("never", 0)
